"""The engine outside the server's interpreter: one worker process per job (no Streamlit here).

A job's runs execute in a child of a fork server that has already imported torch and core and
loaded the default dataset and text encoder (`worker_preload`), so a run starts warm without sharing
the interpreter (and its GIL, its garbage collector) with the Streamlit server.
The child streams ("progress" | "step" | "partial" | "done" | "failed" | "cancelled") messages over a
queue; a pump thread in the server applies them to the session's `Job`. Cancel sets an event the
engine checks about once a second; a child still alive GRACE_S later is killed and the run folder it
was writing is removed. A child that dies (killed, out of memory) marks its job failed with the reason,
and nothing else in the server is touched. The pump then fits each new run's drift map in the server,
where UMAP is compiled once.
"""

from __future__ import annotations

import importlib.machinery
import logging
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

GRACE_S = 10.0  # after a cancel request, how long the child gets to stop by itself before it is killed
PRELOAD = "dashboard.worker_preload"
_LOG = logging.getLogger("structguard.worker")
_CTX_LOCK = threading.Lock()
_CTX: Any = None


def context() -> Any:
    """The fork-server context (started at the first job, or by warm_up); its children start warm."""
    global _CTX
    with _CTX_LOCK:
        if _CTX is None:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload([PRELOAD])
            _CTX = ctx
        return _CTX


# Streamlit runs the app script as sys.modules["__main__"]; multiprocessing would run that file again in
# every child (its "main module fixup"), the whole app in bare mode. A main named "*.__main__" is skipped.
_MAIN_STUB = types.ModuleType("__main__")
_MAIN_STUB.__spec__ = importlib.machinery.ModuleSpec("dashboard.__main__", None)
_START_LOCK = threading.Lock()


def _start(proc: Any) -> None:
    """proc.start() without the app script as the child's main module."""
    with _START_LOCK:
        saved = sys.modules.get("__main__")
        sys.modules["__main__"] = _MAIN_STUB
        try:
            proc.start()
        finally:
            if saved is not None:
                sys.modules["__main__"] = saved


def warm_up() -> None:
    """Start the fork server now (it imports torch and loads the default data: seconds, once per server)."""
    threading.Thread(target=lambda: _start(context().Process(target=_noop)), daemon=True,
                     name="structguard-worker-warm-up").start()


def _noop() -> None:
    pass


# ------------------------------------------------------------------------------------------ the child


def run_requests(requests: list[Any], send: Callable[..., None], cancelled: Callable[[], bool]) -> None:
    """Run the requests one after another (core only); every outcome is sent as a message, the last one
    "done", "cancelled" or "failed"."""
    from core.engine import Callbacks
    from core.pipeline import execute_run
    from core.proxy import Cancelled

    dirs: list[str] = []
    try:
        for i, req in enumerate(requests):
            if cancelled():
                break
            n, tag = len(requests), str(getattr(req, "method", i))
            prefix = f"[{i + 1}/{n} {tag}] " if n > 1 else ""
            cb = Callbacks(on_progress=lambda f, m, i=i, n=n, p=prefix: send("progress", (i + f) / n, p + m),
                           on_step=lambda rec, t=tag: send("step", dict(rec, run=t)),
                           should_cancel=cancelled, on_partial=lambda path: send("partial", str(path)))
            try:
                dirs.append(str(execute_run(req, cb)))
            except Exception:
                if cancelled() and dirs:
                    break  # keep the runs that completed before the cancel
                raise
        send("cancelled" if cancelled() and not dirs else "done", dirs)
    except Cancelled:
        send("cancelled", dirs)
    except Exception as exc:
        send("failed", describe_error(exc), traceback.format_exc(), dirs)


def describe_error(exc: BaseException) -> str:
    """The job panel's line for a run that raised: our own errors (and ValueError, which the request's checks
    raise) already say what is wrong and what to do, so they are shown as they are; anything else is a
    defect or the system (a torch RuntimeError, a full disk), named as unexpected with its class."""
    from core.cli import USER_ERRORS  # the errors the CLI also shows as one line without a traceback

    if isinstance(exc, (*USER_ERRORS, ValueError)):
        return str(exc) or type(exc).__name__
    return f"unexpected {type(exc).__name__}: {exc} (the server log has the full trace)"


def _child(requests: list[Any], env: dict[str, str], messages: Any, cancel: Any, server: dict | None = None) -> None:
    """The worker process: the job's environment and thread count, then run_requests. The audit views are
    prepared by the server's pump thread (UMAP stays compiled there)."""
    if server is not None:
        threading.Thread(target=_exit_with, args=(server,), daemon=True, name="structguard-server-watch").start()
    os.environ.clear()
    os.environ.update(env)  # the fork server's environment is from when it started: use the job's
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C on the server stops the server, which stops us
    import torch

    from dashboard import worker_preload

    torch.set_num_threads(worker_preload.THREADS)  # the fork server ran on one (see worker_preload)
    run_requests(requests, lambda *msg: messages.put(msg), cancel.is_set)


