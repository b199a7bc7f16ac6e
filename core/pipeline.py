"""One unlearning request from start to saved run: the entry point of the CLI and the dashboard.

execute_run validates the request, loads model, data and anchors, measures the
original model, unlearns, measures again, and writes the run directory atomically.
"""

from __future__ import annotations

import hashlib
from collections import Counter
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import runs
from .data import Dataset, DataError, load_dataset
from .engine import (Callbacks, UnlearnError, anchor_map, load_unlearned, run_unlearning, save_unlearned,
                     term_shares)
from .methods import default_config
from .metrics import (accuracy_from_probs, affinity_matrix, dimensional_alignment, outputs, per_class_accuracy,
                      structure_scores, true_class_confidence)
from .models import load_model, pick_device
from .train import prepare_model, to_device_format

ROOT = Path(__file__).resolve().parent.parent
MAX_SNAPSHOTS = 40


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
    snapshot_every: int = 0                     # audit-sample snapshot every N steps; 0 = about 30 over the run
    device: str | None = None
    uploads: list[tuple[np.ndarray, int]] = field(default_factory=list)  # user images (uint8 CxHxW, label)


def cached_dataset(name: str, data_dir: str | None) -> Dataset:
    """One loaded copy per (dataset, folder, configured folder): the env var is part of the key."""
    return _cached_dataset(name, data_dir, os.environ.get("STRUCTGUARD_FASHION_DIR"))


@lru_cache(maxsize=4)
def _cached_dataset(name: str, data_dir: str | None, _configured: str | None) -> Dataset:
    return load_dataset(name, data_dir)


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def validate_forget_ids(ids: list[int], ds: Dataset, already_forgotten: set[int] = frozenset()) -> list[int]:
    """Clear errors for empty, duplicate, out-of-range or impossible forget sets."""
    try:
        ids = [int(i) for i in ids]
    except (TypeError, ValueError) as exc:
        raise UnlearnError(f"forget ids must be integers: {exc}") from exc
    n = len(ds.train)
    if len(ids) > n:
        raise UnlearnError(f"the forget set has {len(ids)} ids but the training set only {n} images")
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dupes:
        raise UnlearnError(f"the forget set repeats ids {dupes[:10]}; each image can be forgotten once")
    known = set(ds.train.ids.tolist())
    bad = [i for i in ids if i not in known]
    if bad:
        hi = int(ds.train.ids.max())
        raise UnlearnError(f"{len(bad)} forget id(s) are not training images of {ds.name} ({ds.source_kind}, "
                           f"ids 0..{hi}): {bad[:10]}")
    again = sorted(set(ids) & set(already_forgotten))
    if again:
        raise UnlearnError(f"ids {again[:10]} were already forgotten by an earlier run in this lineage")
    return ids


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


_BEFORE_CACHE: dict[tuple, tuple] = {}


def _outputs_cached(key: str, model: torch.nn.Module, split, positions: torch.Tensor,
                    cache_dir: Path | None = None) -> tuple:
    """Outputs of the ORIGINAL model never change, so they are cached in memory and on disk
    (keyed by the weights' hash or parent run, the split and the exact rows)."""
    name = hashlib.sha1(f"{key}|{len(split)}|{_hash_positions(split.ids)}|{_hash_positions(positions)}".encode())
    k = name.hexdigest()[:24]
    if k in _BEFORE_CACHE:
        return _BEFORE_CACHE[k]
    path = cache_dir / f"original-{k}.npz" if cache_dir else None
    result = None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                result = (z["feats"], z["backbone"], z["probs"])
        except Exception:  # a damaged cache file is recomputed, never trusted
            result = None
    if result is None:
        result = outputs(model, split, positions)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, feats=result[0], backbone=result[1], probs=result[2])
            tmp.replace(path)
    if len(_BEFORE_CACHE) > 16:
        _BEFORE_CACHE.clear()
    _BEFORE_CACHE[k] = result
    return result


