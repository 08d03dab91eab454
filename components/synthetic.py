"""The embedded synthetic image world: the default raw data, rendered deterministically from a seed.

Run: `python -m components synth` (renders params' `synthetic` section into data/synthetic).

What it holds, in the raw layout that prepare reads (see components/prepare.py):
    - K object classes, each a distinct (shape, texture, colour) triple; every image draws its object with a random
      pose, scale, position and colour jitter over a random background (gradient, radial, stripes, clouds, checker),
      with a lighting ramp and pixel noise, so classes are learnable but not trivially so;
    - classification sets (train/val/test), a curated seed set (`seeds/synthetic/<class>/`);
    - a segmentation set: multi-object scenes whose per-pixel class mask (0 = background, k + 1 = class k; the ignore
      value 255 is not used here) comes from the same scene description as the image;
    - a depth set: scenes of one kind of object in front of a wall, the whole scene at its class's distance scale
      (0.5 to 2, wall at 8 m times the scale, objects nearer, painted far to near), so that depth follows what the
      image shows;
    - places: fixed scenes seen from several viewpoints (shifted, zoomed, lit differently) for retrieval;
    - an uncurated pool (single objects and multi-object scenes, in nested sub-folders) with planted near-duplicates
      (crops, JPEG re-encodes, colour shifts, resizes, one exact copy), planted leaks (near-copies of evaluation test
      images, the first an exact copy) and planted bad files (truncated JPEG, zero bytes, text named .jpg, an image
      too small, a PNG whose header claims 100000 x 100000 pixels, a non-image suffix);
    - `ground_truth.json`: everything planted, paths relative to the root, and `counts` of input files per part.

The segmentation and depth sets have no size keys of their own: each split holds `num_classes * eval_<split>_per_class
// 2` scenes (at least 4). Same seed and config give byte-identical files whatever the number of worker processes:
every image draws from its own generator, seeded by (seed, role, index).
"""

from __future__ import annotations

import colorsys
import io
import math
import os
import shutil
import struct
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from components.config import SyntheticConfig
from components.jsonio import write_json
from components.log import get_logger
from components.parallel import mp_context

log = get_logger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "crescent", "hexagon")
TEXTURES = ("solid", "stripes", "dots", "checker", "gradient")
COLOURS = (
    ("red", 0.0),
    ("orange", 30.0),
    ("yellow", 55.0),
    ("green", 120.0),
    ("cyan", 180.0),
    ("blue", 225.0),
    ("purple", 275.0),
    ("magenta", 315.0),
)
BACKGROUNDS = ("gradient", "radial", "stripes", "clouds", "checker")

SEED_SET = "synthetic"
DEPTH_SCALE = 1000.0
"""Depth PNG value per metre (millimetres in a 16-bit PNG; 0 = invalid)."""
DEPTH_WALL_M = 8.0
"""Distance of the wall behind a depth scene at distance scale 1 (objects stand at 1 to 3 m there)."""
DISTANCE_SCALES = (0.5, 2.0)
"""Range of the classes' distance scales; class k's scale is spread over it by a fixed permutation of the classes."""
_DISTANCE_ORDER_SEED = 123
HUGE_SIDE = 100_000
"""Side claimed by the hostile PNG header (1e10 pixels; a few dozen bytes on disk)."""

POOL_SUBDIRS = ("", "web", "web/2023", "web/2023/05", "camera", "camera/roll_1", "scans")
BAD_DIR = "incoming"
DUPLICATE_KINDS = ("crop", "reencode", "colour", "resize")
_WORLD_PARTS = ("pool", "seeds", "eval")

# Stream tags keep the generators of different roles apart: (seed, tag, index...) never collides across roles.
_TAG = {"plan": 1, "cls": 2, "seed": 3, "seg": 4, "depth": 5, "place": 6, "pool": 7, "dup": 8, "leak": 9, "bad": 10}
_SPLIT_ID = {"train": 0, "val": 1, "test": 2, "query": 3, "database": 4}


# --------------------------------------------------------------------------------------------------------------------
# Classes and scene descriptions
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectClass:
    """One of the K classes: a distinct (shape, texture, colour) triple."""

    index: int
    shape: str
    texture: str
    colour: str
    hue: float
    """Base hue in degrees."""
    distance: float = 1.0
    """Distance scale of the depth scenes that show this class (`_depth_scene`)."""

    @property
    def name(self) -> str:
        return f"{self.shape}_{self.texture}_{self.colour}"


