"""Calibration of the copy thresholds on the pool itself: planted copies of its own images, measured.

No fixed similarity threshold is right for every embedding model: the paper's 0.6 / 0.45 belong to its copy
detector (SSCD), a random initialisation's features crowd near 1, a DINOv2 backbone's spread differently again. So
the curate stage measures, on the pool at hand and with the configured model:

- positives: a sample of pool (or evaluation) images, each with one planted copy (components/curation/copies.py,
  the kinds taking turns), and the similarity of each image to its copy;
- negatives: pairs of distinct images: each sampled image with its nearest pool neighbours (the pairs a
  deduplication actually weighs), and the two disjoint halves of every fourth sampled image (distinct pictures of
  one scene, the hardest kind). A nearest neighbour that local-feature verification confirms as a copy is most
  likely a duplicate already in the pool, not a distinct image: it is left out of the negatives and counted
  (`probable_pool_duplicates`), so real duplicates do not pass for errors.

From these pairs: precision and recall of "similarity >= t" at every threshold t (the curve), the accept threshold
(the lowest t at and above which precision stays at the target, `curate.dedup_precision`), the candidate threshold
(the highest t that keeps `curate.candidate_recall` of the planted copies, for verification), and the outcome of the
whole decision rule (accept, or candidate and verified) on the same pairs: its precision, which the stage gates, and
its recall per kind of copy, which the report states as the expected recall.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from components.curation.copies import COPY_KINDS, disjoint_halves, plant_copy

HALVES_EVERY = 4
"""Every this many sampled images also give a pair of disjoint halves (a hard negative)."""
MAX_SIDE = 512
"""Sampled images are shrunk to this longer side before copies are made (the embedder and the verifier work at
224 and 256 px; a 12-megapixel original would only cost time)."""


@dataclass(frozen=True)
class Curve:
    """Precision and recall of "similarity >= threshold", thresholds in decreasing order."""

    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray

    def at(self, threshold: float) -> tuple[float, float]:
        """(precision, recall) at `threshold` (1.0, 0.0 above every similarity)."""
        above = self.thresholds >= threshold
        if not above.any():
            return 1.0, 0.0
        i = int(np.flatnonzero(above)[-1])
        return float(self.precision[i]), float(self.recall[i])

    def sampled(self, num: int = 101) -> list[dict[str, float]]:
        """At most `num` points of the curve, evenly spread over its thresholds, for the report."""
        rows = np.unique(np.linspace(0, len(self.thresholds) - 1, min(num, len(self.thresholds))).round().astype(int))
        return [
            {
                "threshold": round(float(self.thresholds[r]), 5),
                "precision": round(float(self.precision[r]), 5),
                "recall": round(float(self.recall[r]), 5),
            }
            for r in rows
        ]


def pr_curve(positives: np.ndarray, negatives: np.ndarray) -> Curve:
    """The curve over every distinct similarity of the positive and negative pairs."""
    sims = np.concatenate([positives, negatives]).astype(np.float64)
    is_pos = np.concatenate([np.ones(len(positives), bool), np.zeros(len(negatives), bool)])
    order = np.argsort(-sims, kind="stable")
    sims, is_pos = sims[order], is_pos[order]
    tp, fp = np.cumsum(is_pos), np.cumsum(~is_pos)
    last = np.r_[sims[1:] != sims[:-1], True] if len(sims) else np.zeros(0, bool)  # ties: one point per value
    precision = tp[last] / np.maximum(tp[last] + fp[last], 1)
    recall = tp[last] / max(len(positives), 1)
    return Curve(sims[last], precision, recall)


def accept_threshold(curve: Curve, target: float) -> float | None:
    """The lowest threshold at and above which precision never falls below `target` (None: not reachable)."""
    if not len(curve.thresholds):
        return None
    # precision at thresholds >= t for every t: the running minimum from the top
    worst = np.minimum.accumulate(curve.precision)
    good = np.flatnonzero((worst >= target) & (curve.recall > 0))
    return float(curve.thresholds[good[-1]]) if len(good) else None


def candidate_threshold(positives: np.ndarray, recall: float) -> float:
    """The highest threshold that keeps `recall` of the positives (the recall-quantile of their similarities)."""
    if not len(positives):
        return 1.0
    ranked = np.sort(np.asarray(positives, np.float64))[::-1]
    return float(ranked[min(len(ranked) - 1, int(np.ceil(recall * len(ranked))) - 1)])


def decide(
    sims: np.ndarray, verified: np.ndarray, *, accept: float | None, candidate: float, verify: str
) -> np.ndarray:
    """The copy decision of the stage: `off` accept only, `on` candidate and verified, `auto` either."""
    sims = np.asarray(sims)
    accepted = sims >= accept if accept is not None else np.zeros(len(sims), bool)
    checked = (sims >= candidate) & np.asarray(verified, bool)
    if verify == "off":
        return accepted
    if verify == "on":
        return checked
    return accepted | checked


@dataclass(frozen=True)
class CalibrationSet:
    """Similarities of the known pairs, and their verification."""

    pos_sims: np.ndarray
    pos_kinds: np.ndarray
    pos_verified: np.ndarray
    neg_sims: np.ndarray
    neg_verified: np.ndarray
    neg_kind: np.ndarray
    """`neighbour` or `halves`."""
    probable_pool_duplicates: int


@dataclass(frozen=True)
class Calibration:
    """The thresholds of one comparison (pool against pool, or pool against evaluation) and their measured effect."""

    name: str
    data: CalibrationSet
    curve: Curve
    accept: float | None
    candidate: float
    accept_source: str
    """`calibrated` or `params.yaml` (a fixed threshold overrides the calibrated one)."""
    verify: str
    precision: float
    recall: float
    recall_per_kind: dict[str, float]
    target: float

    def report(self) -> dict[str, Any]:
        data = self.data
        return {
            "target_precision": self.target,
            "accept_threshold": self.accept,
            "accept_threshold_source": self.accept_source,
            "candidate_threshold": self.candidate,
            "verify": self.verify,
            "expected_precision": round(self.precision, 5),
            "expected_recall": round(self.recall, 5),
            "expected_recall_per_kind": {k: round(v, 5) for k, v in self.recall_per_kind.items()},
            "embedding_only": dict(
                zip(("precision", "recall"), self.curve.at(2.0 if self.accept is None else self.accept), strict=True)
            ),
            "planted_copies": len(data.pos_sims),
            "negatives": {
                "neighbours": int((data.neg_kind == "neighbour").sum()),
                "halves": int((data.neg_kind == "halves").sum()),
            },
            "probable_pool_duplicates": data.probable_pool_duplicates,
            "curve": self.curve.sampled(),
        }


def calibrate(
    name: str,
    data: CalibrationSet,
    *,
    target: float,
    candidate_recall: float,
    verify: str,
    fixed_accept: float | None,
    fixed_candidate: float | None,
) -> Calibration:
    """Thresholds from the calibration pairs (or fixed ones from params.yaml) and the decision rule's outcome."""
    curve = pr_curve(data.pos_sims, data.neg_sims)
    accept = fixed_accept if fixed_accept is not None else accept_threshold(curve, target)
    candidate = fixed_candidate if fixed_candidate is not None else candidate_threshold(data.pos_sims, candidate_recall)
    if accept is not None:
        candidate = min(candidate, accept)
    pos = decide(data.pos_sims, data.pos_verified, accept=accept, candidate=candidate, verify=verify)
    neg = decide(data.neg_sims, data.neg_verified, accept=accept, candidate=candidate, verify=verify)
    found = int(pos.sum())
    precision = found / max(found + int(neg.sum()), 1) if found else (1.0 if not neg.any() else 0.0)
    per_kind = {str(k): float(pos[data.pos_kinds == k].mean()) for k in COPY_KINDS if (data.pos_kinds == k).any()}
    return Calibration(
        name=name,
        data=data,
        curve=curve,
        accept=accept,
        candidate=candidate,
        accept_source="params.yaml" if fixed_accept is not None else "calibrated",
        verify=verify,
        precision=precision,
        recall=found / max(len(pos), 1),
        recall_per_kind=per_kind,
        target=target,
    )


