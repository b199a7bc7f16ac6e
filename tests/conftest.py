"""Shared fixtures for the whole test suite.

Session-scoped (built once, treat as read-only): `bundled_fashion`, `fashion`,
`sample_model`. Cheap per-test helpers: `tiny_model`, `write_idx_dir`,
`write_cifar_dir`, `clean_env`, `run_cli`.
"""

from __future__ import annotations

import atexit
import gzip
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

# Nothing in the tests may reach a model hub; set before core (or huggingface_hub) is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A test session has its own on-disk text-embedding cache: it never reads or fills the user's.
_TEXT_CACHE = tempfile.mkdtemp(prefix="structguard-text-cache-")
os.environ["STRUCTGUARD_TEXT_CACHE"] = _TEXT_CACHE
atexit.register(shutil.rmtree, _TEXT_CACHE, True)

import torch  # noqa: E402

from core.data import DEBIAN_FASHION, IDX_FILES, Dataset, load_bundled_fashion, load_fashion_mnist  # noqa: E402
from core.models import SAMPLE_MODELS, LoadedModel, ResNet, create_model, load_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLE_MODEL_NAME = "fmnist_resnet18_narrow"


def debian_fashion_available() -> bool:
    return all((DEBIAN_FASHION / f"{stem}.gz").is_file() or (DEBIAN_FASHION / stem).is_file()
               for stems in IDX_FILES.values() for stem in stems)


requires_debian_fashion = pytest.mark.skipif(
    not debian_fashion_available(),
    reason=f"Debian package dataset-fashion-mnist is not installed ({DEBIAN_FASHION} has no IDX files); "
           "install it with: apt-get install dataset-fashion-mnist",
)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def bundled_fashion() -> Dataset:
    """The subset shipped in assets/data (3,000 train / 1,000 test, ids into the full splits)."""
    return load_bundled_fashion()


@pytest.fixture(scope="session")
def fashion() -> Dataset:
    """Fashion-MNIST from the first available source (Debian package here, else the bundled subset)."""
    return load_fashion_mnist(os.environ.get("STRUCTGUARD_FASHION_DIR"), download=False)


@pytest.fixture(scope="session")
def sample_model() -> LoadedModel:
    """The shipped sample model, in eval mode on CPU."""
    if not (SAMPLE_MODELS / f"{SAMPLE_MODEL_NAME}.json").is_file():
        pytest.skip(f"no sample model yet: sample_models/{SAMPLE_MODEL_NAME}.json is missing "
                    f"(train it with `python -m core train --arch resnet18_narrow --epochs 12 --seed 0 "
                    f"--out sample_models/{SAMPLE_MODEL_NAME}`)")
    return load_model(SAMPLE_MODEL_NAME)


