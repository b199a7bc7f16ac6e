"""The one shared unlearning loop, the unlearned model, and its persistence."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .methods import (
    Batch,
    Context,
    Method,
    UnlearnConfig,
    get_method,
    mixture_kl,
    mixture_pool,
    original_proxy_features,
    pick_mixtures,
    true_and_best_other,
)
from .models import ResNet, compute_dtype, freeze_before, load_weights, model_from_card, precision_name, trunk_dtype
from .proxy import Cancelled, make_proxy_set


class UnlearnError(RuntimeError):
    """An unlearning run cannot proceed; the message says why and what to do."""


class Projector(nn.Sequential):
    """p_w: Linear(d,d) -> BatchNorm1d -> ReLU -> Linear(d,d), between h and classify."""

    def __init__(self, dim: int) -> None:
        super().__init__(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, dim))

    @torch.no_grad()
    def init_identity(self, feats: torch.Tensor) -> None:
        """Start as the identity on the given (non-negative) features.

        Linear = I; BatchNorm's affine and running statistics set to the features'
        mean/std so that, in eval mode, BN(h) = h; ReLU keeps h >= 0 as it is. The
        unlearned model then starts exactly where the original is.
        """
        d = feats.shape[1]
        for lin in (self[0], self[3]):
            lin.weight.copy_(torch.eye(d))
            lin.bias.zero_()
        bn: nn.BatchNorm1d = self[1]
        mean = feats.mean(0)
        var = feats.var(0, unbiased=True) if len(feats) > 1 else torch.zeros_like(mean)  # one sample: no spread
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_((var + bn.eps).sqrt())  # BN divides by sqrt(running_var + eps): undo exactly that
        bn.bias.copy_(mean)


class UnlearnedModel(nn.Module):
    """classify(p(h(x))): a backbone (ResNet or an earlier UnlearnedModel) plus an optional projector."""

    def __init__(self, backbone: nn.Module, projector: Projector | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def train(self, mode: bool = True) -> UnlearnedModel:
        """Projectors of earlier runs (inside the backbone) stay in eval mode: their BatchNorm keeps
        its statistics and works on a forget batch of one image."""
        super().train(mode)
        inner = self.backbone
        while isinstance(inner, UnlearnedModel):
            if inner.projector is not None:
                inner.projector.eval()
            inner = inner.backbone
        return self

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone.features(x)
        return h if self.projector is None else self.projector(h)

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        return self.backbone.classify(f)

    def classifier_weight(self) -> torch.Tensor:
        return self.base().linear.weight

    def base(self) -> ResNet:
        """The innermost ResNet (Grad-CAM reads its last conv stage)."""
        b = self.backbone
        return b.base() if isinstance(b, UnlearnedModel) else b

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.base().feature_map(x)

    def chain(self) -> list[int | None]:
        """Projector dims from the innermost level outwards (persisted in the card)."""
        inner = self.backbone.chain() if isinstance(self.backbone, UnlearnedModel) else []
        return inner + [None if self.projector is None else self.feature_dim]

    def forward(self, x: torch.Tensor, method: str = "logits") -> torch.Tensor:
        f = self.features(x)
        return f if method == "features" else self.classify(f)


def wrap(model: nn.Module) -> UnlearnedModel:
    return model if isinstance(model, UnlearnedModel) and model.projector is None else UnlearnedModel(model)


def anchor_map(d: int, e: int, seed: int = 0) -> torch.Tensor:
    """R: identity when d = e, else a seeded Gaussian d x e matrix with unit-norm columns."""
    if d == e:
        return torch.eye(d)
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(d, e, generator=g)
    return r / r.norm(dim=0, keepdim=True)


# ------------------------------------------------------------------ callbacks


@dataclass
class Callbacks:
    """How a run talks to its caller; every field is optional."""

    on_progress: Callable[[float, str], None] | None = None   # fraction in [0, 1], phase message
    on_step: Callable[[dict], None] | None = None             # one history record per update step
    should_cancel: Callable[[], bool] | None = None
    # Snapshots of the prediction-path features of `snapshot_inputs` (images) while the model changes:
    # on_snapshot(step, features) at step 0, at every step snapshot_due(step) accepts, and at the last step.
    on_snapshot: Callable[[int, torch.Tensor], None] | None = None
    snapshot_inputs: torch.Tensor | None = None
    snapshot_due: Callable[[int], bool] | None = None           # default: every step
    on_partial: Callable[[Path], None] | None = None         # the hidden folder a run is being saved into

    def progress(self, fraction: float, message: str) -> None:
        if self.on_progress:
            self.on_progress(min(max(fraction, 0.0), 1.0), message)

    def check_cancel(self, where: str) -> None:
        if self.should_cancel and self.should_cancel():
            raise Cancelled(f"cancelled during {where}")


@dataclass
class Outcome:
    model: UnlearnedModel
    history: list[dict]
    timings: dict[str, float]
    stop_reason: str
    steps: int
    proxy: tuple[torch.Tensor, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------- loop


@torch.no_grad()
def _forget_accuracy(model: nn.Module, x_f: torch.Tensor, y_f: torch.Tensor, step: int = 0,
                     stop_margin: float = 0.0) -> tuple[float, bool]:
    """(forget accuracy in %, whether the stop rule is met: every image misclassified, and with stop_margin > 0
    its true logit at least that far below the best other, so a change of precision does not bring it back)."""
    model.eval()
    logits = model(x_f)
    if not torch.isfinite(logits).all():  # NaN logits would otherwise count as "forgotten"
        when = f"after step {step}" if step else "before any update"
        raise UnlearnError(f"the model's outputs on the forget set are not finite {when} (weights or BatchNorm "
                           "statistics diverged); lower the learning rate and run again")
    acc = float((logits.argmax(1) == y_f).float().mean() * 100)
    if acc > 0 or stop_margin <= 0:
        return acc, acc == 0.0
    true, best_other = true_and_best_other(logits, y_f)
    return acc, bool((true - best_other <= -stop_margin).all())


def _update_mode(model: UnlearnedModel, config: UnlearnConfig, checked: bool) -> None:
    """Module modes during update steps.

    bn="frozen": everything in eval mode (BatchNorm keeps the original running statistics; the
    bounded deletion term does not inflate activations, so nothing needs re-normalising).
    bn="train": train mode, as the authors; their loop never puts the projector back in train mode
    after its first forget-accuracy check, so with schedule="paper" it stays in eval mode from then on.
    """
    if config.bn == "frozen":
        model.eval()
        return
    model.train()
    if config.schedule == "paper" and checked and model.projector is not None:
        model.projector.eval()


# The stop rule's float32 forget check after every step costs a forward of the forget set (5 of a k=32 step's 94 ms).
# When every step's batch holds every forget image, the next step's forward has their logits already, in the steps'
# dtype: while one image is still recognised there by more than DEFER_SLACK logits, the float32 check cannot stop the
# run and is skipped. The two precisions' margins differ by at most 0.2 logits on default runs
# (bench/results/deferred-check-intel.md), so the run stops at the same step with the same weights; a skipped check
# records the accuracy that forward measured. None: the float32 check after every step.
DEFER_SLACK: float | None = 1.0


def _can_defer(ctx: Context, n_forget: int) -> bool:
    """Whether the next step's forward gives the prediction-path logits of every forget image, as the check would:
    all of them in every batch, BatchNorm frozen (eval mode), and L_del through the prediction path."""
    c = ctx.config
    return (DEFER_SLACK is not None and n_forget <= c.batch_size and c.bn == "frozen"
            and (c.deletion_path == "prediction" or getattr(ctx.model, "projector", None) is None))


def _deferred_check(ctx: Context, live: UnlearnedModel, x_forget: torch.Tensor, y_forget: torch.Tensor,
                    step: int) -> tuple[float, bool]:
    """(forget accuracy, stop rule met) for the weights the last step left, from this step's forward when it shows
    an image still recognised beyond DEFER_SLACK; otherwise from the float32 check."""
    seen = ctx.state.pop("forget_logits", None)
    if seen is not None:
        rows, logits = seen
        true, other = true_and_best_other(logits.float(), y_forget[rows])
        if float((true - other).max()) > DEFER_SLACK - ctx.config.stop_margin:
            return float((true > other).float().mean() * 100), False
    acc, met = _forget_accuracy(live, x_forget, y_forget, step, ctx.config.stop_margin)
    _update_mode(live, ctx.config, checked=True)
    return acc, met


def base_resnet(model: nn.Module) -> ResNet:
    """The innermost ResNet of a model (itself, or the base of an UnlearnedModel chain)."""
    return model.base() if isinstance(model, UnlearnedModel) else model


@contextmanager
def entering_at(stage: str, *models: nn.Module) -> Iterator[None]:
    """Inputs enter these models at `stage` (ResNet.entry) inside the block; images again after it."""
    bases = [base_resnet(m) for m in models]
    for b in bases:
        b.entry = stage
    try:
        yield
    finally:
        for b in bases:
            b.entry = "stem"


@torch.no_grad()
def _encode(model: nn.Module, x: torch.Tensor, stage: str, cb: Callbacks, chunk: int = 512) -> torch.Tensor:
    """Inputs of `stage` for images x, through the frozen stages before it (no-op for "stem")."""
    if stage == "stem":
        return x
    base, parts = base_resnet(model).eval(), []
    for i in range(0, len(x), chunk):
        cb.check_cancel("preparation")
        parts.append(base.encode(x[i:i + chunk], stage))
    return torch.cat(parts)


@torch.no_grad()
def _snapshot(live: UnlearnedModel, z: torch.Tensor, step: int, cb: Callbacks, chunk: int = 512) -> None:
    live.eval()
    parts = []
    for i in range(0, len(z), chunk):
        cb.check_cancel("the update steps")
        parts.append(live.features(z[i:i + chunk]))
    cb.on_snapshot(step, torch.cat(parts))


def run_unlearning(model: nn.Module, x_forget: torch.Tensor, y_forget: torch.Tensor, num_classes: int,
                   config: UnlearnConfig, anchors: torch.Tensor | None = None,
                   callbacks: Callbacks | None = None) -> Outcome:
    """Unlearn (x_forget, y_forget) from `model` with config.method; the input model is not modified.

    Phases: proxy set (PGD against the original), `prepare`, then update steps in passes
    over the proxy set (the forget set for NegGrad) until forget accuracy is 0 or max_epochs
    passes. Only the stages from config.train_from on are updated: the frozen ones before it run once
    per input (forget set, proxies, mixtures, snapshot inputs) and every step starts after them.
    Cancel is checked inside every long loop (PGD passes, importance batches, within each step,
    snapshots), so it answers within about a second; a NaN loss stops the run.
    """
    config.validate()
    cb = callbacks or Callbacks()
    recipe = get_method(config.method)
    device = x_forget.device
    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}

    original = copy.deepcopy(model).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    live = wrap(copy.deepcopy(model)).to(device)
    live.requires_grad_(True)
    entry = config.train_from
    if entry != "stem" and not isinstance(base_resnet(live), ResNet):
        raise UnlearnError(f"train_from={entry!r} needs one of our ResNets (it splits the network by stage); "
                           "use train_from='stem' for this model")

    ctx = Context(model=live, original=original, config=config)
    # The conv stages of the attacks and the update steps compute in this dtype (bf16 only where it is native
    # with precision="auto"); the stop rule's forget check, snapshots and every measurement stay float32.
    dtype = ctx.state["trunk_dtype"] = compute_dtype(config.precision, device)
    # the recipes' long loops (importance, the original's proxy features) call this between batches
    ctx.state["check_cancel"] = lambda: cb.check_cancel("the importance measurement")

    t0 = time.perf_counter()
    if recipe.needs_proxy:
        cb.progress(0.0, "generating the adversarial proxy set")
        with trunk_dtype(dtype):
            ctx.x_adv, ctx.y_adv, _ = make_proxy_set(
                original, x_forget, y_forget, num_classes, config.n_adv, config.eps, config.pgd_step, config.pgd_iters,
                config.seed, on_chunk=lambda done, total: cb.progress(0.4 * done / total, f"proxy set {done}/{total}"),
                should_cancel=cb.should_cancel, early_exit=config.pgd_early_exit)
        if config.proxy_labels == "original":  # an attack that missed its target keeps what theta_0 says
            labels = []
            with torch.no_grad():
                for i in range(0, len(ctx.x_adv), 512):
                    cb.check_cancel("the proxy set")
                    labels.append(original(ctx.x_adv[i:i + 512]).argmax(1))
            ctx.y_adv = torch.cat(labels)
    # From here on every input is what the stage `entry` takes (images when it is the stem).
    proxy_images = ctx.x_adv
    if recipe.needs_proxy:
        ctx.x_adv = _encode(original, ctx.x_adv, entry, cb)
    z_forget = _encode(original, x_forget, entry, cb)
    ctx.state["x_forget"] = z_forget
    if config.mix_weight > 0 and recipe.needs_proxy:
        ctx.state["mix_pool"] = _encode(original, mixture_pool(x_forget, config, y_forget), entry, cb)
    # The steps' rows, stored in the steps' dtype where the stage they enter casts them to it anyway (its first
    # convolutions): bit-identical outputs without casting every step's rows twice (about 5 % of a k=32 step).
    # The float32 originals stay for the float32 uses: the forget check, the original's answers, importance.
    if dtype is not None and entry != "stem" and base_resnet(live).enters_by_convolution(entry):  # a ResNet (above)
        ctx.state["steps_forget"] = z_forget.to(dtype)
        if recipe.needs_proxy:
            ctx.state["steps_proxy"] = ctx.x_adv.to(dtype)
        if "mix_pool" in ctx.state:
            ctx.state["steps_mix"] = ctx.state["mix_pool"].to(dtype)
    if config.polish_steps > 0 and config.polish_pick == "mix_kl":  # the original's answers, float32
        mixtures = pick_mixtures(x_forget, config, y_forget)  # PICK_MIXTURES rows: one forward each
        with torch.no_grad():
            answers = torch.softmax(original(mixtures), 1)
        ctx.state["pick"] = (_encode(original, mixtures, entry, cb), answers)
    z_snap = None
    if cb.on_snapshot and cb.snapshot_inputs is not None:
        z_snap = _encode(original, cb.snapshot_inputs.to(device), entry, cb)
    timings["proxy"] = time.perf_counter() - t0

    with entering_at(entry, live, original):
        freeze_before(live.base(), entry)
        outcome = _update(ctx, recipe, live, z_forget, y_forget, anchors, z_snap, cb, timings)
    outcome.model.requires_grad_(True)  # the returned model is whole again: a later run may update any stage
    outcome.proxy = (proxy_images, ctx.y_adv) if recipe.needs_proxy else None
    return outcome


def lr_scale(config: UnlearnConfig, step: int, steps_per_epoch: int, late: bool = False) -> float:
    """The learning-rate schedule's factor for update step `step` (0-based): a linear warm-up over
    `warmup_steps`, then `lr_decay` once per pass, times `late_lr` once the run is `late` (forget accuracy has
    fallen to late_below). Exactly 1.0 by default (constant rate)."""
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    return warm * config.lr_decay ** (step // steps_per_epoch) * (config.late_lr if late else 1.0)


def _update(ctx: Context, recipe: Method, live: UnlearnedModel, x_forget: torch.Tensor, y_forget: torch.Tensor,
            anchors: torch.Tensor | None, z_snap: torch.Tensor | None, cb: Callbacks,
            timings: dict[str, float]) -> Outcome:
    """Projector, `prepare` and the update steps, on inputs that enter at config.train_from."""
    config, device = ctx.config, x_forget.device
    t0 = time.perf_counter()
    if recipe.uses_projector:
        if anchors is None:
            raise UnlearnError("StructGuard needs semantic anchors: build an AnchorSet first")
        if len(ctx.x_adv) < 2:
            raise UnlearnError("StructGuard's projector (BatchNorm) needs at least 2 proxy images: "
                               "raise the adversarial images per forget image (n_adv) or forget more images")
        d = live.feature_dim
        ctx.anchors = anchors.to(device).float()
        ctx.R = anchor_map(d, ctx.anchors.shape[1], config.seed).to(device)
        projector = Projector(d).to(device)
        if config.projector_init == "identity":
            projector.init_identity(original_proxy_features(ctx))
        live = UnlearnedModel(live.backbone, projector).to(device)
        ctx.model = live
    cb.check_cancel("preparation")
    cb.progress(0.4, f"{recipe.name}: preparing")
    recipe.prepare(ctx)
    timings["importance"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    opt = recipe.optimizer(ctx)
    gen = torch.Generator().manual_seed(config.seed + 1)
    n_pool = len(ctx.x_adv) if recipe.needs_proxy else len(x_forget)
    steps_per_epoch = max(1, math.ceil(n_pool / config.batch_size))
    max_steps = config.max_epochs * steps_per_epoch
    history: list[dict] = []
    step, stop_reason = 0, "max_epochs"
    f_order = torch.randperm(len(x_forget), generator=gen)
    f_pos = 0
    checked = config.check_first_pass
    rows_forget = ctx.state.get("steps_forget", x_forget)  # the steps' copies where there are (run_unlearning)
    rows_proxy = ctx.state.get("steps_proxy", ctx.x_adv)
    due = cb.snapshot_due or (lambda s: True)
    snapped = -1

    def snapshot(at: int) -> None:
        nonlocal snapped
        if z_snap is not None and cb.on_snapshot and snapped != at:
            with trunk_dtype(ctx.state["trunk_dtype"]):  # frames of a picture, stored in float16: the steps' dtype
                _snapshot(live, z_snap, at, cb)
            snapped = at

    acc, met = _forget_accuracy(live, x_forget, y_forget, stop_margin=config.stop_margin)
    snapshot(0)
    history.append({"step": 0, "epoch": 0.0, "loss": None, "terms": {}, "forget_acc": acc})
    if met and checked:
        stop_reason = "forgotten"
    pending: dict | None = None  # the last step's record while its forget accuracy waits for the next forward
    defer = _can_defer(ctx, len(x_forget))
    polish: dict[str, Any] = {}  # once the stop rule is first met: where, until when, the last weights that met it
    late = {"from": None}  # the step whose check first saw forget accuracy <= late_below (late_lr from then on)

    def pick_score() -> float:
        """KL(original || live) on the pick mixtures: how far the weights have moved from the original's answers
        between the forget images."""
        rows, answers = ctx.state["pick"]
        live.eval()
        with torch.no_grad(), trunk_dtype(ctx.state["trunk_dtype"]):
            logits = live(rows).float()
        _update_mode(live, config, checked=True)
        return float(mixture_kl(logits, answers))

    def done(met: bool) -> bool:
        """Whether the run stops after this check: once the stop rule is met, or with polish_steps, once that many
        more steps are taken (the state that met the rule which polish_pick prefers is kept and returned)."""
        if config.polish_steps <= 0:
            return met
        if met and not polish:
            polish.update(start=step, until=step + config.polish_steps)
        if not polish:
            return False
        if met:
            score = pick_score() if "pick" in ctx.state else None
            if score is None or score < polish.get("score", math.inf):
                polish.update(kept=step, score=score,
                              weights={k: v.detach().clone() for k, v in live.state_dict().items()})
        return step >= polish["until"]

    def finish(record: dict, acc: float | None) -> None:
        """Complete a step's record with the forget accuracy of the weights it left, and report it."""
        record["forget_acc"] = acc  # None: not checked at this step
        if late["from"] is None and config.late_lr < 1 and acc is not None and acc <= config.late_below:
            late["from"] = record["step"]
        history.append(record)
        if cb.on_step:
            cb.on_step(record)
        shown = f"forget accuracy {acc:.1f}%" if acc is not None else "first pass, forget accuracy not checked yet"
        cb.progress(0.45 + 0.45 * record["step"] / max_steps, f"{recipe.name}: step {record['step']}, {shown}")

    _update_mode(live, config, checked=False)
    while stop_reason != "forgotten" and step < max_steps:
        order = torch.randperm(n_pool, generator=gen)
        for s in range(steps_per_epoch):
            cb.check_cancel("the update steps")
            rows = order[s * config.batch_size:(s + 1) * config.batch_size].to(device)
            if recipe.uses_projector and len(rows) < 2:
                continue  # BatchNorm cannot train on a batch of one; the rows come back next pass
            if recipe.needs_proxy:
                take = min(config.batch_size, len(x_forget))
                if f_pos + take > len(x_forget):
                    f_order, f_pos = torch.randperm(len(x_forget), generator=gen), 0
                f_rows = f_order[f_pos:f_pos + take].to(device)
                f_pos += take
                batch = Batch(rows_forget[f_rows], y_forget[f_rows], rows_proxy[rows], ctx.y_adv[rows], rows, f_rows)
            else:
                batch = Batch(rows_forget[rows], y_forget[rows], f_idx=rows)
            ctx.step = step
            with trunk_dtype(ctx.state["trunk_dtype"]):
                terms = recipe.losses(ctx, batch)
            if pending is not None:  # this forward saw every forget image with the last step's weights
                acc, met = _deferred_check(ctx, live, x_forget, y_forget, step)
                finish(pending, acc)
                pending = None
                if done(met):
                    stop_reason = "forgotten"
                    break
            loss = torch.stack(list(terms.values())).sum()
            if not torch.isfinite(loss):
                bad = {k: float(v.detach()) for k, v in terms.items()}
                raise UnlearnError(f"the loss became {float(loss.detach())} at step {step + 1} (terms {bad}); "
                                   "lower the learning rate or the regulariser weight and run again")
            opt.zero_grad()
            loss.backward()
            opt.lr_scale = lr_scale(config, step, steps_per_epoch, late=late["from"] is not None)
            opt.step()
            step += 1
            cb.check_cancel("the update steps")
            # The authors skip the check during the first pass (a random projector would stop the run at once).
            checked = checked or step > steps_per_epoch
            record = {"step": step, "epoch": step / steps_per_epoch, "loss": float(loss.detach()),
                      "terms": {k: float(v.detach()) for k, v in terms.items()}}
            if due(step):
                snapshot(step)
            if checked and step < max_steps and defer:
                pending = record  # the next step's forward tells whether the float32 check is needed
                continue
            if checked:
                acc, met = _forget_accuracy(live, x_forget, y_forget, step, config.stop_margin)
            _update_mode(live, config, checked)
            finish(record, acc if checked else None)
            if checked and done(met):
                stop_reason = "forgotten"
                break
            if step >= max_steps:
                break
    if polish:  # the polish steps may end with an image recognised again: return the last state that met the rule
        live.load_state_dict(polish["weights"])
        stop_reason = "forgotten"
        snapped = -1  # the last frame shows the returned weights, also when this step already has one
    snapshot(step)  # the timeline always ends at the returned model
    live.eval()
    timings["updates"] = time.perf_counter() - t0
    if "importance" in ctx.state:  # measured inside the updates: move its time to its own phase
        timings["importance"] += ctx.state["importance"]["seconds"]
        timings["updates"] -= ctx.state["importance"]["seconds"]
    extra = {"importance": ctx.state["importance"], "importance_weights": ctx.state["weights"]} \
        if "importance" in ctx.state else {}
    extra["precision"] = precision_name(ctx.state["trunk_dtype"])  # what "auto" became
    if late["from"] is not None:
        extra["late_lr_from"] = late["from"]
    if polish:
        extra["polish"] = {"from": polish["start"], "until": polish["until"], "returned": polish["kept"],
                           "pick": config.polish_pick, "score": polish["score"]}
    return Outcome(live, history, timings, stop_reason, step, None, extra)


