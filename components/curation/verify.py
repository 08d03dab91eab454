"""Verification of candidate copies by local features with geometric consistency (OpenCV).

A global embedding says two images look alike; it cannot say whether one is an edit of the other or a different
photo of the same kind of scene. Local features can: a copy (re-encoded, rescaled, cropped, recoloured, tilted,
captioned, framed) keeps most of its keypoints where a similarity transform of the other image puts them, while two
distinct images, even two crops of one photo, do not. The recipe is the classic one (Lowe 2004; Philbin et al. 2007;
the copy-detection baselines of DISC21):

1. each image, in grey, resized so that its longer side is `side` px, gives up to `num_features` ORB keypoints and
   binary descriptors (FAST corners, oriented BRIEF; Rublee et al. 2011), computed once per image;
2. descriptors are matched by Hamming distance, keeping a match only when its nearest neighbour is clearly closer
   than the second (`ratio` test);
3. RANSAC fits a similarity transform (rotation, uniform scale, translation: what the copy edits do) to the matches;
   its inliers are the matches it explains within `reprojection` of the side;
4. the pair is a copy when there are at least `min_inliers` inliers, the transform is plausible (scale within
   `max_scale`, rotation within `max_rotation_deg`), the two frames overlap as a copy's do (one picture lies at least
   `min_contained` inside the other, and the overlap is at least `min_overlap` of the larger one, so two crops of
   different parts of one photo fail), the inliers spread over at least `min_spread` of both pictures (a shared
   watermark or caption on two distinct images gives many inliers in one small region), and the pictures agree
   where they overlap: one warped onto the other by the transform, their grey thumbnails correlate by at least
   `min_correlation` (normalised cross-correlation, blind to brightness and contrast changes; two distinct images
   that share an object or a repeated texture match keypoints but not pixels).

Cost is bounded: only candidate pairs are verified (the caller caps their number), features are computed once per
image, every pair is a few vectorised OpenCV calls, and pairs run on `workers` threads (OpenCV and Pillow's decoders
release the GIL, so threads scale without copying features between processes). `Verification` reports the time per
pair, wall and CPU, as measured.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from components import storage
from components.images import decode_rgb
from components.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class VerifyParams:
    """Knobs of local-feature verification; the defaults are the ones measured in docs/curation_at_scale.md."""

    side: int = 256
    """Longer side of the grey image the keypoints are found in, px (small images are upscaled to it)."""
    num_features: int = 500
    """Most ORB keypoints per image."""
    ratio: float = 0.8
    """Lowe's ratio test: nearest descriptor distance below this share of the second nearest."""
    reprojection: float = 0.02
    """RANSAC inlier tolerance, as a share of `side`."""
    min_inliers: int = 16
    """Inliers of the similarity transform a copy needs (on the synthetic world's single-object renders, distinct
    look-alikes reach 10-14; copies of photographs have 20 and more)."""
    min_contained: float = 0.8
    """Share of the smaller picture's frame that must lie inside the other picture."""
    min_overlap: float = 0.5
    """Share of the larger picture's frame the overlap must cover (copies keep at least 70 % of the area)."""
    min_spread: float = 0.05
    """Convex hull of the inliers, as a share of each picture's area."""
    max_scale: float = 3.0
    """Largest scale ratio between the two normalised pictures."""
    max_rotation_deg: float = 30.0
    """Largest rotation between them, degrees."""
    thumb_side: int = 64
    """Longer side of the grey thumbnail the pixel agreement is measured on, px."""
    min_correlation: float = 0.5
    """Normalised cross-correlation of the overlapping thumbnails a copy needs."""


DEFAULT_VERIFY = VerifyParams()


@dataclass(frozen=True)
class LocalFeatures:
    """An image's keypoints (N-by-2 float32, in the `side`-normalised frame), ORB descriptors (N-by-32 uint8), the
    normalised frame's width and height, and a grey thumbnail (`thumb_side` on the longer side, uint8)."""

    points: np.ndarray
    descriptors: np.ndarray
    width: int
    height: int
    thumb: np.ndarray


@dataclass(frozen=True)
class PairMatch:
    """What matching two images found."""

    inliers: int
    contained: float
    """Share of the smaller picture's frame inside the other (0 without a transform)."""
    overlap: float
    """Share of the larger picture's frame covered by the overlap."""
    spread: float
    """Smaller of the two inlier hulls' shares of their pictures."""
    correlation: float
    """Normalised cross-correlation of the overlapping thumbnails (0 without a transform)."""
    verified: bool


NO_MATCH = PairMatch(0, 0.0, 0.0, 0.0, 0.0, False)


def _cv2():  # noqa: ANN202 (the module)
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from our threads; OpenCV's own would oversubscribe the cores
    return cv2


