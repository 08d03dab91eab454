"""The `ivf_gemm` index (components/curation/cells.py): cells scanned by bfloat16 products, pairs re-scored exactly."""

from __future__ import annotations

import numpy as np
import torch

from components.curation import dedup, sharded
from components.curation.cells import BF16_ERROR, _above, _best, top_two
from components.curation.search import SearchParams, build_index
from tests.curation.vectors import planted, unit


def _pairs(edges: dedup.DuplicateEdges) -> set[tuple[int, int]]:
    return {(min(a, b), max(a, b)) for a, b in zip(edges.src.tolist(), edges.dst.tolist(), strict=True)}


def test_probing_every_cell_is_the_exact_search() -> None:
    rng = np.random.default_rng(0)
    x = unit(rng.standard_normal((1500, 32)))
    queries = unit(rng.standard_normal((40, 32)))
    exact = build_index(x, SearchParams(kind="flat")).search(queries, 10)
    ours = build_index(x, SearchParams(kind="ivf_gemm", nlist=12, nprobe=12)).search(queries, 10)
    assert (ours[1] == exact[1]).all()
    np.testing.assert_allclose(ours[0], exact[0], atol=1e-5)  # float32 scores, not bfloat16 ones


def test_the_self_join_finds_the_exact_graph_when_every_cell_is_probed() -> None:
    x, _ = planted(2000, dim=24, num_groups=80)
    flat = dedup.duplicate_edges(x, k=8, threshold=0.7, params=SearchParams(kind="flat"))
    ours = dedup.duplicate_edges(x, k=8, threshold=0.7, params=SearchParams(kind="ivf_gemm", nlist=10, nprobe=10))
    assert _pairs(ours) == _pairs(flat) and len(flat) > 100
    np.testing.assert_allclose(ours.similarity, np.einsum("nd,nd->n", x[ours.src], x[ours.dst]), atol=1e-5)


def test_shards_do_not_change_the_graph() -> None:
    """One shard or several (each indexed alone, every query block read once per shard): the same edges."""
    x, _ = planted(3000, dim=32, num_groups=100)
    params = SearchParams(kind="ivf_gemm", nlist=24, nprobe=6, chunk_size=500)
    one = sharded.self_edges(sharded.in_memory(x, chunk_size=500), 8, 0.75, params)
    four = sharded.self_edges(sharded.in_memory(x, shard_size=800, chunk_size=500), 8, 0.75, params)
    for a, b in zip(one, four, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(one[0]) > 100


def test_scores_above_a_floor_read_from_the_bfloat16_bits() -> None:
    """The int16 reading of bfloat16 bits agrees with the comparison itself, negative scores and a floor that
    bfloat16 cannot hold included."""
    rng = np.random.default_rng(1)
    scores = torch.from_numpy(rng.uniform(-1, 1, (300, 500)).astype(np.float32)).to(torch.bfloat16)
    scores[5, 7] = 0.59375  # exactly a bfloat16 number
    for low in (0.0, 0.3, 0.59375, 0.6, 0.95):
        rows, cols = _above(scores, low)
        want = np.nonzero(scores.float().numpy() >= float(torch.tensor(low).to(torch.bfloat16).float()) - 1e-9)
        if float(torch.tensor(low).to(torch.bfloat16)) > low:  # rounded up: the value just below counts too
            want = np.nonzero(scores.float().numpy() >= low - 2**-8)
        got = set(zip(rows.tolist(), cols.tolist(), strict=True))
        assert got >= {(r, c) for r, c in zip(*want, strict=True) if scores[r, c].float() >= low}
        assert all(float(scores[r, c]) >= low - 2**-7 for r, c in got)  # nothing below the floor's neighbourhood


def test_a_crowded_row_keeps_its_best() -> None:
    scores = torch.full((3, 50), -0.5).to(torch.bfloat16)
    scores[0, :20] = torch.linspace(0.7, 0.9, 20).to(torch.bfloat16)  # 20 above the floor, 4 kept
    scores[2, [3, 9]] = 0.8
    rows, cols = _best(scores, 4, 0.6 - BF16_ERROR)
    got = {(r, c) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)}
    assert got == {(0, 16), (0, 17), (0, 18), (0, 19), (2, 3), (2, 9)}
    rows, cols = _best(scores, 2, -np.inf)  # no floor: every row's best 2
    assert np.bincount(rows).tolist() == [2, 2, 2]


