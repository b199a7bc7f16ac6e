"""Confidence-based membership inference (MIA) on the forget set, before and after unlearning.

Definition (also printed in the report):

    Score of a sample = the model's softmax probability of the sample's TRUE label.
    The attacker calls a sample a "member" (seen in training) when its score is at
    least a threshold t. t is calibrated on samples whose membership is known:
    retained training samples (members) versus test samples (non-members), choosing
    the t that maximises balanced accuracy (TPR + TNR) / 2 on them. Attack accuracy
    (balanced) and ROC AUC are reported on those calibration samples. The attack is
    then applied to the forget set: the share of forget samples called "member".
    Before and after are calibrated separately, each on its own model's scores.

    Forget AUC (no threshold): the probability that a forget sample scores higher
    than a test sample (ties count one half). 0.5: the forget samples look like
    data the model never saw; above 0.5: like training data; below 0.5: the model
    is less sure of them than of unseen data.

Reading it: before unlearning the forget samples are training members, so their
member rate is close to the retain rate. After successful unlearning it should fall
to about the test rate (the false-positive rate on unseen data): the forget samples
then look like data the model never saw. Far below the test rate is itself a signal
(the Streisand effect: an over-forgotten sample is recognisable again). With a
well-generalising model the attack is weak (accuracy near 0.5); that is a property
of the model, and the report says so rather than hiding it. The member rate then
depends on where the threshold happens to fall, so it can jump between 0 and 1
from one forget set to the next; the forget AUC does not depend on a threshold.
A retrained model, which never saw the forget samples, puts it near 0.5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["MIA_DEFINITION", "MIAResult", "calibrate_threshold", "confidence_mia", "mia_before_after",
           "rank_auc", "roc"]

MIA_DEFINITION = __doc__.split("Definition (also printed in the report):", 1)[1].strip()


@dataclass
class MIAResult:
    threshold: float
    attack_accuracy: float     # balanced accuracy on retain (members) vs test (non-members)
    auc: float                 # ROC AUC of the confidence score on the same samples
    member_rate_retain: float  # TPR at the threshold
    member_rate_test: float    # FPR at the threshold: the rate an unseen sample is called member
    member_rate_forget: float  # share of forget samples called member
    forget_auc: float          # P(forget score > test score), ties one half: 0.5 = like unseen data
    n_retain: int
    n_test: int
    n_forget: int

    def as_dict(self) -> dict:
        return asdict(self)


def _clean(x: np.ndarray | None) -> np.ndarray:
    x = np.asarray([] if x is None else x, dtype=np.float64).ravel()
    return x[np.isfinite(x)]


def roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of `score >= t` at every distinct score, highest first, after a first point
    (0, 0) at t = +inf: scikit-learn's roc_curve without dropping collinear points, which changes neither
    the best balanced accuracy nor the area. Ours because scikit-learn's import (0.9 s) was a twentieth of
    a cold k=32 run with a retrain reference; tests/test_audit.py checks it against scikit-learn."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order].astype(bool)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last row of each run of equal scores
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    return (np.r_[0.0, fps / max(len(y) - y.sum(), 1)], np.r_[0.0, tps / max(y.sum(), 1)], np.r_[np.inf, s[last]])


def _area(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The area under roc()'s curve by trapezoids: a tie between a member and a non-member counts one half."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def rank_auc(higher: np.ndarray, lower: np.ndarray) -> float:
    """P(a score of `higher` > a score of `lower`), a tie counting one half (the ROC AUC of `higher` as positives).
    NaN when either side is empty."""
    a, b = _clean(higher), _clean(lower)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    fpr, tpr, _ = roc(np.r_[np.ones(len(a)), np.zeros(len(b))], np.r_[a, b])
    return _area(fpr, tpr)


def calibrate_threshold(member_conf: np.ndarray, nonmember_conf: np.ndarray) -> tuple[float, float, float]:
    """Threshold maximising balanced accuracy of `score >= t`; returns (t, balanced accuracy, AUC)."""
    m, n = _clean(member_conf), _clean(nonmember_conf)
    if len(m) == 0 or len(n) == 0:
        raise ValueError("membership inference needs member (retain) and non-member (test) confidences")
    y = np.r_[np.ones(len(m)), np.zeros(len(n))]
    s = np.r_[m, n]
    fpr, tpr, thr = roc(y, s)
    j = np.argmax(tpr - fpr)  # Youden's J == maximal balanced accuracy
    t = float(thr[j])
    if not np.isfinite(t):  # the first threshold is +inf ("nobody is a member")
        t = float(s.max()) + 1e-12
    return t, float((tpr[j] + 1 - fpr[j]) / 2), _area(fpr, tpr)


def confidence_mia(retain_conf: np.ndarray, test_conf: np.ndarray, forget_conf: np.ndarray) -> MIAResult:
    """Calibrate on retain vs test confidences of one model, then score that model's forget confidences."""
    r, te, f = _clean(retain_conf), _clean(test_conf), _clean(forget_conf)
    t, acc, auc = calibrate_threshold(r, te)

    def rate(v: np.ndarray) -> float:
        return float((v >= t).mean()) if len(v) else float("nan")

    return MIAResult(t, acc, auc, rate(r), rate(te), rate(f), rank_auc(f, te), len(r), len(te), len(f))


def mia_before_after(audit: dict[str, np.ndarray]) -> dict[str, MIAResult]:
    """Before/after MIA from a run's audit arrays (keys as in docs/ARCHITECTURE.md).

    Forget confidences are `conf_before/after` where `group == "forget"`. Missing keys
    make the corresponding side absent from the result rather than failing.
    """
    out: dict[str, MIAResult] = {}
    groups = np.asarray(audit.get("group", [])).astype(str)
    for side in ("before", "after"):
        keys = (f"retain_conf_{side}", f"test_conf_{side}", f"conf_{side}")
        if not all(k in audit for k in keys) or len(groups) != len(audit[keys[2]]):
            continue
        forget = np.asarray(audit[keys[2]])[groups == "forget"]
        try:
            out[side] = confidence_mia(audit[keys[0]], audit[keys[1]], forget)
        except ValueError:
            continue
    return out
