"""The 15 ImageNet-C corruptions at 5 severities (Hendrycks & Dietterich 2019), in numpy, scipy and PIL.

Constants are those of the reference implementation (`imagenet_c/corruptions.py`), which corrupts 224 x 224 crops.
Our evaluation images are often smaller (56 px in the demo), so every *spatial* constant (blur radii and sigmas,
displacements, shuffle distances, snow-flake streaks) is scaled by s = min(H, W) / 224: a corruption then removes the
same share of the image's detail at any size. Scale-free constants (noise levels, zoom factors, pixelation ratios,
JPEG qualities, contrast and brightness factors) are used as published. At 224 px the two coincide.

Where the reference calls a library that this project does not depend on, the equivalent is written here:
- skimage's Gaussian filter and salt-and-pepper noise, OpenCV's filter2D / warpAffine: scipy.ndimage equivalents
  with the same border modes (reflect-101 is scipy's `mirror`);
- ImageMagick's motion blur (used by `motion_blur` and `snow`): its kernel re-implemented, a one-sided line of
  2 * ceil(radius) + 1 taps with Gaussian weights exp(-i^2 / 2 sigma^2), pixels taken at rounded offsets along the
  angle, edges clamped;
- frost: the reference blends a random crop of one of six photographs of frost on glass shipped with the package.
  Nothing is downloaded here: `frost_texture` synthesises six equivalent "photographs" once, from a fixed seed
  (branching ice crystals drawn as thin bright segments, their density modulated by a plasma fractal, bluish white,
  normalised to the photographs' typical mean brightness of about 0.45), and each image blends a random crop of one
  of them with the published weights. Frost errors are therefore comparable between models
  evaluated here, not to published ImageNet-C frost numbers.
- glass blur keeps the reference's pixel "swap", which (a numpy aliasing quirk) copies the neighbour into the pixel
  rather than exchanging them; it is what ImageNet-C contains.

Each call draws from its own generator, seeded from (seed, corruption, severity, image index) by `corrupt_images`,
so a corrupted set is the same whatever the batch order or the number of models evaluated. The result is kept in
memory as uint8; unlike the released ImageNet-C files it is not re-encoded as JPEG.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
"""The 15 ImageNet-C corruptions, in the paper's order (noise, blur, weather, digital)."""

SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIDE = 224
"""Side of the crops the reference constants were written for."""

Array = np.ndarray


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def _scale(x: Array) -> float:
    return min(x.shape[:2]) / REFERENCE_SIDE


