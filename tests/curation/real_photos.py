"""A pool of real photographs with planted copies, built from the sample images scikit-image ships.

Each photograph is cut into distinct pictures (its corners, `CROP` of each side: neighbouring pictures share a strip,
but neither holds the other): the hard negatives, distinct images of one scene. A share of those pictures get
planted copies, one per kind, written with this module's own edits (not components/curation/copies.py, so the test
does not grade the calibration on its own transforms): a low-quality JPEG, a rescale, a crop keeping 70-95 % of the
area, a colour and contrast change, a small rotation, a caption or a border.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
    "rocket",
    "brick",
    "grass",
    "gravel",
    "page",
    "text",
)
"""scikit-image's photographs (renders such as colorwheel and clock, and near-textureless micrographs, left out)."""
KINDS = ("jpeg", "rescale", "crop", "colour", "rotate", "overlay")
CROP = 0.6


def photo(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    if array.dtype != np.uint8:
        array = (255 * (array.astype(np.float64) / max(float(array.max()), 1e-9))).astype(np.uint8)
    return Image.fromarray(array[..., :3])


def pictures(image: Image.Image, num: int) -> list[Image.Image]:
    width, height = image.size
    w, h = int(width * CROP), int(height * CROP)
    corners = [(0, 0), (width - w, height - h), (width - w, 0), (0, height - h)]
    return [image.crop((x, y, x + w, y + h)) for x, y in corners[:num]]


def edit(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    width, height = image.size
    if kind == "jpeg":
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=int(rng.integers(8, 30)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "rescale":
        f = rng.uniform(0.35, 0.6)
        small = image.resize((int(width * f), int(height * f)), Image.Resampling.BOX)
        return small if rng.random() < 0.5 else small.resize((width, height), Image.Resampling.LANCZOS)
    if kind == "crop":
        side = np.sqrt(rng.uniform(0.72, 0.93))
        w, h = int(width * side), int(height * side)
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        return image.crop((x, y, x + w, y + h))
    if kind == "colour":
        out = ImageEnhance.Contrast(image).enhance(rng.uniform(0.6, 1.4))
        return ImageEnhance.Color(ImageEnhance.Brightness(out).enhance(rng.uniform(0.7, 1.3))).enhance(0.6)
    if kind == "rotate":
        return image.rotate(rng.choice([-1, 1]) * rng.uniform(2, 9), resample=Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        return ImageOps.expand(image, border=int(0.05 * max(width, height)), fill=(250, 250, 250))
    out = image.copy()
    font = ImageFont.load_default(size=max(10, height // 10))
    ImageDraw.Draw(out).text(
        (width // 10, height // 2), f"#{int(rng.integers(1000))} shared", fill=(255, 0, 0), font=font
    )
    return out


def build(root: Path, *, photos: tuple[str, ...], per_photo: int, with_copies: int, seed: int = 0) -> dict:
    """Writes `root/pool/` (distinct pictures as PNG, copies as PNG or JPEG) and returns the truth.

    Args:
        photos: Names of scikit-image sample images.
        per_photo: Distinct pictures cut from each photo.
        with_copies: How many of each photo's pictures get one copy of every kind.

    Returns:
        {"pictures": [rel], "copies": [{"path", "of", "kind"}]} with paths relative to root.
    """
    rng = np.random.default_rng(seed)
    (root / "pool").mkdir(parents=True, exist_ok=True)
    truth: dict = {"pictures": [], "copies": []}
    for name in photos:
        for i, picture in enumerate(pictures(photo(name), per_photo)):
            rel = f"pool/{name}_{i}.png"
            picture.save(root / rel)
            truth["pictures"].append(rel)
            if i >= with_copies:
                continue
            for kind in KINDS:
                copy = edit(picture, kind, rng)
                copy_rel = f"pool/{name}_{i}_{kind}.{'jpg' if kind == 'jpeg' else 'png'}"
                if kind == "jpeg":
                    (root / copy_rel).write_bytes(_jpeg_bytes(copy))
                else:
                    copy.save(root / copy_rel)
                truth["copies"].append({"path": copy_rel, "of": rel, "kind": kind})
    (root / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def _jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def score(truth: dict, removed: list[dict], root: Path) -> dict:
    """Precision of the removals and recall of the planted copies, overall and per kind.

    A removal is right when the removed image and the image it duplicates are the same picture (one of them a copy
    of the other, or two copies of one picture). A planted copy is found when it and its picture end up in one
    duplicate group (one of them removed as a duplicate of the other or of the same kept image).
    """
    prefix = str(root).rstrip("/") + "/"
    origin = {p: p for p in truth["pictures"]} | {c["path"]: c["of"] for c in truth["copies"]}

    def rel(uri: str) -> str:
        return uri[len(prefix) :] if uri.startswith(prefix) else uri

    kept_as = {}
    right = 0
    for row in removed:
        a, b = rel(row["uri"]), rel(row["duplicate_of"])
        right += origin.get(a) == origin.get(b)
        kept_as[a] = b
    group = {p: kept_as.get(p, p) for p in origin}
    found = {c["path"]: group[c["path"]] == group[c["of"]] for c in truth["copies"]}
    per_kind = {
        kind: float(np.mean([found[c["path"]] for c in truth["copies"] if c["kind"] == kind])) for kind in KINDS
    }
    return {
        "removed": len(removed),
        "precision": right / len(removed) if removed else 1.0,
        "recall": float(np.mean(list(found.values()))),
        "recall_per_kind": per_kind,
        "copies": len(truth["copies"]),
        "pictures": len(truth["pictures"]),
    }
