"""Deduplication (DINOv2 appendix A.3): near-duplicate groups in the pool, and pool images that copy evaluation images.

Self-deduplication: every pool image queries its k nearest pool neighbours (k = 64 in the paper's pipeline); a pair
above the similarity threshold is an edge of the duplicate graph; the connected components of that graph (union-find)
are the duplicate groups, and one image per group is kept. The rule (`choose_keepers`): the highest resolution
(width x height), then the earliest row in manifest order, so the choice is deterministic and keeps the copy with the
most pixels (a resize or a crop of an image has fewer; an upscale has more but no more information, which is the
price of a simple rule: it is the one the issue suggests and the paper does not specify).

Deduplication against evaluation sets ("relative" deduplication): a pool image whose highest similarity to any
evaluation image reaches `eval_threshold` touches that evaluation image, and its whole duplicate group is removed,
so a second copy of a leaked image cannot survive through its sibling. The similarity is computed with the pool
images as queries against an index of the evaluation images (k = 1): the same pairs as querying with each evaluation
image, but exact for every pool image (an evaluation image with more than k copies above the threshold cannot hide
some of them behind the k limit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from components.curation import sharded
from components.curation.search import DEFAULT_SEARCH, SearchParams, max_similarity


@dataclass(frozen=True)
class DuplicateEdges:
    """Pairs of pool rows above the threshold: (src, dst, similarity), src != dst."""

    src: np.ndarray
    dst: np.ndarray
    similarity: np.ndarray

    def __len__(self) -> int:
        return len(self.src)


def duplicate_edges(
    x: np.ndarray | sharded.Vectors,
    *,
    k: int,
    threshold: float,
    params: SearchParams = DEFAULT_SEARCH,
    **sharding: Any,
) -> DuplicateEdges:
    """Edges of the duplicate graph: each row's k nearest neighbours with similarity at least `threshold`.

    Args:
        x: N-by-D L2-normalised embeddings (float16 or float32), or the pool's shards (`sharded.Vectors`).
        k: Neighbours searched per row (itself excluded).
        threshold: Cosine similarity of an edge.
        params: Index kind and knobs (exact for small N, IVF above; see `search`).
        sharding: `ranks`, `cache` and `name` of `sharded.self_edges` (each rank searches every row against the
            shards it owns).
    """
    # k + 1 searched: the row itself is (almost always) its own first neighbour and is dropped.
    src, dst, sim = sharded.self_edges(sharded.as_vectors(x, params.chunk_size), k, threshold, params, **sharding)
    return DuplicateEdges(src, dst, sim)


def connected_components(num_nodes: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Connected components by union-find, vectorised over edges.

    A parallel union-find (Shiloach-Vishkin style): each round hooks the larger root of every edge whose endpoints
    have different roots under the smaller one ("union by minimum"), then compresses every path fully (pointer
    jumping). Parents only ever point to smaller ids, so there are no cycles; the rounds stop when every edge joins
    one root. Each round is a few numpy passes over the remaining edges, so a billion-edge graph is not a Python loop.

    Args:
        num_nodes: N; nodes are 0 .. N - 1.
        src, dst: Edge endpoints (undirected; duplicates and self-loops allowed).

    Returns:
        (N,) int64 component label of every node: the smallest node id of its component.
    """
    parent = np.arange(num_nodes, dtype=np.int64)
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    while len(src):
        root_src, root_dst = parent[src], parent[dst]
        live = root_src != root_dst
        if not live.any():
            break
        src, dst, root_src, root_dst = src[live], dst[live], root_src[live], root_dst[live]
        low, high = np.minimum(root_src, root_dst), np.maximum(root_src, root_dst)
        np.minimum.at(parent, high, low)  # hook: a root goes under the smallest root it is linked to
        while True:  # full path compression: every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


