"""Faults (issue 12, item 4): processes killed with SIGKILL in the middle of a run.

- a command-line run killed mid-run: nothing is listed as a run, and the next command says the run was
  interrupted (once);
- a process killed while it wrote a run's .partial folder: the next start removes the folder at once
  (not an hour later), and a folder that a live process is writing is left alone;
- the dashboard's server gone during a run (killed, restarted): the run's marker outlives it, and the
  Runs page of the session that started it lists it as interrupted, with Dismiss;
- a dashboard worker process whose server is gone stops by itself.

Real processes are killed here (SIGKILL: no clean-up code runs). The other faults of the issue are in
tests/test_worker.py (a killed worker fails its job), tests/test_safety.py (a run folder deleted while
shown, full and read-only runs folders) and tests/test_e2e_browser.py (two browser sessions).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_fashion_idx
from streamlit.testing.v1 import AppTest

from core import runs

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "dashboard" / "app.py")
pytestmark = pytest.mark.timeout(300)


def _python(code: str) -> subprocess.Popen:
    """A python process that runs `code`, prints "ready" and waits to be killed."""
    return subprocess.Popen([sys.executable, "-c", code + "\nprint('ready', flush=True)\nimport time\ntime.sleep(600)"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def _wait_for(predicate, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def test_a_killed_cli_run_lists_nothing_and_the_next_command_says_it_was_interrupted(tmp_path, run_cli) -> None:
    data, root = write_fashion_idx(tmp_path / "data"), tmp_path / "runs"
    cmd = [sys.executable, "-m", "core", "unlearn", "--method", "adv", "--k", "4", "--seed", "3", "--data-dir",
           str(data), "--runs-dir", str(root), "--retain-eval", "200"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for(lambda: any((root / runs.RUNNING_DIR).glob("*.json")))  # the run has started computing
    _kill(proc)
    assert runs.list_runs(root) == []  # no half run listed
    (item,) = runs.interrupted_runs(root, cli=True)
    assert item.record["method"] == "adv" and item.record["k"] == 4 and item.record["seed"] == 3
    assert runs.interrupted_runs(root, secret="any session's secret") == []  # not a session's run
    # the next command that uses the runs folder says so, once
    again = run_cli("unlearn", "--method", "adv", "--k", "0", "--runs-dir", str(root), "--data-dir", str(data))
    assert again.returncode == 2 and "error: k must be at least 1" in again.stderr
    assert "note: adv on 4 image(s), seed 3, started" in again.stderr and "was interrupted" in again.stderr
    assert runs.interrupted_runs(root, cli=True) == []
    assert not list((root / runs.RUNNING_DIR).glob("*.json"))


def test_the_partial_folder_of_a_killed_writer_is_removed_at_the_next_start(tmp_path) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    writer = _python(f"from pathlib import Path\nfrom core import runs\nruns.partial_dir(Path({str(root)!r}), "
                     "'killed')")
    assert writer.stdout.readline().strip() == "ready"
    live = runs.partial_dir(root, "live")  # this process is writing it
    _kill(writer)
    assert (root / ".killed.partial").is_dir()  # minutes old at most: the age rule alone would keep it an hour
    assert runs.clean_partials(root) == 1
    assert not (root / ".killed.partial").exists() and live.is_dir()
    # a partial folder from another machine (shared runs folder) is never judged by a local pid
    (live / runs.WRITER_FILE).write_text(json.dumps({"host": "elsewhere", "pid": writer.pid, "start": None}))
    assert runs.clean_partials(root) == 0 and live.is_dir()


def test_a_run_the_server_was_running_when_it_stopped_is_listed_as_interrupted(app_env) -> None:
    at = AppTest.from_file(APP, default_timeout=180).run()
    owner = runs.owner_hash(at.session_state.owner_secret)
    # the process that ran it (here: the server's role) marks the run, then dies without a word
    server = _python(f"from pathlib import Path\nfrom core import runs\nruns.begin_run(Path({str(app_env)!r}), "
                     f"{{'method': 'structguard', 'k': 32, 'seed': 0}}, {owner!r})")
    assert server.stdout.readline().strip() == "ready"
    at.switch_page("app_pages/runs.py").run()
    assert not [w for w in at.warning if "was interrupted" in w.value]  # still running: not interrupted
    _kill(server)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    (warning,) = [w.value for w in at.warning if "was interrupted" in w.value]
    assert warning.startswith("structguard on 32 image(s), seed 0, started ")
    assert "Nothing was saved; start it again." in warning
    assert runs.list_runs(app_env) == []  # and nothing is listed as complete
    other = AppTest.from_file(APP, default_timeout=180).run()  # another session does not see it
    other.switch_page("app_pages/runs.py").run()
    assert not [w for w in other.warning if "was interrupted" in w.value]
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("dismiss-"))).click().run()
    assert not [w for w in at.warning if "was interrupted" in w.value]
    assert runs.interrupted_runs(app_env, at.session_state.owner_secret) == []


def test_a_worker_whose_server_is_gone_stops_by_itself(tmp_path) -> None:
    server = _python("")
    assert server.stdout.readline().strip() == "ready"
    token = runs.process_token(server.pid)
    child = subprocess.Popen([sys.executable, "-c", f"from dashboard.worker import _exit_with\n_exit_with({token!r})"],
                             cwd=REPO)
    time.sleep(1.5)
    assert child.poll() is None  # the server is alive: the worker keeps running
    _kill(server)
    assert child.wait(10) == 70
