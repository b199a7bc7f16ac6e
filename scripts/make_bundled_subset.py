"""Build assets/data/fashion-mnist-subset.npz from the full Fashion-MNIST IDX files.

Selection (fixed, no randomness): for each class 0..9, the first 300 training
images of that class in id order, and the first 100 test images of that class.
Ids are indices into the original splits, so the subset's images are the same
samples the sample model was trained and evaluated on. Rows are sorted by id.

The .npz is written with fixed zip timestamps, so the same input gives the same bytes.

    python scripts/make_bundled_subset.py [--src /usr/share/datasets/fashion-mnist] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.data import BUNDLED_FASHION, DEBIAN_FASHION, IDX_FILES, _find_idx, read_idx  # noqa: E402

TRAIN_PER_CLASS = 300
TEST_PER_CLASS = 100


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Ids of the first `per_class` samples of every class, sorted by id."""
    picked = [np.flatnonzero(labels == c)[:per_class] for c in range(int(labels.max()) + 1)]
    short = [c for c, p in enumerate(picked) if len(p) < per_class]
    if short:
        raise SystemExit(f"classes {short} have fewer than {per_class} samples")
    return np.sort(np.concatenate(picked)).astype(np.int64)


def load_split(src: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    paths = [_find_idx(src, stem) for stem in IDX_FILES[split]]
    if None in paths:
        raise SystemExit(f"{src} lacks the {split} IDX files {IDX_FILES[split]}")
    return read_idx(paths[0]), read_idx(paths[1])


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Compressed .npz with a fixed timestamp per member (byte-reproducible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".npz.part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=DEBIAN_FASHION, help="folder with the four IDX files (.gz or raw)")
    p.add_argument("--out", type=Path, default=BUNDLED_FASHION)
    args = p.parse_args(argv)

    arrays: dict[str, np.ndarray] = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        x, y = load_split(args.src, split)
        ids = first_per_class(y, per_class)
        arrays[f"{split}_x"] = x[ids].astype(np.uint8)
        arrays[f"{split}_y"] = y[ids].astype(np.uint8)
        arrays[f"{split}_ids"] = ids
    write_npz(args.out, arrays)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out}: {len(arrays['train_ids'])} train, {len(arrays['test_ids'])} test, "
          f"{args.out.stat().st_size / 1e6:.2f} MB, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
