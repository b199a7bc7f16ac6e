"""Accuracy and structure-preservation metrics (DESIGN.md section 6): plain arrays in, numbers out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .audit.affinity import row_cosine
from .data import Split
from .train import to_device_format

DA_ENERGY = 0.95  # dimensional alignment: the retain eigenspace holding 95% of the energy


@torch.no_grad()
def batch_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prediction-path features, backbone features, softmax probabilities) of one batch, on the CPU."""
    back = model.backbone_features(x) if hasattr(model, "backbone_features") else model.features(x)
    proj = getattr(model, "projector", None)
    f = proj(back) if proj is not None else back
    return f.float().cpu(), back.float().cpu(), torch.softmax(model.classify(f), 1).float().cpu()


@dataclass(frozen=True)
class Outputs:
    """One model's outputs on a set of rows: prediction-path features f, backbone h(x), softmax probabilities."""

    features: np.ndarray
    backbone: np.ndarray
    probs: np.ndarray

    def __len__(self) -> int:
        return len(self.probs)

    @classmethod
    def concat(cls, *parts: Outputs) -> Outputs:
        return cls(*(np.concatenate([getattr(p, name) for p in parts]).astype(np.float32)
                     for name in ("features", "backbone", "probs")))

    @classmethod
    def empty(cls) -> Outputs:
        return cls(*(np.zeros((0, 0), np.float32) for _ in range(3)))


CHECKED_CPU_BATCH = 256  # with a cancel check on the CPU: a batch takes well under a second (2 cores)


@torch.no_grad()
def outputs(model: nn.Module, split: Split | torch.Tensor, positions: torch.Tensor | None = None,
            batch_size: int = 1000, device: torch.device | None = None,
            check: Callable[[], None] | None = None) -> Outputs:
    """batch_outputs over the given rows of a split (or over a tensor of images), as numpy arrays.

    `check()` (a run's cancel check, which raises) is called before every batch; with one, CPU batches
    are at most CHECKED_CPU_BATCH rows so that cancel answers quickly (each row's outputs do not
    depend on the batch it is in)."""
    device = device or next(model.parameters()).device
    if check is not None and device.type == "cpu":
        batch_size = min(batch_size, CHECKED_CPU_BATCH)
    was = model.training
    model.eval()
    n = len(split) if positions is None else len(positions)
    parts = []
    try:
        for start in range(0, n, batch_size):
            if check is not None:
                check()
            if isinstance(split, torch.Tensor):
                x = split[start:start + batch_size].to(device)
            else:
                rows = positions[start:start + batch_size] if positions is not None \
                    else slice(start, start + batch_size)
                x = to_device_format(split.images(rows), device)
            parts.append(batch_outputs(model, x))
    finally:
        model.train(was)
    if not parts:
        return Outputs.empty()
    return Outputs(*(torch.cat([p[i] for p in parts]).numpy() for i in range(3)))


def accuracy_from_probs(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean() * 100) if len(labels) else float("nan")


def per_class_accuracy(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    pred = probs.argmax(1)
    out: list[float | None] = []
    for c in range(num_classes):
        mask = labels == c
        out.append(float((pred[mask] == c).mean() * 100) if mask.any() else None)
    return out


def true_class_confidence(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return probs[np.arange(len(labels)), labels].astype(np.float32)


# ------------------------------------------------------------------ structure


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al., 2019) between two feature matrices of the same samples."""
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    xty = np.linalg.norm(x.T.astype(np.float64) @ y, "fro") ** 2
    den = np.linalg.norm(x.T.astype(np.float64) @ x, "fro") * np.linalg.norm(y.T.astype(np.float64) @ y, "fro")
    return float(xty / den) if den > 0 else float("nan")


def knn_overlap(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """Mean share of each sample's k cosine nearest neighbours kept between x and y."""
    n = len(x)
    if n <= k:
        k = n - 1
    if k < 1:
        return float("nan")

    def neighbours(f: np.ndarray) -> np.ndarray:
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        sim = f @ f.T
        np.fill_diagonal(sim, -np.inf)
        return np.argpartition(-sim, k, axis=1)[:, :k]

    a, b = neighbours(x), neighbours(y)
    return float(np.mean([len(np.intersect1d(a[i], b[i])) / k for i in range(n)]))


def dimensional_alignment(forget: np.ndarray, retain: np.ndarray, energy: float = DA_ENERGY) -> float:
    """Share of the forget features' energy inside the top eigenspace of the retain features.

    The eigenspace is the smallest set of leading eigenvectors of the (uncentred) retain
    second-moment matrix that holds `energy` of its trace (Seo et al., 2024).
    """
    if len(forget) == 0 or len(retain) == 0:
        return float("nan")
    cov = retain.T.astype(np.float64) @ retain / len(retain)
    vals, vecs = np.linalg.eigh(cov)
    vals, vecs = vals[::-1], vecs[:, ::-1]
    m = int(np.searchsorted(np.cumsum(vals) / max(vals.sum(), 1e-12), energy) + 1)
    top = vecs[:, :m]
    proj = forget.astype(np.float64) @ top
    return float((proj**2).sum() / max((forget.astype(np.float64) ** 2).sum(), 1e-12))


def structure_scores(before: np.ndarray, after: np.ndarray, aff_before: np.ndarray, aff_after: np.ndarray,
                     k: int = 10) -> dict[str, float]:
    """Affinity row cosine, linear CKA and kNN overlap between original and unlearned features."""
    return {
        "affinity_cosine": float(np.mean(row_cosine(aff_before, aff_after))) if len(aff_before) else float("nan"),
        "cka": linear_cka(before, after),
        "knn_overlap": knn_overlap(before, after, k),
    }
