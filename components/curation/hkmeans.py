"""Hierarchical k-means with resampling and balanced sampling (Vo et al. 2024, "Automatic data curation for
self-supervised learning: a clustering-based approach").

Plain k-means on web data puts most centroids in the dense regions (many near-identical product photos, few rare
concepts), so sampling per cluster still over-represents the head of the distribution. Vo et al. fix this twice:

1. k-means with resampling (their Algorithm 1): after the Lloyd iterations, each centroid is recomputed from only the
   `resample_size` points nearest to it, and all points are reassigned; repeated `resampling_steps` times. Dense
   regions no longer pull centroids towards themselves, so the clusters cover the data more uniformly.
2. Several levels (their Algorithm 2): level 1 clusters the embeddings, level 2 clusters level 1's centroids, and so
   on; the top level has few, semantically broad clusters.
3. Balanced hierarchical sampling (their section 4.3): a target of T images is split equally over the top-level
   clusters ("water-filling": a cluster with fewer images than its share gives the remainder to the others), each
   cluster's share is split the same way over its children, down to the level-1 clusters, from which images are drawn
   at random.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from components.curation import sharded
from components.curation.search import SearchParams


@dataclass(frozen=True)
class Level:
    """One level of the hierarchy."""

    centroids: np.ndarray
    """C_l-by-D unit-norm centroids."""
    labels: np.ndarray
    """Cluster of every item of the level below (level 1: of every embedding; level l: of level l-1's centroids)."""


def resampled_kmeans(
    x: np.ndarray | sharded.Vectors,
    num_clusters: int,
    *,
    niter: int,
    resampling_steps: int,
    resample_size: int,
    seed: int,
    use_gpu: bool = True,
    ranks: sharded.Ranks = sharded.LOCAL,
    cache: sharded.WorkCache = sharded.NO_CACHE,
    name: str = "resampled_kmeans",
) -> Level:
    """Spherical k-means, then `resampling_steps` centroid updates from the `resample_size` nearest points each.

    Args:
        x: N-by-D L2-normalised items, or the pool's shards (each rank assigns its own; sums joined exactly).
        num_clusters: C (clipped to N).
        niter: Lloyd iterations of the initial k-means.
        resampling_steps: Resampling rounds (0: plain k-means).
        resample_size: Points per cluster a resampled centroid is computed from.
        seed: k-means seed.
        use_gpu: faiss on a GPU when present.
        ranks: The ranks sharing the shards of x.
        cache: Where each shard's assignments are kept (resume).
        name: The step's name in the cache.
    """
    vectors = sharded.as_vectors(x, SearchParams().chunk_size)
    params = SearchParams(use_gpu=use_gpu)
    result = sharded.kmeans(vectors, num_clusters, niter=niter, seed=seed, params=params, ranks=ranks, cache=cache,
                            name=f"{name}/kmeans")  # fmt: skip
    centroids, labels, sims = result.centroids, result.labels, result.similarity
    for step in range(resampling_steps):
        # The resample_size points nearest each centroid: sort by (cluster, -similarity, row), take each run's head.
        order = np.lexsort((-sims, labels))
        sorted_labels = labels[order]
        starts = np.searchsorted(sorted_labels, np.arange(len(centroids)))
        rank = np.arange(len(order)) - starts[sorted_labels]
        chosen = np.sort(order[rank < resample_size])
        sums, counts = sharded.cluster_sums(vectors, chosen, labels, len(centroids), ranks=ranks)
        centroids = sharded.centroids_from_sums(sums, counts, centroids)  # an empty cluster keeps its centroid
        labels, sims = sharded.assign(vectors, centroids, params, ranks=ranks, cache=cache, name=f"{name}/step{step}")
    return Level(centroids=centroids, labels=labels)


@dataclass(frozen=True)
class Hierarchy:
    """Levels from the finest (level 1, clusters of the embeddings) to the coarsest."""

    levels: tuple[Level, ...]

    def leaf_labels(self, level: int) -> np.ndarray:
        """(N,) the cluster of every embedding at `level` (0-based: 0 is level 1)."""
        labels = self.levels[0].labels
        for lvl in self.levels[1 : level + 1]:
            labels = lvl.labels[labels]
        return labels

    def cluster_sizes(self) -> list[np.ndarray]:
        """Per level, the number of embeddings under each cluster."""
        return [np.bincount(self.leaf_labels(i), minlength=len(lvl.centroids)) for i, lvl in enumerate(self.levels)]


def hierarchical_kmeans(
    x: np.ndarray | sharded.Vectors,
    num_clusters: Sequence[int],
    *,
    niter: int = 20,
    resampling_steps: int = 10,
    resample_size: int | None = None,
    seed: int = 0,
    use_gpu: bool = True,
    ranks: sharded.Ranks = sharded.LOCAL,
    cache: sharded.WorkCache = sharded.NO_CACHE,
) -> Hierarchy:
    """Hierarchical k-means with resampling: level l clusters the centroids of level l-1.

    Args:
        x: N-by-D L2-normalised embeddings, or the pool's shards: level 1 is distributed over `ranks`; the higher
            levels cluster centroids, which every rank holds, and run on each rank alike.
        num_clusters: Clusters per level, finest first and decreasing (e.g. 10M, 500k, 50k, 20k in Vo et al.'s
            web-scale run).
        niter: Lloyd iterations per level.
        resampling_steps: Resampling rounds per level.
        resample_size: Points per cluster a resampled centroid uses; None: the mean cluster size at that level.
        seed: Seed (each level adds its index).
        use_gpu: faiss on a GPU when present.
        ranks: The ranks sharing the shards of x.
        cache: Where level 1's per-shard assignments are kept (resume).
    """
    if len(x) == 0:
        raise ValueError("hierarchical k-means of an empty set")
    levels: list[Level] = []
    items = x
    for depth, k in enumerate(num_clusters):
        k = int(min(k, len(items)))
        size = resample_size or max(1, len(items) // k)
        level = resampled_kmeans(
            items,
            k,
            niter=niter,
            resampling_steps=resampling_steps,
            resample_size=size,
            seed=seed + depth,
            use_gpu=use_gpu,
            ranks=ranks if depth == 0 else sharded.LOCAL,
            cache=cache if depth == 0 else sharded.NO_CACHE,
            name=f"hkmeans/level{depth}",
        )
        levels.append(level)
        items = level.centroids
    return Hierarchy(levels=tuple(levels))


def balanced_allocation(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Water-filling: split `budget` as equally as possible over groups, no group given more than its size.

    Args:
        sizes: (G,) items available in each group.
        budget: Items to allocate in total (clipped to the total available).

    Returns:
        (G,) int64 counts summing to min(budget, sizes.sum()), each at most its size; ties broken by group order.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    budget = int(min(budget, sizes.sum()))
    counts = np.zeros(len(sizes), np.int64)
    open_groups = sizes > 0
    while budget > 0 and open_groups.any():
        share = budget // int(open_groups.sum())
        if share == 0:  # fewer items left than open groups: one more each to the first groups
            idx = np.flatnonzero(open_groups)[:budget]
            counts[idx] += 1
            break
        room = sizes - counts
        give = np.where(open_groups, np.minimum(room, share), 0)
        counts += give
        budget -= int(give.sum())
        open_groups = (sizes - counts) > 0
    return counts


def balanced_sample(hierarchy: Hierarchy, target: int, rng: np.random.Generator) -> np.ndarray:
    """Top-down balanced sampling of `target` embeddings (rows), Vo et al. section 4.3.

    Args:
        hierarchy: From `hierarchical_kmeans`.
        target: T, the number of rows to draw (clipped to N).
        rng: Generator for the random draws inside level-1 clusters.

    Returns:
        Sorted int64 rows of the sample.
    """
    sizes = hierarchy.cluster_sizes()
    top = len(hierarchy.levels) - 1
    # Budget of every cluster at the top level, then pushed down one level at a time.
    budget = balanced_allocation(sizes[top], target)
    for level in range(top, 0, -1):
        child_parent = hierarchy.levels[level].labels  # parent (at `level`) of every child cluster (at level - 1)
        child_budget = np.zeros(len(child_parent), np.int64)
        order = np.argsort(child_parent, kind="stable")
        bounds = np.searchsorted(child_parent[order], np.arange(len(budget) + 1))
        for parent in np.flatnonzero(budget):
            children = order[bounds[parent] : bounds[parent + 1]]
            child_budget[children] = balanced_allocation(sizes[level - 1][children], int(budget[parent]))
        budget = child_budget
    labels = hierarchy.levels[0].labels
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(len(budget) + 1))
    picks = [
        rng.choice(order[bounds[c] : bounds[c + 1]], size=int(budget[c]), replace=False) for c in np.flatnonzero(budget)
    ]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)
