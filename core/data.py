"""Datasets with stable sample ids.

Every sample keeps the index it has in its original split as its id, so a forget
set is a plain list of ids that can be saved, reloaded and audited.

Fashion-MNIST is looked up in order: a configured path, the Debian package
`dataset-fashion-mnist`, a download (only when online and allowed), and finally
the subset bundled in assets/. CIFAR-10/100 come from the python pickle batches
(read with a restricted unpickler) and user images from class-per-folder trees.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .downloads import ALLOW_DOWNLOADS_ENV, downloads_allowed
from .runs import write_atomic  # atomic, no partial file after a failed download

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_FASHION = ASSETS / "data" / "fashion-mnist-subset.npz"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path(os.environ.get("STRUCTGUARD_CACHE", Path.home() / ".cache" / "structguard"))
FASHION_URL = "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(RuntimeError):
    """A dataset could not be found or read; the message says what to do."""


@dataclass
class Split:
    """Images as uint8 [N, C, H, W]; `images()` gives float tensors in [0, 1]."""

    pixels: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor

    def __post_init__(self) -> None:
        n = len(self.pixels)
        if len(self.labels) != n or len(self.ids) != n:
            raise DataError(f"split sizes disagree: {n} images, {len(self.labels)} labels, {len(self.ids)} ids")

    def __len__(self) -> int:
        return len(self.pixels)

    def images(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        px = self.pixels if index is None else self.pixels[index]
        return px.float().div_(255.0)

    def positions(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Row positions of the given sample ids; raises on unknown ids."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        lookup = {int(v): i for i, v in enumerate(self.ids.tolist())}
        missing = [int(i) for i in ids.tolist() if int(i) not in lookup]
        if missing:
            shown = ", ".join(map(str, missing[:10]))
            raise DataError(f"{len(missing)} id(s) not in this split (e.g. {shown}); "
                            "ids are indices of the original split")
        return torch.tensor([lookup[int(i)] for i in ids.tolist()], dtype=torch.long)

    def subset(self, positions: torch.Tensor) -> Split:
        return Split(self.pixels[positions], self.labels[positions], self.ids[positions])


@dataclass
class Dataset:
    name: str
    class_names: list[str]
    train: Split
    test: Split
    source: str
    source_kind: str  # "path" | "debian" | "download" | "bundled" | "cifar" | "folder"
    full: bool  # True when train/test are the complete original splits
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.pixels.shape[1:])  # type: ignore[return-value]

    def card(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "source_kind": self.source_kind,
            "full": self.full,
            "train_size": len(self.train),
            "test_size": len(self.test),
            "classes": self.class_names,
            "input_shape": list(self.input_shape),
            "notes": self.notes,
        }


# --------------------------------------------------------------------------- IDX


def _open_maybe_gz(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError) as exc:
            raise DataError(f"{path} is a damaged gzip file ({exc}); re-download or reinstall it") from exc
    return raw


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), validating header and length."""
    data = _open_maybe_gz(path)
    if len(data) < 4:
        raise DataError(f"{path} is truncated: {len(data)} bytes, not even an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(
            f"{path} is truncated or damaged: expected {expected} bytes for shape {shape}, found {len(data)}; "
            "re-download or reinstall the dataset"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz", root / stem.replace("-idx", ".idx")):
        if candidate.is_file():
            return candidate
    return None


def _idx_split(root: Path, split: str) -> Split:
    img_stem, lbl_stem = IDX_FILES[split]
    img_path, lbl_path = _find_idx(root, img_stem), _find_idx(root, lbl_stem)
    if img_path is None or lbl_path is None:
        raise FileNotFoundError(f"no {img_stem}[.gz] / {lbl_stem}[.gz] in {root}")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
    if labels.max(initial=0) >= len(FASHION_CLASSES):
        raise DataError(f"{lbl_path}: label {labels.max()} outside the 10 Fashion-MNIST classes")
    pixels = torch.from_numpy(images.copy()).unsqueeze(1)
    return Split(pixels, torch.from_numpy(labels.astype(np.int64)), torch.arange(len(labels)))


def _fashion_from_dir(root: Path, kind: str) -> Dataset:
    train, test = _idx_split(root, "train"), _idx_split(root, "test")
    full = len(train) == 60000 and len(test) == 10000
    return Dataset("fashion-mnist", list(FASHION_CLASSES), train, test, str(root), kind, full)


def _download_fashion(dest: Path, timeout: float = 5.0) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for stems in IDX_FILES.values():
        for stem in stems:
            target = dest / f"{stem}.gz"
            if target.is_file():
                continue
            with urllib.request.urlopen(FASHION_URL + target.name, timeout=timeout) as resp:  # noqa: S310
                write_atomic(target, resp.read(), what="the dataset download")
    return dest


def load_bundled_fashion(path: Path = BUNDLED_FASHION) -> Dataset:
    if not path.is_file():
        raise FileNotFoundError(f"bundled subset {path} is missing")
    with np.load(path) as z:
        train = Split(torch.from_numpy(z["train_x"]).unsqueeze(1), torch.from_numpy(z["train_y"].astype(np.int64)),
                      torch.from_numpy(z["train_ids"].astype(np.int64)))
        test = Split(torch.from_numpy(z["test_x"]).unsqueeze(1), torch.from_numpy(z["test_y"].astype(np.int64)),
                     torch.from_numpy(z["test_ids"].astype(np.int64)))
    note = "bundled subset: ids are indices into the full Fashion-MNIST splits"
    return Dataset("fashion-mnist", list(FASHION_CLASSES), train, test, str(path), "bundled", False, [note])


def load_fashion_mnist(
    root: str | Path | None = None,
    *,
    debian_dir: Path = DEBIAN_FASHION,
    bundled: Path | None = BUNDLED_FASHION,
    download: bool | None = None,
) -> Dataset:
    """Fashion-MNIST from the first source that works; the error lists all tried."""
    tried: list[str] = []
    root = root or os.environ.get("STRUCTGUARD_FASHION_DIR")
    if root:
        try:
            return _fashion_from_dir(Path(root), "path")
        except FileNotFoundError as exc:
            tried.append(f"configured path: {exc}")
    try:
        return _fashion_from_dir(debian_dir, "debian")
    except FileNotFoundError as exc:
        tried.append(f"Debian package dataset-fashion-mnist: {exc} (apt-get install dataset-fashion-mnist)")
    if download is None:
        download = downloads_allowed()
    if download:
        dest = CACHE_DIR / "fashion-mnist"
        try:
            return _fashion_from_dir(_download_fashion(dest), "download")
        except (OSError, FileNotFoundError) as exc:
            tried.append(f"download to {dest}: {exc}")
    else:
        tried.append(f"download: skipped (set {ALLOW_DOWNLOADS_ENV}=1 without HF_HUB_OFFLINE to allow it)")
    if bundled is not None:
        try:
            return load_bundled_fashion(bundled)
        except FileNotFoundError as exc:
            tried.append(f"bundled subset: {exc}")
    raise DataError("Fashion-MNIST not found. Tried, in order:\n  - " + "\n  - ".join(tried)
                    + "\nSet STRUCTGUARD_FASHION_DIR to a folder with the four IDX files.")


# ------------------------------------------------------------------------ CIFAR


class _SafeUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles: allow only the numpy array reconstructors."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
        ("numpy.core.numeric", "_frombuffer"),  # arrays pickled with protocol 5
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _SafeUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"{path} is not a readable CIFAR python batch: {exc}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a CIFAR batch dictionary")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_split(batches: list[dict], label_key: str) -> Split:
    xs = [np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches]
    ys = [np.asarray(b[label_key], dtype=np.int64) for b in batches]
    x, y = np.concatenate(xs), np.concatenate(ys)
    return Split(torch.from_numpy(x), torch.from_numpy(y), torch.arange(len(y)))


