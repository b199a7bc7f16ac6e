"""Bench sweeps on Ray (core/sweep.py, core/cli_bench.py): a tiny grid run as Ray tasks on a local Ray
runtime gives the same numbers as the local backend, a failing cell is recorded and the sweep goes on,
`--resume` skips complete cells, and a Ray worker loads the data and the model once for all its cells.

Real parts: the sample model, the shipped Fashion-MNIST subset (3,000 / 1,000 real images, as IDX
files, so a run evaluates quickly), MiniLM anchors, a real Ray runtime with two worker CPUs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_fashion_idx

from core.sweep import Backend, SweepError, import_ray, run_cells

pytestmark = pytest.mark.timeout(600)

# 2 methods x 2 seeds at k=2 that run, and the same at k=100000 (more than the 3,000 training images) that fail.
GRID = ("--methods", "neggrad,structguard", "--ks", "2,100000", "--seeds", "0,1", "--pgd-iters", "2",
        "--n-adv", "4", "--max-epochs", "1", "--retain-eval", "200", "--cpus-per-run", "1")
EXACT = ("forget_acc", "retain_acc", "test_acc", "steps")
CLOSE = ("structure_score", "cka", "knn_overlap", "dim_alignment")


def _rows(path: Path) -> dict[tuple, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {(r["label"], r["k"], r["seed"]): r for r in rows}


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, run_cli) -> dict:
    """The grid on Ray (2 workers), then the same grid on the local backend, into one runs folder."""
    tmp = tmp_path_factory.mktemp("sweep")
    data = write_fashion_idx(tmp / "data")
    common = (*GRID, "--data-dir", str(data), "--runs-dir", str(tmp / "runs"))
    out = {}
    for backend in ("ray", "local"):
        extra = ("--backend", "ray", "--workers", "2") if backend == "ray" else ()
        proc = run_cli("bench", *common, *extra, "--out", str(tmp / f"{backend}.md"),
                       "--jsonl", str(tmp / f"{backend}.jsonl"), timeout=500)
        out[backend] = {"proc": proc, "rows": _rows(tmp / f"{backend}.jsonl"),
                        "table": (tmp / f"{backend}.md").read_text()}
    out["tmp"], out["common"] = tmp, common
    return out


def test_ray_sweep_gives_the_local_backends_numbers(sweeps):
    ray_rows, local_rows = sweeps["ray"]["rows"], sweeps["local"]["rows"]
    assert set(ray_rows) == set(local_rows) and len(ray_rows) == 8
    ran = [key for key, row in local_rows.items() if not row.get("error")]
    assert sorted(ran) == sorted((m, 2, s) for m in ("neggrad", "structguard") for s in (0, 1))
    for key in ran:  # same seeds, one torch thread each: the same accuracies and steps, exactly
        assert {m: ray_rows[key][m] for m in EXACT} == {m: local_rows[key][m] for m in EXACT}, key
        # the structure scores go through numpy's BLAS, whose thread count differs between the two processes
        assert [ray_rows[key][m] for m in CLOSE] == pytest.approx([local_rows[key][m] for m in CLOSE], rel=1e-9)
    assert ray_rows[("structguard", 2, 0)]["run_dir"] != local_rows[("structguard", 2, 0)]["run_dir"]
    assert all(local_rows[key]["polish"] is None for key in ran)  # recorded; these runs have no polish steps
    # both tables list the rows in the grid's order, whatever order Ray finished them in
    for backend in ("ray", "local"):
        table = sweeps[backend]["table"]
        assert table.index("| 2 | neggrad |") < table.index("| 2 | structguard |")
        assert f"backend: {backend} (torch threads per run: [1])" in table


def test_failing_cell_is_recorded_and_the_sweep_goes_on(sweeps):
    proc, rows, table = sweeps["ray"]["proc"], sweeps["ray"]["rows"], sweeps["ray"]["table"]
    assert proc.returncode == 1, proc.stderr  # something failed: not 0, and not a crash
    failed = {key: row["error"] for key, row in rows.items() if row.get("error")}
    assert sorted(failed) == sorted((m, 100000, s) for m in ("neggrad", "structguard") for s in (0, 1))
    assert all("k=100000 is larger than the training set (3000 images)" in e for e in failed.values())
    assert "Failed (4):" in table and "- structguard k=100000 seed=1: UnlearnError: k=100000" in table
    assert "Traceback" not in proc.stderr


def test_ray_workers_load_the_data_and_the_model_once(sweeps):
    workers = [row["worker"] for row in sweeps["ray"]["rows"].values() if not row.get("error")]
    assert all(w["threads"] == 1 and w["dataset_loads"] == 1 and w["model_loads"] == 1 for w in workers), workers
    assert len({w["pid"] for w in workers}) == 2  # two workers shared the four runs
    assert sweeps["local"]["rows"][("structguard", 2, 1)]["worker"]["model_loads"] == 1


def test_resume_skips_the_complete_cells(sweeps, run_cli):
    tmp = sweeps["tmp"]
    before = sorted(p.name for p in (tmp / "runs").iterdir() if not p.name.startswith("."))
    proc = run_cli("bench", *sweeps["common"], "--resume", "--out", str(tmp / "resumed.md"),
                   "--jsonl", str(tmp / "resumed.jsonl"), timeout=300)
    assert proc.returncode == 1, proc.stderr  # the impossible cells are tried again and fail again
    assert "resume: 4 of 8 cells already complete" in proc.stderr
    after = sorted(p.name for p in (tmp / "runs").iterdir() if not p.name.startswith("."))
    assert after == before  # no cell ran again
    resumed = _rows(tmp / "resumed.jsonl")  # only what ran now is appended: the four failures
    assert sorted(resumed) == sorted((m, 100000, s) for m in ("neggrad", "structguard") for s in (0, 1))
    table = (tmp / "resumed.md").read_text()
    assert "| 2 | neggrad |" in table and "| 2 | structguard |" in table
    # another setting is another experiment: it runs
    proc = run_cli("bench", *sweeps["common"], "--resume", "--lr", "0.002", "--ks", "2", "--seeds", "0",
                   "--methods", "neggrad", "--out", str(tmp / "other.md"), timeout=300)
    assert proc.returncode == 0 and "resume: 0 of 1 cells already complete" in proc.stderr, proc.stderr


def test_sweep_returns_results_in_cell_order_and_records_errors():
    sweep = run_cells("math:sqrt", [4.0, -1.0, 9.0], Backend("local"))
    assert [o.value for o in sweep.outcomes] == [2.0, None, 3.0]
    assert sweep.outcomes[1].error == "ValueError: math domain error" and not sweep.interrupted


def test_ray_missing_is_one_line_with_the_install_command(monkeypatch, run_cli, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(SweepError, match="requirements-ray.txt"):
        import_ray()
    stub = tmp_path / "noray"
    (stub / "ray").mkdir(parents=True)
    (stub / "ray" / "__init__.py").write_text("raise ImportError('no ray here')\n")
    proc = run_cli("bench", "--backend", "ray", "--methods", "adv", "--ks", "8", "--seeds", "0",
                   "--out", str(tmp_path / "t.md"), env={"PYTHONPATH": str(stub)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --backend ray needs Ray, which is not installed; install it with: "
        "pip install -r requirements-ray.txt -c requirements-lock.txt -c requirements-dev-lock.txt")


def test_backend_flags_are_checked(run_cli, tmp_path):
    proc = run_cli("bench", "--workers", "2", "--methods", "adv", "--ks", "8", "--out", str(tmp_path / "t.md"))
    assert proc.returncode == 2 and "are for --backend ray" in proc.stderr


def test_interrupt_keeps_the_finished_rows(tmp_path, repo_root):
    """Ctrl+C (SIGINT) during the second cell: the first cell's row is in the table, exit code 130."""
    import os
    import signal
    import time

    data = write_fashion_idx(tmp_path / "data")
    cmd = [sys.executable, "-m", "core", "bench", "--methods", "neggrad", "--ks", "2", "--seeds", "0,1,2",
           "--max-epochs", "1", "--retain-eval", "200", "--data-dir", str(data), "--runs-dir", str(tmp_path / "runs"),
           "--out", str(tmp_path / "t.md"), "--jsonl", str(tmp_path / "rows.jsonl")]
    # A job started in the background by a non-interactive shell (nohup ... &) inherits SIGINT ignored, and so
    # would the bench: give it Ctrl+C's default action, as in a terminal, whoever started the tests.
    proc = subprocess.Popen(cmd, cwd=repo_root, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and not (tmp_path / "rows.jsonl").exists():
        time.sleep(0.2)
    assert proc.poll() is None, "the bench ended before the interrupt could be sent"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "cancelled: the finished rows are in the table" in err
    table = (tmp_path / "t.md").read_text()
    assert "| 2 | neggrad |" in table and "Interrupted: 1 of 3 cells finished." in table
