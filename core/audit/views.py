"""What each audit picture needs, computed once per run and cached beside it.

The dashboard's Audit page and the HTML report both call these functions and only draw,
so one run always shows one picture. Expensive views (the drift map: a UMAP fit; Grad-CAM:
two models' gradients) are cached in `<run>/views/*.npz`, keyed by the audit arrays' file
stamp, so an edited or replaced run is recomputed and a read-only run folder just skips the cache.

Drift uses the prediction path everywhere (the features the classifier reads: for StructGuard
the projector's output), for the map, the displacement and the timeline snapshots alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .affinity import anchor_similarity, class_mean_affinity, row_cosine, row_cosine_summary, sample_affinity
from .drift import DriftResult, embedding_drift, project_snapshots

__all__ = ["ACCURACY_ROWS", "TOW_DEFINITION", "AffinityView", "DriftView", "GradCamView", "accuracy_rows",
           "affinity_view", "drift_method", "drift_view", "gradcam_view"]

VIEW_VERSION = 2  # bump when a view's computation changes: older caches are then ignored
# What the Tug-of-War score is, and why a run that forgets every image scores low (Audit page and report).
TOW_DEFINITION = ("Product over A_f, A_r, A_test of (1 - |unlearned - retrained| / 100); 1 = the retrained model. "
                  "The retrained model still recognises most forget images (they look like their class), so a run "
                  "that misclassifies all of them scores low here by design.")
ACCURACY_ROWS = (("forget_acc", "Forget accuracy A_f (%)", "down"), ("retain_acc", "Retain accuracy A_r (%)", "up"),
                 ("test_acc", "Test accuracy A_test (%)", "up"),
                 ("dim_alignment", "Dimensional alignment of forget features", "down"))


def drift_method(method: str | None = None) -> str:
    """The drift map's method: the argument, else $STRUCTGUARD_DRIFT_METHOD, else auto (UMAP when installed)."""
    return method or os.environ.get("STRUCTGUARD_DRIFT_METHOD") or "auto"


# ------------------------------------------------------------------------------------ the disk cache


# Fits (not reads) take turns in this process: a page that asks for a view while the dashboard's pump fits it
# waits, then reads the pump's cache instead of fitting it again. One lock: fits already share the two cores.
_FIT_LOCK = threading.Lock()


def _stamp(run_dir: Path, *parts: Any) -> str:
    """Identity of the inputs of a view: the audit file's size and mtime plus the view's own parameters."""
    st = (run_dir / "audit.npz").stat()
    return hashlib.sha1(repr((VIEW_VERSION, st.st_size, st.st_mtime_ns, parts)).encode()).hexdigest()[:16]