def load_cifar(root: str | Path, variant: str = "cifar10") -> Dataset:
    """CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test, meta)."""
    root = Path(root)
    if variant == "cifar10":
        names = [root / f"data_batch_{i}" for i in range(1, 6)] + [root / "test_batch"]
        missing = [p.name for p in names if not p.is_file()]
        if missing:
            raise DataError(f"CIFAR-10 batches missing in {root}: {', '.join(missing)}")
        train = _cifar_split([_unpickle(p) for p in names[:5]], "labels")
        test = _cifar_split([_unpickle(names[5])], "labels")
        classes = list(CIFAR10_CLASSES)
        meta = root / "batches.meta"
        if meta.is_file():
            classes = [c.decode() if isinstance(c, bytes) else c for c in _unpickle(meta)["label_names"]]
    elif variant == "cifar100":
        names = [root / "train", root / "test", root / "meta"]
        missing = [p.name for p in names if not p.is_file()]
        if missing:
            raise DataError(f"CIFAR-100 files missing in {root}: {', '.join(missing)}")
        train = _cifar_split([_unpickle(names[0])], "fine_labels")
        test = _cifar_split([_unpickle(names[1])], "fine_labels")
        classes = [c.decode() if isinstance(c, bytes) else c for c in _unpickle(names[2])["fine_label_names"]]
    else:
        raise DataError(f"unknown CIFAR variant {variant!r}; use cifar10 or cifar100")
    return Dataset(variant, classes, train, test, str(root), "cifar", True)


