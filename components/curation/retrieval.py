"""Retrieval (DINOv2 appendix A.4): pick the pool images that look like each curated seed set.

Two ways, as in the paper's LVD-142M recipe (Table 15 says which seed dataset used which):
- sample-based: for every seed image, its k nearest pool images (k = 4 for large seed sets, 32 for small ones);
- cluster-based: the pool is clustered by k-means into C clusters (100,000 in the paper); every cluster that holds at
  least t seed images (once the seeds are assigned to the nearest centroid) contributes up to n of its pool images,
  sampled at random with the stage's seed.
A per-seed-set cap bounds how much any one seed set brings in. Every retrieved row keeps its provenance: the method,
and the seed image (sample-based, with its similarity) or the cluster (cluster-based, with the similarity to the
centroid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from components.curation import sharded
from components.curation.search import DEFAULT_SEARCH, SearchParams


@dataclass(frozen=True)
class Retrieved:
    """Pool rows retrieved for one seed set, one entry per pool row (its best provenance)."""

    pool_rows: np.ndarray
    """(R,) int64 rows of the (deduplicated) pool array."""
    method: np.ndarray
    """(R,) `sample` or `cluster`."""
    seed_rows: np.ndarray
    """(R,) int64 row of the seed image that brought it (sample-based), else -1."""
    cluster: np.ndarray
    """(R,) int64 cluster that brought it (cluster-based), else -1."""
    similarity: np.ndarray
    """(R,) float32 similarity to the seed image (sample) or to the cluster centroid (cluster)."""

    def __len__(self) -> int:
        return len(self.pool_rows)

    @staticmethod
    def empty() -> Retrieved:
        return Retrieved(
            np.zeros(0, np.int64),
            np.zeros(0, dtype=object),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros(0, np.float32),
        )

    def take(self, rows: np.ndarray) -> Retrieved:
        return Retrieved(
            self.pool_rows[rows], self.method[rows], self.seed_rows[rows], self.cluster[rows], self.similarity[rows]
        )


def concat(parts: list[Retrieved]) -> Retrieved:
    parts = [p for p in parts if len(p)]
    if not parts:
        return Retrieved.empty()
    return Retrieved(
        np.concatenate([p.pool_rows for p in parts]),
        np.concatenate([p.method for p in parts]),
        np.concatenate([p.seed_rows for p in parts]),
        np.concatenate([p.cluster for p in parts]),
        np.concatenate([p.similarity for p in parts]),
    )


def best_per_pool_row(found: Retrieved) -> Retrieved:
    """One entry per pool row: sample-based provenance before cluster-based, then the highest similarity."""
    if not len(found):
        return found
    # lexsort: last key first -> pool row, then sample before cluster, then similarity descending
    order = np.lexsort((-found.similarity, found.method != "sample", found.pool_rows))
    rows = found.pool_rows[order]
    first = np.ones(len(rows), bool)
    first[1:] = rows[1:] != rows[:-1]
    return found.take(order[first])


def sample_retrieval(
    pool_x: np.ndarray | sharded.Vectors,
    seed_x: np.ndarray,
    *,
    k: int,
    min_similarity: float = -1.0,
    params: SearchParams = DEFAULT_SEARCH,
    **sharding: Any,
) -> Retrieved:
    """The k nearest pool images of every seed image (at least `min_similarity`), one entry per pool image.

    Args:
        pool_x: N-by-D L2-normalised pool embeddings (after deduplication), or their shards.
        seed_x: S-by-D embeddings of one seed set.
        k: Neighbours per seed image (4 or 32 in the paper).
        min_similarity: Neighbours below this cosine similarity are not retrieved (a seed set with no close pool
            image retrieves nothing).
        params: Search knobs.
        sharding: `ranks`, `cache` and `name` of `sharded.knn` (each rank searches the seeds against its shards).
    """
    if len(pool_x) == 0 or len(seed_x) == 0:
        return Retrieved.empty()
    sims, ids = sharded.knn(seed_x, sharded.as_vectors(pool_x, params.chunk_size), min(k, len(pool_x)), params,
                            **sharding)  # fmt: skip
    seed_rows, cols = np.nonzero((ids >= 0) & (sims >= min_similarity))
    found = Retrieved(
        pool_rows=ids[seed_rows, cols],
        method=np.full(len(seed_rows), "sample", dtype=object),
        seed_rows=seed_rows.astype(np.int64),
        cluster=np.full(len(seed_rows), -1, np.int64),
        similarity=sims[seed_rows, cols].astype(np.float32),
    )
    return best_per_pool_row(found)


def cluster_retrieval(
    pool_labels: np.ndarray,
    pool_similarity: np.ndarray,
    seed_labels: np.ndarray,
    *,
    min_seeds: int,
    per_cluster: int,
    rng: np.random.Generator,
) -> Retrieved:
    """Up to `per_cluster` pool images (a random sample) from every cluster holding at least `min_seeds` seeds.

    Args:
        pool_labels: (N,) k-means cluster of every pool image.
        pool_similarity: (N,) similarity of every pool image to its centroid (kept as provenance).
        seed_labels: (S,) nearest centroid of every seed image of one seed set.
        min_seeds: t, the seed images a cluster must hold to be retrieved from.
        per_cluster: n, the most pool images taken from one cluster.
        rng: Sampling generator (seeded by the stage).
    """
    if len(pool_labels) == 0 or len(seed_labels) == 0:
        return Retrieved.empty()
    clusters, counts = np.unique(seed_labels, return_counts=True)
    chosen = clusters[counts >= min_seeds]
    if not len(chosen):
        return Retrieved.empty()
    order = np.argsort(pool_labels, kind="stable")
    bounds = np.searchsorted(pool_labels[order], np.stack([chosen, chosen + 1]))
    picks = []
    for start, end in bounds.T:
        members = order[start:end]
        if len(members) > per_cluster:
            members = np.sort(rng.choice(members, size=per_cluster, replace=False))
        picks.append(members)
    rows = np.concatenate(picks) if picks else np.zeros(0, np.int64)
    return Retrieved(
        pool_rows=rows.astype(np.int64),
        method=np.full(len(rows), "cluster", dtype=object),
        seed_rows=np.full(len(rows), -1, np.int64),
        cluster=pool_labels[rows].astype(np.int64),
        similarity=pool_similarity[rows].astype(np.float32),
    )


def cap(found: Retrieved, max_images: int | None, rng: np.random.Generator) -> Retrieved:
    """At most `max_images` entries: sample-based ones first, most similar first, then cluster-based ones at random.

    The cap is the per-source (per seed set) limit on how many pool images one seed set may bring in.
    """
    if max_images is None or len(found) <= max_images:
        return found
    is_sample = found.method == "sample"
    sample_order = np.flatnonzero(is_sample)[np.argsort(-found.similarity[is_sample], kind="stable")]
    cluster_order = rng.permutation(np.flatnonzero(~is_sample))
    keep = np.concatenate([sample_order, cluster_order])[:max_images]
    return found.take(np.sort(keep))
