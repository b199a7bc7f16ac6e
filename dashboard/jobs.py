"""Background jobs: one run (or a few in a row) per session, in a worker process (dashboard.worker).

Jobs are kept in a process-wide registry keyed by the session's random token, so that a
page reload (same URL, `?s=<token>`) re-attaches to its own run, while another live browser
session never can: one live session holds a token at a time (session.session_token), and a
job watched by another live session is neither shown nor replaced here.

Rule: the work is a list of core.pipeline.RunRequest values, resolved in the script thread (from
Streamlit's caches where needed) and handed to the worker process; its pump thread touches only the
session's `Job`, never Streamlit.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from dashboard import session

SETTLE_S = 5.0  # the sidebar polls this long after a finished job's follow-up page opened (recover_stale_page)


@dataclass
class Job:
    """One background job. The worker's pump thread only touches this object, never Streamlit."""

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
    thread: threading.Thread | None = None  # the pump thread (joins once the worker process has ended)
    pid: int | None = None                  # the worker process
    handled: bool = False  # the session has recorded the outcome (script thread only)
    handled_at: float = 0.0  # when: the follow-up page had finished its first run

    def settling(self) -> bool:
        """The session still polls: the job runs, or its follow-up page is new (widgets.recover_stale_page)."""
        return self.status == "running" or (self.status == "done" and bool(self.run_dirs) and (
            not self.handled or time.time() - self.handled_at < SETTLE_S))

    # applied by the worker's pump thread
    def on_progress(self, fraction: float, message: str) -> None:
        with self.lock:
            self.fraction, self.message = float(min(max(fraction, 0.0), 1.0)), str(message)

    def on_step(self, record: dict) -> None:
        with self.lock:
            self.history.append(dict(record))

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


def start_job(label: str, requests: list[Any]) -> Job:
    """Run core.pipeline requests one after another in a worker process (dashboard.worker) for this session.

    The job's status, progress, step records and run folders are filled in by the worker's pump thread.
    """
    from dashboard import worker

    token = session.session_token()
    if current_job() is None and (held := registry().get(token)) is not None and held.status == "running":
        raise RuntimeError("another open session is running a job under this link")  # never replace it
    job = Job(token=token, label=label, owner=session.session_id())
    registry()[job.token] = job
    try:
        job.thread = worker.start(requests, job)
    except Exception as exc:  # the worker could not start (no memory for a process, say)
        with job.lock:
            job.status, job.error, job.finished = "failed", f"the run could not start: {exc}", time.time()
    return job
