"""bench/forget_margins.py on a real (small) engine run: its float32 margins reproduce the run's own A_f."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_fashion_idx

from bench.forget_margins import main, margins


@pytest.fixture(scope="module")
def small_run(fashion, tmp_path_factory):
    pipeline = pytest.importorskip("core.pipeline")
    tmp = tmp_path_factory.mktemp("margins")
    data = write_fashion_idx(tmp / "fmnist", fashion, 3000, 1000)
    ids = [int(i) for i in np.random.default_rng(1).choice(3000, 4, replace=False)]
    req = pipeline.RunRequest(forget_ids=ids, method="neggrad", encoder="clip-random:ViT-S-32",
                              runs_root=str(tmp / "runs"), data_dir=str(data), audit_per_class=8, retain_eval=300)
    return pipeline.execute_run(req), str(data)


def test_float32_margins_agree_with_the_runs_forget_accuracy(small_run, tmp_path):
    run_dir, data = small_run
    m = margins(run_dir, data)
    assert m["fp32"].shape == m["bf16"].shape == (4,)
    forget_acc = json.loads((run_dir / "run.json").read_text())["metrics"]["after"]["forget_acc"]
    assert 100 * float(np.mean(m["fp32"] > 0)) == pytest.approx(forget_acc)  # the engine's own check, re-done
    assert np.isfinite(m["fp32"]).all() and np.abs(m["fp32"] - m["bf16"]).max() < 1.0  # bf16: close, not equal
    out = tmp_path / "margins.md"
    assert main([str(run_dir), "--data-dir", data, "--out", str(out)]) == 0
    row = out.read_text().splitlines()[-1].split(" | ")
    assert row[1:4] == ["neggrad", "4", "0"] and row[4].endswith("of 4")
