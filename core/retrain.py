"""The retrain reference: the base model's recipe trained from scratch without the forget set.

Retraining is the field's gold standard for unlearning: a method is as good as it is
close to the model that never saw the forget set. A retrained model is stored beside
the bench (`bench/retrain/`) as safetensors + card; the card names the base model, the
forget ids and their hash, so any run with the same base model and forget set finds it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .data import DataError, Dataset
from .models import LoadedModel, save_model
from .train import TrainConfig, accuracy, train_classifier

ROOT = Path(__file__).resolve().parent.parent
RETRAIN_DIR = ROOT / "bench" / "retrain"


def retrain_dir() -> Path:
    """Where retrained references live: $STRUCTGUARD_RETRAIN_DIR, else bench/retrain in the repository."""
    return Path(os.environ.get("STRUCTGUARD_RETRAIN_DIR") or RETRAIN_DIR)


def ids_hash(ids: list[int]) -> str:
    """Order-free hash of a forget set."""
    return hashlib.sha256(json.dumps(sorted(int(i) for i in ids)).encode()).hexdigest()[:16]


def recipe_of(card: dict) -> TrainConfig:
    """The training configuration recorded in a model card (the sample model's recipe)."""
    cfg = (card.get("training") or {}).get("config")
    if not cfg:
        raise DataError("the model card records no training recipe (training.config); retrain needs one")
    known = set(TrainConfig.__dataclass_fields__)
    return TrainConfig(**{k: v for k, v in cfg.items() if k in known})


def retrain(ds: Dataset, base: LoadedModel, forget_ids: list[int], device: torch.device, seed: int | None = None,
            progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Train the base model's recipe on ds.train minus forget_ids; returns the model and its card."""
    keep = ~torch.isin(ds.train.ids, torch.tensor(sorted(forget_ids), dtype=torch.long))
    if int((~keep).sum()) != len(set(forget_ids)):
        raise DataError(f"{len(set(forget_ids)) - int((~keep).sum())} forget id(s) are not in {ds.name}'s "
                        "training split")
    cfg = recipe_of(base.card)
    if seed is not None:
        cfg.seed = seed
    reduced = Dataset(ds.name, ds.class_names, ds.train.subset(torch.nonzero(keep).squeeze(1)), ds.test,
                      ds.source, ds.source_kind, ds.full)
    model, log = train_classifier(reduced, cfg, device, progress=progress)
    acc = accuracy(model, ds.test)
    card = {k: v for k, v in base.card.items() if k not in ("training", "weights_file", "weights_sha256")}
    card.update({
        "test_accuracy": acc, "kind": "retrain",
        "trained_on": f"{ds.name} train minus {len(forget_ids)} forget ids, {len(reduced.train)} images "
                      f"from {ds.source_kind}",
        "retrain_of": {"weights_sha256": base.card.get("weights_sha256"), "arch": base.card["arch"]},
        "forget_ids": sorted(int(i) for i in forget_ids), "forget_ids_sha256": ids_hash(forget_ids),
        "training": {"seed": cfg.seed, "config": cfg.__dict__, "seconds": round(log["seconds"], 1),
                     "device": log["device"], "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "history": log["history"]},
    })
    return model, card


def save_retrained(model: torch.nn.Module, card: dict, out: str | Path) -> dict:
    return save_model(model.cpu().to(memory_format=torch.contiguous_format), out, card)


def find_retrained(base_card: dict, forget_ids: list[int], search: Path | None = None) -> Path | None:
    """The card of a retrained reference for this base model and forget set, if one was made."""
    search = search or retrain_dir()
    if not search.is_dir() or not forget_ids:
        return None
    want, sha = ids_hash(forget_ids), base_card.get("weights_sha256")
    for path in sorted(search.rglob("*.json")):
        try:
            card = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if card.get("forget_ids_sha256") == want and (card.get("retrain_of") or {}).get("weights_sha256") == sha:
            return path
    return None


__all__ = ["RETRAIN_DIR", "find_retrained", "ids_hash", "recipe_of", "retrain", "retrain_dir", "save_retrained"]