@dataclass(frozen=True)
class Planted:
    """Images made for calibration: a copy of each sampled image, and the disjoint halves of some."""

    copies: list[Image.Image]
    kinds: np.ndarray
    halves: list[tuple[Image.Image, Image.Image]]
    halves_of: np.ndarray
    """Sample index of each pair of halves."""
    originals: list[Image.Image]


def plant(images: Sequence[Image.Image], rng: np.random.Generator) -> Planted:
    """One copy of every image (the kinds taking turns from a random start) and the halves of every fourth."""
    offset = int(rng.integers(len(COPY_KINDS)))
    copies, kinds, halves, halves_of, originals = [], [], [], [], []
    for i, image in enumerate(images):
        image = image.convert("RGB")
        if max(image.size) > MAX_SIDE:
            image = image.copy()
            image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        originals.append(image)
        kind = COPY_KINDS[(offset + i) % len(COPY_KINDS)]
        copies.append(plant_copy(image, kind, rng))
        kinds.append(kind)
        if i % HALVES_EVERY == 0 and min(image.size) >= 16:
            halves.append(disjoint_halves(image))
            halves_of.append(i)
    return Planted(copies, np.array(kinds, dtype=object), halves, np.array(halves_of, np.int64), originals)


Verifier = Callable[[np.ndarray, Sequence[Any]], np.ndarray]
"""(pairs P-by-2, image sources) -> (P,) bool verified."""