def _gaussian(x: Array, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> Array:
    """skimage.filters.gaussian on an (H, W) or (H, W, C) image: spatial axes only."""
    sigmas = (sigma, sigma, 0.0)[: x.ndim]
    return ndimage.gaussian_filter(x, sigma=sigmas, mode=mode, truncate=truncate)


def _disk(radius: float, alias_blur: float) -> Array:
    """The reference's anti-aliased disk kernel: a filled disk of `radius`, blurred by a small Gaussian, sum 1."""
    half = max(1, math.ceil(radius)) + 1
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    kernel = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    if kernel.sum() == 0:  # a radius below half a pixel: the centre pixel alone
        kernel[half, half] = 1.0
    kernel /= kernel.sum()
    # cv2.GaussianBlur with a 3x3 (radius <= 8) or 5x5 kernel of sigma alias_blur, borders reflect-101.
    ksize = 3 if radius <= 8 else 5
    taps = np.arange(ksize) - ksize // 2
    g = np.exp(-(taps**2) / (2 * max(alias_blur, 1e-6) ** 2))
    g /= g.sum()
    kernel = ndimage.convolve1d(ndimage.convolve1d(kernel, g, axis=0, mode="mirror"), g, axis=1, mode="mirror")
    return kernel / kernel.sum()


def _clipped_zoom(img: Array, zoom: float) -> Array:
    """Zooms the central 1/zoom of the image back to full size (bilinear), as the reference (non-square allowed)."""
    h, w = img.shape[:2]
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    factors = (zoom, zoom) + (1,) * (img.ndim - 2)
    out = ndimage.zoom(img[top : top + ch, left : left + cw], factors, order=1)
    trim_top, trim_left = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    return out[trim_top : trim_top + h, trim_left : trim_left + w]


def _motion_blur(x: Array, radius: float, sigma: float, angle_deg: float) -> Array:
    """ImageMagick's MotionBlurImage: a one-sided Gaussian-weighted line of taps along `angle`, edges clamped."""
    width = 2 * math.ceil(radius) + 1 if radius > 0 else 1
    i = np.arange(width, dtype=np.float64)
    weights = np.exp(-(i**2) / (2 * max(sigma, 1e-6) ** 2))
    weights /= weights.sum()
    theta = math.radians(angle_deg)
    # ImageMagick: offset.x = ceil(i * cos - 0.5), offset.y = ceil(i * sin - 0.5) (point = width*(sin, cos), unit).
    off_x = np.ceil(i * math.cos(theta) - 0.5).astype(int)
    off_y = np.ceil(i * math.sin(theta) - 0.5).astype(int)
    h, w = x.shape[:2]
    rows, cols = np.arange(h), np.arange(w)
    out = np.zeros_like(x, dtype=np.float64)
    for wt, dx, dy in zip(weights, off_x, off_y, strict=True):
        r = np.clip(rows + dy, 0, h - 1)
        c = np.clip(cols + dx, 0, w - 1)
        out += wt * x[r][:, c]
    return out


def plasma_fractal(rng: np.random.Generator, mapsize: int = 256, wibbledecay: float = 3.0) -> Array:
    """Diamond-square height map in [0, 1] (the reference's fog generator), `mapsize` a power of two."""
    if mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two, got {mapsize}")
    maparray = np.empty((mapsize, mapsize), dtype=np.float64)
    maparray[0, 0] = 0
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array: Array) -> Array:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        # squares: the centre of each square of corners gets their mean plus noise
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        square = corners + np.roll(corners, shift=-1, axis=0)
        square += np.roll(square, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(square)
        # diamonds: edge midpoints get the mean of their diamond's corners plus noise
        centres = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ltsum)
        ttsum = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return maparray / maparray.max()


def _resize_float(a: Array, h: int, w: int) -> Array:
    """Resizes a float (H, W) map with PIL's bilinear filter, which widens its support when shrinking (antialiased),
    so thin structures fade rather than alias. PIL, not torch: corruption workers must not touch OpenMP after a fork."""
    if a.shape == (h, w):
        return a
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64)


def _reference_canvas(h: int, w: int) -> tuple[tuple[int, int], float]:
    """Size at which to draw a structured layer (snow, frost) so its structures have the reference's pixel scale.

    Below 224 px the layer is drawn at 224 on the short side and shrunk afterwards; at or above it, at the image's
    size with the spatial constants scaled by s. Returns ((height, width), s for the drawing).
    """
    s = min(h, w) / REFERENCE_SIDE
    if s >= 1:
        return (h, w), s
    return (max(1, round(h / s)), max(1, round(w / s))), 1.0


FROST_BANK_SIZE = 6
"""Frost "photographs" synthesised once (the reference ships six)."""
FROST_PHOTO_SIDE = 320
"""Side of each synthesised frost photograph at the reference scale; a 224 crop of it is used per image."""
FROST_BANK_SEED = 20190328
"""Fixed seed of the frost bank: like the reference's files, the textures are constants of the benchmark."""


def frost_texture(side: int, rng: np.random.Generator) -> Array:
    """A synthetic frost photograph (side, side, 3) in [0, 1] at the reference scale.

    Ice crystals are drawn as dendrites: short bright segments (3 to 12 px) that random-walk from a seed and sprout
    side branches at +-60 degrees (the hexagonal habit of ice), on a haze whose density follows a plasma fractal
    (frost is patchy). The layer is tinted bluish white and normalised to a mean of about 0.45, the typical
    brightness of the reference's photographs.
    """
    density = _resize_float(plasma_fractal(rng, 256, 2.0), side, side)
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(160 * side * side / REFERENCE_SIDE**2)):
        x, y = rng.uniform(0, side), rng.uniform(0, side)
        angle = rng.uniform(0, 2 * math.pi)
        brightness = int(rng.uniform(120, 255))
        stack = [(x, y, angle, 0)]
        while stack:
            x0, y0, a0, depth = stack.pop()
            for _ in range(int(rng.integers(2, 6))):
                length = rng.uniform(3, 12)
                x1, y1 = x0 + length * math.cos(a0), y0 + length * math.sin(a0)
                draw.line([(x0, y0), (x1, y1)], fill=brightness, width=1)
                if depth < 2 and rng.random() < 0.5:
                    stack.append((x1, y1, a0 + rng.choice((-1, 1)) * math.pi / 3, depth + 1))
                x0, y0, a0 = x1, y1, a0 + rng.normal(0, 0.2)
    crystals = _gaussian(np.asarray(canvas, np.float64) / 255.0, 0.6)
    layer = crystals * (0.5 + density) + 0.35 * density
    layer = layer / max(layer.mean(), 1e-6) * 0.45
    tint = np.array([0.88, 0.94, 1.0])
    return np.clip(layer[..., None] * tint, 0, 1)


