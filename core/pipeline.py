"""One unlearning request from start to saved run: the entry point of the CLI and the dashboard.

execute_run passes typed values through five stages, each a short function:

    resolve(request)            -> Resolved   model, data, anchors, forget rows, config, device
    measure(original, ...)      -> Measured   outputs of the original model (cached on disk)
    unlearn(resolved)           -> Unlearned  the engine's loop, with feature snapshots for the timeline
    measure(unlearned, ...)     -> Measured   the same rows through the unlearned model
    assemble + save             -> Path       run.json and audit.npz, written atomically
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from . import runs
from .anchors import AnchorSet, build_anchor_set, load_anchor_texts, validate_anchor_texts
from .audit.affinity import sample_affinity
from .data import DataError, Dataset, load_dataset
from .engine import (
    Callbacks,
    Outcome,
    UnlearnError,
    anchor_map,
    load_unlearned,
    run_unlearning,
    save_unlearned,
    term_shares,
)
from .methods import UnlearnConfig, default_config
from .metrics import (
    Outputs,
    accuracy_from_probs,
    dimensional_alignment,
    outputs,
    per_class_accuracy,
    structure_scores,
    true_class_confidence,
)
from .models import (
    PRECISIONS,
    SAMPLE_MODELS,
    LoadedModel,
    compute_dtype,
    load_model,
    pick_device,
    precision_name,
    trunk_dtype,
)
from .peak_memory import PeakMemory
from .train import prepare_model, to_device_format

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)
MAX_SNAPSHOTS = 40
ACCURACIES = ("forget_acc", "retain_acc", "test_acc")


@dataclass
class RunRequest:
    """Everything a user chooses for one run; recorded in run.json."""

    forget_ids: list[int]
    method: str = "structguard"
    model: str = "fmnist_resnet18_narrow"       # sample model name or card path
    parent_run: str | None = None               # run directory to continue from (sequential requests)
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the method defaults
    seed: int = 0
    anchor_texts: dict[str, list[str]] | None = None      # None: the dataset's default anchor file
    encoder: str = "auto"
    clip_checkpoint: str | None = None
    runs_root: str | None = None
    audit_per_class: int = 20                   # retained and test samples per class in the audit sample
    retain_eval: int = 5000                     # retain accuracy on a fixed subset of this size; 0 = full set
    # What the conv stages compute in when measuring the dataset rows (retain subset, test set, audit sample):
    # "auto" is bfloat16 where the device has it natively (3x faster on such a CPU; A_test within 0.25 points,
    # bench/results/eval-precision-*.md). The forget set is always measured in float32, as the stop rule checks it.
    eval_precision: str = "auto"
    snapshot_every: int = 0                     # audit-sample snapshot every N steps; 0 = about 30 over the run
    device: str | None = None
    uploads: list[tuple[np.ndarray, int]] = field(default_factory=list)  # user images (uint8 CxHxW, label)
    owner: str | None = None                    # sha256 of the dashboard session's owner secret; None: command line
    bench_cell: str | None = None               # the bench cell this run is (core/cli_bench.py; --resume finds it)


# ------------------------------------------------------------------------------ values between stages


@dataclass
class StartModel:
    """The model a run starts from: a sample/user model or the result of an earlier run."""

    model: nn.Module
    card: dict                       # the base model's card (a chain keeps its root's card)
    key: str                         # cache key of its outputs: weights hash or parent run id
    name: str
    parent_meta: dict | None = None
    forgotten_before: set[int] = field(default_factory=set)


@dataclass
class Rows:
    """Row positions into the dataset's splits that a run measures."""

    forget: torch.Tensor             # train positions of the forget ids (uploads come on top)
    retain: torch.Tensor             # retain subset for A_r
    retain_set: str                  # "full" or "subset of N"
    test: torch.Tensor
    audit_retain: torch.Tensor       # audit sample: retained and test images per class
    audit_test: torch.Tensor


@dataclass
class Labels:
    forget: np.ndarray
    retain: np.ndarray
    test: np.ndarray
    audit: np.ndarray                # forget, audit_retain, audit_test in that order