def tug_of_war(accs: dict[str, float], reference: dict[str, float]) -> float:
    """Product over A_f, A_r, A_test of (1 - |acc - acc_retrain| / 100): 1 is the retrained model."""
    return float(np.prod([1 - abs(accs[k] - reference[k]) / 100 for k in ("forget_acc", "retain_acc", "test_acc")]))


def retrain_reference(base_card: dict, ids: list[int], ds: Dataset, device: torch.device, r_pos: torch.Tensor,
                      f_pos: torch.Tensor, cache: Path, after: dict, probs: tuple, labels: tuple) -> dict | None:
    """The retrained model's numbers on the same rows, the gaps to it and the Tug-of-War score.

    Only when bench/retrain holds a model retrained without exactly this forget set (core.retrain).
    MIA: the confidence attack (core.audit.mia) calibrated on each model's own retain vs test
    scores; the retrained model's forget member rate is what "never seen" looks like.
    """
    from .audit.mia import confidence_mia
    from .retrain import find_retrained

    path = find_retrained(base_card, ids)
    if path is None:
        return None
    loaded = load_model(path)
    model = prepare_model(loaded.model, device).eval()
    key = f"model:{loaded.card['weights_sha256']}"
    r_out = _outputs_cached(key + "|train", model, ds.train, r_pos, cache)
    t_out = _outputs_cached(key + "|test", model, ds.test, torch.arange(len(ds.test)), cache)
    f_out = _outputs_cached(key + "|train", model, ds.train, f_pos, cache)
    y_r, y_t, y_f = labels
    ref = {"forget_acc": accuracy_from_probs(f_out[2], y_f), "retain_acc": accuracy_from_probs(r_out[2], y_r),
           "test_acc": accuracy_from_probs(t_out[2], y_t),
           "card": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
           "command": (loaded.card.get("training") or {}).get("command")}
    mia_ref = confidence_mia(true_class_confidence(r_out[2], y_r), true_class_confidence(t_out[2], y_t),
                             true_class_confidence(f_out[2], y_f))
    mia_run = confidence_mia(*(true_class_confidence(p, y) for p, y in zip(probs, labels)))
    ref["gap"] = {k: after[k] - ref[k] for k in ("forget_acc", "retain_acc", "test_acc")}
    ref["tug_of_war"] = tug_of_war(after, ref)
    ref["mia_forget_member_rate"] = {"retrain": mia_ref.member_rate_forget, "unlearned": mia_run.member_rate_forget}
    return ref


