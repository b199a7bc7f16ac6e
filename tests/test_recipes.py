"""The maths of each recipe, pinned by hand, and the determinism of a run.

Each method runs through the real loop (`run_unlearning`) on a tiny model whose weights are
written out below (4 pixels -> Linear -> BatchNorm -> ReLU: 3 features -> Linear: 3 classes) and
four forget images, one of them already misclassified. The batch size exceeds the proxy set, so
every step sees the whole forget set and the whole proxy set (batch order does not change a mean)
and two steps can be followed exactly: the terms the run records at step 1 (at theta_0), one SGD
step with momentum and weight decay, the terms at step 2, and the weights after step 2 are all
recomputed here with plain tensor operations (the forward pass, cross-entropy, the three deletion
forms, S = norm(f R) A^T, cosines, importance gradients with autograd) and compared with what the
run recorded (DESIGN.md section 5, docs/METHOD.md). The only thing taken from the run is its
proxy set (PGD is pinned in test_engine.py).

`deletion_loss` on fixed logits is pinned in test_engine.py::test_deletion_forms_by_hand; here the
forms are checked inside the recipes (the weight w_f, the path through the projector).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import write_fashion_idx

from core.engine import Callbacks, anchor_map, run_unlearning, wrap
from core.methods import L2UL, Context, UnlearnConfig, affinity, default_config, jointly
from core.train import prepare_model, to_device_format

C, D, E = 3, 3, 4          # classes, feature dimension, anchor dimension (d != e: R is the seeded Gaussian map)
BN_EPS = 1e-5              # BatchNorm's eps (torch's default, used by the tiny model and the projector)
FORMS = ["hinge", "hinge_active", "masked_ce", "ce"]

# Four 2x2 images; the tiny model predicts 0, 1, 2, 0. The last one is labelled 1: already forgotten.
X = torch.tensor([[0.9, 0.1, 0.2, 0.1], [0.1, 0.9, 0.1, 0.3], [0.2, 0.1, 0.1, 0.9],
                  [0.6, 0.5, 0.4, 0.2]]).view(4, 1, 2, 2)
Y = torch.tensor([0, 1, 2, 1])
# Anchors: C x E, unit rows.
ANCHORS = F.normalize(torch.tensor([[1.0, 0.2, 0.0, -0.3], [0.1, 1.0, 0.4, 0.0], [-0.2, 0.3, 1.0, 0.5]]), dim=1)


class Tiny(nn.Module):
    """The engine's model interface (features / classify / linear / feature_dim) with written-out weights."""

    feature_dim = D

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, D)
        self.bn = nn.BatchNorm1d(D)
        self.linear = nn.Linear(D, C)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, -0.5, 0.25, 0.0], [-0.5, 1.0, 0.0, 0.5],
                                               [0.25, 0.0, -0.75, 1.0]]))
            self.fc.bias.copy_(torch.tensor([2.0, 1.5, 2.5]))
            # running statistics far from any batch's: a step that used batch statistics would not match
            self.bn.running_mean.copy_(torch.tensor([2.25, 1.75, 2.5]))
            self.bn.running_var.copy_(torch.tensor([0.25, 0.5, 1.0]))
            self.bn.weight.copy_(torch.tensor([1.0, 0.8, 1.2]))
            self.bn.bias.copy_(torch.tensor([2.0, 2.0, 2.0]))  # features stay > 0 on [0, 1] inputs
            self.linear.weight.copy_(torch.tensor([[1.5, -0.5, -0.5], [-0.5, 1.5, -0.5], [-0.5, -0.5, 1.5]]))
            self.linear.bias.copy_(torch.tensor([0.0, 0.1, -0.1]))
        self.eval()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.fc(x.flatten(1))))

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


# ------------------------------------------------------- the maths, by hand


BACKBONE = ("fc.weight", "fc.bias", "bn.weight", "bn.bias", "linear.weight", "linear.bias")
PROJECTOR = ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")


def tiny_weights() -> dict[str, torch.Tensor]:
    """theta_0 as plain tensors; the parameters are leaves that autograd can differentiate."""
    state = Tiny().state_dict()
    return {k: v.detach().clone().requires_grad_(k in BACKBONE) for k, v in state.items()}


def bn_eval(z: torch.Tensor, mean, var, weight, bias) -> torch.Tensor:
    return (z - mean) / torch.sqrt(var + BN_EPS) * weight + bias


