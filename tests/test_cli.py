"""`python -m core ...` as a user runs it: subprocesses in the repo root.

info, train, evaluate; the user errors of every command (one line, exit code 2); a chain of
unlearning requests (--parent); the clean-up of runs killed while saving (.partial folders)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import SAMPLE_MODEL_NAME

from core import runs
from core.models import SAMPLE_MODELS


def _no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


def test_info(run_cli) -> None:
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    _no_traceback(proc)
    out = proc.stdout
    for line_start in ("device", "dataset", "encoder", "archs"):
        assert any(line.startswith(line_start) for line in out.splitlines()), f"no {line_start!r} line in:\n{out}"
    assert "fashion-mnist from" in out
    assert "resnet18_narrow" in out


def test_info_json(run_cli) -> None:
    proc = run_cli("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["device"] in ("cpu", "cuda")
    ds = info["dataset"]
    assert ds["name"] == "fashion-mnist" and ds["source_kind"] in ("path", "debian", "download", "bundled")
    assert ds["test_size"] >= 1000
    assert isinstance(info["encoders"], list) and info["encoders"]
    assert all({"name", "available", "detail"} <= set(e) for e in info["encoders"])
    if (SAMPLE_MODELS / f"{SAMPLE_MODEL_NAME}.json").is_file():
        assert SAMPLE_MODEL_NAME in [m["name"] for m in info["sample_models"]]


def test_info_reports_a_missing_dataset(run_cli, tmp_path: Path) -> None:
    proc = run_cli("info", "--dataset", "cifar10", "--data-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "unavailable" in proc.stdout and "data_batch_1" in proc.stdout


def test_evaluate_sample_model_json(run_cli, sample_model) -> None:
    proc = run_cli("evaluate", "--model", SAMPLE_MODEL_NAME, "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model"] == SAMPLE_MODEL_NAME and result["device"] == "cpu"
    assert result["test_set"] in ("full", "subset") and result["source"]
    if result["test_set"] == "full":
        assert result["test_size"] == 10000
        assert result["test_acc"] == pytest.approx(sample_model.card["test_accuracy"], abs=0.05)
    else:
        assert result["test_size"] >= 1000 and result["test_acc"] >= 85.0


def test_evaluate_text_says_which_set(run_cli, sample_model, bundled_fashion) -> None:
    proc = run_cli("evaluate", "--model", SAMPLE_MODEL_NAME, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "the full test set" in proc.stdout or "test subset" in proc.stdout


def test_evaluate_unknown_model_is_a_clear_error(run_cli) -> None:
    proc = run_cli("evaluate", "--model", "no_such_model")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "no_such_model" in proc.stderr
    _no_traceback(proc)


def test_evaluate_wrong_class_count_is_a_clear_error(run_cli, tiny_model, tmp_path: Path, write_cifar_dir) -> None:
    """A 10-class Fashion-MNIST card evaluated on CIFAR-100: refused with a message, not a traceback."""
    from core.models import save_model

    save_model(tiny_model, tmp_path / "m", {"arch": "resnet18_narrow", "dataset": "fashion-mnist",
                                           "class_names": [str(i) for i in range(10)], "input_shape": [1, 28, 28]})
    proc = run_cli("evaluate", "--model", str(tmp_path / "m"), "--dataset", "cifar100",
                   "--data-dir", str(write_cifar_dir("cifar100", per_batch=2)))
    assert proc.returncode == 2, proc.stderr
    assert "expects 10 classes and 1 channel(s), but cifar100 has 100 classes and 3 channel(s)" in proc.stderr
    _no_traceback(proc)
    proc = run_cli("evaluate", "--model", str(tmp_path / "m"), "--dataset", "cifar10")
    assert proc.returncode == 2 and "needs a directory" in proc.stderr
    _no_traceback(proc)


def test_train_then_evaluate_on_small_data(run_cli, write_idx_dir, tmp_path: Path) -> None:
    """End to end on 64 images: seeded training writes weights and a card with the exact command."""
    data_dir = write_idx_dir(n_train=64, n_test=20, gz=True)
    out = tmp_path / "tiny_model"
    args = ("train", "--data-dir", str(data_dir), "--arch", "resnet18_narrow", "--epochs", "1",
            "--batch-size", "32", "--seed", "3", "--device", "cpu", "--out", str(out))
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "saved" in proc.stdout and "not the full set" in proc.stderr
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["arch"] == "resnet18_narrow" and card["training"]["seed"] == 3
    assert card["training"]["command"] == "python -m core " + " ".join(args)
    assert card["input_shape"] == [1, 28, 28] and card["weights_file"] == "tiny_model.safetensors"
    proc = run_cli("evaluate", "--model", str(out), "--data-dir", str(data_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["test_size"] == 20 and result["source"] == "path" and result["test_set"] == "subset"


# ------------------------------------------------------- user errors: one line, exit code 2

# The cheapest run the CLI allows: NegGrad, one pass, a 20-image retain subset, a random small CLIP text tower.
FAST = ("--method", "neggrad", "--max-epochs", "1", "--retain-eval", "20", "--encoder", "clip-random:ViT-S-32",
        "--device", "cpu")


@pytest.fixture
def tiny_setup(tmp_path: Path, write_idx_dir, tiny_model) -> dict[str, Path]:
    """60 training / 20 test images, a random resnet18_narrow card for them, an empty runs root."""
    from core.data import FASHION_CLASSES
    from core.models import save_model

    save_model(tiny_model, tmp_path / "model", {"arch": "resnet18_narrow", "dataset": "fashion-mnist",
                                               "class_names": list(FASHION_CLASSES), "input_shape": [1, 28, 28]})
    return {"data": write_idx_dir(n_train=60, n_test=20), "model": tmp_path / "model.json", "runs": tmp_path / "runs"}


def _unlearn(setup: dict[str, Path], *args: str) -> tuple[str, ...]:
    return ("unlearn", *FAST, "--model", str(setup["model"]), "--data-dir", str(setup["data"]),
            "--runs-dir", str(setup["runs"]), *args)


def _user_error_cases(tmp: Path, setup: dict[str, Path]) -> dict[str, tuple[tuple[str, ...], str]]:
    """case -> (command line, what the one error line must name); later options override FAST's."""
    (tmp / "float_ids.json").write_text("[1, 2.5]")
    (tmp / "far_ids.txt").write_text("0\n999\n")
    (tmp / "ids.txt").write_text("0\n1\n")
    (tmp / "anchors.json").write_text('{"classes": {"T-shirt/top": ["short sleeves"],')
    (tmp / "broken_card.json").write_text("{not json")
    broken_data = setup["data"].parent / "broken_data"
    broken_data.mkdir()
    for f in setup["data"].iterdir():
        (broken_data / f.name).write_bytes(f.read_bytes()[:10])  # truncated inside the IDX header
    not_a_run = tmp / "not_a_run"
    not_a_run.mkdir()
    damaged = tmp / "damaged_run"
    damaged.mkdir()
    (damaged / "run.json").write_text('{"status": "complete", "run_id": "damaged_run"}')
    ids = ("--ids", str(tmp / "ids.txt"))
    return {
        "ids file missing": (_unlearn(setup, "--ids", str(tmp / "nope.json")), "nope.json does not exist"),
        "ids not integers": (_unlearn(setup, "--ids", str(tmp / "float_ids.json")), "2.5, which is not a non-negative"),
        "ids out of range": (_unlearn(setup, "--ids", str(tmp / "far_ids.txt")), "not training images"),
        "anchors not JSON": (_unlearn(setup, *ids, "--anchors", str(tmp / "anchors.json")), "is not valid JSON"),
        "unknown encoder": (_unlearn(setup, *ids, "--encoder", "clipp"), "unknown encoder 'clipp'"),
        "unknown model": (_unlearn(setup, *ids, "--model", "no_such_model"), "unknown model 'no_such_model'"),
        "broken model card": (_unlearn(setup, *ids, "--model", str(tmp / "broken_card.json")), "not valid JSON"),
        "bad option value": (_unlearn(setup, *ids, "--lr", "-1"), "lr must be a positive number"),
        "data folder missing": (_unlearn(setup, *ids, "--data-dir", str(tmp / "no_data")), "does not exist"),
        "data folder damaged": (_unlearn(setup, *ids, "--data-dir", str(broken_data)), "truncated"),
        "parent missing": (_unlearn(setup, *ids, "--parent", str(tmp / "no_run")), "--parent:"),
        "parent damaged": (_unlearn(setup, *ids, "--parent", str(damaged)), "damaged"),
        "report of a missing folder": (("report", str(tmp / "no_run")), "is not a directory"),
        "report of a folder without run.json": (("report", str(not_a_run)), "has no run.json"),
        "retrain ids not integers": (("retrain", "--model", str(setup["model"]), "--data-dir", str(setup["data"]),
                                      "--ids", str(tmp / "float_ids.json")), "not a non-negative integer"),
    }


