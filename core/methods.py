"""Unlearning methods: each a short recipe of loss terms over the shared loop in engine.py.

A recipe says whether it needs the proxy set and a projector, what it computes once
before the updates (`prepare`), how its parameters are optimised, and which loss
terms make up one step. Adding a method or an ablation switch is a few lines here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from .models import PRECISIONS, STAGES, trunk_dtype
from .sgd import SGD

MIX_PAIRS = ("any", "distinct", "cross")  # UnlearnConfig.mix_pairs (mixture_pool)
POLISH_PICKS = ("last", "mix_kl")  # UnlearnConfig.polish_pick


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
    sa_weight: float = 1.0            # weight of the structure-alignment term (SA); the paper's is 1
    mix_weight: float = 0.0           # proxy methods: KL to the original on mixtures of forget images (0 = off)
    mix_batch: int = 128              # mixtures per step for that term
    mix_pairs: str = "any"            # which two forget images a mixture joins: "any", "distinct" (never an image
                                      # with itself) or "cross" (of two classes where the forget set has two)
    sa: bool = True                   # StructGuard ablation switches
    sr: bool = True
    cr: bool = True
    projector_init: str = "identity"  # "identity" or "random"; see DESIGN notes in docs/METHOD.md
    max_epochs: int = 100             # passes over the proxy set (forget set for NegGrad)
    importance_chunk: int = 64        # per-sample gradients computed this many at a time
    seed: int = 0
    # Engine v2 (docs/METHOD.md, "Deletion that stops"): how the loop behaves. `schedule="paper"`
    # sets all of them to the authors' loop (PAPER_SCHEDULE below).
    schedule: str = "ours"            # "ours" or "paper"; recorded, and "paper" applies PAPER_SCHEDULE
    deletion: str = "hinge"           # "ce" (published ascent), "masked_ce", "hinge", "hinge_active" or "hinge_dual"
    dual_lr: float = 0.1              # hinge_dual: growth of an image's deletion weight per unit of its hinge
    margin: float = 1.0               # hinge: push the true logit this far below the best other one
    nesterov: bool = False            # Nesterov momentum in the update (damps the forget set's back and forth)
    warmup_steps: int = 0             # learning rate rises linearly over the first this many update steps (0: none)
    lr_decay: float = 1.0             # then is multiplied by this once per pass (1: constant)
    late_lr: float = 1.0              # and by this from the first check with forget accuracy <= late_below (1: off)
    late_below: float = 5.0           # forget accuracy (%) from which late_lr applies
    stop_margin: float = 0.0          # stop once every forget image's true logit is this far below the best other
                                      # (0: once every one is misclassified, the default)
    polish_steps: int = 0             # once the stop rule is met, go on this many steps and return the last state in
                                      # which it was met (the retention terms keep working; docs/METHOD.md v19)
    polish_pick: str = "last"         # which state that met it: "last", or "mix_kl" (the one whose answers on fresh
                                      # mixtures of forget images are closest to the original's; docs/METHOD.md v21)
    deletion_path: str = "prediction" # StructGuard's L_del: "backbone" (bypasses the projector, the paper)
                                      # or "prediction" (through the projector, where forgetting is checked)
    bn: str = "frozen"                # backbone BatchNorm during updates: "frozen" (eval) or "train"
    check_first_pass: bool = True     # check forget accuracy during the first pass (the authors do not)
    importance: str = "batch"         # SR importance: "batch" (|grad| of batch means) or "per_sample" (vmap)
    importance_after: int = 1         # update steps taken before SR importance is measured
    sr_from: int = 1                  # first step (counted in updates already taken) with the SR term
    sr_normalise: bool = True         # scale SR importance to [0, 1] (by its max) so lam sets the strength
    sr_quantile: float = 1.0          # with sr_normalise: divide by this quantile of the importance instead, and clip
                                      # at 1 (1.0: the max; lower lifts the bulk of the weights under the few largest)
    pgd_early_exit: bool = True       # a proxy stops moving once the original model predicts its target
    proxy_labels: str = "target"      # "target" (the attack's, the paper) or "original" (what theta_0 predicts)
    train_from: str = "stem"          # first ResNet stage updated (STAGES); earlier stages stay the original's
    precision: str = "fp32"           # conv stages in attacks and update steps: "fp32", "bf16", or "auto" (bf16 where
                                      # the device computes it natively); measurements are always float32

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnlearnConfig:
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
        for name in ("dual_lr", "stop_margin"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        if self.n_adv < 1 or self.pgd_iters < 0 or self.mix_batch < 1:
            raise ValueError("n_adv and mix_batch must be >= 1 and pgd_iters >= 0")
        if self.projector_init not in ("identity", "random"):
            raise ValueError("projector_init must be 'identity' or 'random'")
        choices = {"schedule": ("ours", "paper"),
                   "deletion": ("ce", "masked_ce", "hinge", "hinge_active", "hinge_dual"),
                   "bn": ("frozen", "train"),
                   "mix_pairs": MIX_PAIRS,
                   "deletion_path": ("backbone", "prediction"), "importance": ("per_sample", "batch"),
                   "proxy_labels": ("target", "original"), "train_from": STAGES, "precision": PRECISIONS,
                   "polish_pick": POLISH_PICKS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not (isinstance(self.sr_quantile, (int, float)) and 0 < self.sr_quantile <= 1):
            raise ValueError(f"sr_quantile must be in (0, 1], got {self.sr_quantile!r}")
        if not (isinstance(self.polish_steps, int) and self.polish_steps >= 0):
            raise ValueError(f"polish_steps must be a whole number >= 0, got {self.polish_steps!r}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be a whole number >= 0, got {self.warmup_steps!r}")
        if not (isinstance(self.lr_decay, (int, float)) and 0 < self.lr_decay <= 1):
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay!r}")
        if not (isinstance(self.late_lr, (int, float)) and 0 < self.late_lr <= 1):
            raise ValueError(f"late_lr must be in (0, 1], got {self.late_lr!r}")
        if not (isinstance(self.late_below, (int, float)) and 0 <= self.late_below <= 100):
            raise ValueError(f"late_below must be a forget accuracy in [0, 100], got {self.late_below!r}")
        if self.nesterov and not self.momentum > 0:
            raise ValueError("nesterov needs momentum > 0")
        if self.importance_after < 0 or self.sr_from < self.importance_after:
            raise ValueError("need 0 <= importance_after <= sr_from (importance is measured before SR starts)")


# The authors' CIFAR-10 / ResNet-18 defaults (DESIGN.md section 5).
BASELINE_CIFAR = dict(lr=0.001, momentum=0.9, weight_decay=1e-4, eps=4.0, pgd_step=0.1, pgd_iters=100, n_adv=20)
STRUCTGUARD_CIFAR = dict(lr=0.005, projector_lr=0.009, momentum=0.0, weight_decay=0.0, eps=3.0, pgd_step=0.1,
                         pgd_iters=100, n_adv=20)
# Fashion-MNIST (784-d inputs, a 2-core CPU), engine v2 (docs/METHOD.md): one budget for every
# method (20 adversarial images per forget image, at most 10 PGD steps of eps/4 with early exit,
# at most 20 passes), the bounded hinge deletion with frozen BatchNorm and momentum 0.9, eps 0.5
# (boundary proxies; chosen on held-out training data, bench/results/v2/). The learning rate of
# each method is chosen per forget size (BY_K below).
FASHION = dict(pgd_iters=10, n_adv=20, max_epochs=20, eps=0.5, pgd_step=0.125, momentum=0.9, weight_decay=0.0)
CIFAR100 = dict(n_adv=200, eps=1.0)
# Per forget size (chosen on held-out training data, bench/tune.py); the nearest k on a log scale applies.
# bench/results/v2/ and v3/tune-*.md: forget seeds 100 and up, A_r on 2,000 held-out training images.
# One pass budget per k for every method (a pass over 8 x 20 proxies is 2 steps, over 128 x 20 is 20).
# k=128: 60 passes (25 until v12, 40 until v16); with 15, StructGuard left one image recognised on held-out seeds
# 101-102 (327 steps); with 40, seeds 113 and 121 (v16: 3.9 % recognised after 800 steps; forgotten at step 802;
# 851 steps).
# Engine v4 at k=32 (docs/METHOD.md; held-out seeds 100-103, bench/results/v5/tune-*.md): the deletion push moves to
# the images that resist (hinge_dual) and the stem and layer1 keep the original weights (they run once per input).
# StructGuard lr 0.002 kept 90.25 % A_r in 154 steps against 89.54 % in 198 with the v3 loop on the same sets;
# L2UL lr 0.002 (89.25 against 89.01 at 0.001); Adv keeps lr 0.001 (90.71 against 90.64).
# k=8 and k=128 keep the v3 loop (plain hinge, every stage updated): at k=8 it kept 90.73 % A_r against 90.69 for
# v4 (the same within the spread; the rule takes the higher), at k=128 75.8 % against 72.8 % at best.
# At k=32 StructGuard and Adv compute their attacks and steps in bfloat16 where the device has it natively
# (precision="auto"; held-out seeds 100-107, bench/results/v6/tune-*-bf16*.md): the same A_r within the spread
# (StructGuard 88.73 against 88.51 in float32, Adv 89.73 against 89.47) at 2.6x less time per step on an AVX-512 BF16
# CPU. L2UL kept less in bfloat16 (86.29 against 88.00) and stays float32; NegGrad was not checked. One StructGuard
# forget set needed 384 steps in bfloat16, so k=32's budget is 80 passes for every method (no float32 run needed >60).
# At k=8 StructGuard too (92.00 against 91.95); Adv kept less there (92.08 against 92.44) and stays float32.
# StructGuard at k=128 computes in bfloat16 too (v16, docs/METHOD.md): on sixteen fresh held-out sets (seeds 112-127)
# it kept -0.07 [-1.14, +0.99] A_r against float32 (more on 6 of 16) in about half the time.
# L2UL at k=128 (held-out seeds 100-103, bench/results/v8/tune-l2ul-k128*.md): with the plain hinge and mix 3 it
# hit the 500-step budget with 2-4 % of the images still recognised; the hinge_dual push forgets every set in 164
# steps and keeps 68.05 % A_r (mix 1: 61.51, mix 2: not forgotten). A lighter MAS penalty (lam 0.3) lets the plain
# hinge forget every set (340 steps) and keeps 72.44 % (v9/tune-l2ul-k128-lam.md), Adv's 72.30 on the same sets.
# L2UL at k=32 too (held-out seeds 100-107, v9/tune-l2ul-k32-mix-lam.md): lam 0.3 with mix 3 keeps 89.47 % A_r against
# 87.43 for lam 1 with mix 1 (+2.04 [+0.71, +3.36], 7 of 8 sets); lam 1 with mix 3 left a set unforgotten.
# StructGuard's projector stays the identity (projector_lr 0 in DEFAULTS; v10/tune-sg-k*-projector-lr*.md, confirm-*):
# at k=32 every lower projector lr kept more (0.0108: 87.65, 0.0036: 88.16, 0.0012: 88.92, 0.0004: 89.04, 0: 89.43 on
# seeds 100-107; 0 against 0.0036 on the fresh seeds 108-115: +1.14, 7 of 8), at k=8 +0.64 [+0.04, +1.24], 8 of 8,
# at k=128 +2.39 [-3.22, +8.00], 3 of 4 (seeds 104-107). SA then aligns the backbone's own features.
# StructGuard at k=128 with lam 30 and mix 5 kept more on 5 of the 7 held-out sets that it forgot, but left seed 102
# 3.9 % recognised at the 500-step budget (bench/results/v11/). With 40 passes for every method it forgets all twelve
# held-out sets (seed 102 in 519 steps, seed 110 in 666) and keeps +2.61 [+0.44, +4.78] A_r over lam 10 with mix 3,
# more on 8 of 12 (v12/confirm-sg-k128-*.md), at about 1.5x the steps. L2UL too keeps more with mix 5 at k=128 (seeds
# 104-107: 74.50 against 70.34, 2 of 4; v12/tune-l2ul-k128-mix5.md), and so does Adv (73.85 against 69.26, 340 steps
# against 267; v12/tune-adv-k128-mix.md).
# At k=32 StructGuard and L2UL let the learning rate decay by 0.95 per pass (5 steps): it damps the back and forth of
# the last images. Held-out (docs/METHOD.md v13): StructGuard +0.62 [+0.02, +1.23] on seeds 100-107 and +0.24
# [-0.21, +0.70] on 108-115, more on 13 of 16, the longest run 224 steps instead of 384; L2UL +0.40 and +0.52, 11 of
# 16. Adv, at half their rate, did not forget one set with 0.95; with 0.98 it keeps +0.32 and +0.95 (10 of 16) in 12 %
# more steps. At k=8 (2 steps a pass) nothing forgot with 0.95. At k=128 (v14) StructGuard with 0.95 or 0.97 left
# a held-out set unforgotten after 40 passes and 0.98 kept -0.21: k=8 and k=128 keep a constant rate.
# At k=32 the proxy methods never mix a forget image with itself (mix_pairs "distinct"; 1 in 32 mixtures was a forget
# image itself, asking to keep its answers) and weigh the mixtures 4 instead of 3 (docs/METHOD.md v15). Held-out A_r
# against the old rule: StructGuard -0.02 [-0.58, +0.53] on seeds 100-115 and -0.16 [-0.63, +0.32] on fresh 116-131,
# L2UL -0.11 [-0.54, +0.31], Adv +0.19 [-0.20, +0.58] (100-115), in 0.83-0.90x the steps, the longest runs 137-182
# steps instead of 211-238. "distinct" alone kept -0.51 (StructGuard, k=32) and -1.11 (k=8, where 1 in 8 mixtures
# was an image itself); "cross" (two classes) -2.08 in 0.68x the steps; Adv with mix 4 alone left a set unforgotten.
# At k=8 a weight of 1.5 or 2 did not buy the self-mixtures back (-0.80, -0.88): k=8 and k=128 keep independent draws.
# StructGuard at k=128 (v18, held-out seeds 112-119, docs/METHOD.md): from layer2, or a mixture weight of 6 or 7,
# left a set partly recognised after 60 passes; weight 7 with hinge_dual 0.05 forgot every set in about half the steps
# but kept -1.30 A_r over eight sets (-2.06 on the four fresh ones). k=128 keeps the plain hinge with weight 5.
# At k=128 the proxy methods halve their learning rate once forget accuracy is 5 % or less (late_lr, v20,
# docs/METHOD.md): near the end a k=128 run swings by 3-11 points of A_r from one forgotten state to the next (v19),
# and smaller steps there keep more. Held-out A_r against the default on seeds 112-119: StructGuard +1.66 [+0.35,
# +2.98], Adv +2.35 [+0.17, +4.53], L2UL +2.69 [+0.56, +4.83] (v21), 7 of 8 each. A quarter of the rate left 2 of 8
# sets 1.6 % recognised after 60 passes. NegGrad, which does not forget at k=128, keeps its constant rate.
# From v22 they also go on 200 steps past the first forgotten state and return the forgotten state whose answers on
# fresh mixtures of forget images are closest to the original's (polish_pick "mix_kl", docs/METHOD.md v21-v22).
# Held-out A_r over the late rate alone on seeds 112-119: StructGuard +1.49 [+0.09, +2.88] (more on 5 of 8), Adv
# +1.36 [+0.26, +2.47] (7 of 8), L2UL +0.81 [-0.42, +2.04] (5 of 8, two ties), in a third to 45 % more update steps.
# The polish steps count against the same 60 passes; NegGrad, which does not forget at k=128, has none.
# Adv at k=128 computes in bfloat16 too (v24, docs/METHOD.md): +0.65 [+0.03, +1.26] A_r over float32 on held-out seeds
# 112-123 (more on 9 of 12) in about half the time. L2UL stays float32: +0.14 [-1.03, +1.30] on 112-119, and two of
# those sets used the whole budget.
LATE128 = dict(late_lr=0.5, late_below=5.0, polish_steps=200, polish_pick="mix_kl")
V4 = dict(deletion="hinge_dual", dual_lr=0.2, train_from="layer2")
MIX32 = dict(mix_weight=4.0, mix_pairs="distinct")
BF16 = dict(precision="auto")
_K8, _K32, _K128 = dict(lr=0.0006, max_epochs=60), dict(V4, lr=0.001, max_epochs=80), dict(lr=0.001, max_epochs=60)
# The retention term on mixtures of forget images (mix_weight) keeps the original's answers between the forget
# images and holds off the collapse to one class; a larger weight keeps more but forgets more slowly
# (explore-k128-mix.md, tune-mix-*.md: w = 3 did not forget at k=8 within 60 passes, w = 1 did).
BY_K: dict[str, dict[str, dict[int, dict]]] = {"fashion-mnist": {
    "neggrad": {8: dict(_K8, lr=0.001), 32: _K32, 128: _K128},
    "adv": {8: dict(_K8, mix_weight=1.0), 32: dict(_K32, **BF16, **MIX32, lr_decay=0.98),
            128: dict(_K128, **BF16, **LATE128, mix_weight=5.0)},
    "l2ul": {8: dict(_K8, mix_weight=1.0), 32: dict(_K32, **MIX32, lr=0.002, lam=0.3, lr_decay=0.95),
             128: dict(_K128, **LATE128, mix_weight=5.0, lam=0.3)},
    "structguard": {8: dict(_K8, **BF16, mix_weight=1.0),
                    32: dict(_K32, **BF16, **MIX32, lr=0.002, lr_decay=0.95),
                    128: dict(_K128, **BF16, **LATE128, mix_weight=5.0, lam=30.0)},
}}

DEFAULTS: dict[str, dict[str, dict]] = {
    "cifar10": {"neggrad": BASELINE_CIFAR, "adv": BASELINE_CIFAR, "l2ul": BASELINE_CIFAR,
                "structguard": STRUCTGUARD_CIFAR},
    "cifar100": {m: dict(BASELINE_CIFAR, **CIFAR100) for m in ("neggrad", "adv", "l2ul")}
    | {"structguard": dict(STRUCTGUARD_CIFAR, **CIFAR100, lr=0.001, projector_lr=0.01)},
    "fashion-mnist": {
        "neggrad": dict(BASELINE_CIFAR, **FASHION, lr=0.001),
        "adv": dict(BASELINE_CIFAR, **FASHION, lr=0.001),
        "l2ul": dict(BASELINE_CIFAR, **FASHION, lr=0.001),
        "structguard": dict(STRUCTGUARD_CIFAR, **FASHION, lr=0.001, projector_lr=0.0, lam=10.0),
    },
}


# The authors' loop (DESIGN.md section 5), one flag away: `schedule="paper"`. Their deletion term
# (CE ascent), BatchNorm in train mode, no mixture term, 100 PGD steps of 0.1 run to the end, up to 100 passes and
# their optimisers; for StructGuard also a random projector, no forget check during the first
# pass, importance from batch-mean gradients after the first step, SR from the third step, raw
# (unnormalised) importance, L_del through the backbone path, and the projector left in eval mode
# after the first check (engine._update_mode). eps stays the dataset's: the authors say to retune it.
PAPER_COMMON = dict(schedule="paper", deletion="ce", bn="train", mix_weight=0.0, pgd_step=0.1, pgd_iters=100,
                    pgd_early_exit=False, max_epochs=100, proxy_labels="target", train_from="stem", precision="fp32",
                    lr_decay=1.0, late_lr=1.0, warmup_steps=0, nesterov=False,  # their learning rates stay constant
                    polish_steps=0, polish_pick="last")  # and they stop at the first forgotten state
PAPER_SCHEDULE: dict[str, dict] = {
    "neggrad": dict(PAPER_COMMON, lr=0.001, momentum=0.9, weight_decay=1e-4),
    "adv": dict(PAPER_COMMON, lr=0.001, momentum=0.9, weight_decay=1e-4),
    "l2ul": dict(PAPER_COMMON, lr=0.001, momentum=0.9, weight_decay=1e-4, lam=1.0),
    "structguard": dict(PAPER_COMMON, lr=0.005, projector_lr=0.009, momentum=0.0, weight_decay=0.0, lam=1.0,
                        projector_init="random", check_first_pass=False, importance="batch", importance_after=1,
                        sr_from=2, sr_normalise=False, deletion_path="backbone"),
}


def tuned_k(method: str, dataset: str, k: int | None) -> int | None:
    """The tuned forget size nearest to k on a log scale (None when the method has no per-k table)."""
    table = BY_K.get(dataset, {}).get(method, {})
    if not table or not k:
        return None
    return min(table, key=lambda t: abs(math.log(t) - math.log(max(k, 1))))


def settings_for_k(method: str, dataset: str, k: int | None) -> dict:
    """The per-k settings of a method: those of the tuned k nearest to this one."""
    bucket = tuned_k(method, dataset, k)
    return {} if bucket is None else dict(BY_K[dataset][method][bucket])


def default_config(method: str, dataset: str = "fashion-mnist", k: int | None = None,
                   **overrides: Any) -> UnlearnConfig:
    """The defaults for a method on a dataset and forget size k, with overrides applied and validated.

    `schedule="paper"` among the overrides replaces the tuned defaults by the authors' loop
    (PAPER_SCHEDULE); other overrides still apply on top.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    table = DEFAULTS.get(dataset, DEFAULTS["fashion-mnist"])
    values = dict(table[method], **settings_for_k(method, dataset, k))
    if overrides.get("schedule") == "paper":
        values.update(PAPER_SCHEDULE[method])
    cfg = UnlearnConfig(method=method, **values)
    cfg = dataclasses.replace(cfg, **{k2: v for k2, v in overrides.items() if v is not None})
    cfg.validate()
    return cfg