def _exit_with(server: dict) -> None:
    """A run outlives no server: when the server's process is gone (killed, restarted), stop at once. The run's
    marker and partial folder stay, so the next server lists it as interrupted and removes the folder."""
    from core.runs import token_alive

    while token_alive(server):
        time.sleep(1.0)
    os._exit(70)


def prepare_views(run_dir: Path) -> None:
    """Fit a new run's drift map and cache it beside the run (core only: safe outside the script thread)."""
    from core.audit.views import drift_view
    from core.runs import class_names, load_run

    rec = load_run(run_dir)
    drift_view(run_dir, rec.audit, rec.meta, n_classes=len(class_names(rec.meta)) or None)


# ------------------------------------------------------------------------------------------ the server


def describe_exit(code: int | None) -> str:
    """Why a child stopped without a word, in a user's terms."""
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        why = " (the machine ran out of memory, or someone killed it)" if -code == signal.SIGKILL else ""
        return f"the run's worker process was stopped by {name}{why}; nothing was saved, run it again"
    return f"the run's worker process ended unexpectedly (exit code {code}); nothing was saved, run it again"


IN_PROCESS = os.environ.get("STRUCTGUARD_WORKER_PROCESS", "1") != "0"  # 0: a server thread (tests with a fake
# engine turn it off). The browser-journey hangs once blamed on it were Streamlit page-switch races (widgets.py).


def start(requests: list[Any], job: Any) -> threading.Thread:
    """Start the requests for `job` (dashboard.jobs.Job) in a worker process and pump its messages.

    Returns the pump thread; it applies progress and step records to the job, forwards the job's
    cancel request, kills a child that does not stop within GRACE_S (removing the folder it was
    writing), and sets the job's final status, error and run folders."""
    if IN_PROCESS:
        ctx = context()
        messages, cancel = ctx.Queue(), ctx.Event()
        from core.runs import process_token

        proc = ctx.Process(target=_child, args=(requests, dict(os.environ), messages, cancel, process_token()),
                           daemon=True,
                           name=f"structguard-run-{job.token}")
        _start(proc)
        job.pid = proc.pid
    else:
        messages, cancel = queue.Queue(), threading.Event()
        proc = threading.Thread(target=run_requests, args=(requests, lambda *msg: messages.put(msg), cancel.is_set),
                                daemon=True,
                                name=f"structguard-run-{job.token}")
        proc.start()

    def pump() -> None:
        partial: str | None = None
        final: tuple | None = None
        cancel_at: float | None = None
        while final is None:
            if job.cancel_event.is_set() and cancel_at is None:
                cancel.set()
                cancel_at = time.monotonic()
            try:
                msg = messages.get(timeout=0.25)
            except queue.Empty:
                if not proc.is_alive():
                    try:  # the last message may still be in the pipe
                        msg = messages.get(timeout=0.5)
                    except queue.Empty:
                        break
                elif IN_PROCESS and cancel_at is not None and time.monotonic() - cancel_at > GRACE_S:
                    _LOG.warning("run worker %s did not stop within %.0f s of a cancel: killing it", proc.pid, GRACE_S)
                    proc.kill()
                    proc.join(5)
                    break
                else:
                    continue
            kind = msg[0]
            if kind == "progress":
                job.on_progress(msg[1], msg[2])
            elif kind == "step":
                job.on_step(msg[1])
            elif kind == "partial":
                partial = msg[1]
            else:
                final = msg
        dirs = [] if final is None else final[3] if final[0] == "failed" else final[1]
        proc.join(GRACE_S)
        if proc.is_alive() and IN_PROCESS:
            proc.kill()
            proc.join(5)
        if final is None and partial and Path(partial).exists():
            shutil.rmtree(partial, ignore_errors=True)  # the half-written run of a killed child
        with job.lock:
            if final is None:
                job.status = "cancelled" if job.cancel_event.is_set() else "failed"
                job.error = None if job.status == "cancelled" else describe_exit(getattr(proc, "exitcode", None))
            elif final[0] == "failed":
                _LOG.error("run failed in worker %s:\n%s", job.pid or "thread", final[2])  # the full trace: server log
                job.run_dirs = [Path(d) for d in final[3]]
                job.status = "cancelled" if job.cancel_event.is_set() else "failed"
                job.error = None if job.status == "cancelled" else final[1]
            else:
                job.run_dirs = [Path(d) for d in final[1]]
                job.status = "done" if final[0] == "done" else "cancelled"
                job.fraction = 1.0 if job.status == "done" else job.fraction
            job.finished = time.time()
        if IN_PROCESS:
            messages.close()
        # After the result is shown: in the server, where UMAP is compiled once (a new process would spend ~8 s
        # loading it), so that the Audit page opens without fitting the drift map (it waits for this fit if asked
        # sooner: core.audit.views locks each view's cache).
        for d in dirs:
            try:
                prepare_views(Path(d))
            except Exception:  # the Audit page shows the problem when it is opened
                pass

    thread = threading.Thread(target=pump, name=f"structguard-pump-{job.token}", daemon=True)
    thread.start()
    return thread


__all__ = ["GRACE_S", "context", "describe_exit", "prepare_views", "run_requests", "start", "warm_up"]
