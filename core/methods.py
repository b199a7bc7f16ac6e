"""Unlearning methods: each a short recipe of loss terms over the shared loop in engine.py.

A recipe says whether it needs the proxy set and a projector, what it computes once
before the updates (`prepare`), how its parameters are optimised, and which loss
terms make up one step. Adding a method or an ablation switch is a few lines here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap


@dataclass
class UnlearnConfig:
    """Every knob of a run; JSON-serialisable, recorded in run.json."""

    method: str = "structguard"
    lr: float = 0.005                 # backbone learning rate
    projector_lr: float = 0.009       # StructGuard projector learning rate
    momentum: float = 0.0
    weight_decay: float = 0.0
    eps: float = 3.0                  # L2 radius of the PGD proxy attack
    pgd_step: float = 0.1
    pgd_iters: int = 100
    n_adv: int = 20                   # adversarial variants per forget image
    batch_size: int = 128             # forget batch and proxy batch
    lam: float = 1.0                  # weight of the importance regulariser (L2UL, SR)
    cr_weight: float = 0.001          # weight of the classifier regulariser (CR)
    sa: bool = True                   # StructGuard ablation switches
    sr: bool = True
    cr: bool = True
    projector_init: str = "identity"  # "identity" or "random"; see DESIGN notes in docs/METHOD.md
    max_epochs: int = 100             # passes over the proxy set (forget set for NegGrad)
    importance_chunk: int = 64        # per-sample gradients computed this many at a time
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UnlearnConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("lr", "eps", "pgd_step", "batch_size", "max_epochs"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if self.n_adv < 1 or self.pgd_iters < 0:
            raise ValueError("n_adv must be >= 1 and pgd_iters >= 0")
        if self.projector_init not in ("identity", "random"):
            raise ValueError("projector_init must be 'identity' or 'random'")


# The authors' CIFAR-10 / ResNet-18 defaults (DESIGN.md section 5).
BASELINE_CIFAR = dict(lr=0.001, momentum=0.9, weight_decay=1e-4, eps=4.0, pgd_step=0.1, pgd_iters=100, n_adv=20)
STRUCTGUARD_CIFAR = dict(lr=0.005, projector_lr=0.009, momentum=0.0, weight_decay=0.0, eps=3.0, pgd_step=0.1,
                         pgd_iters=100, n_adv=20)
# Fashion-MNIST (784-d inputs, a 2-core CPU): 10 PGD steps of eps/4, at most 30 passes, and the
# learning rate and eps of each method chosen on held-out TRAINING data (bench/tune.py, k=32, forget
# ids drawn with seed 100; bench/results/tuning*.md): the highest retain accuracy among settings that
# forget completely. The test set is never read for this.
FASHION = dict(pgd_iters=10, n_adv=20, max_epochs=30)
CIFAR100 = dict(n_adv=200, eps=1.0)

DEFAULTS: dict[str, dict[str, dict]] = {
    "cifar10": {"neggrad": BASELINE_CIFAR, "adv": BASELINE_CIFAR, "l2ul": BASELINE_CIFAR,
                "structguard": STRUCTGUARD_CIFAR},
    "cifar100": {m: dict(BASELINE_CIFAR, **CIFAR100) for m in ("neggrad", "adv", "l2ul")}
    | {"structguard": dict(STRUCTGUARD_CIFAR, **CIFAR100, lr=0.001, projector_lr=0.01)},
    "fashion-mnist": {
        "neggrad": dict(BASELINE_CIFAR, **FASHION, lr=0.01),
        "adv": dict(BASELINE_CIFAR, **FASHION, lr=0.01, eps=1.0, pgd_step=0.25),
        "l2ul": dict(BASELINE_CIFAR, **FASHION, lr=0.01, eps=2.0, pgd_step=0.5),
        "structguard": dict(STRUCTGUARD_CIFAR, **FASHION, lr=0.03, projector_lr=0.054, eps=1.0, pgd_step=0.25),
    },
}


def default_config(method: str, dataset: str = "fashion-mnist", **overrides: Any) -> UnlearnConfig:
    """The per-dataset defaults for a method, with overrides applied and validated."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    table = DEFAULTS.get(dataset, DEFAULTS["fashion-mnist"])
    cfg = UnlearnConfig(method=method, **table[method])
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()
    return cfg