@functools.cache
def _frost_bank() -> tuple[Array, ...]:
    rng = np.random.default_rng(FROST_BANK_SEED)
    return tuple(frost_texture(FROST_PHOTO_SIDE, rng) for _ in range(FROST_BANK_SIZE))


def _frost_layer(h: int, w: int, rng: np.random.Generator) -> Array:
    """A random crop of a random frost photograph, at the reference scale, resized to (h, w)."""
    photo = _frost_bank()[int(rng.integers(FROST_BANK_SIZE))]
    (rh, rw), _ = _reference_canvas(h, w)
    reps = (math.ceil(rh / photo.shape[0]), math.ceil(rw / photo.shape[1]), 1)  # large images: tile the photograph
    photo = np.tile(photo, reps) if reps != (1, 1, 1) else photo
    top = int(rng.integers(0, photo.shape[0] - rh + 1))
    left = int(rng.integers(0, photo.shape[1] - rw + 1))
    crop = photo[top : top + rh, left : left + rw]
    return np.stack([_resize_float(crop[..., d], h, w) for d in range(3)], axis=-1)


def _affine_matrix(src: Array, dst: Array) -> Array:
    """The 2x3 affine map (x, y order) taking three `src` points to `dst` (cv2.getAffineTransform)."""
    a = np.hstack([src, np.ones((3, 1))])  # (3, 3)
    return np.linalg.solve(a, dst).T  # (2, 3)


# --------------------------------------------------------------------------------------------------------------------
# The corruptions: x is float (H, W, 3) in [0, 1]; each returns float in [0, 1]
# --------------------------------------------------------------------------------------------------------------------


def gaussian_noise(x: Array, severity: int, rng: np.random.Generator) -> Array:
    c = [0.08, 0.12, 0.18, 0.26, 0.38][severity - 1]
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1)


def shot_noise(x: Array, severity: int, rng: np.random.Generator) -> Array:
    c = [60, 25, 12, 5, 3][severity - 1]
    return np.clip(rng.poisson(x * c) / float(c), 0, 1)


def impulse_noise(x: Array, severity: int, rng: np.random.Generator) -> Array:
    # skimage.util.random_noise(mode="s&p", amount=c): each value independently, half salt, half pepper.
    c = [0.03, 0.06, 0.09, 0.17, 0.27][severity - 1]
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    out = x.copy()
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


def defocus_blur(x: Array, severity: int, rng: np.random.Generator) -> Array:
    radius, alias = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)][severity - 1]
    kernel = _disk(radius * _scale(x), alias)
    channels = [ndimage.convolve(x[..., d], kernel, mode="mirror") for d in range(x.shape[2])]
    return np.clip(np.stack(channels, axis=-1), 0, 1)


def glass_blur(x: Array, severity: int, rng: np.random.Generator) -> Array:
    sigma, max_delta, iterations = [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)][severity - 1]
    s = _scale(x)
    sigma, delta = sigma * s, max(1, round(max_delta * s))
    blurred = np.uint8(_gaussian(x, sigma) * 255)  # (H, W, 3), truncated to uint8 as the reference
    h, w = x.shape[:2]
    # Locally shuffle pixels: the sequential loop of the reference, run on a flat index map (cheap) rather than on
    # the pixels; the reference's "swap" copies the neighbour into the pixel (see the module docstring).
    index = list(range(h * w))
    for _ in range(iterations):
        rows = range(h - delta, delta, -1)  # as the reference: side - delta down to delta + 1
        cols = range(w - delta, delta, -1)
        jumps = rng.integers(-delta, delta, size=(len(rows), len(cols), 2))  # (dx, dy), high exclusive
        for ri, r in enumerate(rows):
            base = r * w
            for ci, c in enumerate(cols):
                dx, dy = jumps[ri, ci]
                index[base + c] = index[(r + dy) * w + c + dx]
    shuffled = blurred.reshape(h * w, -1)[np.asarray(index)].reshape(blurred.shape)
    return np.clip(_gaussian(shuffled / 255.0, sigma), 0, 1)


