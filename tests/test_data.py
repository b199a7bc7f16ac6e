"""core.data: every Fashion-MNIST source in order, IDX validation, CIFAR batches, image folders."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import requires_debian_fashion

from core import data
from core.data import (
    BUNDLED_FASHION,
    DEBIAN_FASHION,
    FASHION_CLASSES,
    DataError,
    load_bundled_fashion,
    load_cifar,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    read_idx,
)

MISSING = Path("/nonexistent/structguard-test")


# ------------------------------------------------------------------ Fashion-MNIST sources


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_configured_path_argument(clean_env, write_idx_dir, gz: bool) -> None:
    root = write_idx_dir(n_train=60, n_test=20, gz=gz)
    ds = load_fashion_mnist(root, debian_dir=MISSING, bundled=None, download=False)
    assert ds.source_kind == "path" and ds.source == str(root)
    assert (len(ds.train), len(ds.test)) == (60, 20)
    assert not ds.full
    assert ds.class_names == FASHION_CLASSES and ds.num_classes == 10
    assert ds.input_shape == (1, 28, 28)
    assert ds.train.pixels.dtype == torch.uint8
    assert torch.equal(ds.train.ids, torch.arange(60))
    # ids, labels and pixels stay aligned (the fixture fills image i with i % 256)
    assert ds.train.labels[37].item() == 37 % 10 and ds.train.pixels[37].unique().tolist() == [37]
    x = ds.train.images(torch.tensor([0, 59]))
    assert x.dtype == torch.float32 and x.shape == (2, 1, 28, 28)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert float(x[1].max()) == pytest.approx(59 / 255)


def test_configured_path_from_environment(clean_env, write_idx_dir) -> None:
    root = write_idx_dir(gz=True)
    clean_env.setenv("STRUCTGUARD_FASHION_DIR", str(root))
    ds = load_fashion_mnist(debian_dir=MISSING, bundled=None, download=False)
    assert ds.source_kind == "path" and ds.source == str(root)


def test_configured_path_wins_over_debian(clean_env, write_idx_dir) -> None:
    mine = write_idx_dir(n_train=30, n_test=10, name="mine")
    debian = write_idx_dir(n_train=40, n_test=10, name="debian")
    ds = load_fashion_mnist(mine, debian_dir=debian, download=False)
    assert ds.source_kind == "path" and len(ds.train) == 30


def test_debian_source_is_next(clean_env, write_idx_dir, tmp_path: Path) -> None:
    """A configured path without the files falls through to the Debian folder (here a stand-in)."""
    debian = write_idx_dir(n_train=40, n_test=10, gz=True, name="debian")
    empty = tmp_path / "empty"
    empty.mkdir()
    ds = load_fashion_mnist(empty, debian_dir=debian, download=False)
    assert ds.source_kind == "debian" and len(ds.train) == 40


@requires_debian_fashion
def test_debian_package_full_dataset(clean_env) -> None:
    ds = load_fashion_mnist(debian_dir=DEBIAN_FASHION, download=False)
    assert ds.source_kind == "debian" and ds.full
    assert (len(ds.train), len(ds.test)) == (60000, 10000)
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10
    assert ds.card()["source"] == str(DEBIAN_FASHION)


def test_bundled_subset_when_nothing_else(clean_env) -> None:
    ds = load_fashion_mnist(debian_dir=MISSING, download=False)
    assert ds.source_kind == "bundled" and not ds.full
    assert ds.source == str(BUNDLED_FASHION)
    assert any("bundled" in n for n in ds.notes)


def test_bundled_subset_contents(bundled_fashion) -> None:
    ds = bundled_fashion
    assert BUNDLED_FASHION.stat().st_size < 4_000_000
    assert len(ds.train) >= 2000 and len(ds.test) >= 1000
    for split, full_size, per_class in ((ds.train, 60000, 300), (ds.test, 10000, 100)):
        ids = split.ids
        assert split.pixels.dtype == torch.uint8 and split.pixels.shape[1:] == (1, 28, 28)
        assert len(torch.unique(ids)) == len(ids), "ids must be unique"
        assert torch.all(ids[1:] > ids[:-1]), "rows are sorted by id"
        assert int(ids.min()) >= 0 and int(ids.max()) < full_size
        assert torch.bincount(split.labels, minlength=10).tolist() == [per_class] * 10
    # positions() maps ids back to rows
    some = ds.train.ids[[5, 500, 2999]]
    assert ds.train.positions(some).tolist() == [5, 500, 2999]


@requires_debian_fashion
def test_bundled_subset_matches_the_full_dataset(bundled_fashion) -> None:
    """The documented rule: first 300 train / 100 test images of each class, same pixels and labels."""
    full = load_fashion_mnist(debian_dir=DEBIAN_FASHION, download=False)
    for sub, whole, per_class in ((bundled_fashion.train, full.train, 300), (bundled_fashion.test, full.test, 100)):
        expected = np.sort(np.concatenate([np.flatnonzero(whole.labels.numpy() == c)[:per_class] for c in range(10)]))
        assert sub.ids.tolist() == expected.tolist()
        assert torch.equal(sub.pixels, whole.pixels[sub.ids])
        assert torch.equal(sub.labels, whole.labels[sub.ids])


def test_download_skipped_when_offline(clean_env, monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("must not download while HF_HUB_OFFLINE is set")

    monkeypatch.setattr(data, "_download_fashion", no_network)
    assert not data.downloads_allowed()
    ds = load_fashion_mnist(debian_dir=MISSING)  # download=None: decided by the environment
    assert ds.source_kind == "bundled"


def test_download_needs_an_explicit_opt_in(clean_env, monkeypatch) -> None:
    """One switch (core.downloads) for datasets and CLIP: HF_HUB_OFFLINE unset is not consent."""
    monkeypatch.setattr(data, "_download_fashion", lambda *a, **k: (_ for _ in ()).throw(AssertionError("download")))
    clean_env.delenv("HF_HUB_OFFLINE")
    clean_env.delenv("STRUCTGUARD_ALLOW_DOWNLOADS", raising=False)
    assert not data.downloads_allowed()
    assert load_fashion_mnist(debian_dir=MISSING).source_kind == "bundled"
    clean_env.setenv("STRUCTGUARD_ALLOW_DOWNLOADS", "1")
    assert data.downloads_allowed()
    clean_env.setenv("HF_HUB_OFFLINE", "1")
    assert not data.downloads_allowed()


def test_download_source_used_when_allowed(clean_env, monkeypatch, write_idx_dir) -> None:
    """The download step's result is used in third place (the network itself is stubbed)."""
    fetched = write_idx_dir(gz=True, name="downloaded")
    monkeypatch.setattr(data, "_download_fashion", lambda dest, timeout=5.0: fetched)
    ds = load_fashion_mnist(debian_dir=MISSING, download=True)
    assert ds.source_kind == "download"


