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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from components.curation.verify import DEFAULT_VERIFY, Verification, VerifyParams, verify_pairs
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
        result = _verify(src[band_rows], dst[band_rows], sources, workers, params)
        verified[band_rows], inliers[band_rows] = result.verified, result.inliers
        stats["verification"] = result.cost()
    stats["verified"] = int(len(band_rows))
    stats["confirmed"] = int(verified.sum())
    copy = accepted | verified
    method = np.where(accepted, "embedding", "local_features").astype(object)
    return CopyPairs(src[copy], dst[copy], sim[copy], method[copy], inliers[copy], stats)


def _verify(
    src: np.ndarray,
    dst: np.ndarray,
    sources: tuple[Sequence[Any], Sequence[Any]],
    workers: int | None,
    params: VerifyParams,
) -> Verification:
    """Verifies pairs of rows, each distinct (side, row) image loaded once."""
    keys = np.concatenate([np.stack([np.zeros_like(src), src], 1), np.stack([np.ones_like(dst), dst], 1)])
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    images = [sources[side][row] for side, row in unique.tolist()]
    pairs = np.stack([inverse[: len(src)], inverse[len(src) :]], 1)
    return verify_pairs(pairs, images, params=params, workers=workers)