def motion_blur(x: Array, severity: int, rng: np.random.Generator) -> Array:
    radius, sigma = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][severity - 1]
    s = _scale(x)
    return np.clip(_motion_blur(x, radius * s, sigma * s, rng.uniform(-45, 45)), 0, 1)


def zoom_blur(x: Array, severity: int, rng: np.random.Generator) -> Array:
    zooms = [
        np.arange(1, 1.11, 0.01),
        np.arange(1, 1.16, 0.01),
        np.arange(1, 1.21, 0.02),
        np.arange(1, 1.26, 0.02),
        np.arange(1, 1.31, 0.03),
    ][severity - 1]
    x = x.astype(np.float32)
    out = np.zeros_like(x)
    for zoom in zooms:
        out += _clipped_zoom(x, float(zoom))
    return np.clip((x + out) / (len(zooms) + 1), 0, 1)


def snow(x: Array, severity: int, rng: np.random.Generator) -> Array:
    c = [
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    ][severity - 1]
    h, w = x.shape[:2]
    # The flake layer is drawn at the reference resolution with the published constants, then resized: the zoom
    # factor c[2] sets the flake size in pixels, so drawing at the image's own size would enlarge small images' flakes.
    (rh, rw), s = _reference_canvas(h, w)
    flakes = rng.normal(size=(rh, rw), loc=c[0], scale=c[1])
    flakes = _clipped_zoom(flakes[..., None], c[2])[..., 0]
    flakes[flakes < c[3]] = 0
    flakes = np.uint8(np.clip(flakes, 0, 1) * 255) / 255.0  # the reference round-trips through an 8-bit PNG
    flakes = _motion_blur(flakes, c[4] * s, c[5] * s, rng.uniform(-135, -45))
    flakes = np.uint8(np.clip(flakes, 0, 1) * 255) / 255.0
    flakes = _resize_float(flakes, h, w)[..., None]
    gray = (x @ np.array([0.299, 0.587, 0.114]))[..., None]  # cv2.COLOR_RGB2GRAY
    x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
    return np.clip(x + flakes + np.rot90(flakes, k=2), 0, 1)


def frost(x: Array, severity: int, rng: np.random.Generator) -> Array:
    c = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)][severity - 1]
    return np.clip(c[0] * x + c[1] * _frost_layer(x.shape[0], x.shape[1], rng), 0, 1)


def fog(x: Array, severity: int, rng: np.random.Generator) -> Array:
    c = [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)][severity - 1]
    max_val = x.max()
    # The reference crops 224 x 224 of a 256 map; that crop is resized to the image so the fog keeps its scale.
    fractal = plasma_fractal(rng, 256, c[1])[:REFERENCE_SIDE, :REFERENCE_SIDE]
    x = x + c[0] * _resize_float(fractal, x.shape[0], x.shape[1])[..., None]
    return np.clip(x * max_val / (max_val + c[0]), 0, 1)


def brightness(x: Array, severity: int, rng: np.random.Generator) -> Array:
    # The reference adds c to V in HSV. With H and S fixed, RGB scales linearly with V = max(R, G, B), so the
    # round trip is RGB * V' / V (grey V' where V = 0), exact and without the colour-space conversion.
    c = [0.1, 0.2, 0.3, 0.4, 0.5][severity - 1]
    x = np.clip(x, 0, 1)
    v = x.max(axis=-1, keepdims=True)
    v_new = np.clip(v + c, 0, 1)
    scaled = x * np.divide(v_new, v, out=np.zeros_like(v), where=v > 0)
    return np.clip(np.where(v > 0, scaled, v_new), 0, 1)


def contrast(x: Array, severity: int, rng: np.random.Generator) -> Array:
    c = [0.4, 0.3, 0.2, 0.1, 0.05][severity - 1]
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1)


