"""Decoding an image file into the RGB picture every stage sees: the one place that says what "the image" of a file is.

Any format Pillow decodes is an image (JPEG, PNG, WebP, GIF, BMP, TIFF, ICO, PPM, ...). A multi-frame file (an
animated GIF, WebP or PNG, a multi-page TIFF) is its first frame. High-bit-depth grey images (16-bit PNG or TIFF,
32-bit integer or float) are scaled to 8 bits over their value range instead of being clipped at 255 (which would
turn most 16-bit photographs white); every other mode goes through Pillow's own conversion to RGB.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """The first frame of `image` as an 8-bit RGB image (a new image; the input's frame pointer is reset to 0)."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    if image.mode in _WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            low, high = 0.0, 65535.0
        else:
            finite = values[np.isfinite(values)]
            low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        scaled = np.clip((np.nan_to_num(values, nan=low) - low) / max(high - low, 1e-12), 0.0, 1.0)
        return Image.fromarray(np.round(scaled * 255.0).astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """The RGB picture of an encoded image file (first frame). Raises what Pillow raises on a file it cannot read."""
    with Image.open(io.BytesIO(data)) as image:
        return to_rgb(image)