def _auto_snapshot_every(config, k: int) -> int:
    """About 30 snapshots over the longest possible run: each one costs a forward pass of the audit
    sample, which every step would pay for again (the timeline needs frames, not every step)."""
    from .methods import get_method

    pool = k * config.n_adv if get_method(config.method).needs_proxy else k
    max_steps = -(-pool // config.batch_size) * config.max_epochs
    return max(1, max_steps // 30)


def execute_run(request: RunRequest, callbacks: Callbacks | None = None) -> Path:
    """Run one unlearning request and return the completed run directory."""
    from .anchors import build_anchor_set, load_anchor_texts, validate_anchor_texts
    from .encoders import get_encoder

    cb = callbacks or Callbacks()
    t_start = time.perf_counter()
    cb.progress(0.0, "loading model and data")
    ds = cached_dataset(request.dataset, request.data_dir)

    # The starting model: a sample/user model, or the result of an earlier run.
    parent_meta: dict | None = None
    if request.parent_run:
        parent = runs.load_run(request.parent_run, strict=True)
        parent_meta = parent.meta
        model = load_unlearned(parent.path)
        base_card = parent.meta["model"]["card"]
        model_key = f"run:{parent.run_id}"
        forgotten_before = set(parent.meta.get("all_forget_ids", parent.meta.get("forget_ids", [])))
    else:
        loaded = load_model(request.model)
        model, base_card = loaded.model, loaded.card
        model_key = f"model:{loaded.card.get('weights_sha256', request.model)}"
        forgotten_before = set()
    if len(base_card["class_names"]) != ds.num_classes:
        raise UnlearnError(f"the model has {len(base_card['class_names'])} classes but {ds.name} has "
                           f"{ds.num_classes}; pick a model trained on this dataset")
    if not request.forget_ids and not request.uploads:
        raise UnlearnError("the forget set is empty: pick at least one training image (or upload one)")
    ids = validate_forget_ids(request.forget_ids, ds, forgotten_before) if request.forget_ids else []

    config = default_config(request.method, ds.name, k=len(ids) + len(request.uploads),
                            **dict(request.config, seed=request.seed))
    texts = request.anchor_texts if request.anchor_texts is not None else load_anchor_texts(ds.name, ds.class_names)
    texts = validate_anchor_texts(texts, ds.class_names)
    encoder = get_encoder(request.encoder, request.clip_checkpoint)
    anchor_set = build_anchor_set(texts, ds.class_names, encoder)

    device = pick_device(request.device)
    model = prepare_model(model, device).eval()

    # Rows: forget set, retain subset for A_r, full test set, and the audit sample.
    f_pos = ds.train.positions(ids) if ids else torch.empty(0, dtype=torch.long)
    all_forgotten = forgotten_before | set(ids)
    keep = ~torch.isin(ds.train.ids, torch.tensor(sorted(all_forgotten), dtype=torch.long))
    retain_pool = torch.nonzero(keep).squeeze(1)
    r_pos = _stable_positions(retain_pool, request.retain_eval, seed=0)
    retain_set = "full" if len(r_pos) == len(retain_pool) and ds.full else f"subset of {len(r_pos)}"
    t_pos = torch.arange(len(ds.test))
    a_ret = _audit_positions(ds.train.labels, retain_pool, request.audit_per_class, seed=1)
    a_test = _audit_positions(ds.test.labels, t_pos, request.audit_per_class, seed=2)

    x_forget = ds.train.images(f_pos)
    y_forget = ds.train.labels[f_pos]
    if request.uploads:
        up_x = torch.stack([torch.from_numpy(np.asarray(img, dtype=np.uint8)) for img, _ in request.uploads])
        if tuple(up_x.shape[1:]) != ds.input_shape:
            raise UnlearnError(f"uploaded images must be {ds.input_shape}, got {tuple(up_x.shape[1:])}")
        labels = [int(lbl) for _, lbl in request.uploads]
        if any(not 0 <= lbl < ds.num_classes for lbl in labels):
            raise UnlearnError(f"upload labels must be class indices 0..{ds.num_classes - 1}")
        x_forget = torch.cat([x_forget, up_x.float() / 255])
        y_forget = torch.cat([y_forget, torch.tensor(labels)])
    x_forget = to_device_format(x_forget, device)
    y_forget = y_forget.to(device)
    k = len(y_forget)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cb.progress(0.02, "measuring the original model")
    cache = runs.runs_root(request.runs_root) / ".cache"
    before_r = _outputs_cached(model_key + "|train", model, ds.train, r_pos, cache)
    before_t = _outputs_cached(model_key + "|test", model, ds.test, t_pos, cache)
    before_ar = _outputs_cached(model_key + "|train", model, ds.train, a_ret, cache)
    before_at = _outputs_cached(model_key + "|test", model, ds.test, a_test, cache)
    before_f = outputs(model, x_forget)
    timings["evaluation_before"] = time.perf_counter() - t0

    anchors_np = anchor_set.matrix.cpu().numpy()
    d = before_ar[0].shape[1]
    R = anchor_map(d, anchors_np.shape[1], config.seed).numpy()

    # Snapshots: prediction-path features of the audit sample during the updates (the collapse timeline).
    # StructGuard's projector starts as the identity, so step 0 is exactly the original feature space.
    x_audit = torch.cat([x_forget.cpu(), ds.train.images(a_ret), ds.test.images(a_test)])
    snapshots: list[np.ndarray] = []
    snapshot_steps: list[int] = []
    every = [request.snapshot_every or _auto_snapshot_every(config, k)]

    @torch.no_grad()
    def on_snapshot(step: int, live: torch.nn.Module) -> None:
        if step % every[0] and step != 0:
            return
        feats = torch.cat([live.features(to_device_format(x_audit[i:i + 1000], device)).cpu()
                           for i in range(0, len(x_audit), 1000)])
        snapshots.append(feats.half().numpy())
        snapshot_steps.append(step)
        if len(snapshots) > MAX_SNAPSHOTS:  # keep the timeline bounded: thin out and snapshot less often
            del snapshots[1::2], snapshot_steps[1::2]
            every[0] *= 2

    def scaled(fraction: float, message: str) -> None:
        cb.progress(0.05 + 0.8 * fraction, message)

    inner = Callbacks(on_progress=scaled, on_step=cb.on_step, should_cancel=cb.should_cancel,
                      on_snapshot=on_snapshot, snapshot_every=1)
    outcome = run_unlearning(model, x_forget, y_forget, ds.num_classes, config, anchor_set.matrix, inner)
    timings.update(outcome.timings)
    live = outcome.model
    if snapshot_steps and snapshot_steps[-1] != outcome.steps:
        every[0] = 1
        on_snapshot(outcome.steps, live)

    t0 = time.perf_counter()
    cb.progress(0.86, "measuring the unlearned model")
    cb.check_cancel("evaluation")
    after_r = outputs(live, ds.train, r_pos)
    cb.check_cancel("evaluation")
    after_t = outputs(live, ds.test, t_pos)
    after_ar = outputs(live, ds.train, a_ret)
    after_at = outputs(live, ds.test, a_test)
    after_f = outputs(live, x_forget)
    timings["evaluation"] = time.perf_counter() - t0

    y_f = y_forget.cpu().numpy()
    y_r, y_t = ds.train.labels[r_pos].numpy(), ds.test.labels.numpy()
    y_ar, y_at = ds.train.labels[a_ret].numpy(), ds.test.labels[a_test].numpy()

    def summary(f_out, r_out, t_out, ar_out, at_out) -> dict:
        return {
            "forget_acc": accuracy_from_probs(f_out[2], y_f),
            "retain_acc": accuracy_from_probs(r_out[2], y_r),
            "retain_set": retain_set,
            "test_acc": accuracy_from_probs(t_out[2], y_t),
            "per_class_test_acc": per_class_accuracy(t_out[2], y_t, ds.num_classes),
            "dim_alignment": dimensional_alignment(f_out[0], np.concatenate([ar_out[0], at_out[0]])),
        }

    m_before = summary(before_f, before_r, before_t, before_ar, before_at)
    m_after = summary(after_f, after_r, after_t, after_ar, after_at)
    kept_before = np.concatenate([before_ar[0], before_at[0]])
    kept_after = np.concatenate([after_ar[0], after_at[0]])
    aff_b, aff_a = affinity_matrix(kept_before, R, anchors_np), affinity_matrix(kept_after, R, anchors_np)
    m_after["structure"] = structure_scores(kept_before, kept_after, aff_b, aff_a)
    m_after["structure_backbone"] = structure_scores(
        np.concatenate([before_ar[1], before_at[1]]), np.concatenate([after_ar[1], after_at[1]]),
        affinity_matrix(np.concatenate([before_ar[1], before_at[1]]), R, anchors_np),
        affinity_matrix(np.concatenate([after_ar[1], after_at[1]]), R, anchors_np))
    m_after["dim_alignment_energy"] = m_before["dim_alignment_energy"] = 0.95
    reference = None
    if not parent_meta and not request.uploads:
        cb.check_cancel("evaluation")
        reference = retrain_reference(base_card, ids, ds, device, r_pos, f_pos, cache, m_after,
                                      (after_r[2], after_t[2], after_f[2]), (y_r, y_t, y_f))

    n_up = len(request.uploads)
    audit_ids = np.concatenate([np.array(ids, dtype=np.int64), -np.arange(1, n_up + 1, dtype=np.int64),
                                ds.train.ids[a_ret].numpy(), ds.test.ids[a_test].numpy()])
    group = np.array(["forget"] * k + ["retain"] * len(a_ret) + ["test"] * len(a_test))
    labels = np.concatenate([y_f, y_ar, y_at]).astype(np.int64)

    def cat(i: int, f_out, ar_out, at_out) -> np.ndarray:
        return np.concatenate([f_out[i], ar_out[i], at_out[i]]).astype(np.float32)

    feats_before, feats_after = cat(0, before_f, before_ar, before_at), cat(0, after_f, after_ar, after_at)
    probs_before, probs_after = cat(2, before_f, before_ar, before_at), cat(2, after_f, after_ar, after_at)
    audit = {
        "ids": audit_ids, "group": group, "labels": labels,
        "feats_before": feats_before, "feats_after": feats_after,
        "backbone_after": cat(1, after_f, after_ar, after_at),
        "affinity_before": affinity_matrix(feats_before, R, anchors_np),
        "affinity_after": affinity_matrix(feats_after, R, anchors_np),
        "anchors": anchors_np.astype(np.float32), "R": R.astype(np.float32),
        "conf_before": true_class_confidence(probs_before, labels),
        "conf_after": true_class_confidence(probs_after, labels),
        "retain_conf_before": true_class_confidence(before_r[2], y_r),
        "retain_conf_after": true_class_confidence(after_r[2], y_r),
        "test_conf_before": true_class_confidence(before_t[2], y_t),
        "test_conf_after": true_class_confidence(after_t[2], y_t),
        "pred_before": probs_before.argmax(1).astype(np.int64), "pred_after": probs_after.argmax(1).astype(np.int64),
    }
    if snapshots:
        audit["snapshot_steps"] = np.array(snapshot_steps, dtype=np.int64)
        audit["snapshots"] = np.stack(snapshots)

    timings["total"] = time.perf_counter() - t_start
    root = runs.runs_root(request.runs_root)
    run_id = runs.new_run_id(request.method, k, request.seed, root)
    partial = runs.partial_dir(root, run_id)
    try:
        cb.check_cancel("saving")
        weights_card = save_unlearned(live.cpu(), partial, base_card, {"run_id": run_id, "method": request.method})
        meta = {
            "run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "method": request.method, "config": config.to_dict(), "seed": request.seed,
            "parent_run": parent_meta["run_id"] if parent_meta else None,
            "dataset": ds.card(),
            "model": {"name": request.model if not parent_meta else parent_meta["model"]["name"],
                      "arch": base_card["arch"], "card": base_card,
                      "card_sha256": hashlib.sha256(repr(sorted(base_card.items())).encode()).hexdigest(),
                      "weights_sha256": base_card.get("weights_sha256"), "start": model_key,
                      "chain": weights_card["chain"]},
            "forget_ids": ids, "k": k,
            "uploads": [{"index": i, "label": int(lbl), "sha256": hashlib.sha256(np.asarray(img).tobytes()).hexdigest()}
                        for i, (img, lbl) in enumerate(request.uploads)],
            "all_forget_ids": sorted(all_forgotten),
            "anchors": {"encoder": anchor_set.encoder, "hash": anchor_set.hash, "class_names": ds.class_names,
                        "texts": anchor_set.texts, "warnings": anchor_set.warnings},
            "code_version": code_version(),
            "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                            "platform": platform.platform(), "device": str(device),
                            "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
            "request": {k2: v for k2, v in asdict(request).items() if k2 not in ("uploads", "anchor_texts")},
            "metrics": {"before": m_before, "after": m_after, "retrain": reference},
            "timings": {k2: round(v, 3) for k2, v in timings.items()},
            "peak_rss_mb": round(peak_rss_mb(), 1), "device": str(device),
            "history": outcome.history, "stop_reason": outcome.stop_reason, "steps": outcome.steps,
            "importance": outcome.extra.get("importance"), "term_shares": term_shares(outcome.history),
        }
        final = runs.finalize(partial, meta, audit)
    except BaseException:
        runs.discard(partial)
        raise
    cb.progress(1.0, f"saved {final.name}")
    return final


__all__ = ["DataError", "RunRequest", "cached_dataset", "execute_run", "validate_forget_ids"]
