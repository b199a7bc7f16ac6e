"""Shared, read-only things of the dashboard, cached once per process.

Datasets, models, encoders, predictions, thumbnails, loaded runs and the audit views are
the same for every browser session, so they live in `st.cache_resource` / `st.cache_data`.
Treat every returned object as read-only: other sessions see the same one.

Only the script thread calls these (never a background job's worker thread: Streamlit's
caches belong to the script run).
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from core import runs as core_runs
from core.audit import views
from core.data import Dataset, load_dataset
from core.models import LoadedModel, list_sample_models, load_model, pick_device

DATASET = os.environ.get("STRUCTGUARD_DATASET", "fashion-mnist")
THUMB_PX = 96  # enlarged thumbnail edge in pixels


# ------------------------------------------------------------------ dataset, model, encoder


@st.cache_resource(show_spinner="Loading the dataset ...")
def get_dataset(name: str = DATASET) -> Dataset:
    return load_dataset(name)


def default_model_name() -> str | None:
    """STRUCTGUARD_MODEL, else the first shipped sample model (None when there is none)."""
    env = os.environ.get("STRUCTGUARD_MODEL")
    if env:
        return env
    cards = list_sample_models()
    return cards[0]["name"] if cards else None


@st.cache_resource(show_spinner="Loading the model ...")
def get_model(name: str) -> LoadedModel:
    """The original classifier (eval mode). Shared: never train or modify it in place."""
    return load_model(name)


@st.cache_resource(show_spinner="Loading the text encoder ...")
def get_encoder(name: str) -> Any:
    from core.encoders import get_encoder as _get

    return _get(name)


@st.cache_data(show_spinner=False)
def encoder_choices() -> dict[str, str]:
    """Encoder name -> one-line status (available or why not)."""
    from core.encoders import encoder_status

    status = encoder_status()
    out: dict[str, str] = {}
    items = status.items() if isinstance(status, dict) else [(s.get("name"), s) for s in status]
    for name, info in items:
        if isinstance(info, dict):
            ok = info.get("available", True)
            detail = info.get("detail") or info.get("reason") or ""
            out[str(name)] = ("available" if ok else "unavailable") + (f": {detail}" if detail else "")
        else:
            out[str(name)] = str(info)
    return out


def device_name() -> str:
    return str(pick_device())


# ------------------------------------------------------------------ forget-set page: positions, predictions, images


@st.cache_data(show_spinner=False)
def class_positions(dataset: str, label: int) -> np.ndarray:
    """Row positions of the training images of one class."""
    ds = get_dataset(dataset)
    return np.flatnonzero(ds.train.labels.numpy() == label)


@st.cache_data(show_spinner="Running the model on these images ...")
def train_predictions(model: str, dataset: str, label: int) -> tuple[np.ndarray, np.ndarray]:
    """(predicted label, confidence in the prediction) for the training images of one class."""
    import torch

    from core.train import to_device_format

    ds, m = get_dataset(dataset), get_model(model).model
    pos = torch.from_numpy(class_positions(dataset, label))
    preds, confs = [], []
    with torch.no_grad():
        for start in range(0, len(pos), 1000):
            x = to_device_format(ds.train.images(pos[start:start + 1000]), next(m.parameters()).device)
            p = m(x).softmax(1)
            c, y = p.max(1)
            preds.append(y.cpu().numpy())
            confs.append(c.cpu().numpy())
    if not preds:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    return np.concatenate(preds), np.concatenate(confs)


def _png(pixels: np.ndarray, size: int) -> bytes:
    from PIL import Image

    arr = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    im = Image.fromarray(arr).resize((size, size), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@st.cache_data(show_spinner=False, max_entries=20000)
def thumbnail(dataset: str, position: int, size: int = THUMB_PX) -> bytes:
    """Enlarged PNG of one training image (nearest-neighbour, so pixels stay crisp)."""
    return _png(get_dataset(dataset).train.pixels[position].numpy(), size)


def upload_png(pixels: np.ndarray, size: int = THUMB_PX) -> bytes:
    """Enlarged PNG of an uploaded image (not cached: uploads belong to one session)."""
    return _png(pixels, size)


# ------------------------------------------------------------------ saved runs and their audit views


def _mtime_ns(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else 0


@st.cache_resource(show_spinner=False, max_entries=16)
def _load_run(path: str, mtime: int) -> Any:
    from core.runs import load_run as _load

    return _load(path)


def load_run(run_dir: Path | str) -> Any:
    """A saved run (metadata + audit arrays), cached until its run.json changes. Treat as read-only."""
    p = Path(run_dir)
    return _load_run(str(p), _mtime_ns(p / "run.json"))


class_names = core_runs.class_names  # plain function: safe in any thread


def _stamp(run_dir: Path | str) -> int:
    """In-memory cache key of a run's views: the audit arrays' mtime (the views' disk cache checks more)."""
    return _mtime_ns(Path(run_dir) / "audit.npz")


@st.cache_resource(show_spinner="Fitting the drift map (UMAP; the first fit in a process compiles numba) ...",
                   max_entries=8)
def _drift_view(run_dir: str, stamp: int, method: str) -> views.DriftView:
    rec = load_run(run_dir)
    return views.drift_view(run_dir, rec.audit, rec.meta, method=method, n_classes=len(class_names(rec.meta)) or None)


def drift_view(run_dir: Path | str) -> views.DriftView:
    """core.audit.views.drift_view of a run (prediction path, $STRUCTGUARD_DRIFT_METHOD), cached in memory."""
    return _drift_view(str(run_dir), _stamp(run_dir), views.drift_method())


@st.cache_resource(show_spinner=False, max_entries=8)
def _affinity_view(run_dir: str, stamp: int) -> views.AffinityView:
    rec = load_run(run_dir)
    n = len(class_names(rec.meta)) or int(rec.audit["labels"].max() + 1)
    return views.affinity_view(rec.audit, n)


def affinity_view(run_dir: Path | str) -> views.AffinityView:
    """core.audit.views.affinity_view of a run; KeyError when it stores neither affinities nor features."""
    return _affinity_view(str(run_dir), _stamp(run_dir))


@st.cache_resource(show_spinner="Computing Grad-CAM before and after ...", max_entries=8)
def _gradcam_view(run_dir: str, stamp: int, n_forget: int) -> views.GradCamView:
    rec = load_run(run_dir)
    return views.gradcam_view(run_dir, rec.audit, rec.meta, n_forget)


def gradcam_view(run_dir: Path | str, n_forget: int) -> views.GradCamView:
    """core.audit.views.gradcam_view of a run (on the CPU), cached in memory and beside the run."""
    return _gradcam_view(str(run_dir), _stamp(run_dir), int(n_forget))


@st.cache_resource(show_spinner=False)
@st.cache_resource(show_spinner=False)
def run_workers_started() -> bool:
    """Start the run workers' fork server once per server process (dashboard.worker), in the background."""
    from dashboard import worker

    if worker.IN_PROCESS:
        worker.warm_up()
    return True


def warm_up_drift() -> threading.Thread | None:
    """Compile UMAP's numba code once per process, in the background (first fit otherwise waits ~15 s)."""
    if views.drift_method() == "pca":
        return None
    from core.audit.drift import warm_up

    t = threading.Thread(target=warm_up, name="umap-warm-up", daemon=True)
    t.start()
    return t