@pytest.fixture
def tiny_model() -> ResNet:
    """A freshly initialised (seeded) resnet18_narrow for 1x28x28 inputs and 10 classes."""
    torch.manual_seed(0)
    return create_model("resnet18_narrow", 10, 1).eval()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No user data path, offline, and runs written to a temporary folder."""
    monkeypatch.delenv("STRUCTGUARD_FASHION_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("STRUCTGUARD_RUNS", str(tmp_path / "runs"))
    return monkeypatch


def _idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr)
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_fashion_idx(root: Path, ds: Dataset | None = None, n_train: int | None = None,
                      n_test: int | None = None, gz: bool = False) -> Path:
    """The first n images of each split of `ds` (default: the bundled subset, all of it) as the four
    Fashion-MNIST IDX files in `root`: a small data folder that loads fast."""
    ds = ds or load_bundled_fashion()
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        part = getattr(ds, split)
        arrays = (part.pixels[:n, 0].numpy(), part.labels[:n].numpy().astype(np.uint8))
        for stem, arr in zip(IDX_FILES[split], arrays, strict=True):
            if gz:
                (root / f"{stem}.gz").write_bytes(gzip.compress(_idx_bytes(arr), compresslevel=1))
            else:
                (root / stem).write_bytes(_idx_bytes(arr))
    return root


@pytest.fixture
def write_idx_dir(tmp_path: Path) -> Callable[..., Path]:
    """write_idx_dir(n_train=60, n_test=20, gz=False, name="idx") -> folder with the four Fashion-MNIST IDX files.

    Labels cycle through 0..9; each image is filled with its own id modulo 256, so tests can
    check that ids, labels and pixels stay aligned.
    """

    def write(n_train: int = 60, n_test: int = 20, gz: bool = False, name: str = "idx") -> Path:
        root = tmp_path / name
        root.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("test", n_test)):
            images = np.repeat((np.arange(n) % 256).astype(np.uint8), 28 * 28).reshape(n, 28, 28)
            labels = (np.arange(n) % 10).astype(np.uint8)
            for stem, arr in zip(IDX_FILES[split], (images, labels), strict=True):
                data = _idx_bytes(arr)
                if gz:
                    (root / f"{stem}.gz").write_bytes(gzip.compress(data))
                else:
                    (root / stem).write_bytes(data)
        return root

    return write


@pytest.fixture
def write_cifar_dir(tmp_path: Path) -> Callable[..., Path]:
    """write_cifar_dir("cifar10" | "cifar100", per_batch=8) -> folder of fake batches in the real format.

    Like the originals: pickled dicts with bytes keys, `data` uint8 [N, 3072] (R, G, B planes),
    labels as lists of ints, protocol 2.
    """

    def dump(path: Path, obj: dict) -> None:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)

    def batch(n: int, classes: int, key: bytes, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        return {b"batch_label": b"fake", key: [int(v) for v in rng.integers(0, classes, n)],
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"filenames": [f"img_{i}.png".encode() for i in range(n)]}

    def write(variant: str = "cifar10", per_batch: int = 8) -> Path:
        root = tmp_path / variant
        root.mkdir(parents=True, exist_ok=True)
        if variant == "cifar10":
            for i in range(1, 6):
                dump(root / f"data_batch_{i}", batch(per_batch, 10, b"labels", i))
            dump(root / "test_batch", batch(per_batch, 10, b"labels", 0))
            names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship",
                     b"truck"]
            dump(root / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch})
        else:
            dump(root / "train", batch(per_batch * 5, 100, b"fine_labels", 1))
            dump(root / "test", batch(per_batch, 100, b"fine_labels", 0))
            dump(root / "meta", {b"fine_label_names": [f"class_{i:02d}".encode() for i in range(100)],
                                 b"coarse_label_names": [f"super_{i:02d}".encode() for i in range(20)]})
        return root

    return write


@pytest.fixture(scope="session")
def run_cli(repo_root: Path) -> Callable[..., subprocess.CompletedProcess]:
    """run_cli("info", "--json", env={...}, timeout=300) runs `python -m core ...` in the repo root."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        full_env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        return subprocess.run([sys.executable, "-m", "core", *args], cwd=repo_root, env=full_env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    return run


def fake_metrics(n_classes: int = 10) -> dict:
    """run.json "metrics" with every key the Audit and Runs pages read (tiny values)."""
    m = {"forget_acc": 100.0, "retain_acc": 91.0, "test_acc": 90.0, "per_class_test_acc": [90.0] * n_classes,
         "retain_set": "subset of 20", "dim_alignment": 0.5}
    return {"before": dict(m), "after": dict(m, forget_acc=0.0), "retrain": None}


def fake_run(root: Path, run_id: str, owner: dict | None = None, **meta) -> Path:
    """A run folder with every required file (tiny contents): complete as far as the listing can tell.
    `owner` as run.json records it (None: no record); a meta value None leaves that key out."""
    path = root / run_id
    path.mkdir(parents=True)
    base = {"run_id": run_id, "status": "complete", "method": "neggrad", "seed": 0, "k": 1, "forget_ids": [1],
            "metrics": fake_metrics(), "dataset": {"name": "fashion-mnist"}, "owner": owner}
    base.update(meta)
    (path / "run.json").write_text(json.dumps({k: v for k, v in base.items() if v is not None}))
    np.savez_compressed(path / "audit.npz", ids=np.arange(3))
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "model.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def subset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled subset (3,000 / 1,000) as IDX files: ids 0..2999, fast to load."""
    return write_fashion_idx(tmp_path_factory.mktemp("fashion"))


@pytest.fixture
def app_env(subset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The environment of a dashboard AppTest on the subset: a fresh runs folder (returned), the sample model,
    a random-weight CLIP (offline) and PCA drift maps (fast)."""
    env = {"STRUCTGUARD_FASHION_DIR": str(subset_dir), "STRUCTGUARD_RUNS": str(tmp_path / "runs"),
           "STRUCTGUARD_MODEL": "fmnist_resnet18_narrow", "HF_HUB_OFFLINE": "1",
           "STRUCTGUARD_ENCODER": "clip-random:ViT-S-32", "STRUCTGUARD_DRIFT_METHOD": "pca"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "runs").mkdir()
    return tmp_path / "runs"