CASES = [
    "ids file missing", "ids not integers", "ids out of range", "anchors not JSON", "unknown encoder",
    "unknown model", "broken model card", "bad option value", "data folder missing", "data folder damaged",
    "parent missing", "parent damaged", "report of a missing folder", "report of a folder without run.json",
    "retrain ids not integers"]


def _assert_one_line_error(proc, needle: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1000:], proc.stderr[-3000:])
    _no_traceback(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", CASES)
def test_user_errors_are_one_line_and_exit_2(run_cli, tiny_setup, tmp_path: Path, case: str) -> None:
    """Every mistake a user can make is named on one stderr line, before any unlearning starts."""
    args, needle = _user_error_cases(tmp_path, tiny_setup)[case]
    _assert_one_line_error(run_cli(*args), needle)
    assert not tiny_setup["runs"].exists() or runs_on_disk(tiny_setup["runs"]) == []


def runs_on_disk(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != ".cache")


def test_structguard_debug_shows_the_traceback(run_cli, tiny_setup, tmp_path: Path) -> None:
    args, needle = _user_error_cases(tmp_path, tiny_setup)["unknown encoder"]
    proc = run_cli(*args, env={"STRUCTGUARD_DEBUG": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr and "EncoderError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown encoder 'clipp'")


# ------------------------------------------------------- sequential requests (--parent)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_unlearn_chain_with_parent(run_cli, tiny_setup, tmp_path: Path) -> None:
    """A dashboard-saved forget set, then a second request continuing from it; repeating an id is refused."""
    first_ids = tmp_path / "forget_set.json"  # written as dashboard/app_pages/forget_set.py writes it
    first_ids.write_text(json.dumps({"dataset": "fashion-mnist", "split": "train", "ids": [0, 1]}, indent=1))
    proc = run_cli(*_unlearn(tiny_setup, "--ids", str(first_ids), "--json"), timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = Path(json.loads(proc.stdout)["run_dir"])

    (tmp_path / "more.txt").write_text("# second request\n2\n3\n")
    proc = run_cli(*_unlearn(tiny_setup, "--ids", str(tmp_path / "more.txt"), "--parent", str(first), "--json",
                             "--precision", "bf16", "--eval-precision", "fp32", "--mix-pairs", "distinct",
                             "--polish-steps", "2", "--polish-pick", "mix_kl"),
                   timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = Path(json.loads(proc.stdout)["run_dir"])
    meta = json.loads((second / "run.json").read_text())
    assert meta["parent_run"] == first.name
    assert meta["forget_ids"] == [2, 3] and meta["all_forget_ids"] == [0, 1, 2, 3]
    assert meta["config"]["precision"] == meta["precision"] == "bf16"  # asked for, and what the steps ran in
    assert meta["request"]["eval_precision"] == meta["eval_precision"] == "fp32"  # and the measurements
    assert meta["config"]["mix_pairs"] == "distinct"
    assert meta["config"]["polish_steps"] == 2 and meta["config"]["polish_pick"] == "mix_kl"
    assert runs_on_disk(tiny_setup["runs"]) == sorted([first.name, second.name])

    (tmp_path / "again.txt").write_text("4\n0\n")  # 0 was forgotten by the first run of the lineage
    proc = run_cli(*_unlearn(tiny_setup, "--ids", str(tmp_path / "again.txt"), "--parent", str(second)))
    _assert_one_line_error(proc, "already forgotten")
    assert runs_on_disk(tiny_setup["runs"]) == sorted([first.name, second.name])


# ------------------------------------------------------- killed runs (.partial folders)


def _partials(root: Path) -> tuple[Path, Path]:
    """An hour-old .partial folder (a killed run) and one being written right now."""
    old, fresh = root / ".20260101-000000-neggrad-k2-s0.partial", root / ".20260101-000001-neggrad-k2-s0.partial"
    for p in (old, fresh):
        p.mkdir(parents=True)
        (p / "model.safetensors").write_bytes(b"x")
    then = time.time() - runs.PARTIAL_MAX_AGE_S - 60
    os.utime(old, (then, then))
    return old, fresh


def test_cli_start_removes_partials_of_killed_runs(run_cli, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    old, fresh = _partials(root)
    (root / ".cache").mkdir()
    proc = run_cli("unlearn", "--method", "neggrad", "--ids", str(tmp_path / "nope.txt"),
                   env={"STRUCTGUARD_RUNS": str(root)})
    assert proc.returncode == 2, proc.stderr[-2000:]  # cleaned at the start, whatever the command does next
    assert not old.exists() and fresh.is_dir() and (root / ".cache").is_dir()


def test_dashboard_start_cleans_once_per_process(tmp_path: Path) -> None:
    """dashboard/app.py calls clean_partials_once on every rerun; only the first call may touch the folder."""
    root = tmp_path / "runs"
    old, fresh = _partials(root)
    assert runs.clean_partials_once(root) == 1
    assert not old.exists() and fresh.is_dir()
    old.mkdir()
    os.utime(old, (0, 0))
    assert runs.clean_partials_once(str(root)) == 1 and old.is_dir()  # same root, same process: nothing more
    assert runs.clean_partials(root) == 1 and not old.exists()


def test_list_runs_never_lists_partial_folders(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    _partials(root)
    complete = root / ".20260101-000002-neggrad-k2-s0.partial"  # finalize wrote run.json, rename pending
    complete.mkdir()
    (complete / "run.json").write_text('{"status": "complete"}')
    for f in runs.REQUIRED_FILES[1:]:
        (complete / f).write_bytes(b"x")
    (root / "20260101-000003-neggrad-k2-s0").mkdir()
    assert [r.run_id for r in runs.list_runs(root)] == ["20260101-000003-neggrad-k2-s0"]