def _read_cache(path: Path, stamp: str) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["stamp"]) != stamp:
                return None
            return {k: z[k] for k in z.files}
    except Exception:  # absent, damaged or from another version: recompute
        return None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomic write (core.runs.write_atomic: a hidden temporary file, removed on failure, renamed into place
    with the umask's permissions); a run folder that cannot be written (read-only, full disk) is simply
    not cached and keeps no partial file."""
    from ..runs import StorageError, write_atomic

    try:
        write_atomic(path, writer=lambda f: np.savez(f, **arrays), what="the audit view cache", parents=False)
    except StorageError as exc:
        warnings.warn(f"audit view not cached: {exc}", stacklevel=3)


# ------------------------------------------------------------------------------------------- drift


@dataclass
class DriftView:
    """The drift map of a run: original and unlearned positions, per-class numbers, and the timeline."""

    result: DriftResult
    frames: np.ndarray | None = None      # [T, M, 2] snapshots placed in the same map
    steps: list[int] = field(default_factory=list)
    frame_notes: list[str] = field(default_factory=list)
    spread: list[float] = field(default_factory=list)   # mean within-class spread of kept points per frame
    features: str = "feats_before -> feats_after"  # the audit arrays compared

    @property
    def before_xy(self) -> np.ndarray | None:
        """The original positions as the timeline's first frame when the snapshots do not start at step 0."""
        return self.result.before if self.steps and self.steps[0] != 0 else None


def drift_view(run_dir: str | Path, audit: dict[str, np.ndarray], meta: dict, method: str | None = None,
               n_classes: int | None = None, space: str = "prediction") -> DriftView:
    """One reducer fitted on the original prediction-path features of the audit sample; the unlearned
    features and every snapshot are placed in it. Raises KeyError when the run lacks the arrays.

    space="backbone" (the report's `--drift-space backbone`) places the unlearned backbone h(x) instead,
    to show what StructGuard's projector hides; it has no timeline (snapshots are prediction-path).
    """
    if space not in ("prediction", "backbone"):
        raise ValueError(f"drift space must be prediction or backbone, not {space!r}")
    run_dir, method = Path(run_dir), drift_method(method)
    labels, groups = audit["labels"].astype(np.int64), audit["group"].astype(str)
    n_classes = n_classes or int(labels.max() + 1 if labels.size else 0)
    after_key = "backbone_after" if space == "backbone" else "feats_after"
    stamp = _stamp(run_dir, "drift", method, n_classes, space)
    path = run_dir / "views" / f"drift-{space}-{method}.npz"
    cached = _read_cache(path, stamp)
    if cached is None:
        with _FIT_LOCK:
            cached = _read_cache(path, stamp)  # another thread may have written it while this one waited
            if cached is None:
                result, reducer = embedding_drift(audit["feats_before"], audit[after_key], labels, groups,
                                                  n_classes=n_classes, method=method)
                frames = None
                if space == "prediction" and "snapshots" in audit and len(audit.get("snapshot_steps", [])):
                    frames = project_snapshots(reducer, audit["snapshots"])
                cached = {"stamp": np.array(stamp), "before": result.before, "after": result.after,
                          "displacement": result.displacement, "rel": result.rel_feature_shift,
                          "scale": np.array(result.scale), "method": np.array(result.method),
                          "note": np.array(result.note), "per_class": np.array(json.dumps(result.per_class))}
                if frames is not None:
                    cached["frames"] = frames
                _write_cache(path, cached)
    result = DriftResult(cached["before"], cached["after"], labels, groups, cached["displacement"], cached["rel"],
                         float(cached["scale"]), str(cached["method"]), json.loads(str(cached["per_class"])),
                         str(cached["note"]))
    view = DriftView(result, features=f"feats_before -> {after_key}")
    if "frames" in cached:
        view.frames = cached["frames"]
        view.steps = [int(s) for s in audit["snapshot_steps"]]
        hist = {int(h["step"]): h.get("forget_acc") for h in meta.get("history") or []
                if isinstance(h, dict) and "step" in h}
        view.frame_notes = [f"forget accuracy {hist[s]:.0f}%" if isinstance(hist.get(s), (int, float)) else ""
                            for s in view.steps]
        view.spread = [_spread(fr, labels, groups) for fr in view.frames]
    return view


def _spread(xy: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    keep = groups != "forget"
    d = [np.linalg.norm(xy[keep & (labels == c)] - xy[keep & (labels == c)].mean(0), axis=1).mean()
         for c in np.unique(labels[keep])]
    return float(np.mean(d)) if d else float("nan")


# ---------------------------------------------------------------------------------------- affinity


@dataclass
class AffinityView:
    s_ori: np.ndarray                 # [M, C] affinity of every audit sample to every anchor, original model
    s_unl: np.ndarray                 # the same, unlearned model
    anchor_similarity: np.ndarray     # [C, C] cosine between the class anchors
    class_mean_before: np.ndarray     # [C, C] mean affinity per class of the retained and test samples
    class_mean_after: np.ndarray
    row_cosine: np.ndarray            # [M] cosine of each sample's affinity row before vs after
    summary: dict[str, dict]          # row cosine per group
    recomputed: bool = False          # True when the run stored no affinities (recomputed from features)


def affinity_view(audit: dict[str, np.ndarray], n_classes: int) -> AffinityView:
    """Anchor affinities of the audit sample; class means use the kept samples only (forget rows are meant
    to move). Raises KeyError when neither the affinities nor the features, anchors and R are stored."""
    s_ori, s_unl = audit.get("affinity_before"), audit.get("affinity_after")
    recomputed = s_ori is None or s_unl is None
    if recomputed:
        s_ori = sample_affinity(audit["feats_before"], audit["anchors"], audit.get("R"))
        s_unl = sample_affinity(audit["feats_after"], audit["anchors"], audit.get("R"))
    labels, groups = audit["labels"].astype(np.int64), audit["group"].astype(str)
    keep = groups != "forget"
    cos = row_cosine(s_ori, s_unl)
    return AffinityView(s_ori, s_unl, anchor_similarity(audit["anchors"]),
                        class_mean_affinity(s_ori[keep], labels[keep], n_classes),
                        class_mean_affinity(s_unl[keep], labels[keep], n_classes), cos,
                        row_cosine_summary(cos, groups), recomputed)


# ---------------------------------------------------------------------------------------- grad-cam


@dataclass
class GradCamView:
    """Grad-CAM for the TRUE label of a few forget images and a retained image of the same class each."""

    rows: np.ndarray                  # audit rows shown: forget rows first, then retained rows
    n_forget: int                     # how many of `rows` are forget images
    images: np.ndarray                # [N, C, H, W] in [0, 1]
    cams_before: np.ndarray           # [N, H, W]
    cams_after: np.ndarray
    pred_before: np.ndarray
    pred_after: np.ndarray
    prob_before: np.ndarray           # p(true label)
    prob_after: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    before_source: str                # "model NAME" or "parent run ID"
    notes: list[str] = field(default_factory=list)      # worth knowing (uploads are not shown)
    warnings: list[str] = field(default_factory=list)   # the picture may mislead (the base weights changed)

    def evidence_kept(self) -> dict[str, float | None]:
        """Sum of the maps after / before, for forget and retained images (None when nothing before)."""
        def kept(sl: slice) -> float | None:
            b = float(self.cams_before[sl].sum())
            return float(self.cams_after[sl].sum()) / b if b > 0 else None
        return {"forget": kept(slice(0, self.n_forget)), "retained": kept(slice(self.n_forget, None))}


def pick_gradcam_rows(audit: dict[str, np.ndarray], n_forget: int) -> tuple[list[int], list[int]]:
    """Forget rows with a dataset id (uploads are not stored), then one retained row of each one's class."""
    groups, ids, labels = audit["group"].astype(str), audit["ids"], audit["labels"]
    f_rows = [int(i) for i in np.flatnonzero(groups == "forget") if ids[i] >= 0][:n_forget]
    r_rows: list[int] = []
    for i in f_rows:
        cand = [int(j) for j in np.flatnonzero((groups == "retain") & (labels == labels[i])) if j not in r_rows]
        r_rows += cand[:1]
    if not r_rows:
        r_rows = [int(j) for j in np.flatnonzero(groups == "retain")[:max(1, n_forget)]]
    return f_rows, r_rows


def _before_model(run_dir: Path, meta: dict) -> tuple[Any, str, list[str]]:
    from ..engine import load_unlearned
    from ..models import load_model

    parent = meta.get("parent_run")
    if parent:
        return load_unlearned(run_dir.parent / parent), f"parent run {parent}", []
    name = (meta.get("model") or {}).get("name")
    if not name:
        raise ValueError("run.json does not name the original model")
    loaded = load_model(name)
    want = (meta.get("model") or {}).get("weights_sha256")
    notes = [f"the weights of {name} changed since this run (sha256 differs); the 'original' maps use the "
             "current file"] if want and loaded.card.get("weights_sha256") != want else []
    return loaded.model, f"model {name}", notes


def gradcam_view(run_dir: str | Path, audit: dict[str, np.ndarray], meta: dict, n_forget: int = 4,
                 device: str | None = None) -> GradCamView:
    """Grad-CAM maps before and after (captum LayerGradCam on the last conv stage), cached per n_forget.
    Raises (ValueError, RunError, model errors) when a model or the dataset cannot be loaded."""
    import torch

    from ..engine import load_unlearned
    from ..pipeline import cached_dataset
    from .gradcam import grad_cam_before_after

    run_dir = Path(run_dir)
    f_rows, r_rows = pick_gradcam_rows(audit, n_forget)
    rows = f_rows + r_rows
    if not rows:
        raise ValueError("no forget or retained images in the audit sample")
    groups, ids, labels = audit["group"].astype(str), audit["ids"], audit["labels"].astype(np.int64)
    notes = ["uploaded forget images are not stored in the run; they are not shown"] \
        if (ids[groups == "forget"] < 0).any() else []
    stamp = _stamp(run_dir, "gradcam", rows, (run_dir / "model.safetensors").stat().st_mtime_ns)
    path = run_dir / "views" / f"gradcam-{n_forget}.npz"
    cached = _read_cache(path, stamp)
    if cached is None:
        before, source, model_warnings = _before_model(run_dir, meta)
        ds = cached_dataset((meta.get("dataset") or {}).get("name") or "fashion-mnist",
                            (meta.get("request") or {}).get("data_dir"))
        split = {"forget": ds.train, "retain": ds.train, "test": ds.test}
        images = torch.cat([split[groups[i]].images(split[groups[i]].positions([int(ids[i])])) for i in rows])
        dev = torch.device(device or "cpu")
        # private copies on the device: captum hooks the layer and back-propagates into it
        cb, ca = grad_cam_before_after(before.to(dev).eval(), load_unlearned(run_dir).to(dev).eval(), images,
                                       labels[rows], device=dev)
        cached = {"stamp": np.array(stamp), "images": images.numpy(), "cams_before": cb.cams, "cams_after": ca.cams,
                  "pred_before": cb.pred, "pred_after": ca.pred, "prob_before": cb.prob_target,
                  "prob_after": ca.prob_target, "source": np.array(source),
                  "warnings": np.array(model_warnings, dtype=str)}
        _write_cache(path, cached)
    return GradCamView(np.array(rows), len(f_rows), cached["images"], cached["cams_before"], cached["cams_after"],
                       cached["pred_before"], cached["pred_after"], cached["prob_before"], cached["prob_after"],
                       ids[rows], labels[rows], str(cached["source"]), notes, [str(n) for n in cached["warnings"]])


# ------------------------------------------------------------------------------------------ metrics


def polish_record(meta: dict) -> dict | None:
    """run.json's record of a run's polish steps ("from", "until", "returned", "pick"), or None without a whole one."""
    p = meta.get("polish")
    return p if isinstance(p, dict) and all(isinstance(p.get(k), int) for k in ("from", "until", "returned")) else None


def returned_step(meta: dict) -> str | None:
    """Which update step's weights a run with polish steps returned, in words (None without polish steps)."""
    if (p := polish_record(meta)) is None:
        return None
    how = "the lowest mixture KL" if p.get("pick") == "mix_kl" else "the last forgotten state"
    return (f"weights from step {p['returned']}: {how} of the polish steps {p['from']}-{p['until']} "
            f"(every forget image first misclassified at step {p['from']})")


def forget_auc_caption(mia: dict, meta: dict) -> str | None:
    """The threshold-free forget AUC of the original and the unlearned model (MIAResults by side, from
    core.audit.mia.mia_before_after) and of the retrained model when the run has a reference, in words."""
    parts = [f"{name} {mia[side].forget_auc:.2f}" for side, name in (("before", "original"), ("after", "unlearned"))
             if side in mia and mia[side].forget_auc == mia[side].forget_auc]
    ref = (meta.get("metrics") or {}).get("retrain")
    retrained = (ref.get("mia_forget_auc") or {}).get("retrain") if isinstance(ref, dict) else None
    if isinstance(retrained, (int, float)):
        parts.append(f"retrained {retrained:.2f}")
    if not parts:
        return None
    return ("Forget AUC vs test, the chance that a forget image gets more confidence in its label than an unseen "
            "test image (0.5: like unseen data; lower: less sure of it than of unseen data): " + ", ".join(parts) + ".")


def accuracy_rows(meta: dict) -> list[dict]:
    """Before, after and (when a retrained model exists) retrained numbers with their deltas."""
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    ref = metrics.get("retrain") if isinstance(metrics.get("retrain"), dict) else None
    out = []
    for key, label, good in ACCURACY_ROWS:
        b, a = before.get(key), after.get(key)
        r = ref.get(key) if ref else None
        num = all(isinstance(v, (int, float)) for v in (a, r))
        out.append({"key": key, "label": label, "good": good, "before": b, "after": a,
                    "delta": a - b if all(isinstance(v, (int, float)) for v in (a, b)) else None,
                    "retrain": r, "gap": a - r if num else None})
    return out