def h(P: dict, x: torch.Tensor) -> torch.Tensor:
    """Backbone features, BatchNorm with its running statistics (bn="frozen")."""
    z = x.flatten(1) @ P["fc.weight"].T + P["fc.bias"]
    return bn_eval(z, P["bn.running_mean"], P["bn.running_var"], P["bn.weight"], P["bn.bias"]).clamp_min(0)


def classify(P: dict, f: torch.Tensor) -> torch.Tensor:
    return f @ P["linear.weight"].T + P["linear.bias"]


def project(Q: dict, f: torch.Tensor) -> torch.Tensor:
    """p_w: Linear -> BatchNorm (running statistics) -> ReLU -> Linear."""
    z = f @ Q["0.weight"].T + Q["0.bias"]
    z = bn_eval(z, Q["1.running_mean"], Q["1.running_var"], Q["1.weight"], Q["1.bias"]).clamp_min(0)
    return z @ Q["3.weight"].T + Q["3.bias"]


def identity_projector(f_ori: torch.Tensor) -> dict[str, torch.Tensor]:
    """docs/METHOD.md: both linear layers I, BatchNorm's statistics and affine set to the features' mean / std."""
    mean, var = f_ori.mean(0), f_ori.var(0, unbiased=True)
    Q = {"0.weight": torch.eye(D), "0.bias": torch.zeros(D), "1.weight": torch.sqrt(var + BN_EPS), "1.bias": mean,
         "3.weight": torch.eye(D), "3.bias": torch.zeros(D), "1.running_mean": mean, "1.running_var": var}
    return {k: v.detach().clone().requires_grad_(k in PROJECTOR) for k, v in Q.items()}


def ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy: -log softmax(z)_y."""
    return per_row_ce(z, y).mean()


def per_row_ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    log_p = z - torch.log(torch.exp(z - z.max(1, keepdim=True).values).sum(1, keepdim=True)) \
        - z.max(1, keepdim=True).values
    return -log_p[torch.arange(len(y)), y]


def deletion(z: torch.Tensor, y: torch.Tensor, form: str, margin: float = 1.0) -> torch.Tensor:
    if form == "ce":  # the published ascent
        return -ce(z, y)
    if form == "masked_ce":  # ascent only on rows still classified correctly; divided by the batch size
        still = (z.argmax(1) == y).float()
        return -(per_row_ce(z, y) * still).sum() / len(y)
    rows = torch.arange(len(y))
    true = z[rows, y]
    other = torch.stack([torch.cat([z[i, :y[i]], z[i, y[i] + 1:]]).max() for i in range(len(y))])
    rows_loss = torch.clamp(margin + true - other, min=0)  # hinge: relu(m + z_y - max_{j != y} z_j)
    if form == "hinge_active":  # averaged over the rows still pushed (at least one)
        return rows_loss.sum() / max(1, int((rows_loss > 0).sum()))
    return rows_loss.mean()


def structure(f: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """S = norm(f R) A^T."""
    fr = f @ R
    return (fr / torch.sqrt((fr * fr).sum(1, keepdim=True))) @ ANCHORS.T


def one_minus_mean_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - per_row_cos(a, b).mean()


def per_row_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1))


def seeded_r(seed: int) -> torch.Tensor:
    """R for d != e: a seeded Gaussian d x e matrix with unit columns."""
    r = torch.randn(D, E, generator=torch.Generator().manual_seed(seed))
    return r / torch.sqrt((r * r).sum(0, keepdim=True))


R_MAP = seeded_r(0)  # the engine's R for seed 0 (checked against anchor_map below)


def sgd(W: dict, terms_total: torch.Tensor, lr: dict[str, float], wd: float, momentum: float,
        buf: dict | None) -> tuple[dict, dict]:
    """One step of torch.optim.SGD by its documented rule: d = g + wd w; b = momentum b + d (b = d at
    the first step); w <- w - lr b. Returns the new weights (leaves again) and the momentum buffers."""
    names = list(lr)
    grads = torch.autograd.grad(terms_total, [W[n] for n in names])
    new, bufs = dict(W), {}
    for n, g in zip(names, grads, strict=True):
        d = g + wd * W[n].detach()
        bufs[n] = d if buf is None else momentum * buf[n] + d
        new[n] = (W[n].detach() - lr[n] * bufs[n]).requires_grad_(True)
    return new, bufs


def accuracy(z: torch.Tensor, y: torch.Tensor) -> float:
    return float((z.argmax(1) == y).float().mean() * 100)


def assert_term(recorded: float, by_hand: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(torch.tensor(recorded, dtype=torch.float64), by_hand.detach().double(),
                               rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def assert_record(rec: dict, terms: dict[str, torch.Tensor], acc: float, step: int) -> None:
    assert rec["step"] == step and set(rec["terms"]) == set(terms), (step, rec["terms"])
    for name, value in terms.items():
        assert_term(rec["terms"][name], value, f"step {step} term {name}")
    assert_term(rec["loss"], torch.stack(list(terms.values())).sum(), f"step {step} total")
    assert rec["forget_acc"] == acc, (step, rec["forget_acc"], acc)


def assert_weights(model: nn.Module, W: dict[str, torch.Tensor], names, prefix: str) -> None:
    got = dict(model.named_parameters())
    for n in names:
        torch.testing.assert_close(got[prefix + n].detach(), W[n].detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=n: f"{prefix}{n} after step 2: {m}")


def config(method: str, **kw) -> UnlearnConfig:
    """Written out in full, so the test does not move when the tuned defaults do."""
    base = dict(method=method, lr=0.05, projector_lr=0.1, momentum=0.9, weight_decay=0.01, eps=0.5, pgd_step=0.125,
                pgd_iters=3, n_adv=2, batch_size=64, max_epochs=2, seed=0, bn="frozen", margin=1.0)
    return UnlearnConfig(**dict(base, **kw))


def run(cfg: UnlearnConfig):
    out = run_unlearning(Tiny(), X, Y, C, cfg, ANCHORS if cfg.method == "structguard" else None)
    assert out.steps == 2 and out.stop_reason == "max_epochs" and len(out.history) == 3
    assert out.history[0]["forget_acc"] == 75.0 and out.history[0]["terms"] == {}
    return out


# ------------------------------------------------------------------ recipes


def test_the_tiny_model_and_its_hand_forward_agree():
    """The hand forward pass is the model's (otherwise every comparison below is void)."""
    P, m = tiny_weights(), Tiny()
    with torch.no_grad():
        torch.testing.assert_close(h(P, X), m.features(X))
        torch.testing.assert_close(classify(P, h(P, X)), m(X))
    assert m(X).argmax(1).tolist() == [0, 1, 2, 0]
    assert torch.isfinite(m(X)).all() and (m.features(X) > 0.5).all()  # ReLU active everywhere