def object_classes(num_classes: int) -> list[ObjectClass]:
    """The first `num_classes` classes; every class differs from the next in shape, texture and colour.

    Class k has shape k mod S and (q = k div S) picks texture (k + q) mod T and colour (3k + q) mod C; for k < S*C
    the pair (shape, colour) already identifies q, so all triples are distinct. Distance scales are evenly spaced over
    `DISTANCE_SCALES` in a fixed, seeded order of the classes, unrelated to their look.
    """
    num_shapes, num_textures, num_colours = len(SHAPES), len(TEXTURES), len(COLOURS)
    if num_classes > num_shapes * num_colours:
        raise ValueError(f"synthetic.num_classes = {num_classes} exceeds {num_shapes * num_colours}")
    order = np.random.default_rng(_DISTANCE_ORDER_SEED).permutation(num_classes)
    lo, hi = DISTANCE_SCALES
    classes = []
    for k in range(num_classes):
        q = k // num_shapes
        colour, hue = COLOURS[(3 * k + q) % num_colours]
        distance = lo + (hi - lo) * float(order[k]) / max(num_classes - 1, 1)
        classes.append(ObjectClass(k, SHAPES[k % num_shapes], TEXTURES[(k + q) % num_textures], colour, hue, distance))
    return classes


@dataclass(frozen=True)
class SceneObject:
    """An object placed in a scene; lengths are fractions of the canvas side."""

    cls: int
    cx: float
    cy: float
    radius: float
    angle: float
    rgb1: tuple[float, float, float]
    rgb2: tuple[float, float, float]
    tex_freq: float
    tex_phase: float
    depth_m: float


@dataclass(frozen=True, eq=False)  # holds an array: compare scenes by identity
class Scene:
    """Everything needed to render an image, its mask and its depth map at any size."""

    background: str
    colours: tuple[tuple[float, float, float], ...]
    angle: float
    freq: float
    centre: tuple[float, float]
    clouds: np.ndarray
    """G x G x 3 RGB control points of the `clouds` background, upsampled bicubically."""
    depth_near: float
    depth_far: float
    depth_tilt: float
    light_angle: float
    light_strength: float
    noise: float
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)


def _hsv(h_deg: float, s: float, v: float) -> tuple[float, float, float]:
    return colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1)))


