"""Planted copies: the transforms a web pool is full of, applied to a pool's own images to calibrate deduplication.

A copy of an image is the same picture after one of the edits that images undergo on their way around the web
(the kinds below, one per copy). Their ranges follow the copy-detection literature's augmentations (Pizzi et al.
2022, SSCD; the DISC21 benchmark) within what the issue that introduced them asks: a copy keeps at least 70 % of the
picture. Two halves of one image that share no pixel are the opposite: distinct images that look alike (same
scene, same light, same camera), the hard negatives of the calibration.

Every function is a pure function of the image and a numpy Generator, so the calibration set is reproducible from
the pipeline seed.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

COPY_KINDS = ("jpeg", "rescale", "crop", "colour", "rotate", "overlay")
"""The kinds of planted copy, in the order the calibration cycles through them."""

_WORDS = ("SALE", "photo", "copyright", "2024", "best of", "LOL", "www.example.org", "@user", "NEW", "repost")


def jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Re-encoded at a low JPEG quality (10-40), blocking artefacts and all."""
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=int(rng.integers(10, 41)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def rescale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Downscaled to 30-70 % of its side, and in half of the cases upscaled back (detail lost either way)."""
    width, height = image.size
    factor = rng.uniform(0.3, 0.7)
    small = image.resize((max(16, round(width * factor)), max(16, round(height * factor))), Image.Resampling.BILINEAR)
    return small.resize((width, height), Image.Resampling.BICUBIC) if rng.random() < 0.5 else small


def crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop keeping 70-95 % of the area, aspect ratio within 20 % of the original's, anywhere in the image."""
    width, height = image.size
    area = rng.uniform(0.70, 0.95)
    stretch = rng.uniform(0.9, 1.1)
    w = min(width, max(1, round(width * math.sqrt(area) * stretch)))
    h = min(height, max(1, round(width * height * area / w)))
    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    return image.crop((x, y, x + w, y + h))


def colour(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation each changed by up to 35 %, or a grey version (a fifth of the cases)."""
    if rng.random() < 0.2:
        return ImageOps.grayscale(image).convert("RGB")
    out = ImageEnhance.Brightness(image).enhance(rng.uniform(0.65, 1.35))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.65, 1.35))
    return ImageEnhance.Color(out).enhance(rng.uniform(0.5, 1.5))


def rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotated by 3-10 degrees either way, corners filled black, same frame (a slightly tilted scan or repost)."""
    angle = rng.uniform(3.0, 10.0) * (1 if rng.random() < 0.5 else -1)
    return image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False)


def overlay(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A caption or watermark written over the picture, or a coloured border of 3-8 % of the side around it."""
    width, height = image.size
    if rng.random() < 0.5:
        pad = max(2, round(max(width, height) * rng.uniform(0.03, 0.08)))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        return ImageOps.expand(image, border=pad, fill=fill)
    out = image.copy()
    draw = ImageDraw.Draw(out)
    size = max(8, round(height * rng.uniform(0.08, 0.14)))
    font = ImageFont.load_default(size=size)
    text = " ".join(_WORDS[int(i)] for i in rng.choice(len(_WORDS), size=2, replace=False))
    x = int(rng.integers(0, max(1, width // 3)))
    y = int(rng.integers(0, max(1, height - size - 1)))
    ink = (255, 255, 255) if rng.random() < 0.5 else (0, 0, 0)
    draw.text((x, y), text, fill=ink, font=font, stroke_width=1, stroke_fill=tuple(255 - c for c in ink))
    return out


_TRANSFORMS = {
    "jpeg": jpeg,
    "rescale": rescale,
    "crop": crop,
    "colour": colour,
    "rotate": rotate,
    "overlay": overlay,
}


def plant_copy(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A copy of `image` (RGB) of one of COPY_KINDS.

    Raises:
        ValueError: An unknown kind.
    """
    if kind not in _TRANSFORMS:
        raise ValueError(f"unknown copy kind {kind!r}; expected one of {COPY_KINDS}")
    return _TRANSFORMS[kind](image.convert("RGB"), rng)


def disjoint_halves(image: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The two halves of `image` along its longer side: distinct pictures (no shared pixel) that look alike."""
    width, height = image.size
    if width >= height:
        half = width // 2
        return image.crop((0, 0, half, height)), image.crop((width - half, 0, width, height))
    half = height // 2
    return image.crop((0, 0, width, half)), image.crop((0, height - half, width, height))