@pytest.mark.parametrize("form", FORMS)
def test_neggrad_terms_by_hand(form):
    """del = deletion(f(x_f), y_f) on the whole forget set; two SGD steps (momentum, weight decay) by hand."""
    cfg = config("neggrad", deletion=form)
    out = run(cfg)
    W0 = tiny_weights()
    lr = {n: cfg.lr for n in BACKBONE}

    t1 = {"del": deletion(classify(W0, h(W0, X)), Y, form)}
    W1, buf = sgd(W0, sum(t1.values()), lr, cfg.weight_decay, cfg.momentum, None)
    assert_record(out.history[1], t1, accuracy(classify(W1, h(W1, X)), Y), 1)  # accuracy after the step

    t2 = {"del": deletion(classify(W1, h(W1, X)), Y, form)}
    W2, _ = sgd(W1, sum(t2.values()), lr, cfg.weight_decay, cfg.momentum, buf)
    assert_record(out.history[2], t2, accuracy(classify(W2, h(W2, X)), Y), 2)
    assert_weights(out.model, W2, BACKBONE, "backbone.")
    # minimising the term: it went down (for ce: the forget cross-entropy went up)
    assert out.history[2]["terms"]["del"] < out.history[1]["terms"]["del"]


@pytest.mark.parametrize("form", FORMS)
def test_adv_terms_by_hand(form):
    """del = w_f deletion(f(x_f), y_f), ret = w_a CE(f(x_adv), y_adv), w the batch-size fractions."""
    cfg = config("adv", deletion=form)
    out = run(cfg)
    xa, ya = out.proxy
    assert len(xa) == len(X) * cfg.n_adv
    w_f, w_a = len(X) / (len(X) + len(xa)), len(xa) / (len(X) + len(xa))  # 1/3, 2/3
    W0 = tiny_weights()
    lr = {n: cfg.lr for n in BACKBONE}

    def terms(W):
        return {"del": w_f * deletion(classify(W, h(W, X)), Y, form), "ret": w_a * ce(classify(W, h(W, xa)), ya)}

    t1 = terms(W0)
    W1, buf = sgd(W0, sum(t1.values()), lr, cfg.weight_decay, cfg.momentum, None)
    assert_record(out.history[1], t1, accuracy(classify(W1, h(W1, X)), Y), 1)
    t2 = terms(W1)
    W2, _ = sgd(W1, sum(t2.values()), lr, cfg.weight_decay, cfg.momentum, buf)
    assert_record(out.history[2], t2, accuracy(classify(W2, h(W2, X)), Y), 2)
    assert_weights(out.model, W2, BACKBONE, "backbone.")


