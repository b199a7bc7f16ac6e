"""Validation of user uploads (images with labels, id lists). Plain Python, no Streamlit.

Every rejection is a one-line message naming the file and what to do; nothing here
raises for bad input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core import images

MAX_FILES = 32
MAX_BYTES, MAX_PIXELS = images.MAX_BYTES, images.MAX_PIXELS  # per image file (the Forget set page shows them)
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
            pixels = images.decode_image(data, shape)  # fully decoded and size-checked
        except ValueError as exc:
            res.errors.append(f"{name}: {exc}.")
            continue
        res.accepted.append(AcceptedImage(name, pixels, lbl))
    return res