def extract(image: Image.Image, params: VerifyParams) -> LocalFeatures:
    """ORB keypoints and descriptors of `image` (any mode), in grey, longer side resized to `params.side`."""
    cv2 = _cv2()
    grey = np.asarray(image.convert("L"))
    height, width = grey.shape
    scale = params.side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    # Smaller borders and patches than ORB's defaults (31 px): keypoints near the edges of small images count.
    orb = cv2.ORB_create(nfeatures=params.num_features, edgeThreshold=15, patchSize=15, fastThreshold=10)
    keypoints, descriptors = orb.detectAndCompute(grey, None)
    thumb_scale = params.thumb_side / params.side
    thumb_size = (max(1, round(size[0] * thumb_scale)), max(1, round(size[1] * thumb_scale)))
    thumb = cv2.resize(grey, thumb_size, interpolation=cv2.INTER_AREA)
    if descriptors is None or not keypoints:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8), size[0], size[1], thumb)
    points = np.array([k.pt for k in keypoints], dtype=np.float32)
    return LocalFeatures(points, descriptors, size[0], size[1], thumb)


def _hull_share(points: np.ndarray, width: int, height: int) -> float:
    cv2 = _cv2()
    if len(points) < 3:
        return 0.0
    return float(cv2.contourArea(cv2.convexHull(points.reshape(-1, 1, 2)))) / max(width * height, 1)


def _frames_overlap(transform: np.ndarray, a: LocalFeatures, b: LocalFeatures) -> tuple[float, float]:
    """(contained, overlap) of picture a mapped by `transform` (2x3) onto picture b."""
    cv2 = _cv2()
    corners = np.array([[0, 0], [a.width, 0], [a.width, a.height], [0, a.height]], np.float32)
    warped = (corners @ transform[:, :2].T + transform[:, 2]).astype(np.float32)
    frame_b = np.array([[0, 0], [b.width, 0], [b.width, b.height], [0, b.height]], np.float32)
    inter, _ = cv2.intersectConvexConvex(warped, frame_b)
    area_a, area_b = abs(float(cv2.contourArea(warped))), float(b.width * b.height)
    if inter <= 0 or area_a <= 0:
        return 0.0, 0.0
    return float(inter) / min(area_a, area_b), float(inter) / max(area_a, area_b)


def _correlation(transform: np.ndarray, a: LocalFeatures, b: LocalFeatures, params: VerifyParams) -> float:
    """Normalised cross-correlation of a's thumbnail warped onto b's, over their overlap (0 if under 64 pixels)."""
    cv2 = _cv2()
    scaled = transform.astype(np.float64).copy()
    scaled[:, 2] *= params.thumb_side / params.side  # same scale both frames: only the translation changes
    height, width = b.thumb.shape
    warped = cv2.warpAffine(a.thumb.astype(np.float32), scaled, (width, height), flags=cv2.INTER_LINEAR)
    inside = cv2.warpAffine(np.ones_like(a.thumb, np.float32), scaled, (width, height), flags=cv2.INTER_NEAREST)
    mask = cv2.erode(inside, np.ones((3, 3), np.uint8)) > 0.5  # away from the warped border
    if int(mask.sum()) < 64:
        return 0.0
    x, y = warped[mask] - warped[mask].mean(), b.thumb[mask].astype(np.float32)
    y = y - y.mean()
    denominator = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum()) / denominator if denominator > 1e-6 else 0.0


def match(a: LocalFeatures, b: LocalFeatures, params: VerifyParams) -> PairMatch:
    """Ratio-tested descriptor matches of a in b, a RANSAC similarity transform, and the copy decision."""
    cv2 = _cv2()
    if len(a.descriptors) < 2 or len(b.descriptors) < 2:
        return NO_MATCH
    # The two nearest descriptors of b for every descriptor of a, as arrays (no Python object per match).
    dist, nearest = cv2.batchDistance(a.descriptors, b.descriptors, cv2.CV_32S, normType=cv2.NORM_HAMMING, K=2)
    good = (nearest[:, 0] >= 0) & (nearest[:, 1] >= 0) & (dist[:, 0] < params.ratio * dist[:, 1])
    if int(good.sum()) < params.min_inliers:
        return PairMatch(int(good.sum()), 0.0, 0.0, 0.0, 0.0, False)
    src, dst = a.points[good], b.points[nearest[good, 0]]
    transform, mask = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=params.reprojection * params.side, maxIters=2000
    )
    if transform is None:
        return PairMatch(0, 0.0, 0.0, 0.0, 0.0, False)
    inlier = mask.ravel().astype(bool)
    scale = math.hypot(transform[0, 0], transform[1, 0])
    angle = abs(math.degrees(math.atan2(transform[1, 0], transform[0, 0])))
    contained, overlap = _frames_overlap(transform, a, b)
    spread = min(_hull_share(src[inlier], a.width, a.height), _hull_share(dst[inlier], b.width, b.height))
    geometric = (
        int(inlier.sum()) >= params.min_inliers
        and 1.0 / params.max_scale <= scale <= params.max_scale
        and angle <= params.max_rotation_deg
        and contained >= params.min_contained
        and overlap >= params.min_overlap
        and spread >= params.min_spread
    )
    correlation = _correlation(transform, a, b, params) if geometric else 0.0
    verified = geometric and correlation >= params.min_correlation
    return PairMatch(int(inlier.sum()), contained, overlap, spread, correlation, verified)