def _hsv_grid(h_deg: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV to RGB (hue in degrees), for many colours at once."""
    h6 = np.mod(h_deg, 360.0) / 60.0
    i, f = np.floor(h6).astype(int) % 6, h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [np.choose(i, c) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))]
    return np.stack(rgb, axis=-1).astype(np.float32)


def _random_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    # Background colours are desaturated so that the objects' colour (a class attribute) stays readable.
    return _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.5), rng.uniform(0.3, 0.95))


def _random_object(
    rng: np.random.Generator, cls: ObjectClass, radius: tuple[float, float], depth: tuple[float, float]
) -> SceneObject:
    r = rng.uniform(*radius)
    hue = cls.hue + rng.uniform(-10, 10)  # colour jitter, small enough to keep neighbouring hues apart
    sat, val = rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0)
    return SceneObject(
        cls=cls.index,
        cx=rng.uniform(0.8 * r, 1 - 0.8 * r),
        cy=rng.uniform(0.8 * r, 1 - 0.8 * r),
        radius=r,
        angle=rng.uniform(0, 2 * math.pi),
        rgb1=_hsv(hue, sat, val),
        rgb2=_hsv(hue, sat * 0.9, val * 0.45),
        tex_freq=rng.uniform(2.0, 3.5),
        tex_phase=rng.uniform(0, 2 * math.pi),
        depth_m=rng.uniform(*depth),
    )


def _random_scene(rng: np.random.Generator, objects: Sequence[SceneObject] = ()) -> Scene:
    grid = int(rng.integers(3, 7))
    return Scene(
        background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        colours=(_random_colour(rng), _random_colour(rng)),
        angle=rng.uniform(0, 2 * math.pi),
        freq=rng.uniform(2.0, 8.0),
        centre=(rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)),
        clouds=_hsv_grid(
            rng.uniform(0, 360, (grid, grid)), rng.uniform(0, 0.5, (grid, grid)), rng.uniform(0.3, 0.95, (grid, grid))
        ),
        depth_near=rng.uniform(3.0, 5.0),
        depth_far=rng.uniform(8.0, 15.0),
        depth_tilt=rng.uniform(-0.3, 0.3),
        light_angle=rng.uniform(0, 2 * math.pi),
        light_strength=rng.uniform(0.0, 0.2),
        noise=rng.uniform(1.5, 5.0),
        # Painter's order: far objects first, so nearer ones occlude them in image, mask and depth alike.
        objects=tuple(sorted(objects, key=lambda o: -o.depth_m)),
    )


def _object_scene(rng: np.random.Generator, classes: Sequence[ObjectClass], k: int) -> Scene:
    """One dominant object of class k, sometimes with a small distractor of another class behind it."""
    objects = [_random_object(rng, classes[k], radius=(0.2, 0.33), depth=(1.0, 2.5))]
    if len(classes) > 1 and rng.random() < 0.3:
        other = (k + 1 + int(rng.integers(len(classes) - 1))) % len(classes)
        objects.append(_random_object(rng, classes[other], radius=(0.07, 0.12), depth=(2.6, 3.0)))
    return _random_scene(rng, objects)


def _depth_scene(rng: np.random.Generator, classes: Sequence[ObjectClass]) -> Scene:
    """A depth-set scene: an object scene of a random class k (`_object_scene`) in front of a wall at `DEPTH_WALL_M`,
    the whole scene at class k's distance scale times U(0.9, 1.1).

    What the scene shows tells how far it is, as a scene's kind does in real photographs, and its objects stand
    nearer than the wall: both cues are visible, so a head that reads the image beats the image-blind mean depth map.
    """
    k = int(rng.integers(len(classes)))
    scene = _object_scene(rng, classes, k)
    scale = classes[k].distance * rng.uniform(0.9, 1.1)
    wall = DEPTH_WALL_M * scale
    objects = tuple(replace(o, depth_m=o.depth_m * scale) for o in scene.objects)  # the painter's order is kept
    return replace(scene, depth_near=wall, depth_far=wall, depth_tilt=0.0, objects=objects)


def _multi_scene(rng: np.random.Generator, classes: Sequence[ObjectClass], num: tuple[int, int]) -> Scene:
    count = int(rng.integers(num[0], num[1] + 1))
    picks = rng.integers(len(classes), size=count)
    objects = [_random_object(rng, classes[int(c)], radius=(0.1, 0.24), depth=(1.0, 3.0)) for c in picks]
    return _random_scene(rng, objects)


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------


def _shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in object coordinates (units of the object's radius)."""
    r = np.hypot(u, v)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":  # vertices on the unit circle; outward edge normals at -90, 30, 150 degrees
        return np.all([u * math.cos(a) + v * math.sin(a) <= 0.5 for a in np.radians((-90, 30, 150))], axis=0)
    if shape == "hexagon":
        return np.all([u * math.cos(a) + v * math.sin(a) <= 0.866 for a in np.radians(range(0, 360, 60))], axis=0)
    if shape == "star":
        return r <= 0.4 + 0.6 * ((1 + np.cos(5 * np.arctan2(v, u))) / 2) ** 2
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.45, v) > 0.8)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, freq: float, phase: float) -> np.ndarray:
    """Blend weight of the second colour, in [0, 1]; in object coordinates so it turns with the object."""
    if texture == "solid":
        return np.zeros_like(u)
    if texture == "stripes":
        return (np.sin(math.pi * freq * u + phase) > 0).astype(np.float32)
    if texture == "dots":
        du = np.mod(u * freq + phase, 1.0) - 0.5
        dv = np.mod(v * freq, 1.0) - 0.5
        return (du * du + dv * dv < 0.09).astype(np.float32)
    if texture == "checker":
        return np.mod(np.floor(u * freq + phase) + np.floor(v * freq), 2.0).astype(np.float32)
    if texture == "gradient":
        return np.clip((v + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


def _lerp(c1: Sequence[float], c2: Sequence[float], t: np.ndarray) -> np.ndarray:
    a, b = np.asarray(c1, np.float32), np.asarray(c2, np.float32)
    return a + (b - a) * t[..., None]


def _background(scene: Scene, x: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    c1, c2 = scene.colours
    ca, sa = math.cos(scene.angle), math.sin(scene.angle)
    along = x * ca + y * sa  # coordinate along the pattern's direction, in canvas fractions
    if scene.background == "gradient":
        return _lerp(c1, c2, (along - along.min()) / max(float(np.ptp(along)), 1e-6))
    if scene.background == "radial":
        d = np.hypot(x - scene.centre[0], y - scene.centre[1])
        return _lerp(c1, c2, np.clip(d / 0.9, 0, 1))
    if scene.background == "stripes":
        return _lerp(c1, c2, 0.5 + 0.5 * np.sin(2 * math.pi * scene.freq * along))
    if scene.background == "checker":
        across = -x * sa + y * ca
        n = scene.freq / 2
        return _lerp(c1, c2, np.mod(np.floor(along * n) + np.floor(across * n), 2.0))
    if scene.background == "clouds":
        grid = (scene.clouds * 255).round().astype(np.uint8)
        big = Image.fromarray(grid, "RGB").resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(big, np.float32) / 255.0
    raise ValueError(f"unknown background {scene.background!r}")


def render_scene(
    scene: Scene, classes: Sequence[ObjectClass], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renders a scene at `size` x `size`.

    Args:
        scene: The scene description.
        classes: The world's classes (shape and texture of each object).
        size: Side in pixels.
        rng: Draws the pixel noise.

    Returns:
        (rgb uint8 HxWx3, mask uint8 HxW with 0 = background and k + 1 = class k, depth float32 HxW in metres).
    """
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(coords, coords, indexing="ij")  # y down, x right, in canvas fractions
    img = _background(scene, x, y, size).astype(np.float32)
    # Ground plane: far at the top, near at the bottom, slightly tilted.
    t = np.clip(y + scene.depth_tilt * (x - 0.5), 0, 1)
    depth = (scene.depth_far + (scene.depth_near - scene.depth_far) * t).astype(np.float32)
    mask = np.zeros((size, size), np.uint8)
    for obj in scene.objects:
        cls = classes[obj.cls]
        # Work in the object's bounding window: a square's corners reach 0.8 * sqrt(2) radii, other shapes 1.
        reach = 1.15 * obj.radius
        rows = slice(max(0, math.floor((obj.cy - reach) * size)), min(size, math.ceil((obj.cy + reach) * size)))
        cols = slice(max(0, math.floor((obj.cx - reach) * size)), min(size, math.ceil((obj.cx + reach) * size)))
        if rows.start >= rows.stop or cols.start >= cols.stop:
            continue
        ca, sa = math.cos(obj.angle), math.sin(obj.angle)
        dx, dy = (x[rows, cols] - obj.cx) / obj.radius, (y[rows, cols] - obj.cy) / obj.radius
        u, v = dx * ca + dy * sa, -dx * sa + dy * ca
        inside = _shape_inside(cls.shape, u, v)
        colour = _lerp(obj.rgb1, obj.rgb2, _texture(cls.texture, u, v, obj.tex_freq, obj.tex_phase))
        bulge = np.sqrt(1.0 - np.minimum(u * u + v * v, 1.0))
        colour *= (0.8 + 0.2 * bulge)[..., None]  # soft shading: the centre bulges towards the light
        img[rows, cols][inside] = colour[inside]
        mask[rows, cols][inside] = obj.cls + 1
        depth[rows, cols][inside] = (obj.depth_m - 0.1 * obj.radius * bulge)[inside]
    light = 1.0 + scene.light_strength * (
        (x - 0.5) * math.cos(scene.light_angle) + (y - 0.5) * math.sin(scene.light_angle)
    )
    img = img * light[..., None] * 255.0 + rng.normal(0.0, scene.noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).round().astype(np.uint8), mask, depth


# --------------------------------------------------------------------------------------------------------------------
# Encoding helpers
# --------------------------------------------------------------------------------------------------------------------


def _encode(rgb: np.ndarray, fmt: str, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(rgb)
    if fmt == "jpg":
        image.save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _write(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def hostile_png(width: int = HUGE_SIDE, height: int = HUGE_SIDE) -> bytes:
    """A valid-looking PNG whose IHDR claims width x height RGB pixels, with one tiny IDAT: a decompression bomb's
    header in a few dozen bytes. Decoding it without bounding the size would try to allocate width*height*3 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _near_copy(data: bytes, kind: str, rng: np.random.Generator, size: int) -> bytes:
    """A near-duplicate of an encoded image: crop, JPEG re-encode at another quality, colour shift or resize."""
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    h, w = rgb.shape[:2]
    if kind == "crop":
        ch, cw = int(h * rng.uniform(0.7, 0.9)), int(w * rng.uniform(0.7, 0.9))
        top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        crop = Image.fromarray(rgb[top : top + ch, left : left + cw])
        if size < 96:  # keep small worlds' crops above prepare's minimum side
            crop = crop.resize((w, h), Image.Resampling.BILINEAR)
        return _encode(np.asarray(crop), "jpg", quality=int(rng.integers(85, 96)))
    if kind == "reencode":
        return _encode(rgb, "jpg", quality=int(rng.integers(30, 61)))
    if kind == "colour":
        gain = rng.uniform(0.8, 1.2, size=3)
        shifted = rgb.astype(np.float32) * gain + rng.uniform(-20, 20)
        return _encode(np.clip(shifted, 0, 255).round().astype(np.uint8), "jpg", quality=90)
    if kind == "resize":
        scale = rng.uniform(0.6, 0.85) if size >= 96 and rng.random() < 0.5 else rng.uniform(1.2, 1.5)
        resized = Image.fromarray(rgb).resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
        return _encode(np.asarray(resized), "jpg", quality=90)
    raise ValueError(f"unknown near-duplicate kind {kind!r}")


# --------------------------------------------------------------------------------------------------------------------
# Jobs (one per image or place; each draws from its own generator so any worker count gives the same bytes)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    kind: str  # "object", "scene" (segmentation), "depth" or "place"
    stream: tuple[int, ...]
    paths: tuple[str, ...]  # object/scene: image [, mask] [, depth]; place: query then database views
    cls: int = -1
    fmt: str = "jpg"
    quality: int = 92
    targets: tuple[str, ...] = ()  # scene: which of "mask", "depth" to write beside the image


def _run_job(args: tuple[_Job, int, int, int, str]) -> None:
    job, seed, num_classes, size, root = args
    rng = np.random.default_rng(np.random.SeedSequence([seed, *job.stream]))
    classes = object_classes(num_classes)
    out = Path(root)
    if job.kind == "object":
        rgb, _, _ = render_scene(_object_scene(rng, classes, job.cls), classes, size, rng)
        _write(out, job.paths[0], _encode(rgb, job.fmt, job.quality))
    elif job.kind in ("scene", "depth"):
        scene = _depth_scene(rng, classes) if job.kind == "depth" else _multi_scene(rng, classes, (2, 4))
        rgb, mask, depth = render_scene(scene, classes, size, rng)
        _write(out, job.paths[0], _encode(rgb, job.fmt, job.quality))
        for rel, target in zip(job.paths[1:], job.targets, strict=True):
            if target == "mask":
                image = Image.fromarray(mask, "L")
            else:
                image = Image.fromarray(np.clip(depth * DEPTH_SCALE, 1, 65535).round().astype(np.uint16))
            buf = io.BytesIO()
            image.save(buf, format="PNG", compress_level=3)
            _write(out, rel, buf.getvalue())
    elif job.kind == "place":
        _render_place(rng, classes, size, out, job.paths)
    else:
        raise ValueError(f"unknown job kind {job.kind!r}")


def _render_place(
    rng: np.random.Generator, classes: Sequence[ObjectClass], size: int, out: Path, paths: Sequence[str]
) -> None:
    """A fixed scene on a canvas twice the image side, seen through shifted, zoomed and differently lit windows."""
    canvas = 2 * size
    count = int(rng.integers(4, 7))
    picks = rng.integers(len(classes), size=count)
    objects = [_random_object(rng, classes[int(c)], radius=(0.07, 0.15), depth=(1.0, 3.0)) for c in picks]
    rgb, _, _ = render_scene(_random_scene(rng, objects), classes, canvas, rng)
    base = Image.fromarray(rgb)
    for rel in paths:
        side = rng.uniform(0.6, 0.85)
        left = float(np.clip(0.5 - side / 2 + rng.uniform(-0.15, 0.15), 0, 1 - side))
        top = float(np.clip(0.5 - side / 2 + rng.uniform(-0.15, 0.15), 0, 1 - side))
        box = (left * canvas, top * canvas, (left + side) * canvas, (top + side) * canvas)
        view = np.asarray(base.resize((size, size), Image.Resampling.BILINEAR, box=box), np.float32) / 255.0
        gain, cast, gamma = rng.uniform(0.75, 1.25), rng.uniform(0.92, 1.08, size=3), rng.uniform(0.85, 1.15)
        view = np.clip(view**gamma * gain * cast, 0, 1) * 255.0
        _write(out, rel, _encode(view.round().astype(np.uint8), "jpg", 92))


# --------------------------------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------------------------------


def dense_split_sizes(cfg: SyntheticConfig) -> dict[str, int]:
    """Scenes per split of the segmentation and depth sets (derived: there are no config keys for them)."""
    return {
        "train": max(4, cfg.num_classes * cfg.eval_train_per_class // 2),
        "val": max(4, cfg.num_classes * cfg.eval_val_per_class // 2),
    }


def _pool_name(rng: np.random.Generator, ident: int, ext: str) -> str:
    sub = POOL_SUBDIRS[int(rng.integers(len(POOL_SUBDIRS)))]
    return "/".join(p for p in ("pool", sub, f"img_{ident:05d}.{ext}") if p)


def render_world(cfg: SyntheticConfig, seed: int, out_dir: str | Path, *, num_workers: int | None = None) -> dict:
    """Renders the synthetic world into `out_dir` and writes `ground_truth.json` there.

    The world is rendered into a sibling temporary folder, then its parts are moved into `out_dir` with
    `ground_truth.json` last, so a `ground_truth.json` marks a complete world. Other files in `out_dir` (a stage's
    resolved config) are kept. A previous world's pool/, seeds/ and eval/ are replaced; the same folders without a
    `ground_truth.json` are a user's data, and raise rather than being deleted.

    Args:
        cfg: The `synthetic` section.
        seed: The top-level seed; same seed and config give byte-identical files.
        out_dir: Root of the raw layout to create.
        num_workers: Rendering processes; None uses every available core, 0 renders in this process.

    Returns:
        The ground truth (also written to `out_dir/ground_truth.json`).
    """
    out_dir = Path(out_dir)
    if any((out_dir / part).exists() for part in _WORLD_PARTS) and not (out_dir / "ground_truth.json").is_file():
        raise FileExistsError(f"{out_dir}: holds raw data that is not a synthetic world; refusing to replace it")
    classes = object_classes(cfg.num_classes)
    names = [c.name for c in classes]
    plan_rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG["plan"]]))
    jobs: list[_Job] = []
    truth: dict[str, Any] = {
        "version": 1,
        "seed": seed,
        "synthetic": cfg.model_dump(mode="json"),
        "classes": [
            {"index": c.index, "name": c.name, "shape": c.shape, "texture": c.texture, "colour": c.colour}
            for c in classes
        ],
    }
    truth["classification"], truth["seed_sets"] = _plan_classification(cfg, names, jobs)
    truth["segmentation"], truth["depth"] = _plan_dense(cfg, classes, jobs)
    truth["retrieval"] = _plan_places(cfg, jobs)
    pool = _plan_pool(cfg, names, plan_rng, jobs)
    truth["pool"] = {"images": pool.labels}

    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _run_jobs(jobs, seed, cfg.num_classes, cfg.image_size, tmp, num_workers)
        _plant_pool_copies(tmp, cfg, seed, names, pool, plan_rng, truth)
        _move_into_place(tmp, out_dir, truth)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return truth


def _plan_classification(
    cfg: SyntheticConfig, names: Sequence[str], jobs: list[_Job]
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """Classification sets and the seed set: one dominant object per image. Returns (classification, seed_sets)."""
    classification: dict[str, dict[str, str]] = {}
    for split, per_class in (
        ("train", cfg.eval_train_per_class),
        ("val", cfg.eval_val_per_class),
        ("test", cfg.eval_test_per_class),
    ):
        classification[split] = {}
        for k, name in enumerate(names):
            for i in range(per_class):
                rel = f"eval/classification/{split}/{name}/{split}_{i:04d}.jpg"
                jobs.append(_Job("object", (_TAG["cls"], _SPLIT_ID[split], k, i), (rel,), cls=k))
                classification[split][rel] = name
    seeds: dict[str, str] = {}
    for k, name in enumerate(names):
        for i in range(cfg.seed_per_class):
            rel = f"seeds/{SEED_SET}/{name}/seed_{i:04d}.jpg"
            jobs.append(_Job("object", (_TAG["seed"], k, i), (rel,), cls=k))
            seeds[rel] = name
    return classification, {SEED_SET: seeds}


def _plan_dense(
    cfg: SyntheticConfig, classes: Sequence[ObjectClass], jobs: list[_Job]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Segmentation and depth: separate scenes (the same scene in both would be an exact cross-task duplicate)."""
    dense: dict[str, dict[str, list[str]]] = {"segmentation": {}, "depth": {}}
    # (task, target folder, target written, job kind, stream tag)
    for task, folder, target, job_kind, tag in (
        ("segmentation", "masks", "mask", "scene", _TAG["seg"]),
        ("depth", "depth", "depth", "depth", _TAG["depth"]),
    ):
        for split, count in dense_split_sizes(cfg).items():
            ids = [f"{split}_{i:05d}" for i in range(count)]
            dense[task][split] = ids
            for i, ident in enumerate(ids):
                paths = (f"eval/{task}/{split}/images/{ident}.png", f"eval/{task}/{split}/{folder}/{ident}.png")
                jobs.append(_Job(job_kind, (tag, _SPLIT_ID[split], i), paths, fmt="png", targets=(target,)))
    segmentation = {
        "splits": dense["segmentation"],
        "mask_values": {"0": "background", **{str(c.index + 1): c.name for c in classes}},
        "ignore_index": 255,
    }
    return segmentation, {"splits": dense["depth"], "depth_scale": DEPTH_SCALE, "invalid_value": 0}


def _plan_places(cfg: SyntheticConfig, jobs: list[_Job]) -> dict[str, Any]:
    """Places: view 0 is the query, the others the database."""
    places: dict[str, dict[str, list[str]]] = {}
    for p in range(cfg.num_places):
        place = f"place_{p:03d}"
        query = [f"eval/retrieval/query/{place}/view_0.jpg"]
        database = [f"eval/retrieval/database/{place}/view_{v}.jpg" for v in range(1, cfg.views_per_place)]
        places[place] = {"query": query, "database": database}
        jobs.append(_Job("place", (_TAG["place"], p), (*query, *database)))
    return {"places": places}


@dataclass(frozen=True)
class _PoolPlan:
    """The pool's rendered images and which of them get planted copies."""

    labels: dict[str, str | None]
    """Relative path -> class name (None for multi-object scenes)."""
    paths: list[str]
    originals: list[int]
    """Pool rows that get near-copies."""
    copies_per: list[int]
    idents: list[int]
    """A permutation of file numbers: planted copies are not told apart by their number."""


def _plan_pool(
    cfg: SyntheticConfig, names: Sequence[str], plan_rng: np.random.Generator, jobs: list[_Job]
) -> _PoolPlan:
    """The pool: names drawn from a permutation so that planted copies are not told apart by their number."""
    num_dup = round(cfg.duplicate_fraction * cfg.pool_size)
    originals = sorted(plan_rng.choice(cfg.pool_size, size=num_dup, replace=False).tolist()) if num_dup else []
    copies_per = [1 + int(plan_rng.random() < 0.3) for _ in originals]
    num_leaks = cfg.leak_per_class * cfg.num_classes if cfg.eval_test_per_class else 0
    idents = plan_rng.permutation(cfg.pool_size + sum(copies_per) + num_leaks).tolist()
    pool_labels: dict[str, str | None] = {}
    pool_paths: list[str] = []
    for i in range(cfg.pool_size):
        ext = "png" if plan_rng.random() < 0.2 else "jpg"
        rel = _pool_name(plan_rng, idents[i], ext)
        if plan_rng.random() < 0.25:
            jobs.append(_Job("scene", (_TAG["pool"], i), (rel,), fmt=ext))
            pool_labels[rel] = None
        else:
            k = int(plan_rng.integers(cfg.num_classes))
            quality = int(plan_rng.integers(80, 96))
            jobs.append(_Job("object", (_TAG["pool"], i), (rel,), cls=k, fmt=ext, quality=quality))
            pool_labels[rel] = names[k]
        pool_paths.append(rel)
    return _PoolPlan(pool_labels, pool_paths, originals, copies_per, idents)


def _plant_pool_copies(
    tmp: Path,
    cfg: SyntheticConfig,
    seed: int,
    names: Sequence[str],
    pool: _PoolPlan,
    plan_rng: np.random.Generator,
    truth: dict[str, Any],
) -> None:
    """Near-duplicates, evaluation leaks and bad files into the rendered pool; their ground truth into `truth`."""
    size = cfg.image_size
    truth["near_duplicates"], next_ident = _plant_duplicates(
        tmp, seed, size, pool.paths, pool.originals, pool.copies_per, pool.idents, cfg.pool_size, plan_rng
    )
    test_images = truth["classification"].get("test", {})
    truth["leaks"] = _plant_leaks(tmp, seed, size, test_images, names, cfg, pool.idents, next_ident)
    truth["bad_files"] = _plant_bad_files(tmp, seed, cfg.num_classes, size) if cfg.bad_files else []
    truth["counts"] = _counts(truth)


def _move_into_place(tmp: Path, out_dir: Path, truth: dict[str, Any]) -> None:
    """Writes the metadata files, then moves the rendered parts into `out_dir`, `ground_truth.json` last."""
    truth_path = out_dir / "ground_truth.json"
    (tmp / "eval" / "depth").mkdir(parents=True, exist_ok=True)
    meta = {"depth_scale": DEPTH_SCALE, "invalid_value": 0, "unit": "metre"}
    write_json(tmp / "eval" / "depth" / "meta.json", meta, indent=1, sort_keys=True)
    write_json(tmp / "ground_truth.json", truth, indent=1, sort_keys=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    truth_path.unlink(missing_ok=True)  # from here until the end the folder reads as incomplete
    for part in _WORLD_PARTS:
        shutil.rmtree(out_dir / part, ignore_errors=True)
        if (tmp / part).exists():  # no pool/ when pool_size is 0 and no bad files are planted
            (tmp / part).rename(out_dir / part)
    (tmp / "ground_truth.json").rename(truth_path)
    tmp.rmdir()


def is_synthetic_world(uris: Sequence[str]) -> bool:
    """True when these (pool) URIs lie in a rendered synthetic world: a folder above them holds its
    `ground_truth.json`. S3 URIs and tar members are looked up by their local part only; an empty list is False."""
    roots: dict[Path, bool] = {}
    found = False
    for uri in uris:
        path = Path(str(uri).split("::", 1)[0])
        if str(uri).startswith("s3://"):
            return False
        for parent in list(path.parents)[:8]:
            if parent not in roots:
                truth = parent / "ground_truth.json"
                roots[parent] = truth.is_file() and (parent / "pool").is_dir()
            if roots[parent]:
                found = True
                break
        else:
            return False
    return found


def _counts(truth: dict[str, Any]) -> dict[str, int]:
    """Input files per part of the world (targets, meta.json and ground_truth.json are not inputs)."""
    places = truth["retrieval"]["places"].values()
    return {
        "classification": sum(len(images) for images in truth["classification"].values()),
        "seeds": sum(len(images) for images in truth["seed_sets"].values()),
        "segmentation": sum(len(ids) for ids in truth["segmentation"]["splits"].values()),
        "depth": sum(len(ids) for ids in truth["depth"]["splits"].values()),
        "retrieval": sum(len(p["query"]) + len(p["database"]) for p in places),
        "pool": len(truth["pool"]["images"]),
        "near_duplicates": sum(len(group["copies"]) for group in truth["near_duplicates"]),
        "leaks": len(truth["leaks"]),
        "bad_files": len(truth["bad_files"]),
    }


def _run_jobs(
    jobs: Sequence[_Job], seed: int, num_classes: int, size: int, root: Path, num_workers: int | None
) -> None:
    args = [(job, seed, num_classes, size, str(root)) for job in jobs]
    if num_workers is None:
        num_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if num_workers <= 1 or len(jobs) < 64:
        for a in args:
            _run_job(a)
        return
    ctx = mp_context(preload=[__name__])
    chunk = max(1, min(32, len(args) // (num_workers * 4)))
    with ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx) as pool:
        for _ in pool.map(_run_job, args, chunksize=chunk):
            pass


def _plant_duplicates(
    root: Path,
    seed: int,
    size: int,
    pool_paths: Sequence[str],
    originals: Sequence[int],
    copies_per: Sequence[int],
    idents: Sequence[int],
    next_ident: int,
    plan_rng: np.random.Generator,
) -> tuple[list[dict[str, Any]], int]:
    """Near-copies of pool images in other pool folders; the first group's copy is byte-identical."""
    groups = []
    for g, (i, num) in enumerate(zip(originals, copies_per, strict=True)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG["dup"], i]))
        data = (root / pool_paths[i]).read_bytes()
        copies = []
        for c in range(num):
            if g == 0 and c == 0:
                kind, blob, ext = "exact", data, pool_paths[i].rsplit(".", 1)[1]
            else:
                kind = DUPLICATE_KINDS[int(rng.integers(len(DUPLICATE_KINDS)))]
                blob, ext = _near_copy(data, kind, rng, size), "jpg"
            rel = _pool_name(plan_rng, idents[next_ident], ext)
            next_ident += 1
            _write(root, rel, blob)
            copies.append({"path": rel, "kind": kind})
        groups.append({"original": pool_paths[i], "copies": copies})
    return groups, next_ident


def _plant_leaks(
    root: Path,
    seed: int,
    size: int,
    test_images: dict[str, str],
    names: Sequence[str],
    cfg: SyntheticConfig,
    idents: Sequence[int],
    next_ident: int,
) -> list[dict[str, str]]:
    """Near-copies of evaluation test images put into the pool; the very first is byte-identical."""
    leaks = []
    for k, name in enumerate(names):
        candidates = sorted(rel for rel, label in test_images.items() if label == name)
        if not candidates:
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG["leak"], k]))
        for j in range(cfg.leak_per_class):
            source = candidates[int(rng.integers(len(candidates)))]
            data = (root / source).read_bytes()
            if k == 0 and j == 0:
                kind, blob, ext = "exact", data, "jpg"
            else:
                kind = DUPLICATE_KINDS[int(rng.integers(len(DUPLICATE_KINDS)))]
                blob, ext = _near_copy(data, kind, rng, size), "jpg"
            rel = _pool_name(rng, idents[next_ident], ext)
            next_ident += 1
            _write(root, rel, blob)
            leaks.append({"path": rel, "eval_path": source, "kind": kind})
    return leaks


def _plant_bad_files(root: Path, seed: int, num_classes: int, size: int) -> list[dict[str, str]]:
    """Corrupt and hostile files, each with the reason prepare must give when rejecting it."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG["bad"]]))
    classes = object_classes(num_classes)
    rgb, _, _ = render_scene(_object_scene(rng, classes, 0), classes, size, rng)
    jpeg = _encode(rgb, "jpg", 92)
    tiny = np.asarray(Image.fromarray(rgb).resize((16, 16), Image.Resampling.BILINEAR))
    bad = {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "empty.jpg": (b"", "empty"),
        "notes.jpg": (b"this is a text file, not an image\n", "not_an_image"),
        "tiny.png": (_encode(tiny, "png"), "too_small"),
        "huge_header.png": (hostile_png(), "too_large"),
        "readme.txt": (b"files the pool picked up on the way\n", "not_an_image"),
    }
    planted = []
    for name, (blob, reason) in bad.items():
        rel = f"pool/{BAD_DIR}/{name}"
        _write(root, rel, blob)
        planted.append({"path": rel, "reason": reason})
    return planted
