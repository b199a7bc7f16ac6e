"""Background jobs: one run (or a few in a row) per session, in a daemon thread.

Jobs are kept in a process-wide registry keyed by the session's random token, so that a
page reload (same URL, `?s=<token>`) re-attaches to its own run, while another live browser
session never can: one live session holds a token at a time (session.session_token), and a
job watched by another live session is neither shown nor replaced here.

Rule: the worker thread touches only its `Job` and core. It never calls a Streamlit
function, not even the caches in dashboard.resources: whatever the work needs from them is
resolved in the script thread before `start_job` and passed in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from dashboard import session


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
    handled: bool = False  # the session has recorded the outcome (script thread only)

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
def registry() -> dict[str, Job]:
    """token -> that session's latest job (the registry object is cached, its entries are per session)."""
    return {}


def current_job() -> Job | None:
    """This session's job, re-attached after a reload when its old session is gone."""
    job = registry().get(session.session_token())
    if job is None:
        return None
    me = session.session_id()
    if job.owner != me:
        if job.owner is not None and session.session_alive(job.owner[0]):
            return None  # another live session holds this token (e.g. a copied URL): do not mix
        job.owner = me
        st.session_state.reattached = True
    return job


def start_job(label: str, work: Callable[[Job], list[Path | str]]) -> Job:
    """Run `work(job)` in a daemon thread; it returns the run directories it created.

    `work` runs outside the script thread: it may call core and the job's callbacks only.
    """
    token = session.session_token()
    if current_job() is None and (held := registry().get(token)) is not None and held.status == "running":
        raise RuntimeError("another open session is running a job under this link")  # never replace it
    job = Job(token=token, label=label, owner=session.session_id())

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
    registry()[job.token] = job
    job.thread.start()
    return job