ImageSource = str | Image.Image
"""An image to verify: a URI (read through storage, decoded by components/images.py) or a decoded image."""


def _load(source: ImageSource) -> Image.Image:
    return source if isinstance(source, Image.Image) else decode_rgb(storage.read_bytes(source))


@dataclass
class Verification:
    """The outcome of verifying pairs: one entry per pair, and what it cost."""

    inliers: np.ndarray
    contained: np.ndarray
    overlap: np.ndarray
    correlation: np.ndarray
    verified: np.ndarray
    errors: dict[int, str]
    """Image index -> why it could not be read (its pairs are not verified)."""
    num_images: int
    wall_s: float
    cpu_s: float
    workers: int

    @property
    def ms_per_pair(self) -> float:
        """Wall milliseconds per pair, feature extraction included."""
        return 1000.0 * self.wall_s / max(len(self.verified), 1)

    def cost(self) -> dict[str, float | int]:
        """The figures a report logs."""
        return {
            "pairs": len(self.verified),
            "images": self.num_images,
            "unreadable_images": len(self.errors),
            "workers": self.workers,
            "wall_s": round(self.wall_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "ms_per_pair": round(self.ms_per_pair, 3),
            "cpu_ms_per_pair": round(1000.0 * self.cpu_s / max(len(self.verified), 1), 3),
        }


def default_workers() -> int:
    """Threads: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def verify_pairs(
    pairs: np.ndarray,
    sources: Sequence[ImageSource] | Callable[[int], ImageSource],
    *,
    params: VerifyParams = DEFAULT_VERIFY,
    workers: int | None = None,
    block_pairs: int = 50_000,
) -> Verification:
    """Verifies every pair (i, j) of image indices, computing each image's features once per block of pairs.

    Args:
        pairs: P-by-2 int array of image indices.
        sources: Image index -> URI or decoded image (a sequence or a function).
        params: Verification knobs.
        workers: Threads (None: the usable cores).
        block_pairs: Pairs per block: features of one block's images are held at once (about 20 kB per image), so
            memory stays bounded however many pairs there are.

    Returns:
        Per-pair inliers, frame overlap and decision, and the measured cost. An image that cannot be read leaves
        its pairs unverified (never a copy) and is named in `errors`.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    workers = max(1, workers or default_workers())
    source_of = sources if callable(sources) else sources.__getitem__
    start, cpu = time.perf_counter(), time.process_time()
    features: dict[int, LocalFeatures] = {}
    errors: dict[int, str] = {}
    lock = threading.Lock()
    results: list[PairMatch] = [NO_MATCH] * len(pairs)

    def compute(index: int) -> None:
        try:
            found = extract(_load(source_of(int(index))), params)
        except Exception as err:  # a deleted or corrupt file: its pairs stay unverified, and the report says why
            with lock:
                errors[int(index)] = f"{type(err).__name__}: {err}"[:300]
            return
        with lock:
            features[int(index)] = found

    def verify(row: int) -> None:
        a, b = features.get(int(pairs[row, 0])), features.get(int(pairs[row, 1]))
        if a is None or b is None:
            return
        # Matching is not symmetric (ratio test, RANSAC on a's matches): a copy is a copy either way round.
        first = match(a, b, params)
        if not first.verified:
            first = max(first, match(b, a, params), key=lambda m: (m.verified, m.inliers))
        results[row] = first

    order = np.argsort(pairs[:, 0], kind="stable")  # a block then holds every pair of its first images
    num_images = 0
    with ThreadPoolExecutor(workers) as pool:
        for begin in range(0, len(order), block_pairs):
            rows = order[begin : begin + block_pairs]
            images = np.unique(pairs[rows]).tolist()
            num_images += len(images)
            features.clear()
            list(pool.map(compute, images))
            list(pool.map(verify, rows.tolist(), chunksize=64))
    features.clear()
    for index, error in errors.items():
        log.warning("verify: image %s could not be read, its pairs are not verified (%s)", source_of(index), error)
    return Verification(
        inliers=np.array([r.inliers for r in results], np.int64),
        contained=np.array([r.contained for r in results], np.float32),
        overlap=np.array([r.overlap for r in results], np.float32),
        correlation=np.array([r.correlation for r in results], np.float32),
        verified=np.array([r.verified for r in results], bool),
        errors=errors,
        num_images=num_images,
        wall_s=time.perf_counter() - start,
        cpu_s=time.process_time() - cpu,
        workers=workers,
    )