# ------------------------------------------------------------- shared pieces


def per_sample_abs_grad_mean(model: nn.Module, loss_one: Callable[[dict, torch.Tensor, torch.Tensor], torch.Tensor],
                             inputs: torch.Tensor, aux: torch.Tensor, chunk: int) -> dict[str, torch.Tensor]:
    """mean_i |d loss_i / d psi| over samples, for every parameter psi (per-sample, via vmap).

    `loss_one(params, x_i, aux_i)` computes one sample's loss with `functional_call`
    (aux_i: that sample's target row). The model must be in eval mode so BatchNorm
    uses (and keeps) its running statistics.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    total = {k: torch.zeros_like(v) for k, v in params.items()}

    def one(p: dict, x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return loss_one({**p, **buffers}, x, i)

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))
    for start in range(0, len(inputs), chunk):
        grads = per_sample(params, inputs[start:start + chunk], aux[start:start + chunk])
        for k in total:
            total[k] += grads[k].abs().sum(0)
    return {k: v / max(len(inputs), 1) for k, v in total.items()}


def weighted_l2_penalty(model: nn.Module, reference: dict[str, torch.Tensor],
                        weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """1/2 sum_i w_i (psi_i - psi0_i)^2 over the named parameters in `weights`."""
    terms = [(weights[n] * (p - reference[n]).pow(2)).sum() for n, p in model.named_parameters() if n in weights]
    return 0.5 * torch.stack(terms).sum()


@dataclass
class Batch:
    x_f: torch.Tensor
    y_f: torch.Tensor
    x_a: torch.Tensor | None = None
    y_a: torch.Tensor | None = None
    a_idx: torch.Tensor | None = None  # rows of the proxy set in this batch

    @property
    def w_f(self) -> float:
        n_a = 0 if self.x_a is None else len(self.x_a)
        return len(self.x_f) / (len(self.x_f) + n_a)

    @property
    def w_a(self) -> float:
        return 1.0 - self.w_f


@dataclass
class Context:
    """What the loop hands to a recipe: live model, frozen original, proxy set, anchors."""

    model: nn.Module                    # engine.UnlearnedModel being updated
    original: nn.Module                 # frozen copy, eval mode
    config: UnlearnConfig
    x_adv: torch.Tensor | None = None
    y_adv: torch.Tensor | None = None
    anchors: torch.Tensor | None = None  # C x e, unit rows
    R: torch.Tensor | None = None        # d x e map from feature to anchor space
    state: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def original_proxy_features(ctx: Context) -> torch.Tensor:
    """h_theta0(x_adv) for the whole proxy set, computed once per run (projector init and S_ori share it)."""
    if "f_ori" not in ctx.state:
        x = ctx.x_adv
        ctx.state["f_ori"] = torch.cat([ctx.original.features(x[i:i + 512]) for i in range(0, len(x), 512)])
    return ctx.state["f_ori"]


def affinity(features: torch.Tensor, R: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """S = norm(f R) A^T: each sample's cosine to each class anchor."""
    return F.normalize(features @ R, dim=1) @ anchors.T


# ------------------------------------------------------------------- recipes


