"""Validation of user uploads (images with labels, id lists). Plain Python, no Streamlit.

Every rejection is a one-line message naming the file and what to do; nothing here
raises for bad input.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_FILES = 32
MAX_BYTES = 2_000_000  # per image file
MAX_PIXELS = 4_000_000  # width * height; above this PIL's header says "decompression bomb"
SUFFIXES = {"png", "jpg", "jpeg", "bmp", "gif", "webp"}


@dataclass
class AcceptedImage:
    name: str
    pixels: np.ndarray  # uint8 [C, H, W]
    label: int


@dataclass
class UploadResult:
    accepted: list[AcceptedImage] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def label_from_name(name: str, classes: list[str]) -> int:
    """`<class>_rest.png` or `<index>_rest.png` -> class index; ValueError when it is not a class."""
    stem = Path(name).stem
    head = stem.split("_", 1)[0] if "_" in stem else stem
    norm = {c.lower().replace("/", "-").replace(" ", "-"): i for i, c in enumerate(classes)}
    key = head.lower().replace("/", "-").replace(" ", "-")
    if key in norm:
        return norm[key]
    if head.isdigit() and int(head) < len(classes):
        return int(head)
    raise ValueError(f"label {head!r} is not one of the classes ({', '.join(classes)}, or 0-{len(classes) - 1})")


def decode_image(name: str, data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """Bytes -> uint8 [C, H, W] at the dataset's input shape; ValueError with a clear reason."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_BYTES:
        raise ValueError(f"{len(data) / 1e6:.1f} MB is over the {MAX_BYTES / 1e6:.0f} MB limit per image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ValueError(f"{w}×{h} pixels is over the {MAX_PIXELS:,}-pixel limit (possible decompression "
                                     "bomb); resize it first")
                im.load()
                im = im.convert("L" if shape[0] == 1 else "RGB").resize((shape[2], shape[1]), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"refused as a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ValueError("is not an image PIL can read (PNG, JPEG, BMP, GIF, WebP)") from exc
    except (OSError, SyntaxError) as exc:  # truncated / corrupt data
        raise ValueError(f"is a damaged or truncated image ({exc})") from exc
    return arr[None] if shape[0] == 1 else arr.transpose(2, 0, 1).copy()


def validate_uploads(files: list[tuple[str, bytes]], classes: list[str], shape: tuple[int, int, int],
                     label: str | None) -> UploadResult:
    """Check every file; `label` None means "take it from the file name"."""
    res = UploadResult()
    if len(files) > MAX_FILES:
        res.errors.append(f"Too many files: {len(files)} uploaded, at most {MAX_FILES} at a time. Nothing was added.")
        return res
    fixed = None
    if label is not None:
        if label not in classes:
            res.errors.append(f"Label {label!r} is not one of the classes ({', '.join(classes)}). Nothing was added.")
            return res
        fixed = classes.index(label)
    for name, data in files:
        try:
            lbl = fixed if fixed is not None else label_from_name(name, classes)
            pixels = decode_image(name, data, shape)
        except ValueError as exc:
            res.errors.append(f"{name}: {exc}.")
            continue
        res.accepted.append(AcceptedImage(name, pixels, lbl))
    return res