@dataclass
class Resolved:
    """A validated request: everything the engine and the measurements need."""

    request: RunRequest
    ds: Dataset
    start: StartModel
    ids: list[int]
    config: UnlearnConfig
    anchor_set: AnchorSet
    device: torch.device
    rows: Rows
    x_forget: torch.Tensor           # forget images (dataset rows then uploads), on the device
    y_forget: torch.Tensor
    labels: Labels

    @property
    def k(self) -> int:
        return len(self.y_forget)

    @property
    def all_forgotten(self) -> set[int]:
        return self.start.forgotten_before | set(self.ids)

    @property
    def eval_dtype(self) -> torch.dtype | None:
        """The conv dtype of the dataset rows' measurements (None: float32); the forget set is always float32."""
        return compute_dtype(self.request.eval_precision, self.device)


@dataclass
class Measured:
    """One model's outputs on the forget set, the retain subset, the test set and the audit sample."""

    forget: Outputs
    retain: Outputs
    test: Outputs
    audit_retain: Outputs
    audit_test: Outputs

    @cached_property
    def kept(self) -> Outputs:
        """The audit sample without the forget set: what structure preservation is judged on."""
        return Outputs.concat(self.audit_retain, self.audit_test)

    @cached_property
    def audit(self) -> Outputs:
        return Outputs.concat(self.forget, self.audit_retain, self.audit_test)


@dataclass
class Unlearned:
    model: nn.Module
    outcome: Outcome
    snapshot_steps: list[int]
    snapshots: list[np.ndarray]      # prediction-path features of the audit sample, float16


# ------------------------------------------------------------------------------------- small helpers


def cached_dataset(name: str, data_dir: str | None) -> Dataset:
    """One loaded copy per (dataset, folder, configured folder): the env var is part of the key."""
    return _cached_dataset(name, data_dir, os.environ.get("STRUCTGUARD_FASHION_DIR"))


@lru_cache(maxsize=4)
def _cached_dataset(name: str, data_dir: str | None, _configured: str | None) -> Dataset:
    return load_dataset(name, data_dir)


def cached_model(name_or_path: str) -> LoadedModel:
    """A fresh copy of a model loaded once per process (a bench worker runs many cells on the same model);
    the key holds the size and modification time of its files, so a changed file is read again."""
    loaded = _cached_model(name_or_path, _model_stamp(name_or_path))
    return LoadedModel(copy.deepcopy(loaded.model), copy.deepcopy(loaded.card), loaded.path)


def _model_stamp(name_or_path: str) -> tuple:
    path = Path(name_or_path)
    files = [path, path.with_suffix(".json"), path.with_suffix(".safetensors"),
             SAMPLE_MODELS / f"{name_or_path}.json", SAMPLE_MODELS / f"{name_or_path}.safetensors"]
    return tuple((str(f), s.st_size, s.st_mtime_ns) for f in files if (s := _stat(f)))


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


@lru_cache(maxsize=2)
def _cached_model(name_or_path: str, _stamp: tuple) -> LoadedModel:
    return load_model(name_or_path)


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def validate_forget_ids(ids: list[int], ds: Dataset, already_forgotten: set[int] = frozenset()) -> list[int]:
    """Clear errors for empty, duplicate, out-of-range or impossible forget sets.

    Ids must be integers already (Python or NumPy ints): a float, a boolean or a numeric string is
    refused, never rounded or converted (core.forget_ids parses files with the same rule)."""
    odd = [i for i in ids if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer))]
    if odd:
        raise UnlearnError(f"forget ids must be integers; got {', '.join(repr(i) for i in odd[:5])} "
                           "(no decimals, booleans or text)")
    ids = [int(i) for i in ids]
    n = len(ds.train)
    if len(ids) > n:
        raise UnlearnError(f"the forget set has {len(ids)} ids but the training set only {n} images")
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dupes:
        raise UnlearnError(f"the forget set repeats ids {dupes[:10]}; each image can be forgotten once")
    known = set(ds.train.ids.tolist())
    bad = [i for i in ids if i not in known]
    if bad:
        lo, hi = int(ds.train.ids.min()), int(ds.train.ids.max())
        raise UnlearnError(f"{len(bad)} forget id(s) are not training images of {ds.name} ({ds.source_kind}: "
                           f"{len(ds.train)} images, ids between {lo} and {hi}): {bad[:10]}")
    again = sorted(set(ids) & set(already_forgotten))
    if again:
        raise UnlearnError(f"ids {again[:10]} were already forgotten by an earlier run in this lineage")
    return ids


