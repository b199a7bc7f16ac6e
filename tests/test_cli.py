"""`python -m core info|train|evaluate` as a user runs them: subprocesses in the repo root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SAMPLE_MODEL_NAME

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
