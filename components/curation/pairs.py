"""Which candidate pairs are copies: the accept threshold, and local-feature verification between the thresholds.

One comparison (the pool against itself, or the pool against the evaluation sets) gives candidate pairs with their
cosine similarity (the kNN search of `search.py`). Each pair is decided once:

- at or above the accept threshold (`verify` auto or off): a copy, on the embedding's word (`embedding`);
- between the candidate and the accept thresholds (`verify` auto; `on`: every pair above the candidate threshold):
  verified by local features (`verify.py`); a copy only when verification confirms it (`local_features`);
- below the candidate threshold: not a copy.

Verification is bounded: at most `verify_k` candidates per query image (its most similar ones) and `max_pairs` per
comparison; candidates beyond the budget are not copies (nothing is removed without evidence) and are counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from components.curation.verify import DEFAULT_VERIFY, VerifyParams, verify_pairs
from components.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Thresholds:
    """The two thresholds of one comparison."""

    accept: float | None
    """A copy without verification at or above it (None: never)."""
    candidate: float
    """Verified at or above it."""


@dataclass(frozen=True)
class CopyPairs:
    """The decided copy pairs of one comparison: (src, dst) rows, similarity, how each was decided."""

    src: np.ndarray
    dst: np.ndarray
    similarity: np.ndarray
    method: np.ndarray
    """`embedding` (at or above the accept threshold) or `local_features` (verified)."""
    inliers: np.ndarray
    """RANSAC inliers of verified pairs (-1 for pairs accepted on the embedding)."""
    stats: dict[str, Any]
    """Candidates, verified, confirmed, over budget, and the verification's cost."""

    def __len__(self) -> int:
        return len(self.src)


def _top_per_query(src: np.ndarray, sim: np.ndarray, k: int, dst: np.ndarray | None = None) -> np.ndarray:
    """Positions of the pairs among each query's k most similar candidates; with `dst` (pairs of one set of images),
    a pair counts for both its images and is kept when it is among the k best of either."""
    if dst is not None:
        both = _top_per_query(np.concatenate([src, dst]), np.concatenate([sim, sim]), k)
        return np.unique(both % max(len(src), 1))
    order = np.lexsort((-sim, src))  # by query, most similar first
    rank = np.arange(len(order)) - np.searchsorted(src[order], src[order], side="left")
    return np.sort(order[rank < k])


def decide_pairs(
    src: np.ndarray,
    dst: np.ndarray,
    sim: np.ndarray,
    *,
    thresholds: Thresholds,
    verify: str,
    verify_k: int,
    max_pairs: int,
    sources: tuple[Sequence[Any], Sequence[Any]] | None,
    symmetric: bool,
    workers: int | None = None,
    params: VerifyParams = DEFAULT_VERIFY,
    sharding: dict[str, Any] | None = None,
) -> CopyPairs:
    """Decides every candidate pair (src[i], dst[i], sim[i]) of one comparison.

    Args:
        src, dst, sim: Candidate pairs (query row, database row, similarity), e.g. from `edges_above`.
        thresholds: The comparison's accept and candidate thresholds.
        verify: `auto`, `on` or `off` (params.yaml `curate.verify`).
        verify_k: Most verified candidates per query row.
        max_pairs: Most verified pairs in all.
        sources: Image sources (URIs) of the query rows and of the database rows, for verification; None: none.
        symmetric: Rows of src and dst are the same images (self-deduplication): (a, b) and (b, a) are one pair.
        workers: Verification threads.
        params: Verification knobs.
        sharding: `ranks`, `cache` and `name` of `verify_split`: the pairs are verified in blocks shared between the
            ranks (every rank gets every outcome); None: all here.
    """
    src, dst, sim = np.asarray(src, np.int64), np.asarray(dst, np.int64), np.asarray(sim, np.float32)
    if symmetric:  # one entry per unordered pair, keeping its similarity
        low, high = np.minimum(src, dst), np.maximum(src, dst)
        _, first = np.unique(np.stack([low, high], 1), axis=0, return_index=True)
        first = np.sort(first) if len(src) else first
        src, dst, sim = src[first], dst[first], sim[first]
    use_accept = verify != "on" and thresholds.accept is not None
    accepted = sim >= thresholds.accept if use_accept else np.zeros(len(sim), bool)
    band = ~accepted & (sim >= thresholds.candidate) if verify != "off" else np.zeros(len(sim), bool)
    stats: dict[str, Any] = {"candidates": int(len(sim)), "accepted_on_embedding": int(accepted.sum())}
    band_rows = np.flatnonzero(band)
    band_rows = band_rows[
        _top_per_query(src[band_rows], sim[band_rows], verify_k, dst[band_rows] if symmetric else None)
    ]
    stats["beyond_verify_k"] = int(band.sum() - len(band_rows))
    if len(band_rows) > max_pairs:
        log.warning("verify: %d candidate pairs, %d over curate.verify_max_pairs: kept", len(band_rows), max_pairs)
        band_rows = band_rows[np.argsort(-sim[band_rows], kind="stable")[:max_pairs]]
    stats["over_budget"] = int(band.sum() - stats["beyond_verify_k"] - len(band_rows))
    verified = np.zeros(len(sim), bool)
    inliers = np.full(len(sim), -1, np.int64)
    if len(band_rows):
        if sources is None:
            raise ValueError("verification needs the images: give the curate core an ImageAccess (or verify off)")
        verified[band_rows], inliers[band_rows], stats["verification"] = _verify(
            src[band_rows], dst[band_rows], sources, workers, params, sharding or {}
        )
    stats["verified"] = int(len(band_rows))
    stats["confirmed"] = int(verified.sum())
    copy = accepted | verified
    method = np.where(accepted, "embedding", "local_features").astype(object)
    return CopyPairs(src[copy], dst[copy], sim[copy], method[copy], inliers[copy], stats)


