"""Training and evaluation of classifiers (the sample model is made here)."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Dataset, Split
from .models import create_model, pick_device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def to_device_format(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """channels_last roughly doubles conv speed on CPU for these small models."""
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    return model.to(device).to(memory_format=torch.channels_last)


@torch.no_grad()
def predict(model: nn.Module, split: Split, positions: torch.Tensor | None = None, batch_size: int = 1000,
            device: torch.device | None = None) -> torch.Tensor:
    """Predicted labels for the split (or the given row positions)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = torch.arange(len(split)) if positions is None else positions
    preds = []
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        preds.append(model(to_device_format(split.images(idx), device)).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, split: Split, positions: torch.Tensor | None = None, **kw) -> float:
    """Top-1 accuracy in percent."""
    labels = split.labels if positions is None else split.labels[positions]
    if len(labels) == 0:
        return float("nan")
    return float((predict(model, split, positions, **kw) == labels).float().mean() * 100)


def _augment(x: torch.Tensor, pad: int, flip: bool) -> torch.Tensor:
    """Random shift by up to `pad` pixels (reflect-padded crop) and horizontal flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,))
    dy = torch.randint(0, 2 * pad + 1, (n,))
    rows = (dy[:, None] + torch.arange(h)[None]).clamp_max(h + 2 * pad - 1)
    cols = (dx[:, None] + torch.arange(w)[None])
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    if flip:
        mask = torch.rand(n) < 0.5
        out[mask] = out[mask].flip(-1)
    return out


@dataclass
class TrainConfig:
    arch: str = "resnet18_narrow"
    epochs: int = 12
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    pad: int = 2
    flip: bool = True
    label_smoothing: float = 0.0


def train_classifier(ds: Dataset, cfg: TrainConfig, device: torch.device | None = None,
                     progress: bool = True) -> tuple[nn.Module, dict]:
    """SGD with nesterov momentum and a one-cycle schedule; returns model and history."""
    seed_everything(cfg.seed)
    device = device or pick_device()
    model = create_model(cfg.arch, ds.num_classes, ds.input_shape[0])
    model = prepare_model(model, device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(ds.train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.2)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    t0 = time.time()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(ds.train), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress)
        total, correct, loss_sum = 0, 0, 0.0
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = _augment(ds.train.images(idx), cfg.pad, cfg.flip)
            x, y = to_device_format(x, device), ds.train.labels[idx].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{100 * correct / total:.1f}")
        test_acc = accuracy(model, ds.test)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / total, "train_acc": 100 * correct / total,
                        "test_acc": test_acc, "seconds": time.time() - t0})
        if progress:
            tqdm.write(f"epoch {epoch + 1}: train acc {100 * correct / total:.2f}%, test acc {test_acc:.2f}%")
    model.eval()
    return model, {"history": history, "seconds": time.time() - t0, "device": str(device)}