def mas_weights(W: dict) -> dict[str, torch.Tensor]:
    """L2UL: Omega = mean over D_f of |d ||f(x)||_2 / d psi|, min-max normalised per tensor, inverted."""
    omega = {n: torch.zeros_like(W[n]) for n in BACKBONE}
    for i in range(len(X)):
        grads = torch.autograd.grad(classify(W, h(W, X[i:i + 1])).norm(), [W[n] for n in BACKBONE])
        for n, g in zip(BACKBONE, grads, strict=True):
            omega[n] += g.abs() / len(X)
    return {n: 1 - (o - o.min()) / (o.max() - o.min()) for n, o in omega.items()}


def test_l2ul_importance_weights_by_hand():
    cfg = config("l2ul")
    live = wrap(Tiny())
    ctx = Context(model=live, original=copy.deepcopy(live).eval(), config=cfg)
    ctx.state["x_forget"] = X
    L2UL().prepare(ctx)
    want = mas_weights(tiny_weights())
    assert set(ctx.state["weights"]) == {"backbone." + n for n in BACKBONE}
    for n in BACKBONE:
        torch.testing.assert_close(ctx.state["weights"]["backbone." + n], want[n], rtol=1e-5, atol=1e-6)
        assert float(want[n].min()) == 0.0 and float(want[n].max()) == pytest.approx(1.0)


def test_l2ul_terms_by_hand():
    """Adv's terms + reg = lam / 2 sum_i Omega~_i (psi_i - psi0_i)^2: 0 at step 1, then live."""
    cfg = config("l2ul", lam=50.0)
    out = run(cfg)
    xa, ya = out.proxy
    w_f, w_a = len(X) / (len(X) + len(xa)), len(xa) / (len(X) + len(xa))
    W0 = tiny_weights()
    omega = mas_weights(W0)
    lr = {n: cfg.lr for n in BACKBONE}

    def terms(W):
        reg = cfg.lam * 0.5 * sum((omega[n] * (W[n] - W0[n].detach()) ** 2).sum() for n in BACKBONE)
        return {"del": w_f * deletion(classify(W, h(W, X)), Y, "hinge"), "ret": w_a * ce(classify(W, h(W, xa)), ya),
                "reg": reg}

    t1 = terms(W0)
    assert float(t1["reg"].detach()) == 0.0
    W1, buf = sgd(W0, sum(t1.values()), lr, cfg.weight_decay, cfg.momentum, None)
    assert_record(out.history[1], t1, accuracy(classify(W1, h(W1, X)), Y), 1)
    t2 = terms(W1)
    assert float(t2["reg"].detach()) > 1e-4  # the penalty is live at step 2 and its value is pinned
    W2, _ = sgd(W1, sum(t2.values()), lr, cfg.weight_decay, cfg.momentum, buf)
    assert_record(out.history[2], t2, accuracy(classify(W2, h(W2, X)), Y), 2)
    assert_weights(out.model, W2, BACKBONE, "backbone.")


def sr_importance(W: dict, Q: dict, xa: torch.Tensor, s_ori: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """SR: I = |d L_align / d psi| for backbone parameters psi, through the projector.

    batch: |grad| of the batch-mean align loss (one batch here: the whole proxy set); per_sample: the mean
    over proxy samples of |grad| of each sample's 1 - cos.
    """
    params = [W[n] for n in BACKBONE]

    def abs_grad(loss: torch.Tensor) -> list[torch.Tensor]:  # the classifier is not on the align path: 0
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.abs() for p, g in zip(params, grads, strict=True)]

    if mode == "batch":
        grads = abs_grad(one_minus_mean_cos(structure(project(Q, h(W, xa)), R_MAP), s_ori))
        return dict(zip(BACKBONE, grads, strict=True))
    total = {n: torch.zeros_like(W[n]) for n in BACKBONE}
    for i in range(len(xa)):
        s_i = structure(project(Q, h(W, xa[i:i + 1])), R_MAP)
        for n, g in zip(BACKBONE, abs_grad(1 - per_row_cos(s_i, s_ori[i:i + 1]).sum()), strict=True):
            total[n] += g / len(xa)
    return total