class Method:
    name = "base"
    needs_proxy = False
    uses_projector = False
    summary = ""

    def prepare(self, ctx: Context) -> None:
        """Work done once before the updates (importance weights)."""

    def optimizer(self, ctx: Context) -> torch.optim.Optimizer:
        c = ctx.config
        return torch.optim.SGD(ctx.model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def losses(self, ctx: Context, b: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class NegGrad(Method):
    name = "neggrad"
    summary = "gradient ascent on the forget set"

    def losses(self, ctx: Context, b: Batch) -> dict[str, torch.Tensor]:
        return {"del": -F.cross_entropy(ctx.model(b.x_f), b.y_f)}


class Adv(Method):
    name = "adv"
    needs_proxy = True
    summary = "ascent on the forget set + descent on adversarial proxies"

    def losses(self, ctx: Context, b: Batch) -> dict[str, torch.Tensor]:
        return {"del": -b.w_f * F.cross_entropy(ctx.model(b.x_f), b.y_f),
                "ret": b.w_a * F.cross_entropy(ctx.model(b.x_a), b.y_a)}


class L2UL(Adv):
    name = "l2ul"
    summary = "Adv + MAS weight-importance regularisation"

    def prepare(self, ctx: Context) -> None:
        # MAS importance: mean over D_f of |d ||f(x)||_2 / d psi|, min-max normalised per tensor, inverted.
        model, x_f = ctx.model, ctx.state["x_forget"]

        def norm_of_output(params: dict, x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            return functional_call(model, params, (x.unsqueeze(0),)).norm(p=2)

        model.eval()
        omega = per_sample_abs_grad_mean(model, norm_of_output, x_f, x_f, ctx.config.importance_chunk)
        ctx.state["weights"] = {k: 1 - (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12) for k, v in omega.items()}
        ctx.state["reference"] = {k: v.detach().clone() for k, v in model.named_parameters()}

    def losses(self, ctx: Context, b: Batch) -> dict[str, torch.Tensor]:
        terms = super().losses(ctx, b)
        terms["reg"] = ctx.config.lam * weighted_l2_penalty(ctx.model, ctx.state["reference"], ctx.state["weights"])
        return terms


class StructGuard(Method):
    name = "structguard"
    needs_proxy = True
    uses_projector = True
    summary = "semantic-anchor structure alignment (SA) + importance (SR) + classifier (CR) regularisers"

    def _s_ori(self, ctx: Context) -> torch.Tensor:
        if "s_ori" not in ctx.state:  # original structure of every proxy sample, computed once
            ctx.state["s_ori"] = affinity(original_proxy_features(ctx), ctx.R, ctx.anchors)
        return ctx.state["s_ori"]

    def prepare(self, ctx: Context) -> None:
        s_ori = self._s_ori(ctx)
        ctx.state["reference"] = {k: v.detach().clone() for k, v in ctx.model.backbone.named_parameters()}
        if not ctx.config.sr:
            return
        # SR importance: mean over proxy samples of |d L_align,i / d psi| for backbone parameters psi.
        model, R, A = ctx.model, ctx.R, ctx.anchors

        def align_one(params: dict, x: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
            f = functional_call(model, params, (x.unsqueeze(0),), kwargs={"method": "features"})
            return 1 - F.cosine_similarity(affinity(f, R, A), s0.unsqueeze(0)).squeeze(0)

        model.eval()
        imp = per_sample_abs_grad_mean(model, align_one, ctx.x_adv, s_ori, ctx.config.importance_chunk)
        ctx.state["weights"] = {k.removeprefix("backbone."): v for k, v in imp.items() if k.startswith("backbone.")}

    def optimizer(self, ctx: Context) -> torch.optim.Optimizer:
        c = ctx.config
        return torch.optim.SGD([{"params": ctx.model.backbone.parameters(), "lr": c.lr},
                                {"params": ctx.model.projector.parameters(), "lr": c.projector_lr}],
                               lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def losses(self, ctx: Context, b: Batch) -> dict[str, torch.Tensor]:
        m, c = ctx.model, ctx.config
        terms = {"del": -b.w_f * F.cross_entropy(m.classify(m.backbone_features(b.x_f)), b.y_f)}
        f_adv = m.features(b.x_a)  # through the projector
        terms["ret"] = b.w_a * F.cross_entropy(m.classify(f_adv), b.y_a)
        if c.sa:
            s_unl = affinity(f_adv, ctx.R, ctx.anchors)
            terms["align"] = 1 - F.cosine_similarity(self._s_ori(ctx)[b.a_idx], s_unl, dim=1).mean()
        if c.sr:
            terms["reg"] = c.lam * weighted_l2_penalty(m.backbone, ctx.state["reference"], ctx.state["weights"])
        if c.cr:
            w = m.classifier_weight()
            terms["cr"] = c.cr_weight * (0.99 * w.abs().sum() + 0.005 * w.pow(2).sum())
        return terms


METHODS: dict[str, type[Method]] = {m.name: m for m in (NegGrad, Adv, L2UL, StructGuard)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]()