def tug_of_war(accs: dict[str, float], reference: dict[str, float]) -> float:
    """Product over A_f, A_r, A_test of (1 - |acc - acc_retrain| / 100): 1 is the retrained model."""
    return float(np.prod([1 - abs(accs[k] - reference[k]) / 100 for k in ACCURACIES]))


def _stable_positions(pool: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if n <= 0 or n >= len(pool):
        return pool
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randperm(len(pool), generator=g)[:n]].sort().values


def _audit_positions(labels: torch.Tensor, pool: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique().tolist():
        rows = pool[labels[pool] == c]
        picks.append(rows[torch.randperm(len(rows), generator=g)[:per_class]])
    return torch.cat(picks).sort().values if picks else pool[:0]


def _hash_positions(t: torch.Tensor) -> str:
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()[:16]


_ORIGINAL_CACHE: dict[str, Outputs] = {}


def original_outputs(key: str, model: nn.Module, split, positions: torch.Tensor, cache_dir: Path | None,
                     check: Callable[[], None] | None = None) -> Outputs:
    """Outputs of a model that never changes (an original or a retrained one), cached in memory and on
    disk, keyed by its weights' hash or parent run, the split and the exact rows.

    The disk cache (runs/.cache) is least-recently-used and bounded by $STRUCTGUARD_CACHE_MB
    (core.runs.prune_cache); a cache that cannot be written (full disk, read-only) is skipped (logged)
    and leaves no partial file. `check` is the run's cancel check, called between batches."""
    name = f"{key}|{len(split)}|{_hash_positions(split.ids)}|{_hash_positions(positions)}"
    k = hashlib.sha1(name.encode()).hexdigest()[:24]
    path = cache_dir / f"original-{k}.npz" if cache_dir else None
    if k in _ORIGINAL_CACHE:
        if path is not None:
            runs.touch(path)  # a use: the disk copy stays among the most recently used
        return _ORIGINAL_CACHE[k]
    result = None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                result = Outputs(z["feats"], z["backbone"], z["probs"])
            runs.touch(path)
        except Exception:  # a damaged cache file is recomputed, never trusted
            result = None
    if result is None:
        result = outputs(model, split, positions, check=check)
        if path is not None and runs.cache_limit_bytes() > 0:
            arrays = {"feats": result.features, "backbone": result.backbone, "probs": result.probs}
            try:
                runs.write_atomic(path, writer=lambda fh: np.savez(fh, **arrays), what="the cache")
            except runs.StorageError as exc:  # only slower next time: no warning on the CLI's one-line stderr
                log.info("the original model's outputs were not cached: %s", exc)
            else:
                runs.prune_cache(path.parent, keep=path)
    if len(_ORIGINAL_CACHE) > 16:
        _ORIGINAL_CACHE.clear()
    _ORIGINAL_CACHE[k] = result
    return result


# ------------------------------------------------------------------------------ stage 1: resolve


def load_start(request: RunRequest) -> StartModel:
    if request.parent_run:
        parent = runs.load_run(request.parent_run, strict=True)
        meta = parent.meta
        return StartModel(load_unlearned(parent.path), meta["model"]["card"], f"run:{parent.run_id}",
                          meta["model"]["name"], meta,
                          set(meta.get("all_forget_ids", meta.get("forget_ids", []))))
    loaded = cached_model(request.model)
    return StartModel(loaded.model, loaded.card, f"model:{loaded.card.get('weights_sha256', request.model)}",
                      request.model)


def choose_rows(ds: Dataset, ids: list[int], all_forgotten: set[int], request: RunRequest) -> Rows:
    """Forget rows, a fixed retain subset for A_r, the full test set and the per-class audit sample."""
    f_pos = ds.train.positions(ids) if ids else torch.empty(0, dtype=torch.long)
    keep = ~torch.isin(ds.train.ids, torch.tensor(sorted(all_forgotten), dtype=torch.long))
    retain_pool = torch.nonzero(keep).squeeze(1)
    r_pos = _stable_positions(retain_pool, request.retain_eval, seed=0)
    retain_set = "full" if len(r_pos) == len(retain_pool) and ds.full else f"subset of {len(r_pos)}"
    t_pos = torch.arange(len(ds.test))
    return Rows(f_pos, r_pos, retain_set, t_pos,
                _audit_positions(ds.train.labels, retain_pool, request.audit_per_class, seed=1),
                _audit_positions(ds.test.labels, t_pos, request.audit_per_class, seed=2))


def forget_batch(ds: Dataset, rows: Rows, uploads: list[tuple[np.ndarray, int]],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The forget images on the device: the chosen training rows, then the user's uploads."""
    x, y = ds.train.images(rows.forget), ds.train.labels[rows.forget]
    if uploads:
        up_x = torch.stack([torch.from_numpy(np.asarray(img, dtype=np.uint8)) for img, _ in uploads])
        if tuple(up_x.shape[1:]) != ds.input_shape:
            raise UnlearnError(f"uploaded images must be {ds.input_shape}, got {tuple(up_x.shape[1:])}")
        labels = [int(lbl) for _, lbl in uploads]
        if any(not 0 <= lbl < ds.num_classes for lbl in labels):
            raise UnlearnError(f"upload labels must be class indices 0..{ds.num_classes - 1}")
        x, y = torch.cat([x, up_x.float() / 255]), torch.cat([y, torch.tensor(labels)])
    return to_device_format(x, device), y.to(device)


def _interruptible(fn: Callable[[], Any], cb: Callbacks | None, where: str) -> Any:
    """fn() while cancel stays answered: a load that cannot stop halfway (a dataset read, an encoder
    load, seconds each) runs in a helper thread and the caller checks cancel every 50 ms. After a
    cancel the helper finishes on its own and only fills the in-process caches."""
    if cb is None or cb.should_cancel is None:
        return fn()
    cb.check_cancel(where)
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    helper = threading.Thread(target=work, name=f"structguard-{where.replace(' ', '-')}", daemon=True)
    helper.start()
    while helper.is_alive():
        helper.join(0.05)
        if helper.is_alive():
            cb.check_cancel(where)
    if "error" in box:
        raise box["error"]
    return box["value"]


def resolve(request: RunRequest, cb: Callbacks | None = None) -> Resolved:
    """Load and validate everything a request names; every user error is raised here, before any work.

    With callbacks, cancel is checked between the loads and answered within 50 ms during each of them."""
    from .encoders import get_encoder  # imported when used: open_clip and transformers are slow to import

    runs.owner_record(request.owner)  # a malformed owner is refused now, not after the work
    if request.eval_precision not in PRECISIONS:
        raise UnlearnError(f"eval_precision must be one of {', '.join(PRECISIONS)}, got {request.eval_precision!r}")
    where = "loading"
    ds = _interruptible(lambda: cached_dataset(request.dataset, request.data_dir), cb, where)
    start = _interruptible(lambda: load_start(request), cb, where)
    if len(start.card["class_names"]) != ds.num_classes:
        raise UnlearnError(f"the model has {len(start.card['class_names'])} classes but {ds.name} has "
                           f"{ds.num_classes}; pick a model trained on this dataset")
    if not request.forget_ids and not request.uploads:
        raise UnlearnError("the forget set is empty: pick at least one training image (or upload one)")
    ids = validate_forget_ids(request.forget_ids, ds, start.forgotten_before) if request.forget_ids else []
    config = default_config(request.method, ds.name, k=len(ids) + len(request.uploads),
                            **dict(request.config, seed=request.seed))
    texts = request.anchor_texts if request.anchor_texts is not None else load_anchor_texts(ds.name, ds.class_names)
    texts = validate_anchor_texts(texts, ds.class_names)
    anchor_set = _interruptible(lambda: build_anchor_set(texts, ds.class_names, get_encoder(request.encoder,
                                                                                             request.clip_checkpoint)),
                                cb, where)
    if cb is not None:
        cb.check_cancel(where)
    device = pick_device(request.device)
    start.model = prepare_model(start.model, device).eval()
    rows = choose_rows(ds, ids, start.forgotten_before | set(ids), request)
    x_forget, y_forget = forget_batch(ds, rows, request.uploads, device)
    y_f = y_forget.cpu().numpy()
    labels = Labels(y_f, ds.train.labels[rows.retain].numpy(), ds.test.labels.numpy(),
                    np.concatenate([y_f, ds.train.labels[rows.audit_retain].numpy(),
                                    ds.test.labels[rows.audit_test].numpy()]).astype(np.int64))
    return Resolved(request, ds, start, ids, config, anchor_set, device, rows, x_forget, y_forget, labels)


# ------------------------------------------------------------------------------ stages 2 and 4: measure


def measure(model: nn.Module, res: Resolved, original_key: str | None = None,
            cache_dir: Path | None = None, check: Callable[[], None] | None = None) -> Measured:
    """A model's outputs on every row set of the run. `original_key` marks a model that never changes
    (the original or a retrained one): its dataset rows are then cached (core never alters them), per precision.
    The dataset rows are measured in `res.eval_dtype`, the forget set in float32. `check` (the run's cancel check)
    is called between batches."""
    ds, rows, dtype = res.ds, res.rows, res.eval_dtype

    def on(split, positions: torch.Tensor) -> Outputs:
        with trunk_dtype(dtype):
            if original_key is None:
                return outputs(model, split, positions, check=check)
            tag = ("|train" if split is ds.train else "|test") + ("" if dtype is None else f"|{precision_name(dtype)}")
            return original_outputs(original_key + tag, model, split, positions, cache_dir, check)

    return Measured(outputs(model, res.x_forget, check=check), on(ds.train, rows.retain), on(ds.test, rows.test),
                    on(ds.train, rows.audit_retain), on(ds.test, rows.audit_test))


def summarise(m: Measured, res: Resolved) -> dict:
    """Accuracies, per-class test accuracy and the forget features' dimensional alignment."""
    y = res.labels
    return {
        "forget_acc": accuracy_from_probs(m.forget.probs, y.forget),
        "retain_acc": accuracy_from_probs(m.retain.probs, y.retain),
        "retain_set": res.rows.retain_set,
        "test_acc": accuracy_from_probs(m.test.probs, y.test),
        "per_class_test_acc": per_class_accuracy(m.test.probs, y.test, res.ds.num_classes),
        "dim_alignment": dimensional_alignment(m.forget.features, m.kept.features),
        "dim_alignment_energy": 0.95,
    }


def structure(before: Measured, after: Measured, R: np.ndarray, anchors: np.ndarray, backbone: bool = False) -> dict:
    """Affinity row cosine, CKA and kNN overlap of the kept audit sample, original vs unlearned."""
    fb, fa = (before.kept.backbone, after.kept.backbone) if backbone else (before.kept.features, after.kept.features)
    return structure_scores(fb, fa, sample_affinity(fb, anchors, R), sample_affinity(fa, anchors, R))


def retrain_reference(res: Resolved, after: Measured, after_accs: dict, cache_dir: Path,
                      check: Callable[[], None] | None = None) -> dict | None:
    """The retrained model's numbers on the same rows, the gaps to it and the Tug-of-War score.

    Only when bench/retrain holds a model retrained without exactly this forget set (core.retrain).
    MIA: the confidence attack (core.audit.mia) calibrated on each model's own retain vs test
    scores, and the threshold-free forget AUC; the retrained model's values are what "never seen" looks like.
    """
    from .audit.mia import MIAResult, confidence_mia
    from .retrain import find_retrained

    if res.start.parent_meta or res.request.uploads:
        return None
    path = find_retrained(res.start.card, res.ids)
    if path is None:
        return None
    loaded = load_model(path)
    ref_out = measure(prepare_model(loaded.model, res.device).eval(), res,
                      original_key=f"model:{loaded.card['weights_sha256']}", cache_dir=cache_dir, check=check)
    y = res.labels
    ref = {k: v for k, v in summarise(ref_out, res).items() if k in ACCURACIES}
    ref["card"] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    ref["command"] = (loaded.card.get("training") or {}).get("command")

    def attack(m: Measured) -> MIAResult:
        return confidence_mia(true_class_confidence(m.retain.probs, y.retain),
                              true_class_confidence(m.test.probs, y.test),
                              true_class_confidence(m.forget.probs, y.forget))

    ref["gap"] = {k: after_accs[k] - ref[k] for k in ACCURACIES}
    ref["tug_of_war"] = tug_of_war(after_accs, ref)
    mia = {"retrain": attack(ref_out), "unlearned": attack(after)}
    ref["mia_forget_member_rate"] = {k: r.member_rate_forget for k, r in mia.items()}
    ref["mia_forget_auc"] = {k: r.forget_auc for k, r in mia.items()}
    return ref


# ------------------------------------------------------------------------------ stage 3: unlearn


class Snapshots:
    """Prediction-path features of the audit sample during the updates (the collapse timeline).

    StructGuard's projector starts as the identity, so step 0 is exactly the original feature space.
    The engine computes each snapshot (`due` says at which steps); the count stays bounded by thinning.
    """

    def __init__(self, every: int) -> None:
        self.every = max(1, every)
        self.steps: list[int] = []
        self.frames: list[np.ndarray] = []

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def __call__(self, step: int, feats: torch.Tensor) -> None:
        if self.steps and self.steps[-1] == step:  # a step's frame again (polish steps: the returned weights)
            self.frames[-1] = feats.cpu().half().numpy()
            return
        self.frames.append(feats.cpu().half().numpy())
        self.steps.append(step)
        if len(self.frames) > MAX_SNAPSHOTS:  # thin out and snapshot less often from here on
            del self.frames[1::2], self.steps[1::2]
            self.every *= 2


def _auto_snapshot_every(config: UnlearnConfig, k: int) -> int:
    """About 30 snapshots over the longest possible run (the timeline needs frames, not every step)."""
    from .methods import get_method

    pool = k * config.n_adv if get_method(config.method).needs_proxy else k
    max_steps = -(-pool // config.batch_size) * config.max_epochs
    return max(1, max_steps // 30)


def unlearn(res: Resolved, cb: Callbacks) -> Unlearned:
    ds, rows = res.ds, res.rows
    x_audit = torch.cat([res.x_forget.cpu(), ds.train.images(rows.audit_retain), ds.test.images(rows.audit_test)])
    snaps = Snapshots(res.request.snapshot_every or _auto_snapshot_every(res.config, res.k))

    def scaled(fraction: float, message: str) -> None:
        cb.progress(0.05 + 0.8 * fraction, message)

    inner = Callbacks(on_progress=scaled, on_step=cb.on_step, should_cancel=cb.should_cancel,
                      on_snapshot=snaps, snapshot_inputs=to_device_format(x_audit, res.device), snapshot_due=snaps.due)
    outcome = run_unlearning(res.start.model, res.x_forget, res.y_forget, ds.num_classes, res.config,
                             res.anchor_set.matrix, inner)
    return Unlearned(outcome.model, outcome, snaps.steps, snaps.frames)


# ------------------------------------------------------------------------------ stage 5: assemble and save


def audit_arrays(res: Resolved, before: Measured, after: Measured, unl: Unlearned, R: np.ndarray) -> dict:
    """audit.npz: everything the audit views draw, one row per audit sample (forget, retain, test)."""
    ds, rows, y = res.ds, res.rows, res.labels
    n_up = len(res.request.uploads)
    anchors = res.anchor_set.matrix.cpu().numpy()
    b, a = before.audit, after.audit
    audit = {
        "ids": np.concatenate([np.array(res.ids, dtype=np.int64), -np.arange(1, n_up + 1, dtype=np.int64),
                               ds.train.ids[rows.audit_retain].numpy(), ds.test.ids[rows.audit_test].numpy()]),
        "group": np.array(["forget"] * res.k + ["retain"] * len(rows.audit_retain) + ["test"] * len(rows.audit_test)),
        "labels": y.audit,
        "feats_before": b.features, "feats_after": a.features, "backbone_after": a.backbone,
        "affinity_before": sample_affinity(b.features, anchors, R),
        "affinity_after": sample_affinity(a.features, anchors, R),
        "anchors": anchors.astype(np.float32), "R": R.astype(np.float32),
        "conf_before": true_class_confidence(b.probs, y.audit), "conf_after": true_class_confidence(a.probs, y.audit),
        "pred_before": b.probs.argmax(1).astype(np.int64), "pred_after": a.probs.argmax(1).astype(np.int64),
    }
    for name, m in (("before", before), ("after", after)):
        audit[f"retain_conf_{name}"] = true_class_confidence(m.retain.probs, y.retain)
        audit[f"test_conf_{name}"] = true_class_confidence(m.test.probs, y.test)
    if unl.snapshots:
        audit["snapshot_steps"] = np.array(unl.snapshot_steps, dtype=np.int64)
        audit["snapshots"] = np.stack(unl.snapshots)
    return audit


def run_meta(res: Resolved, run_id: str, weights_card: dict, metrics: dict, unl: Unlearned, timings: dict,
             memory: PeakMemory) -> dict:
    """run.json: what was asked, what it ran on, what it measured."""
    req, start, outcome = res.request, res.start, unl.outcome
    card = start.card
    return {
        "run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "method": req.method, "config": res.config.to_dict(), "seed": req.seed,
        "parent_run": start.parent_meta["run_id"] if start.parent_meta else None,
        "dataset": res.ds.card(),
        "model": {"name": start.name, "arch": card["arch"], "card": card,
                  "card_sha256": hashlib.sha256(repr(sorted(card.items())).encode()).hexdigest(),
                  "weights_sha256": card.get("weights_sha256"), "start": start.key, "chain": weights_card["chain"]},
        "forget_ids": res.ids, "k": res.k,
        "uploads": [{"index": i, "label": int(lbl), "sha256": hashlib.sha256(np.asarray(img).tobytes()).hexdigest()}
                    for i, (img, lbl) in enumerate(req.uploads)],
        "all_forget_ids": sorted(res.all_forgotten),
        "anchors": {"encoder": res.anchor_set.encoder, "hash": res.anchor_set.hash,
                    "class_names": res.ds.class_names, "texts": res.anchor_set.texts,
                    "warnings": res.anchor_set.warnings},
        "code_version": code_version(),
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "platform": platform.platform(), "device": str(res.device),
                        "cuda": torch.cuda.get_device_name(0) if res.device.type == "cuda" else None},
        "owner": runs.owner_record(req.owner),  # who may delete and share it (core/runs.py, ownership)
        "request": {k: v for k, v in asdict(req).items() if k not in ("uploads", "anchor_texts", "owner")},
        "metrics": metrics,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        # the run's own peak (sampled while it ran), not the process's lifetime maximum
        "peak_rss_mb": round(memory.peak_mb, 1), "rss_start_mb": round(memory.start_mb, 1),
        "device": str(res.device),
        "history": outcome.history, "stop_reason": outcome.stop_reason, "steps": outcome.steps,
        "importance": outcome.extra.get("importance"), "term_shares": term_shares(outcome.history),
        "precision": outcome.extra.get("precision"),  # what "auto" resolved to on this device
        "polish": outcome.extra.get("polish"),  # with polish_steps: where they began and the step the model is from
        "eval_precision": precision_name(res.eval_dtype),  # the dataset rows' measurements
    }


def save(res: Resolved, unl: Unlearned, build_meta: Any, audit: dict, cb: Callbacks) -> Path:
    """Write the run into a hidden .partial folder and rename it into place only when complete.

    Cancel is checked between the writes; a failed write (full disk, read-only folder) raises
    runs.StorageError; either way the partial folder is removed, so nothing is left behind."""
    cb.progress(0.95, "saving the run")
    cb.check_cancel("saving")
    root = runs.runs_root(res.request.runs_root)
    try:
        run_id = runs.new_run_id(res.request.method, res.k, res.request.seed, root)
        partial = runs.partial_dir(root, run_id)
    except OSError as exc:
        raise runs.storage_error(exc, "the run") from exc
    if cb.on_partial:  # a worker process tells its server, which removes the folder if it has to kill it
        cb.on_partial(partial)
    try:
        cb.check_cancel("saving")
        try:
            weights_card = save_unlearned(unl.model.cpu(), partial, res.start.card,
                                          {"run_id": run_id, "method": res.request.method})
        except OSError as exc:
            raise runs.storage_error(exc, "the run") from exc
        cb.check_cancel("saving")
        return runs.finalize(partial, build_meta(run_id, weights_card), audit,
                             check=lambda: cb.check_cancel("saving"))
    except BaseException:
        runs.discard(partial)
        raise


# ------------------------------------------------------------------------------ the whole request


def execute_run(request: RunRequest, callbacks: Callbacks | None = None) -> Path:
    """Run one unlearning request and return the completed run directory."""
    cb = callbacks or Callbacks()
    t_start = time.perf_counter()
    root = runs.runs_root(request.runs_root)
    marker = None
    try:
        with PeakMemory() as memory:
            cb.progress(0.0, "loading model and data")
            res = resolve(request, cb)
            runs.ensure_writable(root)
            marker = runs.begin_run(root, {"method": request.method, "k": res.k, "seed": request.seed}, request.owner)
            unl, metrics, timings, audit = _compute(res, cb, root, t_start)
        final = save(res, unl, lambda run_id, card: run_meta(res, run_id, card, metrics, unl, timings, memory), audit,
                     cb)
    finally:
        runs.end_run(marker)  # a killed process leaves it behind: the run is then listed as interrupted
    cb.progress(1.0, f"saved {final.name}")
    return final


def _compute(res: Resolved, cb: Callbacks, root: Path, t_start: float) -> tuple[Unlearned, dict, dict, dict]:
    """Measure the original model, unlearn, measure the result: the metrics, timings and audit arrays."""
    cache = root / runs.CACHE_DIR
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    cb.progress(0.02, "measuring the original model")
    before = measure(res.start.model, res, original_key=res.start.key, cache_dir=cache,
                     check=lambda: cb.check_cancel("measuring the original model"))
    timings["evaluation_before"] = time.perf_counter() - t0

    unl = unlearn(res, cb)
    timings.update(unl.outcome.timings)

    t0 = time.perf_counter()
    cb.progress(0.86, "measuring the unlearned model")
    evaluating = lambda: cb.check_cancel("evaluation")  # noqa: E731
    evaluating()
    after = measure(unl.model, res, check=evaluating)
    timings["evaluation"] = time.perf_counter() - t0

    anchors = res.anchor_set.matrix.cpu().numpy()
    R = anchor_map(before.kept.features.shape[1], anchors.shape[1], res.config.seed).numpy()
    m_before, m_after = summarise(before, res), summarise(after, res)
    m_after["structure"] = structure(before, after, R, anchors)
    m_after["structure_backbone"] = structure(before, after, R, anchors, backbone=True)
    evaluating()
    reference = retrain_reference(res, after, m_after, cache, evaluating)
    evaluating()
    audit = audit_arrays(res, before, after, unl, R)
    timings["total"] = time.perf_counter() - t_start
    return unl, {"before": m_before, "after": m_after, "retrain": reference}, timings, audit


__all__ = ["DataError", "Measured", "Resolved", "RunRequest", "cached_dataset", "execute_run", "measure", "resolve",
           "tug_of_war", "unlearn", "validate_forget_ids"]