def measure(
    *,
    sample_x: np.ndarray,
    planted: Planted,
    embed: Callable[[Sequence[Image.Image]], np.ndarray],
    neighbour_sims: np.ndarray,
    neighbour_sources: Sequence[Any],
    verifier: Verifier,
) -> CalibrationSet:
    """Embeds the planted images and verifies every known pair.

    Args:
        sample_x: S-by-D stored embeddings of the sampled images (as searched: whitened if the stage whitens).
        planted: Their copies and halves.
        embed: Images -> their embeddings, prepared exactly as `sample_x` was.
        neighbour_sims: S-by-K similarity of each sampled image to its K nearest distinct pool images (-inf: none).
        neighbour_sources: S*K image sources of those neighbours (row-major), for verification.
        verifier: Verifies pairs of image sources.
    """
    num, k = neighbour_sims.shape
    flat_halves = [image for pair in planted.halves for image in pair]
    vectors = embed([*planted.copies, *flat_halves])
    copy_x, halves_x = vectors[:num], vectors[num:]
    pos_sims = np.einsum("ij,ij->i", sample_x.astype(np.float32), copy_x.astype(np.float32))
    halves_sims = np.einsum("ij,ij->i", halves_x[0::2].astype(np.float32), halves_x[1::2].astype(np.float32))
    # One verification call: sources are the originals, copies, halves, then the neighbours.
    sources = [*planted.originals, *planted.copies, *flat_halves, *neighbour_sources]
    base_h, base_n = 2 * num, 2 * num + len(flat_halves)
    has_neighbour = np.isfinite(neighbour_sims.ravel())
    pairs = np.concatenate(
        [
            np.stack([np.arange(num), num + np.arange(num)], 1),
            np.stack([base_h + 2 * np.arange(len(planted.halves)), base_h + 2 * np.arange(len(planted.halves)) + 1], 1),
            np.stack([np.repeat(np.arange(num), k), base_n + np.arange(num * k)], 1)[has_neighbour],
        ]
    ).astype(np.int64)
    verified = verifier(pairs, sources)
    pos_verified = verified[:num]
    halves_verified = verified[num : num + len(planted.halves)]
    neigh_verified = verified[num + len(planted.halves) :]
    neigh_sims = neighbour_sims.ravel()[has_neighbour]
    distinct = ~neigh_verified  # a verified nearest neighbour is most likely a real duplicate of the pool
    return CalibrationSet(
        pos_sims=pos_sims,
        pos_kinds=planted.kinds,
        pos_verified=pos_verified,
        neg_sims=np.concatenate([neigh_sims[distinct], halves_sims]),
        neg_verified=np.concatenate([neigh_verified[distinct], halves_verified]),
        neg_kind=np.array(["neighbour"] * int(distinct.sum()) + ["halves"] * len(halves_sims), dtype=object),
        probable_pool_duplicates=int(neigh_verified.sum()),
    )


def sample_images(uris: Sequence[str], num: int, rng: np.random.Generator) -> tuple[np.ndarray, list[Image.Image]]:
    """Up to `num` rows drawn at random, with their decoded images; an unreadable image is skipped with a warning."""
    from components import storage
    from components.images import decode_rgb
    from components.log import get_logger

    rows, images = [], []
    for row in rng.permutation(len(uris))[: min(num, len(uris))].tolist():
        try:
            images.append(decode_rgb(storage.read_bytes(uris[row])))
        except Exception as err:  # deleted since the embed stage: calibration goes on without it
            get_logger(__name__).warning("calibration: %s not readable, not sampled (%s)", uris[row], err)
            continue
        rows.append(row)
    return np.array(rows, np.int64), images


def nearest_distinct(
    query_x: np.ndarray, pool_x: Any, k: int, *, exclude: np.ndarray | None, params: Any, **sharding: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k most similar pool rows, its own row (`exclude`, self-deduplication) left out: (sims, rows).

    `pool_x`: an array or sharded `Vectors`; `sharding`: `ranks`, `cache`, `name` of `sharded.knn`.
    """
    from components.curation import sharded

    sims, rows = sharded.knn(query_x, sharded.as_vectors(pool_x, params.chunk_size), k + 1, params, **sharding)
    if exclude is not None:
        own = rows == exclude[:, None]
        sims = np.where(own, -np.inf, sims)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(rows, order, 1)
