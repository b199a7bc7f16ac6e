"""Session state and caches of the dashboard, behind a few small helpers.

Rules:
- Per-user things (forget selection, uploads, anchor texts, the current run, the
  background job) live in `st.session_state`, so two browser sessions never see
  each other's work.
- Shared, read-only things (datasets, models, encoders, predictions, thumbnails)
  are cached with `st.cache_resource` / `st.cache_data`.
- Background jobs are kept in a cached registry keyed by a random per-session
  token, so that a page reload (same URL, `?s=<token>`) can re-attach to its own
  run, while another browser session never can.
"""

from __future__ import annotations

import copy
import io
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from core.data import Dataset, load_dataset
from core.models import LoadedModel, list_sample_models, load_model, pick_device

ROOT = Path(__file__).resolve().parent.parent
DATASET = os.environ.get("STRUCTGUARD_DATASET", "fashion-mnist")
THUMB_PX = 96  # enlarged thumbnail edge in pixels


def runs_root() -> Path:
    return Path(os.environ.get("STRUCTGUARD_RUNS", ROOT / "runs"))


# ------------------------------------------------------------------ shared caches


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
    return _png(pixels, size)


@st.cache_resource(show_spinner=False, max_entries=16)
def _load_run(path: str, mtime: float) -> Any:
    from core.runs import load_run as _load

    return _load(path)


def load_run(run_dir: Path | str) -> Any:
    """A saved run (metadata + audit arrays), cached until its run.json changes. Treat as read-only."""
    p = Path(run_dir)
    return _load_run(str(p), (p / "run.json").stat().st_mtime if (p / "run.json").exists() else 0.0)


# ------------------------------------------------------------------ session state


def _ss(key: str, factory: Any) -> Any:
    if key not in st.session_state:
        st.session_state[key] = factory()
    return st.session_state[key]


def session_token() -> str:
    """Random per-session token, mirrored in the URL (?s=...) so a reload finds its run again."""
    if "token" not in st.session_state:
        given = st.query_params.get("s")
        st.session_state.token = given if given and len(given) == 16 else secrets.token_hex(8)
    if st.query_params.get("s") != st.session_state.token:
        st.query_params["s"] = st.session_state.token
    return st.session_state.token


def selection() -> set[int]:
    """Training-sample ids chosen for forgetting."""
    return _ss("selection", set)


def set_selection(ids: set[int] | list[int]) -> None:
    st.session_state.selection = {int(i) for i in ids}


def toggle(sample_id: int) -> None:
    sel = selection()
    sel.symmetric_difference_update({int(sample_id)})


@dataclass
class Upload:
    name: str
    pixels: np.ndarray  # uint8 [C, H, W] at the dataset's input size
    label: int


def uploads() -> list[Upload]:
    """User images added to the forget set (kept only in this session)."""
    return _ss("uploads", list)