def test_kmeans_near_ties_are_settled_exactly() -> None:
    """Many centroids, all close to every row (the bfloat16 best and runner-up within rounding): the assignment is
    still the exact nearest centroid."""
    rng = np.random.default_rng(2)
    centroids = unit(1.0 + 0.05 * rng.standard_normal((64, 48))).astype(np.float32)
    x = unit(1.0 + 0.05 * rng.standard_normal((700, 48))).astype(np.float32)
    exact = x.astype(np.float64) @ centroids.T.astype(np.float64)
    top2 = np.sort(exact, axis=1)[:, -2:]
    assert np.median(top2[:, 1] - top2[:, 0]) < 2**-8  # the two best are closer than bfloat16 can tell apart
    ids, sims, bound = sharded._nearest(x, centroids, SearchParams(use_gpu=False))
    chosen = exact[np.arange(len(x)), ids]
    np.testing.assert_allclose(chosen, exact.max(axis=1), atol=1e-6)  # the best, up to float32 rounding
    np.testing.assert_allclose(sims, chosen, atol=1e-6)
    others = np.where(np.arange(64)[None] == ids[:, None], -np.inf, exact).max(axis=1)
    assert (bound >= others - 1e-6).all()  # an upper bound on every other centroid


def test_kmeans_near_ties_between_two_or_three_of_many_centroids_are_settled_exactly() -> None:
    """Rows halfway between two or three of many centroids: the exact best, and a bound that holds for every other
    centroid and stays close (the exact runner-up)."""
    rng = np.random.default_rng(5)
    centroids = unit(rng.standard_normal((500, 64))).astype(np.float32)
    groups = np.stack([rng.choice(500, 3, replace=False) for _ in range(900)])
    weights = np.where(np.arange(900)[:, None] % 2 == 0, [1.0, 1.0, 0.0], [1.0, 1.0, 1.0])  # 2 or 3 centroids
    mixed = (centroids[groups] * weights[:, :, None]).sum(axis=1)
    x = unit(mixed + 1e-4 * rng.standard_normal((900, 64))).astype(np.float32)
    exact = x.astype(np.float64) @ centroids.T.astype(np.float64)
    top2 = np.sort(exact, axis=1)[:, -2:]
    assert np.median(top2[:, 1] - top2[:, 0]) < 2**-8  # closer than bfloat16 can tell apart
    ids, sims, bound = sharded._nearest(x, centroids, SearchParams(use_gpu=False))
    chosen = exact[np.arange(len(x)), ids]
    np.testing.assert_allclose(chosen, exact.max(axis=1), atol=1e-6)
    np.testing.assert_allclose(sims, chosen, atol=1e-6)
    others = np.where(np.arange(500)[None] == ids[:, None], -np.inf, exact).max(axis=1)
    assert (bound >= others - 1e-6).all()
    assert (bound < sims + 3 * BF16_ERROR).all()


def test_top_two_reads_bfloat16_bits_as_the_numbers_sort() -> None:
    """The int16 reading of bfloat16 scores gives torch's float answer, rows of negative scores included."""
    rng = np.random.default_rng(3)
    values = rng.uniform(-1, 1, (300, 50)).astype(np.float32)
    values[:40] = -np.abs(values[:40])  # every score negative
    values[40:60, 0], values[40:60, 1:] = np.abs(values[40:60, 0]), -np.abs(values[40:60, 1:])  # one non-negative
    values[60:70, 0] = -0.0
    scores = torch.from_numpy(values).to(torch.bfloat16)
    kept = scores.clone()
    cols, best, others = top_two(scores)
    assert torch.equal(scores.view(torch.int16), kept.view(torch.int16))  # the scores are left as they were
    as_float = kept.float()
    expected_best = as_float.max(dim=1).values.numpy()
    np.testing.assert_array_equal(best, expected_best)
    np.testing.assert_array_equal(as_float.numpy()[np.arange(300), cols], expected_best)
    rest = as_float.clone()
    rest[np.arange(300), cols] = -np.inf
    assert (others >= rest.max(dim=1).values.numpy()).all()  # an upper bound on every other column
    exact_rows = np.r_[0:40, 70:300]  # where some other column is non-negative, or all are negative: the very value
    np.testing.assert_array_equal(others[exact_rows], rest.max(dim=1).values.numpy()[exact_rows])


def test_exact_row_scores_do_not_depend_on_the_rows_scored_together() -> None:
    """k-means re-scores each row's best centroid in float32 in blocks whose size depends on how the rows are shared
    out: a row's score must come out the same bits in any block (so 1 rank and 2 ranks agree)."""
    rng = np.random.default_rng(4)
    a = torch.from_numpy(rng.standard_normal((3000, 384)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((3000, 384)).astype(np.float32))
    whole = sharded._row_dots(a, b)
    for size in (1, 7, 1000):
        parts = torch.cat([sharded._row_dots(a[i : i + size], b[i : i + size]) for i in range(0, len(a), size)])
        assert torch.equal(parts, whole), size
    centroids = b[:500]
    whole = sharded._exact_rows(a, centroids)
    for size in (1, 2, 7, 1000):
        parts = [sharded._exact_rows(a[i : i + size], centroids) for i in range(0, len(a), size)]
        for got, expected in zip(map(np.concatenate, zip(*parts, strict=True)), whole, strict=True):
            np.testing.assert_array_equal(got, expected, err_msg=str(size))