# ----------------------------------------------------------------------- folders


def _read_image(path: Path, channels: int, size: int) -> np.ndarray:
    """One file of an image folder, decoded and checked like an upload (core.images); DataError names it."""
    from .images import MAX_BYTES, decode_image

    try:
        size_bytes = path.stat().st_size
        if size_bytes > MAX_BYTES:  # checked before reading: a huge file costs nothing
            raise ValueError(f"{size_bytes / 1e6:.1f} MB is over the {MAX_BYTES / 1e6:.0f} MB limit per image")
        return decode_image(path.read_bytes(), (channels, size, size))
    except ValueError as exc:
        raise DataError(f"image folder file {path}: {exc}; remove or replace it") from exc
    except OSError as exc:
        raise DataError(f"image folder file {path} cannot be read ({exc.strerror or exc})") from exc


def _folder_split(root: Path, classes: list[str], channels: int, size: int) -> Split:
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        folder = root / name
        if folder.is_dir():
            files += [(p, label) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}/<class>/")
    pixels = np.stack([_read_image(p, channels, size) for p, _ in files])
    labels = np.array([lbl for _, lbl in files], dtype=np.int64)
    return Split(torch.from_numpy(pixels), torch.from_numpy(labels), torch.arange(len(files)))


def load_image_folder(root: str | Path, *, channels: int = 1, size: int = 28, name: str | None = None) -> Dataset:
    """Class-per-folder images: root/train/<class>/*, root/test/<class>/*.

    Ids are positions in the sorted file list of each split.
    """
    root = Path(root)
    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise DataError(f"{root} needs train/<class>/ and test/<class>/ sub-folders")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{train_dir} needs at least two class folders, found {classes}")
    train = _folder_split(train_dir, classes, channels, size)
    test = _folder_split(test_dir, classes, channels, size)
    return Dataset(name or root.name, classes, train, test, str(root), "folder", True)


def load_dataset(name: str = "fashion-mnist", root: str | Path | None = None, **kwargs) -> Dataset:
    """Load a dataset by name: fashion-mnist, cifar10, cifar100 or folder."""
    if name == "fashion-mnist":
        return load_fashion_mnist(root, **kwargs)
    if name in ("cifar10", "cifar100"):
        if root is None:
            raise DataError(f"{name} needs a directory with its python batches (--data-dir)")
        return load_cifar(root, name)
    if name == "folder":
        if root is None:
            raise DataError("folder datasets need a root with train/<class>/ and test/<class>/")
        return load_image_folder(root, **kwargs)
    raise DataError(f"unknown dataset {name!r}; choose fashion-mnist, cifar10, cifar100 or folder")