def test_nothing_found_names_every_source(clean_env, monkeypatch, tmp_path: Path) -> None:
    def unreachable(dest, timeout=5.0):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data, "_download_fashion", unreachable)
    with pytest.raises(DataError) as err:
        load_fashion_mnist(tmp_path / "mine", debian_dir=MISSING, bundled=tmp_path / "none.npz", download=True)
    msg = str(err.value)
    assert "Tried, in order" in msg
    for part in ("configured path", str(tmp_path / "mine"), "Debian package dataset-fashion-mnist",
                 "apt-get install dataset-fashion-mnist", "download", "network is unreachable",
                 "bundled subset", "STRUCTGUARD_FASHION_DIR"):
        assert part in msg, f"{part!r} missing from: {msg}"


def test_nothing_found_offline_says_download_skipped(clean_env) -> None:
    with pytest.raises(DataError, match="download: skipped"):
        load_fashion_mnist(debian_dir=MISSING, bundled=None)


# ------------------------------------------------------------------------- IDX checks


@pytest.mark.parametrize("cut", [2, 10, 1000])
def test_truncated_idx_is_a_clear_error(clean_env, write_idx_dir, cut: int) -> None:
    root = write_idx_dir()
    images = root / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[: -cut if cut == 1000 else cut])
    with pytest.raises(DataError, match="truncated"):
        load_fashion_mnist(root, debian_dir=MISSING, bundled=None, download=False)


def test_damaged_gzip_is_a_clear_error(write_idx_dir) -> None:
    root = write_idx_dir(gz=True)
    path = root / "t10k-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="damaged gzip"):
        read_idx(path)


def test_idx_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)  # float IDX, not unsigned bytes
    with pytest.raises(DataError, match="not an unsigned-byte IDX"):
        read_idx(path)


def test_idx_labels_out_of_range(clean_env, write_idx_dir) -> None:
    root = write_idx_dir()
    labels = np.full(60, 12, np.uint8)
    (root / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (60).to_bytes(4, "big") + labels.tobytes())
    with pytest.raises(DataError, match="outside the 10"):
        load_fashion_mnist(root, debian_dir=MISSING, bundled=None, download=False)


def test_unknown_ids_are_refused(bundled_fashion) -> None:
    with pytest.raises(DataError, match="not in this split"):
        bundled_fashion.test.positions([999_999])


# ------------------------------------------------------------------------------- CIFAR


