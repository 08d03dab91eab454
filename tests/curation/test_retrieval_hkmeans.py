"""Retrieval (appendix A.4) and hierarchical k-means with balanced sampling (Vo et al. 2024)."""

from __future__ import annotations

import numpy as np

from components.curation import hkmeans, retrieval
from tests.curation.vectors import unit


def test_sample_retrieval_k_and_min_similarity() -> None:
    rng = np.random.default_rng(0)
    pool = unit(rng.standard_normal((100, 16)))
    seeds = pool[[3, 7]] + 0.0
    found = retrieval.sample_retrieval(pool, seeds, k=4)
    assert len(found) <= 8 and {3, 7} <= set(found.pool_rows.tolist())
    assert (found.method == "sample").all() and set(found.seed_rows.tolist()) <= {0, 1}
    assert len(set(found.pool_rows.tolist())) == len(found)  # one entry per pool image
    # A seed set with no match above the threshold retrieves nothing (and does not fail).
    far = retrieval.sample_retrieval(pool, -pool[:1], k=4, min_similarity=0.99)
    assert len(far) == 0


def test_cluster_retrieval_needs_t_seeds_and_takes_n() -> None:
    pool_labels = np.repeat(np.arange(4), 25)
    seed_labels = np.array([0, 0, 0, 1, 2, 2, 2, 2])
    found = retrieval.cluster_retrieval(
        pool_labels, np.ones(100, np.float32), seed_labels, min_seeds=3, per_cluster=10, rng=np.random.default_rng(0)
    )
    assert sorted(set(found.cluster.tolist())) == [0, 2]
    assert len(found) == 20
    assert (pool_labels[found.pool_rows] == found.cluster).all()
    none = retrieval.cluster_retrieval(
        pool_labels, np.ones(100), seed_labels, min_seeds=9, per_cluster=10, rng=np.random.default_rng(0)
    )
    assert len(none) == 0


def test_cap_keeps_most_similar_samples_first() -> None:
    found = retrieval.Retrieved(
        pool_rows=np.arange(6),
        method=np.array(["sample", "sample", "cluster", "sample", "cluster", "cluster"], dtype=object),
        seed_rows=np.array([0, 0, -1, 1, -1, -1]),
        cluster=np.array([-1, -1, 2, -1, 2, 3]),
        similarity=np.array([0.5, 0.9, 0.1, 0.7, 0.2, 0.3], np.float32),
    )
    capped = retrieval.cap(found, 2, np.random.default_rng(0))
    assert sorted(capped.pool_rows.tolist()) == [1, 3]
    assert retrieval.cap(found, None, np.random.default_rng(0)) is found


def test_balanced_allocation_water_filling() -> None:
    assert hkmeans.balanced_allocation(np.array([100, 2, 50, 0]), 60).tolist() == [29, 2, 29, 0]
    assert hkmeans.balanced_allocation(np.array([3, 3]), 100).tolist() == [3, 3]
    counts = hkmeans.balanced_allocation(np.array([5, 5, 5]), 7)
    assert counts.sum() == 7 and counts.max() - counts.min() <= 1


def test_hierarchical_sampling_balances_a_skewed_pool() -> None:
    rng = np.random.default_rng(0)
    centers = unit(rng.standard_normal((8, 16)) * 3)
    sizes = np.array([800, 400, 200, 100, 50, 25, 15, 10])  # a long-tailed concept distribution
    concept = np.repeat(np.arange(8), sizes)
    x = unit(centers[concept] + 0.05 * rng.standard_normal((len(concept), 16)))
    hierarchy = hkmeans.hierarchical_kmeans(x, (32, 8), niter=10, resampling_steps=3, seed=0)
    assert [len(level.centroids) for level in hierarchy.levels] == [32, 8]
    assert hierarchy.leaf_labels(1).shape == (len(x),)
    rows = hkmeans.balanced_sample(hierarchy, 160, np.random.default_rng(0))
    assert len(rows) == 160 and len(np.unique(rows)) == 160
    sampled = np.bincount(concept[rows], minlength=8)
    uniform = sizes / sizes.sum() * 160

    def entropy(counts: np.ndarray) -> float:
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    # Rare concepts get far more than their share under uniform sampling, and the mix is closer to uniform.
    assert sampled[-1] >= 5 * uniform[-1] and sampled[0] < uniform[0]
    assert entropy(sampled) > entropy(sizes) + 0.3


def test_resampled_kmeans_recomputes_centroids_from_nearest_points() -> None:
    rng = np.random.default_rng(1)
    x = unit(np.concatenate([rng.standard_normal((900, 8)) * 0.05 + 1, rng.standard_normal((100, 8))]))
    plain = hkmeans.resampled_kmeans(x, 10, niter=10, resampling_steps=0, resample_size=10, seed=0)
    resampled = hkmeans.resampled_kmeans(x, 10, niter=10, resampling_steps=5, resample_size=10, seed=0)
    assert plain.labels.shape == resampled.labels.shape == (1000,)
    assert not np.allclose(plain.centroids, resampled.centroids)
    np.testing.assert_allclose(np.linalg.norm(resampled.centroids, axis=1), 1.0, atol=1e-4)
    # Every point is assigned to its nearest resampled centroid (up to float rounding between two GEMM kernels).
    sims = x @ resampled.centroids.T
    np.testing.assert_allclose(sims[np.arange(len(x)), resampled.labels], sims.max(axis=1), atol=1e-6)
