"""The faiss module, union-find, the keep rule and deduplication against evaluation sets (appendix A.3)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as scipy_components

from components.curation import dedup, sharded
from components.curation.search import SearchParams, build_index, default_nlist, knn, resolve_kind
from tests.curation.vectors import planted, unit


def test_flat_search_is_exact_and_chunked() -> None:
    rng = np.random.default_rng(0)
    xb, xq = unit(rng.standard_normal((300, 16))), unit(rng.standard_normal((50, 16)))
    sims, ids = knn(xq, xb, 5, SearchParams(kind="flat", chunk_size=7))  # many small chunks, same answer
    exact = xq @ xb.T
    np.testing.assert_array_equal(ids, np.argsort(-exact, axis=1)[:, :5])
    np.testing.assert_allclose(sims, np.sort(exact, axis=1)[:, ::-1][:, :5], atol=1e-5)


def test_k_beyond_database_is_padded() -> None:
    x = unit(np.random.default_rng(1).standard_normal((3, 8)))
    sims, ids = knn(x, x, 5)
    assert (ids[:, 3:] == -1).all() and np.isneginf(sims[:, 3:]).all()
    assert (ids[:, 0] == np.arange(3)).all()


def test_auto_kind_and_nlist() -> None:
    assert resolve_kind(SearchParams(exact_max=100), 100) == "flat"
    assert resolve_kind(SearchParams(exact_max=100), 101) == "ivf_gemm"
    assert default_nlist(1_000_000) == 4000
    assert default_nlist(10) == 1


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq", "ivf_gemm"])
def test_ivf_indexes_find_planted_duplicates(kind: str) -> None:
    x, groups = planted(3000, dim=32, num_groups=100)
    params = SearchParams(kind=kind, nlist=32, nprobe=8, pq_m=8, chunk_size=1000)
    edges = dedup.duplicate_edges(x, k=8, threshold=0.8, params=params)
    found = {(min(a, b), max(a, b)) for a, b in zip(edges.src.tolist(), edges.dst.tolist(), strict=True)}
    truth = {(g[i], g[j]) for g in groups for i in range(len(g)) for j in range(i + 1, len(g))}
    assert len(truth & found) / len(truth) >= 0.99
    assert found <= truth  # nothing else is above 0.8 in this data
    assert (edges.src != edges.dst).all()
    # Similarities returned by ivf_pq are exact (re-ranked on float16 copies), not PQ approximations.
    np.testing.assert_allclose(edges.similarity, np.einsum("nd,nd->n", x[edges.src], x[edges.dst]), atol=2e-3)


def test_kmeans_assigns_every_vector() -> None:
    x, _ = planted(500, dim=16)
    result = sharded.kmeans(sharded.in_memory(x, shard_size=128), 10, niter=5, seed=0)
    assert result.centroids.shape == (10, 16)
    assert result.labels.shape == (500,) and set(result.labels.tolist()) <= set(range(10))
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-4)  # spherical
    # The assignment is the exact nearest centroid (bfloat16 products re-scored in float32), with its similarity.
    sims = x @ result.centroids.T
    np.testing.assert_allclose(sims[np.arange(len(x)), result.labels], sims.max(axis=1), atol=1e-6)
    np.testing.assert_allclose(result.similarity, sims.max(axis=1), atol=1e-5)


def test_kmeans_matches_plain_lloyd() -> None:
    """Hamerly's bounds and the bfloat16 products skip work, not results: plain float64 Lloyd from the same start."""
    rng = np.random.default_rng(3)
    x = unit(rng.standard_normal((600, 24)) + 2.0 * unit(rng.standard_normal((6, 24)))[rng.integers(0, 6, 600)])
    result = sharded.kmeans(sharded.in_memory(x, shard_size=100), 6, niter=8, seed=1)
    init = np.sort(np.random.default_rng(1).choice(600, size=6, replace=False))
    centroids = x[init].astype(np.float64)
    labels = np.argmax(x @ centroids.T, axis=1)
    for _ in range(8):  # 8 updates, each followed by an assignment
        sums = np.stack([x[labels == c].sum(0) if (labels == c).any() else centroids[c] for c in range(6)])
        centroids = sums / np.linalg.norm(sums, axis=1, keepdims=True)
        labels = np.argmax(x @ centroids.T, axis=1)
    np.testing.assert_allclose(result.centroids, centroids, atol=1e-5)
    assert (result.labels == np.argmax(x @ centroids.T, axis=1)).all()