def elastic_transform(x: Array, severity: int, rng: np.random.Generator) -> Array:
    # (alpha, sigma, affine jitter) at 224 px; "244 should have been 256, but ultimately nothing is incorrect".
    c = [
        (244 * 2, 244 * 0.7, 244 * 0.1),
        (244 * 2, 244 * 0.08, 244 * 0.2),
        (244 * 0.05, 244 * 0.01, 244 * 0.02),
        (244 * 0.07, 244 * 0.01, 244 * 0.02),
        (244 * 0.12, 244 * 0.01, 244 * 0.02),
    ][severity - 1]
    s = _scale(x)
    # The smoothed noise's amplitude falls as 1 / sigma, so alpha scales with s^2 for displacements that scale with s.
    alpha, sigma, jitter = c[0] * s * s, c[1] * s, c[2] * s
    h, w = x.shape[:2]
    # random affine (cv2.getAffineTransform + warpAffine with BORDER_REFLECT_101)
    centre = np.float64([w, h]) // 2
    side = min(h, w) // 3
    pts1 = np.float64([centre + side, [centre[0] + side, centre[1] - side], centre - side])
    pts2 = pts1 + rng.uniform(-jitter, jitter, size=pts1.shape)
    m = _affine_matrix(pts1, pts2)  # src (x, y) -> dst (x, y)
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]  # dst -> src, what a pull-back warp samples
    # affine_transform works in (row, col): swap x and y in the matrix and the offset.
    matrix = np.array([[inv[1, 1], inv[1, 0]], [inv[0, 1], inv[0, 0]]])
    offset = np.array([inv[1, 2], inv[0, 2]])
    warped = np.stack(
        [ndimage.affine_transform(x[..., d], matrix, offset, order=1, mode="mirror") for d in range(x.shape[2])],
        axis=-1,
    )
    dx = _gaussian(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
    dy = _gaussian(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out = np.stack(
        [ndimage.map_coordinates(warped[..., d], [yy + dy, xx + dx], order=1, mode="reflect") for d in range(3)],
        axis=-1,
    )
    return np.clip(out, 0, 1)


def pixelate(x: Array, severity: int, rng: np.random.Generator) -> Array:
    c = [0.6, 0.5, 0.4, 0.3, 0.25][severity - 1]
    h, w = x.shape[:2]
    img = Image.fromarray(np.uint8(np.clip(x, 0, 1) * 255))
    img = img.resize((max(1, int(w * c)), max(1, int(h * c))), Image.Resampling.BOX)
    return np.asarray(img.resize((w, h), Image.Resampling.BOX), np.float64) / 255.0


def jpeg_compression(x: Array, severity: int, rng: np.random.Generator) -> Array:
    c = [25, 18, 15, 10, 7][severity - 1]
    buf = io.BytesIO()
    Image.fromarray(np.uint8(np.clip(x, 0, 1) * 255)).save(buf, "JPEG", quality=c)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), np.float64) / 255.0


_FUNCTIONS: dict[str, Callable[[Array, int, np.random.Generator], Array]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}
assert tuple(_FUNCTIONS) == CORRUPTIONS


# --------------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------------


def corrupt(image: Array, name: str, severity: int, rng: np.random.Generator) -> Array:
    """Applies one corruption to one image.

    Args:
        image: (H, W, 3) uint8 RGB.
        name: One of `CORRUPTIONS`.
        severity: 1 (mild) to 5 (severe).
        rng: The generator this image's randomness is drawn from.

    Returns:
        (H, W, 3) uint8, the same size as the input.
    """
    if name not in _FUNCTIONS:
        raise KeyError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    out = _FUNCTIONS[name](image.astype(np.float64) / 255.0, severity, rng)
    return np.uint8(np.clip(out, 0, 1) * 255 + 0.5)


def corrupt_images(images: Array, name: str, severity: int, seed: int) -> Array:
    """Applies one corruption to a stack of images, each with its own seeded generator.

    Args:
        images: (N, H, W, 3) uint8.
        name: One of `CORRUPTIONS`.
        severity: 1 to 5.
        seed: Base seed; image i uses SeedSequence([seed, corruption index, severity, i]).

    Returns:
        (N, H, W, 3) uint8.
    """
    index = CORRUPTIONS.index(name) if name in CORRUPTIONS else -1
    out = np.empty_like(images)
    for i, image in enumerate(images):
        rng = np.random.default_rng(np.random.SeedSequence([seed, index + 1, severity, i]))
        out[i] = corrupt(image, name, severity, rng)
    return out
