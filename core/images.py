"""Decoding one image a user gave (an upload, a file in an image folder), with every check in one place.

The image is fully decoded (`Image.load()`), so a file that is only a header or cut short is refused
here, not later in the middle of a run; its size is checked before decoding (decompression bombs).
"""

from __future__ import annotations

import io
import warnings

import numpy as np

MAX_BYTES = 2_000_000  # per image file
MAX_PIXELS = 4_000_000  # width * height; above this PIL's header says "decompression bomb"


def decode_image(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """Bytes -> uint8 [C, H, W] at `shape` (C, H, W); ValueError with a one-line reason for bad input."""
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


__all__ = ["MAX_BYTES", "MAX_PIXELS", "decode_image"]