@pytest.mark.parametrize("deletion_path", ["prediction", "backbone"])
@pytest.mark.parametrize("importance", ["batch", "per_sample"])
def test_structguard_terms_by_hand(deletion_path, importance):
    """StructGuard, every term at steps 1 and 2 and the weights after step 2:

    del   = w_f deletion(classify(p(h(x_f))), y_f)   (prediction path; "backbone": classify(h(x_f)))
    ret   = w_a CE(classify(p(h(x_adv))), y_adv)
    align = sa_weight (1 - mean_i cos(S_ori[i], S_unl[i])), S = norm(f R) A^T, S_ori from h_theta0
    reg   = lam / 2 sum_i I_i (psi_i - psi0_i)^2, I measured after the first step, divided by its max;
            present from the second step (sr_from 1)
    cr    = cr_weight (0.99 ||W||_1 + 0.005 ||W||_F^2), W the final linear layer's weight
    """
    cfg = config("structguard", lam=10.0, sa_weight=1.0, cr_weight=0.001, deletion_path=deletion_path,
                 importance=importance, importance_after=1, sr_from=1, sr_normalise=True)
    out = run(cfg)
    xa, ya = out.proxy
    w_f, w_a = len(X) / (len(X) + len(xa)), len(xa) / (len(X) + len(xa))
    W0 = tiny_weights()
    with torch.no_grad():
        f_ori = h(W0, xa)
        s_ori = structure(f_ori, R_MAP)
    Q0 = identity_projector(f_ori)
    lr = {n: cfg.lr for n in BACKBONE}
    lr_all = dict(lr, **{n: cfg.projector_lr for n in PROJECTOR})

    def terms(W, Q, importance_weights=None):
        f_x = project(Q, h(W, X)) if deletion_path == "prediction" else h(W, X)
        w = W["linear.weight"]
        t = {"del": w_f * deletion(classify(W, f_x), Y, "hinge"),
             "ret": w_a * ce(classify(W, project(Q, h(W, xa))), ya),
             "align": cfg.sa_weight * one_minus_mean_cos(s_ori, structure(project(Q, h(W, xa)), R_MAP))}
        if importance_weights is not None:
            t["reg"] = cfg.lam * 0.5 * sum((importance_weights[n] * (W[n] - W0[n].detach()) ** 2).sum()
                                           for n in BACKBONE)
        t["cr"] = cfg.cr_weight * (0.99 * w.abs().sum() + 0.005 * (w * w).sum())
        return t

    def predict(W, Q):
        return classify(W, project(Q, h(W, X)))  # forget accuracy is read through the projector

    # step 1: theta_0 with the identity projector: S_unl = S_ori, so the align loss is 0; no SR yet
    t1 = terms(W0, Q0)
    assert abs(float(t1["align"].detach())) < 1e-6
    both, buf = sgd({**W0, **Q0}, sum(t1.values()), lr_all, cfg.weight_decay, cfg.momentum, None)
    W1, Q1 = {k: both[k] for k in W0}, {k: both[k] for k in Q0}
    assert_record(out.history[1], t1, accuracy(predict(W1, Q1), Y), 1)  # accuracy after the step

    # importance after the first step, normalised by its maximum over all backbone parameters
    raw = sr_importance(W1, Q1, xa, s_ori, importance)
    flat = torch.cat([v.flatten() for v in raw.values()])
    weights = {n: v / flat.max() for n, v in raw.items()}
    got = out.extra["importance_weights"]
    assert set(got) == set(BACKBONE)
    for n in BACKBONE:
        torch.testing.assert_close(got[n], weights[n], rtol=1e-4, atol=1e-7, msg=lambda m, n=n: f"I[{n}]: {m}")
    info = out.extra["importance"]
    assert info["after_steps"] == 1 and info["mode"] == importance and info["normalised"]
    assert info["max"] == pytest.approx(float(flat.max()), rel=1e-4)
    assert info["mean"] == pytest.approx(float(flat.mean()), rel=1e-4)

    # step 2: every term live
    t2 = terms(W1, Q1, weights)
    assert float(t2["align"].detach()) > 1e-7 and float(t2["reg"].detach()) > 0
    both, _ = sgd({**W1, **Q1}, sum(t2.values()), lr_all, cfg.weight_decay, cfg.momentum, buf)
    assert_record(out.history[2], t2, accuracy(predict({k: both[k] for k in W0}, {k: both[k] for k in Q0}), Y), 2)
    assert_weights(out.model.backbone, both, BACKBONE, "")
    assert_weights(out.model.projector, both, PROJECTOR, "")
    # frozen BatchNorm: neither the backbone's nor the projector's running statistics moved
    torch.testing.assert_close(out.model.projector[1].running_mean, Q0["1.running_mean"])
    torch.testing.assert_close(out.model.projector[1].running_var, Q0["1.running_var"])
    torch.testing.assert_close(out.model.backbone.bn.running_mean, W0["bn.running_mean"], rtol=0, atol=0)


