"""Anchor-affinity audit: how each sample relates to the class anchors, before and after.

Affinity of a sample = norm(f R) A^T (DESIGN.md §5): cosine similarity of its feature,
mapped into anchor space by the fixed R, to every class anchor. StructGuard aligns the
rows of S_unl with S_ori; the per-sample row cosine says how well the structure held.
"""

from __future__ import annotations

import numpy as np

__all__ = ["affinity_difference", "anchor_similarity", "class_mean_affinity", "row_cosine", "row_cosine_summary",
           "sample_affinity"]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def anchor_similarity(anchors: np.ndarray) -> np.ndarray:
    """[C, C] cosine similarity between class anchors (rows re-normalised to be safe)."""
    a = _unit_rows(anchors)
    return (a @ a.T).astype(np.float32)


def sample_affinity(feats: np.ndarray, anchors: np.ndarray, R: np.ndarray | None = None) -> np.ndarray:
    """[M, C] = norm(feats R) A^T with the training loss's own formula (core.methods.affinity), in float64.

    R=None means identity (feature dim == anchor dim). Anchors are unit rows, as the anchor set stores them.
    """
    import torch

    from ..methods import affinity

    f = torch.from_numpy(np.asarray(feats, dtype=np.float64))
    a = torch.from_numpy(np.asarray(anchors, dtype=np.float64))
    r = torch.eye(f.shape[1], dtype=torch.float64) if R is None else torch.from_numpy(np.asarray(R, np.float64))
    if r.shape[1] != a.shape[1] or f.shape[1] != r.shape[0]:
        raise ValueError(f"feature dim {f.shape[1]} does not match anchor dim {a.shape[1]}; pass R")
    return affinity(f, r, a).numpy().astype(np.float32)


def affinity_difference(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """S_unl - S_ori, elementwise [M, C]."""
    before, after = np.asarray(before, np.float32), np.asarray(after, np.float32)
    if before.shape != after.shape:
        raise ValueError(f"affinity shapes differ: {before.shape} vs {after.shape}")
    return after - before


def class_mean_affinity(affinity: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """[C, C]: row c = mean affinity of the samples of class c; NaN rows for classes absent from the sample."""
    affinity = np.asarray(affinity, np.float32)
    labels = np.asarray(labels)
    out = np.full((n_classes, affinity.shape[1]), np.nan, dtype=np.float32)
    for c in range(n_classes):
        m = labels == c
        if m.any():
            out[c] = affinity[m].mean(0)
    return out


def row_cosine(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """[M] cosine between each sample's affinity row before and after (1 = structure kept)."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if before.shape != after.shape:
        raise ValueError(f"affinity shapes differ: {before.shape} vs {after.shape}")
    return np.sum(_unit_rows(before) * _unit_rows(after), axis=1).astype(np.float32)


def row_cosine_summary(cos: np.ndarray, groups: np.ndarray) -> dict[str, dict]:
    """Mean / median / 10th percentile of the row cosine per group (forget, retain, test) and overall."""
    cos, groups = np.asarray(cos), np.asarray(groups).astype(str)
    out = {}
    for name, mask in [("all", np.ones(len(cos), bool))] + [(g, groups == g) for g in ("forget", "retain", "test")]:
        v = cos[mask]
        out[name] = ({"n": int(len(v)), "mean": float(v.mean()), "median": float(np.median(v)),
                      "p10": float(np.percentile(v, 10))} if len(v) else {"n": 0})
    return out