def test_cifar10_batches(write_cifar_dir) -> None:
    root = write_cifar_dir("cifar10", per_batch=8)
    ds = load_cifar(root, "cifar10")
    assert ds.name == "cifar10" and ds.source_kind == "cifar"
    assert (len(ds.train), len(ds.test)) == (40, 8)
    assert ds.train.pixels.shape == (40, 3, 32, 32) and ds.train.pixels.dtype == torch.uint8
    assert ds.class_names[0] == "airplane" and ds.num_classes == 10
    assert torch.equal(ds.train.ids, torch.arange(40))
    # data rows are R, G, B planes of 1024 pixels each, as in the original files
    with open(root / "data_batch_1", "rb") as fh:
        first = pickle.load(fh, encoding="bytes")
    assert ds.train.pixels[0, 1, 0, 0].item() == first[b"data"][0, 1024]
    assert ds.train.labels[:8].tolist() == first[b"labels"]


def test_cifar100_batches(write_cifar_dir) -> None:
    ds = load_dataset("cifar100", write_cifar_dir("cifar100", per_batch=4))
    assert ds.num_classes == 100 and ds.class_names[3] == "class_03"
    assert (len(ds.train), len(ds.test)) == (20, 4)
    assert ds.input_shape == (3, 32, 32)


def test_cifar_protocol5_arrays_load(write_cifar_dir) -> None:
    root = write_cifar_dir("cifar10", per_batch=4)
    with open(root / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}, fh, protocol=5)
    assert len(load_cifar(root).test) == 4


class _RunsCode:
    """Unpickling this would call os.system; the loader must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_carrying_code_is_refused(write_cifar_dir, tmp_path: Path) -> None:
    root = write_cifar_dir("cifar10", per_batch=4)
    marker = tmp_path / "pwned"
    with open(root / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": _RunsCode(marker), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(DataError, match="refusing to load"):
        load_cifar(root, "cifar10")
    assert not marker.exists(), "the payload ran"


def test_cifar_missing_batches(tmp_path: Path, write_cifar_dir) -> None:
    root = write_cifar_dir("cifar10")
    (root / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        load_cifar(root, "cifar10")
    with pytest.raises(DataError, match="meta"):
        load_cifar(tmp_path, "cifar100")
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10")


def test_cifar_not_a_pickle(write_cifar_dir) -> None:
    root = write_cifar_dir("cifar10", per_batch=4)
    (root / "test_batch").write_bytes(gzip.compress(b"not a pickle"))
    with pytest.raises(DataError, match="not a readable CIFAR"):
        load_cifar(root)


# ----------------------------------------------------------------------- image folders


def _write_images(root: Path, spec: dict[str, int], size: int = 20) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in spec.items():
        folder = root / cls
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (root / next(iter(spec)) / "notes.txt").write_text("not an image")  # ignored: not an image


def test_class_per_folder_images(tmp_path: Path) -> None:
    _write_images(tmp_path / "pets" / "train", {"dog": 3, "cat": 2})
    _write_images(tmp_path / "pets" / "test", {"dog": 1, "cat": 1})
    ds = load_dataset("folder", tmp_path / "pets", channels=3, size=32)
    assert ds.name == "pets" and ds.source_kind == "folder"
    assert ds.class_names == ["cat", "dog"]  # sorted folder names
    assert ds.train.pixels.shape == (5, 3, 32, 32)
    assert ds.train.labels.tolist() == [0, 0, 1, 1, 1]
    gray = load_image_folder(tmp_path / "pets", channels=1, size=28)
    assert gray.input_shape == (1, 28, 28)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train/<class>/ and test/<class>/"):
        load_image_folder(tmp_path)
    (tmp_path / "train" / "only").mkdir(parents=True)
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="at least two class folders"):
        load_image_folder(tmp_path)
    (tmp_path / "train" / "other").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path)


@pytest.mark.parametrize("name, data, reason", [
    ("text.png", b"not an image at all", "is not an image"),
    ("header_only.png", None, "damaged or truncated"),
    ("bomb.png", "bomb", "decompression bomb"),
])
def test_image_folder_refuses_a_bad_file_by_name(tmp_path: Path, name: str, data, reason: str) -> None:
    """A file that is not a whole image fails the load with its path and the reason, before any run."""
    import io

    from PIL import Image

    _write_images(tmp_path / "pets" / "train", {"dog": 2, "cat": 2})
    _write_images(tmp_path / "pets" / "test", {"dog": 1, "cat": 1})
    if data is None:  # a real PNG cut after its header: PIL opens it, only a full decode sees the damage
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(buf, "PNG")
        data = buf.getvalue()[:200]
    elif data == "bomb":  # small file, huge canvas
        buf = io.BytesIO()
        Image.new("L", (3000, 2000)).save(buf, "PNG")
        data = buf.getvalue()
    bad = tmp_path / "pets" / "train" / "cat" / name
    bad.write_bytes(data)
    with pytest.raises(DataError, match=f"{name}: .*{reason}"):
        load_image_folder(tmp_path / "pets")


def test_unknown_dataset_name() -> None:
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")


def test_bundled_loader_reports_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_bundled_fashion(tmp_path / "absent.npz")