# ------------------------------------------------------------- shared pieces


def per_sample_abs_grad_mean(model: nn.Module, loss_one: Callable[[dict, torch.Tensor, torch.Tensor], torch.Tensor],
                             inputs: torch.Tensor, aux: torch.Tensor, chunk: int,
                             check: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    """mean_i |d loss_i / d psi| over samples, for every parameter psi (per-sample, via vmap).

    `loss_one(params, x_i, aux_i)` computes one sample's loss with `functional_call`
    (aux_i: that sample's target row). The model must be in eval mode so BatchNorm
    uses (and keeps) its running statistics. `check()` (a run's cancel check) is called before each chunk.
    """
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}  # frozen stages: constants
    buffers = {k: v.detach() for k, v in [*model.named_buffers(), *model.named_parameters()] if k not in params}
    total = {k: torch.zeros_like(v) for k, v in params.items()}

    def one(p: dict, x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return loss_one({**p, **buffers}, x, i)

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))
    for start in range(0, len(inputs), chunk):
        if check is not None:
            check()
        grads = per_sample(params, inputs[start:start + chunk], aux[start:start + chunk])
        for k in total:
            total[k] += grads[k].abs().sum(0)
    return {k: v / max(len(inputs), 1) for k, v in total.items()}


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters a run updates (stages before `train_from` are frozen by the engine)."""
    return [p for p in module.parameters() if p.requires_grad]


def jointly(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor],
            *batches: torch.Tensor) -> list[torch.Tensor]:
    """fn on each batch; in one call on their concatenation when every module of `model` is in eval mode.

    Without batch statistics each row's output does not depend on the rows beside it, so one call gives the same
    outputs as separate calls, and one large batch is cheaper than several small ones (1.5x for a k=32 step in
    bfloat16 on the CPU). In train mode (the authors' loop) each batch keeps its own BatchNorm statistics."""
    if any(m.training for m in model.modules()):
        return [fn(x) for x in batches]
    return list(fn(torch.cat(batches)).split([len(x) for x in batches]))


def weighted_l2_penalty(model: nn.Module, reference: dict[str, torch.Tensor],
                        weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """1/2 sum_i w_i (psi_i - psi0_i)^2 over the named parameters in `weights`."""
    terms = [(weights[n] * (p - reference[n]).pow(2)).sum() for n, p in model.named_parameters() if n in weights]
    return 0.5 * torch.stack(terms).sum()


def true_and_best_other(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_y, max_{j != y} z_j) for each row: the deletion hinge, the stop rule and bench/forget_margins.py."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return true, other


def hinge_per_row(logits: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
    """relu(margin + z_y - max_{j != y} z_j) for each row."""
    true, other = true_and_best_other(logits, y)
    return F.relu(margin + true - other)


def deletion_loss(logits: torch.Tensor, y: torch.Tensor, config: UnlearnConfig) -> torch.Tensor:
    """The deletion term (to minimise), in the form config.deletion chooses.

    ce:        -CE(logits, y): the published gradient ascent; unbounded, it keeps pushing after
               the images are forgotten.
    masked_ce: -CE over the rows the batch still classifies correctly; zero once all are wrong.
    hinge:     relu(margin + z_y - max_{j != y} z_j), averaged: pushes the true logit below the best
               other class by `margin`, then stops (zero loss, zero gradient).
    hinge_active: the same hinge averaged over the rows it still pushes, so the last images left get the
               whole push instead of 1/batch of it (with retention terms they otherwise linger for many steps).
    hinge_dual: the hinge with one weight per forget image, kept across steps by forget_term (here: plain).
    """
    if config.deletion == "ce":
        return -F.cross_entropy(logits, y)
    if config.deletion == "masked_ce":
        still = (logits.argmax(1) == y).float()
        return -(F.cross_entropy(logits, y, reduction="none") * still).sum() / len(y)
    hinge = hinge_per_row(logits, y, config.margin)
    if config.deletion == "hinge_active":
        return hinge.sum() / (hinge > 0).sum().clamp_min(1)
    return hinge.mean()


def forget_term(ctx: Context, b: Batch, logits: torch.Tensor) -> torch.Tensor:
    """The deletion term of a batch of forget images.

    hinge_dual treats "every forget image wrong by the margin" as a constraint: each image has a weight
    (a multiplier, 1 at the start) that grows by dual_lr times its hinge at every step it is in, so the
    push goes to the images the retention terms keep bringing back. The weights are divided by their mean:
    the total push stays that of the plain hinge and is only redistributed (unnormalised multipliers ramp
    the whole deletion term up, forget in fewer steps and cost retained accuracy; docs/METHOD.md).
    The plain hinge gives every image 1/batch of the push however long it has resisted.
    """
    c = ctx.config
    ctx.state["forget_logits"] = (b.f_idx, logits.detach())  # the loop's deferred stop check reads them
    if c.deletion != "hinge_dual":
        return deletion_loss(logits, b.y_f, c)
    dual = ctx.state.setdefault("dual", torch.ones(len(ctx.state["x_forget"]), device=logits.device))
    w, dual_mean = dual[b.f_idx], dual.mean()  # copies taken before this step's update of the weights
    hinge = hinge_per_row(logits, b.y_f, c.margin)  # computed once: the loss and the weights' update share it
    dual[b.f_idx] = w + c.dual_lr * hinge.detach()
    return ((w / dual_mean) * hinge).mean()


@dataclass
class Batch:
    x_f: torch.Tensor
    y_f: torch.Tensor
    x_a: torch.Tensor | None = None
    y_a: torch.Tensor | None = None
    a_idx: torch.Tensor | None = None  # rows of the proxy set in this batch
    f_idx: torch.Tensor | None = None  # rows of the forget set in this batch

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
    step: int = 0                        # update steps taken so far (the loop keeps it current)


@torch.no_grad()
def original_proxy_features(ctx: Context) -> torch.Tensor:
    """h_theta0(x_adv) for the whole proxy set, computed once per run (projector init and S_ori share it)."""
    if "f_ori" not in ctx.state:
        x, check, parts = ctx.x_adv, ctx.state.get("check_cancel"), []
        for i in range(0, len(x), 512):
            if check is not None:
                check()
            parts.append(ctx.original.features(x[i:i + 512]))
        ctx.state["f_ori"] = torch.cat(parts)
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

    def optimizer(self, ctx: Context) -> SGD:
        c = ctx.config
        return SGD([(trainable(ctx.model), c.lr)], momentum=c.momentum, weight_decay=c.weight_decay,
                   nesterov=c.nesterov)

    def losses(self, ctx: Context, b: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class NegGrad(Method):
    name = "neggrad"
    summary = "gradient ascent on the forget set"

    def losses(self, ctx: Context, b: Batch) -> dict[str, torch.Tensor]:
        return {"del": forget_term(ctx, b, ctx.model(b.x_f))}


class Adv(Method):
    name = "adv"
    needs_proxy = True
    summary = "ascent on the forget set + descent on adversarial proxies"

    def losses(self, ctx: Context, b: Batch) -> dict[str, torch.Tensor]:
        mix = mixture_batch(ctx) if ctx.config.mix_weight > 0 else None
        logits = jointly(ctx.model, ctx.model, b.x_f, b.x_a, *([mix[0]] if mix else []))
        terms = {"del": b.w_f * forget_term(ctx, b, logits[0]),
                 "ret": b.w_a * F.cross_entropy(logits[1], b.y_a)}
        if mix:
            terms["mix"] = ctx.config.mix_weight * mixture_kl(logits[2], mix[1])
        return terms


class L2UL(Adv):
    name = "l2ul"
    summary = "Adv + MAS weight-importance regularisation"

    def prepare(self, ctx: Context) -> None:
        # MAS importance: mean over D_f of |d ||f(x)||_2 / d psi|, min-max normalised per tensor, inverted.
        model, x_f = ctx.model, ctx.state["x_forget"]

        def norm_of_output(params: dict, x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            return functional_call(model, params, (x.unsqueeze(0),)).norm(p=2)

        model.eval()
        omega = per_sample_abs_grad_mean(model, norm_of_output, x_f, x_f, ctx.config.importance_chunk,
                                         ctx.state.get("check_cancel"))
        ctx.state["weights"] = {k: 1 - (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12) for k, v in omega.items()}
        ctx.state["reference"] = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

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
        self._s_ori(ctx)
        ctx.state["reference"] = {k: v.detach().clone() for k, v in ctx.model.backbone.named_parameters()
                                  if v.requires_grad}
        if ctx.config.sr and ctx.config.importance_after == 0:
            self.measure_importance(ctx)

    def measure_importance(self, ctx: Context) -> None:
        """SR importance I = mean over proxy samples of |d L_align / d psi| for backbone parameters psi.

        Measured after `importance_after` update steps: at the start an identity projector makes
        L_align exactly 0 with a zero gradient, so importance there would be all zeros. Computed in
        eval mode (running statistics neither used from the batch nor changed). With sr_normalise the
        weights are divided by their maximum (into [0, 1]), so lam alone sets the strength of the SR
        term and lam * lr < 2 keeps the most important parameter's update stable. With sr_quantile q < 1
        they are divided by the q-quantile and clipped at 1: the importance is heavy-tailed (mean/max
        1/50 to 1/400), so dividing by the max leaves most weights near 0 and SR guards only the few largest.
        """
        model, R, A, c = ctx.model, ctx.R, ctx.anchors, ctx.config
        s_ori, was = self._s_ori(ctx), model.training
        check = ctx.state.get("check_cancel")  # the run's cancel check, called between batches
        t0 = time.perf_counter()
        model.eval()
        if c.importance == "per_sample":
            def align_one(params: dict, x: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
                f = functional_call(model, params, (x.unsqueeze(0),), kwargs={"method": "features"})
                return 1 - F.cosine_similarity(affinity(f, R, A), s0.unsqueeze(0)).squeeze(0)

            imp = per_sample_abs_grad_mean(model, align_one, ctx.x_adv, s_ori, c.importance_chunk, check)
        else:  # the authors' form: |grad| of each batch's mean align loss, weighted by batch size
            imp = {k: torch.zeros_like(v) for k, v in model.named_parameters() if v.requires_grad}
            names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
            for i in range(0, len(ctx.x_adv), c.batch_size):
                if check is not None:
                    check()
                f = model.features(ctx.x_adv[i:i + c.batch_size])
                loss = 1 - F.cosine_similarity(affinity(f, R, A), s_ori[i:i + c.batch_size], dim=1).mean()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for n, g in zip(names, grads, strict=True):
                    if g is not None:
                        imp[n] += g.abs() * len(f)
            imp = {k: v / len(ctx.x_adv) for k, v in imp.items()}
        model.train(was)
        weights = {k.removeprefix("backbone."): v.detach() for k, v in imp.items() if k.startswith("backbone.")}
        flat = torch.cat([w.flatten() for w in weights.values()])
        raw_mean, raw_max = float(flat.mean()), float(flat.max())
        scale = raw_max
        if c.sr_normalise and c.sr_quantile < 1:  # kthvalue: torch.quantile refuses tensors over 16M elements
            scale = float(flat.kthvalue(max(1, math.ceil(c.sr_quantile * len(flat)))).values)
        if c.sr_normalise and scale > 0:
            weights = {k: (w / scale).clamp_max(1.0) for k, w in weights.items()}
        ctx.state["weights"] = weights
        ctx.state["importance"] = {"mean": raw_mean, "max": raw_max, "after_steps": ctx.step,
                                   "mode": c.importance, "normalised": bool(c.sr_normalise and scale > 0),
                                   "scale": scale,
                                   "seconds": round(time.perf_counter() - t0, 3)}

    def optimizer(self, ctx: Context) -> SGD:
        c = ctx.config
        return SGD([(trainable(ctx.model.backbone), c.lr), (trainable(ctx.model.projector), c.projector_lr)],
                   momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.nesterov)

    def losses(self, ctx: Context, b: Batch) -> dict[str, torch.Tensor]:
        m, c = ctx.model, ctx.config
        mix = mixture_batch(ctx) if c.mix_weight > 0 else None
        rest = [b.x_a, *([mix[0]] if mix else [])]  # through the projector
        # The paper's L_del bypasses the projector; the loop's stop rule checks the prediction path.
        if c.deletion_path == "backbone":
            h_f, (f_adv, *f_mix) = m.backbone_features(b.x_f), jointly(m, m.features, *rest)
        else:
            h_f, f_adv, *f_mix = jointly(m, m.features, b.x_f, *rest)
        terms = {"del": b.w_f * forget_term(ctx, b, m.classify(h_f))}
        terms["ret"] = b.w_a * F.cross_entropy(m.classify(f_adv), b.y_a)
        if c.sa:
            s_unl = affinity(f_adv, ctx.R, ctx.anchors)
            terms["align"] = c.sa_weight * (1 - F.cosine_similarity(self._s_ori(ctx)[b.a_idx], s_unl, dim=1).mean())
        if c.sr and ctx.step >= c.importance_after and "weights" not in ctx.state:
            self.measure_importance(ctx)
        if c.sr and ctx.step >= c.sr_from:
            terms["reg"] = c.lam * weighted_l2_penalty(m.backbone, ctx.state["reference"], ctx.state["weights"])
        if c.cr:
            w = m.classifier_weight()
            terms["cr"] = c.cr_weight * (0.99 * w.abs().sum() + 0.005 * w.pow(2).sum())
        if mix:
            terms["mix"] = c.mix_weight * mixture_kl(m.classify(f_mix[0]), mix[1])
        return terms


MIX_POOL = 8  # mixtures made per run, in mix_batch units: the frozen stages and the original see each one once


def mixture_pool(x_forget: torch.Tensor, config: UnlearnConfig, y_forget: torch.Tensor | None = None) -> torch.Tensor:
    """MIX_POOL * mix_batch mixtures lam * x_i + (1 - lam) * x_j of two forget images, lam in [0.3, 0.7].

    Made once per run (seeded): the original's answers on them are computed once, and when the first stages
    are frozen their outputs too, instead of on a fresh batch every step. mix_pairs="distinct" never mixes an
    image with itself (that mixture is the forget image), "cross" joins two images of different classes (y_forget;
    distinct images when every forget image has one class): the original calls a mixture of one class that class,
    and keeping its answer there pulls against forgetting them."""
    g = torch.Generator().manual_seed(config.seed * 100_003)
    n = MIX_POOL * config.mix_batch
    i, j = torch.randint(len(x_forget), (n,), generator=g), torch.randint(len(x_forget), (n,), generator=g)
    if config.mix_pairs != "any" and len(x_forget) > 1:
        cross = config.mix_pairs == "cross" and y_forget is not None and len(y_forget.unique()) > 1
        y = y_forget.cpu() if cross else torch.arange(len(x_forget))
        # j: drawn uniformly among the images of another class than i's (another image, for "distinct")
        others = [torch.nonzero(y != y[a]).flatten() for a in range(len(x_forget))]
        u = torch.rand(n, generator=g)
        j = torch.stack([others[a][int(v * len(others[a]))] for a, v in zip(i.tolist(), u.tolist(), strict=True)])
    lam = (0.3 + 0.4 * torch.rand(n, generator=g)).to(x_forget.device).view(-1, *[1] * (x_forget.dim() - 1))
    return lam * x_forget[i.to(x_forget.device)] + (1 - lam) * x_forget[j.to(x_forget.device)]


PICK_MIXTURES = 256  # fresh mixtures that score the polish steps' forgotten states (polish_pick="mix_kl")


def pick_mixtures(x_forget: torch.Tensor, config: UnlearnConfig, y_forget: torch.Tensor | None = None) -> torch.Tensor:
    """The mixtures on which polish_pick="mix_kl" compares a run's forgotten states with the original: two distinct
    forget images each, drawn apart from the training mixtures (another seed), so the score is not what the
    mixture term pulls on. Data-free, like the rest of the setting."""
    other = dataclasses.replace(config, seed=config.seed + 999, mix_pairs="distinct", mix_batch=PICK_MIXTURES)
    return mixture_pool(x_forget, other, y_forget)[:PICK_MIXTURES]


def mixture_batch(ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's mixtures of two forget images (rows of ctx.state["mix_pool"]) and the original's answers on them.

    The retention term on them is KL(original || live) (`mixture_kl`). Data-free, like the rest of the
    instance-unlearning setting: only the forget set and the frozen original are used. The mixtures lie between
    forget images, away from each of them, so keeping the original's answers there resists the global shortcut
    (the runner-up class everywhere) without asking the forget images themselves to stay. The rows depend on
    (seed, step) only: runs stay reproducible.
    """
    pool, c = ctx.state["mix_pool"], ctx.config
    if "mix_target" not in ctx.state:
        with torch.no_grad(), trunk_dtype(None):  # the original's answers: float32, whatever the steps compute in
            ctx.state["mix_target"] = torch.cat([torch.softmax(ctx.original(pool[i:i + 512]), 1)
                                                 for i in range(0, len(pool), 512)])
    g = torch.Generator().manual_seed(c.seed * 100_003 + ctx.step)
    rows = torch.randint(len(pool), (c.mix_batch,), generator=g).to(pool.device)
    return ctx.state.get("steps_mix", pool)[rows], ctx.state["mix_target"][rows]  # the steps' copy where there is one


def mixture_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)), averaged over the rows."""
    return F.kl_div(F.log_softmax(logits, 1), target, reduction="batchmean")


METHODS: dict[str, type[Method]] = {m.name: m for m in (NegGrad, Adv, L2UL, StructGuard)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]()