VERIFY_BLOCK = 2048
"""Pairs per block of verification work: blocks go round the ranks, and each is kept for resume once verified."""


def _verify(
    src: np.ndarray,
    dst: np.ndarray,
    sources: tuple[Sequence[Any], Sequence[Any]],
    workers: int | None,
    params: VerifyParams,
    sharding: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Verifies pairs of rows (source side, destination side): (verified, inliers, cost)."""
    pairs = np.stack([src, dst], 1)

    def source(side_row: int) -> Any:
        return sources[side_row % 2][side_row // 2]

    # Images are numbered 2 row + side: a pair (a, b) reads image 2 a and image 2 b + 1.
    return verify_split(np.stack([2 * pairs[:, 0], 2 * pairs[:, 1] + 1], 1), source, workers=workers, params=params,
                        **sharding)  # fmt: skip


def verify_split(
    pairs: np.ndarray,
    sources: Sequence[Any] | Callable[[int], Any],
    *,
    workers: int | None = None,
    params: VerifyParams = DEFAULT_VERIFY,
    ranks: Any = None,
    cache: Any = None,
    name: str = "verify",
    block: int = VERIFY_BLOCK,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """`verify_pairs` in blocks of `block` pairs, block b on rank b mod R; every rank gets every outcome.

    Each pair's outcome depends on its two images alone (ORB is deterministic, OpenCV's RANSAC seeds its own
    generator), so the outcomes do not depend on how pairs are split.

    Returns:
        (verified, inliers, cost): per pair, and the cost of all blocks (pairs, images read, CPU and wall seconds
        summed over the blocks, the ranks' threads).
    """
    from components.curation import sharded

    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)

    def compute(b: int, _: Any) -> dict[str, np.ndarray]:
        result = verify_pairs(pairs[b * block : (b + 1) * block], sources, params=params, workers=workers)
        cost = result.cost()
        return {
            "verified": result.verified,
            "inliers": result.inliers,
            "cost": np.array(
                [cost["images"], cost["unreadable_images"], cost["workers"], cost["wall_s"], cost["cpu_s"]], np.float64
            ),  # fmt: skip
        }

    blocks = sharded.map_chunks(ranks or sharded.LOCAL, -(-len(pairs) // block), compute,
                                cache=cache or sharded.NO_CACHE, name=name)  # fmt: skip
    verified = sharded.concat(blocks, "verified", bool)
    inliers = sharded.concat(blocks, "inliers", np.int64)
    total = np.sum([b["cost"] for b in blocks], axis=0) if blocks else np.zeros(5)
    wall, cpu = float(total[3]), float(total[4])
    cost = {
        "pairs": len(pairs),
        "images": int(total[0]),
        "unreadable_images": int(total[1]),
        "workers": int(max((b["cost"][2] for b in blocks), default=0)),
        "ranks": (ranks or sharded.LOCAL).world,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "ms_per_pair": round(1000.0 * wall / max(len(pairs), 1), 3),
        "cpu_ms_per_pair": round(1000.0 * cpu / max(len(pairs), 1), 3),
    }
    return verified, inliers, cost