def term_shares(history: list[dict]) -> dict[str, float]:
    """Each loss term's share of the run: sum over steps of |term| / sum of all |terms|."""
    totals: dict[str, float] = {}
    for record in history:
        for name, value in record.get("terms", {}).items():
            totals[name] = totals.get(name, 0.0) + abs(value)
    grand = sum(totals.values())
    return {name: (v / grand if grand else 0.0) for name, v in totals.items()}


# --------------------------------------------------------------- persistence


def save_unlearned(model: UnlearnedModel, directory: Path, base_card: dict, extra: dict | None = None) -> dict:
    """model.safetensors + model.json (the base card and the projector chain)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # serialised in memory and written by Python: the file gets the umask's mode like every other file of a run
    # (safetensors' own save_file creates 0600) and a failed write is an OSError (full disk, read-only folder)
    (directory / "model.safetensors").write_bytes(safetensors_bytes(state))
    card = {"kind": "unlearned", "base_card": base_card, "chain": model.chain(), **(extra or {})}
    (directory / "model.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def build_unlearned(card: dict) -> UnlearnedModel:
    """An empty UnlearnedModel with the structure a card describes."""
    net: nn.Module = model_from_card(card["base_card"])
    for dim in card["chain"]:
        net = UnlearnedModel(net, None if dim is None else Projector(dim))
    if not isinstance(net, UnlearnedModel):
        net = UnlearnedModel(net)
    return net


def load_unlearned(run_dir: str | Path) -> UnlearnedModel:
    run_dir = Path(run_dir)
    try:
        card = json.loads((run_dir / "model.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise UnlearnError(f"{run_dir} has no readable model.json: {exc}") from exc
    model = build_unlearned(card)
    try:
        state = load_file(str(run_dir / "model.safetensors"))
    except Exception as exc:
        raise UnlearnError(f"{run_dir}/model.safetensors cannot be read: {exc}") from exc
    load_weights(model, state, str(run_dir / "model.safetensors"))
    return model.eval()


__all__ = ["Callbacks", "Cancelled", "Outcome", "Projector", "UnlearnError", "UnlearnedModel", "anchor_map",
           "build_unlearned", "entering_at", "load_unlearned", "run_unlearning", "save_unlearned", "term_shares",
           "wrap"]
