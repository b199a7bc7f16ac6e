"""Embedding drift: where do samples move in a 2-D map of the ORIGINAL feature space?

The reducer is fitted once on the original model's features of the audit sample and
then only *transforms* the unlearned features (and every snapshot of a timeline), so
all pictures share one coordinate system and a moving point means the model moved it,
not that the map was redrawn. UMAP (umap-learn) is the default; PCA (scikit-learn) is
the fast, deterministic fallback. Plain arrays in, plain arrays out. scikit-learn is imported where it
is used: importing it costs about 1 s, which a CLI run that draws no map need not pay.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DriftReducer", "DriftResult", "embedding_drift", "project_snapshots", "umap_available", "warm_up"]

_WARM = False


def umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except Exception:  # umap pulls numba/llvmlite; any import failure means "use PCA"
        return False
    return True


def _umap_cls():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # umap warns about tensorflow / parametric UMAP at import
        import umap
    return umap.UMAP


def warm_up() -> float:
    """Compile umap-learn's numba kernels once per process (a fit and a placement on tiny data).

    umap-learn caches part of its kernels on disk, but a fresh process still pays
    several seconds on its first fit and first transform. Returns the seconds spent;
    0.0 when already warm or when UMAP is unavailable.
    """
    global _WARM
    if _WARM or not umap_available():
        return 0.0
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sklearn.neighbors import NearestNeighbors
        from umap.umap_ import smooth_knn_dist

        dist, idx = NearestNeighbors(n_neighbors=10).fit(x).kneighbors(x)
        _umap_cls()(n_neighbors=10, n_epochs=20, random_state=0, precomputed_knn=(idx, dist.astype(np.float32))).fit(x)
        smooth_knn_dist(np.abs(x[:10, :10]), 10.0, local_connectivity=0.0)
    _WARM = True
    return time.perf_counter() - t0


class DriftReducer:
    """Fit a 2-D map on original features, then place any features of the same space.

    method: "umap", "pca" or "auto" (UMAP when importable, else PCA).

    UMAP placement uses umap-learn's own rule for new points without its stochastic
    refinement: a new point lands at the membership-weighted mean of the map positions
    of its k nearest ORIGINAL points (umap's `smooth_knn_dist` weights, as in its
    `init_graph_transform`). umap's full `transform` then runs SGD epochs whose random
    negative samples depend on every other point in the batch, so an unchanged sample
    would move when others change; this rule is per point, deterministic and continuous:
    unchanged features land on the same spot, and all displacement is the model's.
    n_epochs=200 (umap's default is 500 below 10k points) keeps a 2,000-point fit within
    a few seconds on a laptop CPU. A fixed random_state makes the map reproducible.
    """

    def __init__(self, method: str = "auto", *, n_neighbors: int = 15, min_dist: float = 0.1,
                 n_epochs: int = 200, metric: str = "euclidean", random_state: int = 0) -> None:
        if method not in ("auto", "umap", "pca"):
            raise ValueError(f"unknown drift method {method!r}; use umap, pca or auto")
        self.method = method
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.n_epochs = n_epochs
        self.metric = metric
        self.random_state = random_state
        self.method_: str | None = None
        self.note_: str = ""
        self._model = None

    def fit(self, x: np.ndarray) -> DriftReducer:
        x = _as_features(x)
        method = self.method
        if method == "auto":
            method = "umap" if umap_available() else "pca"
            if method == "pca":
                self.note_ = "umap-learn unavailable; PCA used instead"
        # UMAP needs more points than neighbours; tiny samples get PCA (and say so)
        if method == "umap" and len(x) <= self.n_neighbors + 1:
            method, self.note_ = "pca", f"only {len(x)} points: PCA used instead of UMAP"
        if method == "umap":
            warm_up()
            # Exact kNN by scikit-learn (vectorised), handed to umap as precomputed_knn: below 4,096
            # points umap otherwise builds all pairwise distances through a Python-level callable
            # (~4 s of a 2,000-point fit on 2 cores). Each point is its own first neighbour, as umap expects.
            from sklearn.neighbors import NearestNeighbors

            self._knn = NearestNeighbors(n_neighbors=self.n_neighbors, metric=self.metric).fit(x)
            dist, idx = self._knn.kneighbors(x)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no search index: transform unavailable" - we place points ourselves
                self._model = _umap_cls()(n_neighbors=self.n_neighbors, min_dist=self.min_dist,
                                          n_epochs=self.n_epochs, metric=self.metric,
                                          random_state=self.random_state,
                                          precomputed_knn=(idx, dist.astype(np.float32))).fit(x)
            self.embedding_ = np.asarray(self._model.embedding_, dtype=np.float32)
        else:
            from sklearn.decomposition import PCA

            self._model = PCA(n_components=2, random_state=self.random_state).fit(x)
            self.embedding_ = self._model.transform(x).astype(np.float32)
        self.method_ = method
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        if self._model is None:
            raise RuntimeError("DriftReducer.transform called before fit")
        x = _as_features(x)
        if self.method_ == "pca":
            return self._model.transform(x).astype(np.float32)
        from umap.umap_ import smooth_knn_dist

        dist, idx = self._knn.kneighbors(x)
        dist = dist.astype(np.float32)
        # local_connectivity 0, as umap's transform uses: rho = 0, so an exact match gets weight 1
        sigma, rho = smooth_knn_dist(dist, float(self.n_neighbors), local_connectivity=0.0)
        w = np.exp(-np.maximum(dist - rho[:, None], 0.0) / np.maximum(sigma[:, None], 1e-12))
        total = w.sum(1, keepdims=True)
        w = np.where(total > 0, w / np.where(total > 0, total, 1), np.eye(1, w.shape[1]))  # no weight: nearest
        return np.einsum("nk,nkd->nd", w, self.embedding_[idx]).astype(np.float32)

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        return self.fit(x).transform(x)


def _as_features(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be [n, d], got shape {x.shape}")
    if not np.isfinite(x).all():
        # NegGrad can blow features up to inf/nan; keep them placeable, but never silently
        x = np.nan_to_num(x, nan=0.0, posinf=np.finfo(np.float32).max / 1e3, neginf=-np.finfo(np.float32).max / 1e3)
    return x


@dataclass
class DriftResult:
    """Original (`before`) and unlearned (`after`) 2-D positions of the same samples."""

    before: np.ndarray            # [M, 2]
    after: np.ndarray             # [M, 2]
    labels: np.ndarray            # [M] int
    groups: np.ndarray            # [M] str: forget / retain / test
    displacement: np.ndarray      # [M] 2-D distance moved, in map units
    rel_feature_shift: np.ndarray  # [M] ||f_after - f_before|| / ||f_before||, in feature space (no map involved)
    scale: float                  # median distance of original points to their class centroid (map units)
    method: str
    per_class: list[dict] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0

    @property
    def forget_mask(self) -> np.ndarray:
        return self.groups == "forget"

    def summary(self) -> dict:
        """Scalar drift statistics; displacement also in units of `scale` so runs compare."""
        def stats(mask: np.ndarray) -> dict:
            if not mask.any():
                return {"n": 0, "mean": float("nan"), "median": float("nan"), "rel_feature_shift": float("nan")}
            return {"n": int(mask.sum()), "mean": float(self.displacement[mask].mean() / self.scale),
                    "median": float(np.median(self.displacement[mask]) / self.scale),
                    "rel_feature_shift": float(np.median(self.rel_feature_shift[mask]))}
        out = {"method": self.method, "scale": self.scale, "n": int(len(self.labels)), "note": self.note,
               "all": stats(np.ones(len(self.labels), bool))}
        for g in ("forget", "retain", "test"):
            out[g] = stats(self.groups == g)
        return out


def _per_class(before: np.ndarray, after: np.ndarray, disp: np.ndarray, rel: np.ndarray, labels: np.ndarray,
               groups: np.ndarray, n_classes: int, scale: float) -> list[dict]:
    """Per-class drift: mean/median displacement, centroid shift and spread change (map units / scale)."""
    rows = []
    for c in range(n_classes):
        m = labels == c
        keep = m & (groups != "forget")  # forget points are judged apart: they are meant to move
        row = {"class": c, "n": int(m.sum()), "n_forget": int((m & (groups == "forget")).sum()), "absent": not m.any()}
        if not keep.any():
            row.update(mean=float("nan"), median=float("nan"), centroid_shift=float("nan"),
                       spread_before=float("nan"), spread_after=float("nan"), rel_feature_shift=float("nan"))
        else:
            cb, ca = before[keep].mean(0), after[keep].mean(0)
            row.update(
                mean=float(disp[keep].mean() / scale), median=float(np.median(disp[keep]) / scale),
                centroid_shift=float(np.linalg.norm(ca - cb) / scale),
                spread_before=float(np.linalg.norm(before[keep] - cb, axis=1).mean() / scale),
                spread_after=float(np.linalg.norm(after[keep] - ca, axis=1).mean() / scale),
                rel_feature_shift=float(np.median(rel[keep])),
            )
        rows.append(row)
    return rows


def _class_scale(xy: np.ndarray, labels: np.ndarray) -> float:
    """Typical within-class radius of the original map: a unit that is comparable across runs."""
    d = []
    for c in np.unique(labels):
        pts = xy[labels == c]
        if len(pts) > 1:
            d.append(np.linalg.norm(pts - pts.mean(0), axis=1))
    if not d:
        spread = float(np.linalg.norm(xy - xy.mean(0), axis=1).mean()) if len(xy) > 1 else 0.0
        return spread or 1.0
    return float(np.median(np.concatenate(d))) or 1.0


def embedding_drift(feats_before: np.ndarray, feats_after: np.ndarray, labels: np.ndarray,
                    groups: np.ndarray | None = None, *, n_classes: int | None = None,
                    reducer: DriftReducer | None = None, method: str = "auto",
                    **reducer_kw: object) -> tuple[DriftResult, DriftReducer]:
    """Fit on `feats_before`, place `feats_after` with the same reducer, measure displacement.

    Both feature arrays must live in the same space (for StructGuard use the backbone
    features `backbone_after`, not the projector output). Returns the result and the
    fitted reducer, which `project_snapshots` reuses for a timeline.
    """
    t0 = time.perf_counter()
    fb, fa = _as_features(feats_before), _as_features(feats_after)
    if fb.shape != fa.shape:
        raise ValueError(f"feature shapes differ: before {fb.shape}, after {fa.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.full(len(labels), "test", dtype="<U6") if groups is None else np.asarray(groups).astype(str)
    if len(labels) != len(fb) or len(groups) != len(fb):
        raise ValueError("labels / groups must have one entry per feature row")
    n_classes = int(n_classes if n_classes is not None else (labels.max() + 1 if len(labels) else 0))
    if reducer is None:
        reducer = DriftReducer(method, **reducer_kw).fit(fb)
    # Both sides go through the same deterministic per-point placement: identical features land
    # on identical points, so any displacement is the model's doing and not the map's jitter.
    before = reducer.transform(fb)
    after = reducer.transform(fa)
    disp = np.linalg.norm(after - before, axis=1)
    norm_b = np.linalg.norm(fb, axis=1)
    rel = np.linalg.norm(fa - fb, axis=1) / np.maximum(norm_b, 1e-12)
    scale = _class_scale(before, labels)
    per_class = _per_class(before, after, disp, rel, labels, groups, n_classes, scale)
    result = DriftResult(before, after, labels, groups, disp.astype(np.float32), rel.astype(np.float32), scale,
                         reducer.method_ or method, per_class, reducer.note_, time.perf_counter() - t0)
    return result, reducer


def project_snapshots(reducer: DriftReducer, snapshots: np.ndarray) -> np.ndarray:
    """Place every snapshot [T, M, d] with the already fitted reducer -> [T, M, 2].

    Placement is per point, so one snapshot at a time equals one big transform without its memory peak.
    """
    snaps = np.asarray(snapshots)
    if snaps.ndim != 3:
        raise ValueError(f"snapshots must be [T, M, d], got {snaps.shape}")
    return np.stack([reducer.transform(s.astype(np.float32)) for s in snaps]) if len(snaps) else \
        np.zeros((0, snaps.shape[1], 2), np.float32)