def group_sizes(labels: np.ndarray) -> np.ndarray:
    """(N,) size of the component of every node."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse]


def choose_keepers(labels: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """One node per component: the most pixels, then the smallest row (the documented keep rule).

    Args:
        labels: (N,) component labels.
        pixels: (N,) width x height of every image.

    Returns:
        (N,) bool, True for the kept node of each component.
    """
    num = len(labels)
    if num == 0:
        return np.zeros(0, bool)
    # lexsort sorts by the last key first: component, then most pixels, then smallest row.
    order = np.lexsort((np.arange(num), -np.asarray(pixels, dtype=np.int64), labels))
    first = np.ones(num, bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    keep = np.zeros(num, bool)
    keep[order[first]] = True
    return keep


@dataclass(frozen=True)
class SelfDedup:
    """The duplicate groups of a pool and the image kept from each."""

    labels: np.ndarray
    """(N,) component label (smallest row of the group)."""
    keep: np.ndarray
    """(N,) True for the one kept image of each group."""
    edges: DuplicateEdges

    @property
    def sizes(self) -> np.ndarray:
        """(N,) size of every row's group."""
        return group_sizes(self.labels)

    def size_histogram(self) -> dict[int, int]:
        """Number of groups of each size (size 1: images with no duplicate)."""
        _, counts = np.unique(self.labels, return_counts=True)
        values, groups = np.unique(counts, return_counts=True)
        return {int(v): int(g) for v, g in zip(values, groups, strict=True)}


def groups_from_edges(num: int, edges: DuplicateEdges, pixels: np.ndarray) -> SelfDedup:
    """Duplicate groups (union-find over `edges`) of `num` images and the keeper of each group."""
    labels = connected_components(num, edges.src, edges.dst)
    return SelfDedup(labels=labels, keep=choose_keepers(labels, pixels), edges=edges)


def self_deduplicate(
    x: np.ndarray, pixels: np.ndarray, *, k: int, threshold: float, params: SearchParams = DEFAULT_SEARCH
) -> SelfDedup:
    """Duplicate groups of the pool (kNN graph, threshold, union-find) and the keeper of each group.

    Args:
        x: N-by-D L2-normalised pool embeddings.
        pixels: (N,) width x height, for the keep rule.
        k: Neighbours per image (64 in the paper's pipeline).
        threshold: Cosine similarity above which two images are copies.
        params: Search knobs.
    """
    return groups_from_edges(len(x), duplicate_edges(x, k=k, threshold=threshold, params=params), pixels)


def leakage_from_copies(
    labels: np.ndarray, max_similarity: np.ndarray, nearest_eval: np.ndarray, copies: np.ndarray
) -> EvalLeakage:
    """Leakage from decided copy pairs: `copies` (N,) marks the pool images found to copy an evaluation image."""
    removed = np.isin(labels, np.unique(labels[copies])) if copies.any() else np.zeros(len(labels), bool)
    return EvalLeakage(max_similarity, nearest_eval, np.asarray(copies, bool), removed)


@dataclass(frozen=True)
class EvalLeakage:
    """Each pool image's nearest evaluation image and what deduplication against the evaluation sets removes."""

    max_similarity: np.ndarray
    """(N,) highest cosine similarity of each pool image to any evaluation image (-inf without evaluation images)."""
    nearest_eval: np.ndarray
    """(N,) row of that evaluation image (-1 without evaluation images)."""
    touching: np.ndarray
    """(N,) True where the image itself is at or above the threshold."""
    removed: np.ndarray
    """(N,) True for every image of a duplicate group that holds a touching image."""


def eval_leakage(
    pool_x: np.ndarray,
    eval_x: np.ndarray,
    labels: np.ndarray,
    *,
    threshold: float,
    params: SearchParams = DEFAULT_SEARCH,
) -> EvalLeakage:
    """Pool images to remove because they, or an image of their duplicate group, copy an evaluation image.

    Args:
        pool_x: N-by-D pool embeddings.
        eval_x: M-by-D embeddings of every evaluation image (all splits of all evaluation sets).
        labels: (N,) duplicate-group labels from `self_deduplicate`.
        threshold: Cosine similarity at or above which a pool image copies an evaluation image.
        params: Search knobs (the evaluation index is exact while M <= exact_max).
    """
    num = len(pool_x)
    if len(eval_x) == 0 or num == 0:
        sims = np.full(num, -np.inf, np.float32)
        return EvalLeakage(sims, np.full(num, -1, np.int64), np.zeros(num, bool), np.zeros(num, bool))
    sims, nearest = max_similarity(pool_x, eval_x, params)
    touching = sims >= threshold
    removed = np.isin(labels, np.unique(labels[touching]))
    return EvalLeakage(sims, nearest, touching, removed)


def curated_group_sizes(
    x: np.ndarray | sharded.Vectors, *, k: int, threshold: float, params: SearchParams = DEFAULT_SEARCH, **sharding: Any
) -> np.ndarray:
    """(N,) how many rows of x share each row's duplicate group: the check that nothing duplicated is left."""
    edges = duplicate_edges(x, k=k, threshold=threshold, params=params, **sharding)
    return group_sizes(connected_components(len(x), edges.src, edges.dst))