def test_union_find_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    for num, num_edges in ((1, 0), (50, 30), (2000, 1500), (2000, 4000)):
        src, dst = rng.integers(0, num, num_edges), rng.integers(0, num, num_edges)
        labels = dedup.connected_components(num, src, dst)
        count, reference = scipy_components(
            coo_matrix((np.ones(num_edges), (src, dst)), shape=(num, num)), directed=False
        )
        assert len(np.unique(labels)) == count
        # Same partition: the pair (ours, scipy's) labels are in one-to-one correspondence.
        assert len({(a, b) for a, b in zip(labels.tolist(), reference.tolist(), strict=True)}) == count
        assert (labels <= np.arange(num)).all()  # a component's label is its smallest node


def test_union_find_long_chain() -> None:
    num = 10_000
    labels = dedup.connected_components(num, np.arange(1, num)[::-1], np.arange(num - 1)[::-1])
    assert (labels == 0).all()


def test_keep_rule_highest_resolution_then_first_row() -> None:
    labels = np.array([0, 0, 0, 3, 3, 5])
    pixels = np.array([100, 400, 400, 50, 10, 1])
    keep = dedup.choose_keepers(labels, pixels)
    assert keep.tolist() == [False, True, False, True, False, True]


def test_self_dedup_recall_precision(planted_vectors: tuple[np.ndarray, list[list[int]]]) -> None:
    x, groups = planted_vectors
    result = dedup.self_deduplicate(x, np.ones(len(x)), k=64, threshold=0.8)
    for group in groups:
        assert len(set(result.labels[group].tolist())) == 1
        assert result.keep[group].sum() == 1
    assert result.keep.sum() == len(x) - sum(len(g) - 1 for g in groups)
    assert result.size_histogram() == {1: len(x) - 60, 3: 20}


def test_eval_leakage_removes_the_whole_group() -> None:
    x, groups = planted(200, dim=32, num_groups=5, copies=2)
    group = groups[0]
    labels = dedup.self_deduplicate(x, np.ones(len(x)), k=16, threshold=0.8).labels
    eval_x = x[[group[0]]] + 0.0  # an evaluation image identical to one member
    leaks = dedup.eval_leakage(x, eval_x, labels, threshold=0.999)
    assert leaks.touching.sum() == 1
    assert np.flatnonzero(leaks.removed).tolist() == group  # its near-copies go too


def test_empty_inputs() -> None:
    empty = np.zeros((0, 8), np.float32)
    result = dedup.self_deduplicate(empty, np.zeros(0), k=4, threshold=0.5)
    assert len(result.labels) == 0 and len(result.edges) == 0
    leaks = dedup.eval_leakage(empty, unit(np.ones((2, 8))), result.labels, threshold=0.5)
    assert len(leaks.removed) == 0
    x = unit(np.ones((3, 8)))
    assert not dedup.eval_leakage(x, empty, np.arange(3), threshold=0.5).removed.any()


def test_build_index_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="N-by"):
        build_index(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="must divide"):
        build_index(unit(np.ones((100, 6))), SearchParams(kind="ivf_pq", pq_m=4))
    # An nlist larger than the database is clipped rather than failing the stage.
    assert build_index(unit(np.ones((10, 4))), SearchParams(kind="ivf_flat", nlist=20)).ntotal == 10
