"""Dashboard runs in a worker process (dashboard.worker), with the real engine on the Fashion-MNIST subset.

The child is forked from a fork server that preloaded torch and core; it streams progress and step records
to the server's pump thread, stops on cancel, and a child that dies marks its job failed with the reason.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from core import runs
from core.pipeline import RunRequest
from dashboard import worker
from dashboard.jobs import Job

TINY = {"pgd_iters": 1, "n_adv": 2, "max_epochs": 1}


def request(root: Path, method: str = "neggrad", **config) -> RunRequest:
    return RunRequest(forget_ids=[0, 1, 2, 3], method=method, config={**TINY, **config}, retain_eval=200,
                      audit_per_class=3, runs_root=str(root), encoder="clip-random:ViT-S-32")


def wait_until(cond, limit: float = 120.0) -> None:
    end = time.time() + limit
    while not cond():
        if time.time() > end:
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def in_process(monkeypatch):
    monkeypatch.setattr(worker, "IN_PROCESS", True)


def test_a_run_executes_in_a_worker_process_and_streams_its_progress(app_env: Path) -> None:
    job = Job(token="w1", label="neggrad")
    pump = worker.start([request(app_env)], job)
    pump.join(300)
    assert job.status == "done", job.error
    assert job.pid and job.pid != os.getpid()
    assert job.history and job.history[0]["run"] == "neggrad" and job.fraction == 1.0
    [run_dir] = job.run_dirs
    assert (run_dir / "run.json").exists() and [i.path for i in runs.list_runs(app_env)] == [run_dir]
    assert list((run_dir / "views").glob("drift-*.npz")), "the worker prepares the audit views"


def test_cancel_stops_the_worker_and_saves_nothing(app_env: Path) -> None:
    job = Job(token="w2", label="structguard")
    pump = worker.start([request(app_env, "structguard", max_epochs=200, pgd_iters=5)], job)
    wait_until(lambda: len(job.history) >= 2)  # updating
    job.cancel_event.set()
    pump.join(worker.GRACE_S + 30)
    assert job.status == "cancelled" and job.error is None
    assert runs.list_runs(app_env) == [] and not list(app_env.glob(".*.partial"))
    with pytest.raises(ProcessLookupError):
        os.kill(job.pid, 0)


def test_a_killed_worker_fails_its_job_with_the_reason_and_the_server_goes_on(app_env: Path) -> None:
    job = Job(token="w3", label="structguard")
    pump = worker.start([request(app_env, "structguard", max_epochs=200, pgd_iters=5)], job)
    wait_until(lambda: len(job.history) >= 2)
    os.kill(job.pid, signal.SIGKILL)  # what the kernel's out-of-memory killer does
    pump.join(30)
    assert job.status == "failed" and "SIGKILL" in job.error and "run it again" in job.error
    assert runs.list_runs(app_env) == [] and not list(app_env.glob(".*.partial"))
    again = Job(token="w4", label="neggrad")  # the next run in the same server works
    worker.start([request(app_env)], again).join(300)
    assert again.status == "done", again.error


def test_an_engine_error_reaches_the_job_as_one_line(app_env: Path) -> None:
    job = Job(token="w5", label="neggrad")
    worker.start([RunRequest(forget_ids=[10**9], method="neggrad", runs_root=str(app_env))], job).join(120)
    assert job.status == "failed" and "\n" not in job.error and "Traceback" not in job.error
    assert "10" in job.error  # names the id that is not in the dataset
    assert "Error:" not in job.error  # our errors are written for the user: no class name in front


def test_describe_error_names_only_what_we_did_not_write_for_the_user() -> None:
    from core.engine import UnlearnError

    assert worker.describe_error(UnlearnError("lower the learning rate")) == "lower the learning rate"
    assert worker.describe_error(ValueError("k must be >= 1")) == "k must be >= 1"
    shown = worker.describe_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert shown.startswith("unexpected RuntimeError: CUDA error") and "server log" in shown


def test_describe_exit() -> None:
    assert "SIGKILL" in worker.describe_exit(-9) and "out of memory" in worker.describe_exit(-9)
    assert "exit code 3" in worker.describe_exit(3)