def anchor_texts(defaults: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """This session's attribute lists per class (initialised from the defaults)."""
    if "anchor_texts" not in st.session_state and defaults is not None:
        st.session_state.anchor_texts = {c: list(v) for c, v in defaults.items()}
    return st.session_state.get("anchor_texts", {})


def set_anchor_texts(texts: dict[str, list[str]]) -> None:
    st.session_state.anchor_texts = {c: list(v) for c, v in texts.items()}
    st.session_state.anchor_rev = st.session_state.get("anchor_rev", 0) + 1


def anchor_rev() -> int:
    """Bumped whenever the texts are replaced wholesale (widgets re-read them)."""
    return st.session_state.get("anchor_rev", 0)


def encoder_choice() -> str:
    return _ss("encoder", lambda: os.environ.get("STRUCTGUARD_ENCODER", "auto"))


def current_run() -> Path | None:
    """The run shown on the audit page for this session."""
    return st.session_state.get("current_run")


def set_current_run(run_dir: Path | str | None) -> None:
    st.session_state.current_run = Path(run_dir) if run_dir else None


def compare_runs() -> list[str]:
    return _ss("compare_runs", list)


def request_compare(run_ids: list[str]) -> None:
    """Pre-select runs on the Runs page (a new table widget picks up the selection)."""
    st.session_state.compare_runs = list(run_ids)
    st.session_state.runs_rev = st.session_state.get("runs_rev", 0) + 1


def my_runs() -> list[str]:
    """Run ids created by this session (for marking them on the Runs page)."""
    return _ss("my_runs", list)


def flash(kind: str, message: str) -> None:
    """Queue a message for the next script run (survives st.rerun)."""
    _ss("flash", list).append((kind, message))


def show_flash() -> None:
    for kind, message in st.session_state.pop("flash", []):
        getattr(st, kind)(message)


def widget_defaults(**defaults: Any) -> None:
    """Set first values of keyed widgets and keep them across page switches.

    Streamlit drops the state of widgets that were not rendered in the last run;
    re-assigning the value keeps it. Widgets using these keys must not pass `value=`.
    """
    for k, v in defaults.items():
        st.session_state[k] = st.session_state[k] if k in st.session_state else v


# ------------------------------------------------------------------ background jobs


@dataclass
class Job:
    """One background run. The worker thread only touches this object, never Streamlit."""

    token: str
    label: str
    owner: tuple[str | None, str] | None = None  # (Streamlit session id, nonce) of the session watching it
    cancel_event: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    status: str = "running"  # running | done | cancelled | failed
    fraction: float = 0.0
    message: str = "starting ..."
    history: list[dict] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    thread: threading.Thread | None = None

    # callbacks handed to core
    def on_progress(self, fraction: float, message: str) -> None:
        with self.lock:
            self.fraction, self.message = float(min(max(fraction, 0.0), 1.0)), str(message)

    def on_step(self, record: dict) -> None:
        with self.lock:
            self.history.append(dict(record))

    def should_cancel(self) -> bool:
        return self.cancel_event.is_set()

    def snapshot(self) -> dict:
        with self.lock:
            return {"status": self.status, "fraction": self.fraction, "message": self.message,
                    "history": list(self.history), "run_dirs": list(self.run_dirs), "error": self.error,
                    "elapsed": (self.finished or time.time()) - self.started, "label": self.label}


@st.cache_resource
def _job_registry() -> dict[str, Job]:
    """token -> that session's latest job (the registry object is cached, its entries are per session)."""
    return {}


def _session_id() -> tuple[str | None, str]:
    """(Streamlit session id, a nonce of this session's state): unique even where ids repeat (AppTest)."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    nonce = _ss("nonce", lambda: secrets.token_hex(8))
    return (ctx.session_id if ctx else None, nonce)


def _session_alive(session_id: str | None) -> bool:
    """Whether a browser is still connected to that Streamlit session."""
    if session_id is None:
        return False
    try:
        from streamlit.runtime import Runtime

        return Runtime.instance().is_active_session(session_id)
    except Exception:  # no runtime (AppTest): treat as alive
        return True


def current_job() -> Job | None:
    """This session's job, re-attached after a reload when its old session is gone."""
    job = _job_registry().get(session_token())
    if job is None:
        return None
    me = _session_id()
    if job.owner != me:
        if job.owner is not None and _session_alive(job.owner[0]):
            return None  # another live session holds this token (e.g. a copied URL): do not mix
        job.owner = me
        st.session_state.reattached = True
    return job


def start_job(label: str, work: Any) -> Job:
    """Run `work(job)` in a daemon thread; it returns the run directories it created."""
    job = Job(token=session_token(), label=label, owner=_session_id())

    def target() -> None:
        try:
            dirs = work(job)
            with job.lock:
                job.run_dirs = [Path(d) for d in dirs]
                job.status = "cancelled" if job.cancel_event.is_set() and not dirs else "done"
                job.fraction = 1.0 if job.status == "done" else job.fraction
        except Exception as exc:  # shown in the UI; the engine never leaves a half-written run
            with job.lock:
                cancelled = job.cancel_event.is_set() or type(exc).__name__ in ("Cancelled", "RunCancelled")
                job.status = "cancelled" if cancelled else "failed"
                job.error = None if cancelled else f"{type(exc).__name__}: {exc}"
        finally:
            job.finished = time.time()

    job.thread = threading.Thread(target=target, name=f"structguard-{job.token}", daemon=True)
    _job_registry()[job.token] = job
    job.thread.start()
    return job


def forget_job() -> None:
    _job_registry().pop(session_token(), None)


# ------------------------------------------------------------------ audit computations (cached per run)


@st.cache_resource(show_spinner="Fitting the drift map (UMAP; the first fit in a process compiles numba) ...",
                   max_entries=8)
def drift(run_dir: str, mtime: float) -> tuple[Any, Any]:
    """(DriftResult, snapshot frames [T, M, 2] or None) of a run, in the backbone feature space."""
    from core.audit.drift import embedding_drift, project_snapshots

    audit = load_run(run_dir).audit
    after = audit["backbone_after"] if "backbone_after" in audit else audit["feats_after"]
    classes = load_run(run_dir).meta.get("dataset", {}).get("classes") or []
    result, reducer = embedding_drift(audit["feats_before"], after, audit["labels"], audit["group"].astype(str),
                                      n_classes=len(classes) or None,
                                      method=os.environ.get("STRUCTGUARD_DRIFT_METHOD", "auto"))
    frames = None
    if "snapshots" in audit and "snapshot_steps" in audit and len(audit["snapshot_steps"]):
        frames = project_snapshots(reducer, audit["snapshots"])
    return result, frames


@st.cache_resource(show_spinner=False)
def warm_up_drift() -> threading.Thread | None:
    """Compile UMAP's numba code once per process, in the background (first fit otherwise waits ~15 s)."""
    if os.environ.get("STRUCTGUARD_DRIFT_METHOD") == "pca":
        return None
    from core.audit.drift import warm_up

    t = threading.Thread(target=warm_up, name="umap-warm-up", daemon=True)
    t.start()
    return t


@st.cache_resource(show_spinner=False, max_entries=8)
def unlearned_model(run_dir: str) -> Any:
    from core.engine import load_unlearned

    return load_unlearned(run_dir).eval()


@st.cache_resource(show_spinner="Computing Grad-CAM before and after ...", max_entries=8)
def gradcam(run_dir: str, mtime: float, n_forget: int) -> Any:
    """Grad-CAM gallery (plotly figure): forget images and a retained image of the same class each."""
    from core import figures as F
    from core.audit.gradcam import grad_cam_before_after, overlay

    rec = load_run(run_dir)
    meta, audit = rec.meta, rec.audit
    parent = meta.get("parent_run")
    before_model = unlearned_model(str(Path(run_dir).parent / parent)) if parent else \
        get_model(meta["model"]["name"]).model
    # Private copies: captum hooks the layer and back-propagates into it; cached models are shared.
    before_model, after_model = copy.deepcopy(before_model), copy.deepcopy(unlearned_model(run_dir))
    ds = get_dataset(meta.get("dataset", {}).get("name", DATASET))
    classes = ds.class_names
    groups, ids, labels = audit["group"].astype(str), audit["ids"], audit["labels"]
    f_rows = [int(i) for i in np.flatnonzero(groups == "forget") if ids[i] >= 0][:n_forget]
    r_rows: list[int] = []
    for i in f_rows:
        cand = [int(j) for j in np.flatnonzero((groups == "retain") & (labels == labels[i])) if j not in r_rows]
        r_rows += cand[:1]
    rows = f_rows + r_rows
    split = {"forget": ds.train, "retain": ds.train, "test": ds.test}
    import torch

    images = torch.cat([split[groups[i]].images(split[groups[i]].positions([int(ids[i])])) for i in rows])
    cb, ca = grad_cam_before_after(before_model, after_model, images, labels[rows], device="cpu")
    img = images.numpy()
    caps = [f"{'forget' if groups[i] == 'forget' else 'kept'} #{int(ids[i])}" for i in rows]  # short: 8 columns
    sub_b = [f"pred {classes[p]} · p={q:.2f}" for p, q in zip(cb.pred, cb.prob_target)]
    sub_a = [f"pred {classes[p]} · p={q:.2f}" for p, q in zip(ca.pred, ca.prob_target)]
    return F.gradcam_gallery(img, overlay(img, cb.cams), overlay(img, ca.cams), caps, sub_before=sub_b,
                             sub_after=sub_a)