def test_structure_and_anchor_map_by_hand():
    """S = norm(f R) A^T and R itself. (L_align cannot see the normalisation: a cosine of rows ignores each
    row's scale; the audit's affinity pictures can, so S is pinned directly.)"""
    f = torch.tensor([[3.0, 1.0, 2.0], [0.5, 2.5, 2.0]])
    torch.testing.assert_close(anchor_map(D, E, seed=0), seeded_r(0))
    torch.testing.assert_close(affinity(f, R_MAP, ANCHORS), structure(f, R_MAP))
    assert not torch.allclose(affinity(f, R_MAP, ANCHORS), (f @ R_MAP) @ ANCHORS.T)
    torch.testing.assert_close(anchor_map(D, D), torch.eye(D))  # d = e: R is the identity


# ---------------------------------------------------------------- determinism


def _fashion_forget(bundled_fashion, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last k training images of the bundled subset (present on every machine)."""
    pos = torch.arange(len(bundled_fashion.train) - k, len(bundled_fashion.train))
    return to_device_format(bundled_fashion.train.images(pos), torch.device("cpu")), bundled_fashion.train.labels[pos]


def _anchor_matrix() -> torch.Tensor:
    """10 unit rows in 384 dimensions (MiniLM's size, so R is the seeded Gaussian map); no encoder to load."""
    return F.normalize(torch.randn(10, 384, generator=torch.Generator().manual_seed(7)), dim=1)


def test_engine_same_seed_is_bit_identical_on_cpu(sample_model, bundled_fashion):
    """Same seed: identical proxy set, history, importance and final weights; another seed: a different run."""
    model = prepare_model(copy.deepcopy(sample_model.model), torch.device("cpu")).eval()
    x, y = _fashion_forget(bundled_fashion, 4)
    anchors = _anchor_matrix()

    def once(seed: int):
        steps: list[dict] = []
        cfg = default_config("structguard", "fashion-mnist", k=4, pgd_iters=3, n_adv=4, max_epochs=3, seed=seed,
                             batch_size=8)
        out = run_unlearning(model, x, y, 10, cfg, anchors, Callbacks(on_step=steps.append))
        with torch.no_grad():
            logits = out.model(x)
        return out, logits, steps

    a, logits_a, steps_a = once(0)
    b, logits_b, steps_b = once(0)
    c, logits_c, _ = once(1)
    assert a.steps >= 2 and all(math.isfinite(r["loss"]) for r in a.history[1:])
    assert a.history == b.history and steps_a == steps_b  # every term, loss and forget accuracy, bit for bit
    assert (a.stop_reason, a.steps) == (b.stop_reason, b.steps)
    assert torch.equal(a.proxy[0], b.proxy[0]) and torch.equal(a.proxy[1], b.proxy[1])
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(logits_a, logits_b)
    info_a, info_b = dict(a.extra["importance"]), dict(b.extra["importance"])
    info_a.pop("seconds"), info_b.pop("seconds")
    assert info_a == info_b
    # the comparison can fail: another seed gives another proxy set, other terms and other weights
    assert not torch.equal(a.proxy[0], c.proxy[0])
    assert [r["terms"] for r in a.history[1:]] != [r["terms"] for r in c.history[1:]]
    assert not torch.equal(logits_a, logits_c)


def _record_without_clocks(run_dir: Path) -> dict:
    """run.json less what may differ between two identical runs: the name, clocks, memory, the runs folder
    and the code version (a commit made meanwhile by someone else changes it)."""
    meta = json.loads((run_dir / "run.json").read_text())
    for key in ("run_id", "created", "timings", "peak_rss_mb", "rss_start_mb", "code_version"):
        meta.pop(key, None)
    meta.get("request", {}).pop("runs_root", None)
    if isinstance(meta.get("importance"), dict):
        meta["importance"].pop("seconds", None)
    return meta


@pytest.mark.slow
def test_execute_run_same_seed_is_bit_identical_on_cpu(sample_model, bundled_fashion, tmp_path):
    """Through the public pipeline API (RunRequest / execute_run), on CPU: the same seed gives the same
    run record (history, metrics, term shares, importance) and the same audit arrays; another seed does not."""
    from core.pipeline import RunRequest, execute_run

    # 1,000 / 200 images of the bundled subset as IDX files: quick to evaluate
    data = write_fashion_idx(tmp_path / "fmnist", bundled_fashion, 1000, 200, gz=True)
    ids = [5, 300, 650, 999]

    def once(seed: int, name: str) -> Path:
        # a and b each have their own runs root: no cached outputs of the original model are shared
        req = RunRequest(forget_ids=ids, method="structguard", data_dir=str(data), seed=seed, device="cpu",
                         runs_root=str(tmp_path / name), encoder="minilm", retain_eval=200, audit_per_class=5,
                         config={"pgd_iters": 3, "n_adv": 2, "max_epochs": 2, "batch_size": 8})
        return execute_run(req)

    a, b, c = once(0, "a"), once(0, "b"), once(1, "a")
    ra, rb, rc = _record_without_clocks(a), _record_without_clocks(b), _record_without_clocks(c)
    assert ra["seed"] == 0 and ra["forget_ids"] == ids and len(ra["history"]) >= 3
    for key in ("history", "metrics", "stop_reason", "steps", "term_shares", "importance", "config"):
        assert ra.get(key) == rb.get(key), key
    assert ra == rb
    with np.load(a / "audit.npz") as za, np.load(b / "audit.npz") as zb:
        assert za.files == zb.files
        for key in za.files:
            np.testing.assert_array_equal(za[key], zb[key], err_msg=key)
    # another seed: another run
    assert rc["seed"] == 1 and rc["history"] != ra["history"]
    assert rc["metrics"]["after"] != ra["metrics"]["after"]


def test_hinge_active_gives_the_last_rows_the_whole_push():
    """Rows already wrong by the margin add nothing, and the rest are averaged among themselves."""
    from core.methods import deletion_loss

    z = torch.tensor([[3.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.5, 0.0, 0.0]])  # rows 0, 2 still pushed; row 1 done
    y = torch.tensor([0, 0, 0])
    by_hand = ((1 + 3.0 - 0.0) + (1 + 0.5 - 0.0)) / 2
    assert float(deletion_loss(z, y, config("adv", deletion="hinge_active"))) == pytest.approx(by_hand)
    assert float(deletion_loss(z, y, config("adv", deletion="hinge"))) == pytest.approx(by_hand * 2 / 3)
    done = torch.tensor([[0.0, 5.0, 0.0]])
    assert float(deletion_loss(done, y[:1], config("adv", deletion="hinge_active"))) == 0.0


def test_jointly_is_one_call_in_eval_mode_and_one_per_batch_in_train_mode() -> None:
    """Eval mode: one call on the concatenation, the same rows as separate calls. Train mode: BatchNorm's batch
    statistics would mix the batches, so each batch gets its own call."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    a, b, calls = torch.randn(5, 4), torch.randn(7, 4), []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return net(x)

    net.eval()
    out = jointly(net, fn, a, b)
    assert calls == [12] and [len(o) for o in out] == [5, 7]
    with torch.no_grad():
        torch.testing.assert_close(out[0], net(a))
        torch.testing.assert_close(out[1], net(b))
    calls.clear()
    net.train()
    out = jointly(net, fn, a, b)
    assert calls == [5, 7]
    with torch.no_grad():
        torch.testing.assert_close(out[1], net(b))  # b's own batch statistics
