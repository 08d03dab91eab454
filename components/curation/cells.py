"""The `ivf_gemm` index: an inverted file whose cells are scanned by bfloat16 matrix products, candidates re-scored
exactly.

The pool is cut into `nlist` cells by spherical k-means (the coarse quantizer of an IVF index). Every cell knows the
`probes` cells whose centroids are nearest its own (itself first). A query is placed in its `spill` nearest cells and
compared with every vector of those cells' probe cells; all queries placed in one cell share these candidates, so a
cell's queries against its candidates is one matrix product (hundreds of queries by thousands of candidates), the
shape where a CPU with AMX or any GPU runs bfloat16 products at its peak. A self-join of N vectors thus costs about
N x spill x probes x N / nlist x 2 D multiply-adds in nlist products, instead of N small searches.

The bfloat16 products only choose: every pair kept (above the search floor, among a query's best `k x refine_factor`)
is scored again in float32 from the float16 vectors, so the similarities handed on are exact, as with `ivf_pq`'s
re-ranking. A bfloat16 product of unit vectors is within 2^-8 of the exact one, and the floor is lowered by
`BF16_MARGIN` so no pair above the threshold is lost to rounding.

Probing by the query's cells rather than by the query itself (faiss's IVF) would lose the neighbours of a query that
sits near a cell's border, in a cell whose centroid is far from its neighbours' cells: placing every query in its two
nearest cells (`spill`) brings them back (tests/curation/test_search_dedup.py; `benchmarks/curation.py` measures
recall against exact search). Results depend only on the data and the
trained cells (every product's shape follows from them), never on how many ranks share the shards.

Memory: the indexed vectors as float16 (2 D bytes each, the float16 re-ranking copy `ivf_pq` keeps too) sorted by
cell, plus one cell's product at a time. Runs on a GPU when torch sees one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

BF16_MARGIN = 0.01
"""How far below a threshold the bfloat16 similarities are kept before the exact re-scoring (the rounding error of a
bfloat16 product of two unit vectors is at most about 2^-8)."""


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _bf16(x: np.ndarray | torch.Tensor, dev: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return t.to(dev, torch.bfloat16)


def nearest_cells(x: np.ndarray, centroids: torch.Tensor, k: int = 1, block: int = 16_384) -> np.ndarray:
    """The k cells (by bfloat16 inner product) nearest every row of x: (N, k) int64, best first."""
    out = np.empty((len(x), k), np.int64)
    for start in range(0, len(x), block):
        sims = _bf16(x[start : start + block], centroids.device) @ centroids.T
        # max() rather than argmax(): the same first maximum, several times faster on bfloat16 CPU tensors
        best = sims.max(dim=1, keepdim=True).indices if k == 1 else torch.topk(sims, k, dim=1).indices
        out[start : start + block] = best.cpu().numpy()
    return out


@dataclass(frozen=True)
class Cells:
    """The trained part of an `ivf_gemm` index, shared by every shard of one database."""

    centroids: np.ndarray
    """(nlist, D) float32 unit-norm centroids."""
    probes: np.ndarray
    """(nlist, probes) int64: the cells scanned for a query placed in each cell, itself first."""

    @property
    def nlist(self) -> int:
        return len(self.centroids)


def train_cells(train: np.ndarray, nlist: int, probes: int, *, niter: int = 10, seed: int = 0) -> Cells:
    """Spherical k-means of `train` (L2-normalised rows) into `nlist` cells with bfloat16 products, and each cell's
    `probes` nearest cells."""
    dev = device()
    nlist = int(max(1, min(nlist, len(train))))
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.ascontiguousarray(train, np.float32)).to(dev)
    xb = x.to(torch.bfloat16)
    centroids = x[torch.from_numpy(np.sort(rng.choice(len(train), nlist, replace=False))).to(dev)].clone()
    for _ in range(niter):
        labels = torch.from_numpy(nearest_cells(xb, centroids.to(torch.bfloat16))[:, 0]).to(dev)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        norms = sums.norm(dim=1, keepdim=True)
        centroids = torch.where(norms > 0, sums / norms.clamp_min(1e-30), centroids)  # an empty cell stays put
    c = centroids.cpu().numpy().astype(np.float32)
    probes = int(max(1, min(probes, nlist)))
    near = torch.topk(torch.from_numpy(c) @ torch.from_numpy(c).T, probes, dim=1).indices.numpy()
    # Itself first (a duplicated centroid could outrank it in a tie), then the others in order.
    lists = np.empty((nlist, probes), np.int64)
    for a in range(nlist):
        others = near[a][near[a] != a]
        lists[a] = np.concatenate([[a], others])[:probes]
    return Cells(c, lists)


ROW_STEP, COLUMN_STEP = 32, 256
"""Products are padded to multiples of these (queries, candidates): a handful of shapes, each planned once by the
matrix library, rather than one plan per cell."""


def _padded(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


def _above(scores: torch.Tensor, low: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the bfloat16 `scores` at or above `low`."""
    if scores.device.type == "cpu" and low >= 0:
        # The bits of a non-negative bfloat16 number, read as int16, sort as the numbers do (negative ones read as
        # negative integers): numpy's vectorised int16 comparisons then do in a fraction of the time what torch's
        # bfloat16 reductions do on a CPU. Most rows have nothing above a duplicate threshold: their maxima say so.
        limit = torch.tensor(low, dtype=torch.bfloat16)
        if float(limit) > low:  # rounded up: the bfloat16 number just below still counts
            limit = torch.nextafter(limit.float(), torch.tensor(-1.0)).to(torch.bfloat16)
        bits = scores.view(torch.int16).numpy()
        limit_bits = int(limit.view(torch.int16))
        hit = np.flatnonzero(bits.max(axis=1) >= limit_bits)
        rows, cols = np.nonzero(bits[hit] >= limit_bits)
        return hit[rows], cols
    hit = (scores.max(dim=1).values >= low).nonzero()[:, 0]
    rows, cols = (scores[hit] >= low).nonzero(as_tuple=True)
    return hit[rows].cpu().numpy(), cols.cpu().numpy()


def _best(scores: torch.Tensor, keep: int, low: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of each row's best `keep` bfloat16 `scores` at or above `low` (all its best `keep` if -inf)."""
    num_rows, num_cols = scores.shape
    if not np.isfinite(low):
        top = torch.topk(scores, min(keep, num_cols), dim=1).indices
        return np.repeat(np.arange(num_rows), top.shape[1]), top.reshape(-1).cpu().numpy()
    rows, cols = _above(scores, low)
    crowded = np.flatnonzero(np.bincount(rows, minlength=num_rows) > keep)
    if len(crowded):  # more than `keep` above the floor: those rows keep their best `keep`
        top = torch.topk(scores[torch.from_numpy(crowded).to(scores.device)], keep, dim=1).indices.cpu().numpy()
        ok = ~np.isin(rows, crowded)
        rows = np.concatenate([rows[ok], np.repeat(crowded, keep)])
        cols = np.concatenate([cols[ok], top.reshape(-1)])
    return rows, cols


class CellIndex:
    """The vectors of one shard, sorted by cell (bfloat16), searched cell block by cell block.

    Ids are rows of the shard (0 .. ntotal - 1); exact similarities are computed from the rows `take` returns.
    """

    def __init__(
        self,
        cells: Cells,
        num: int,
        take: Callable[[np.ndarray], np.ndarray],
        chunk_size: int,
        labels: np.ndarray | None = None,
    ) -> None:
        """Reads the `num` rows through `take` (sorted rows -> float32 rows), `chunk_size` at a time; `labels`: their
        cells when already known (`nearest_cells`), else computed here."""
        self.cells = cells
        self.take = take
        self.dev = device()
        self.centroids = _bf16(cells.centroids, self.dev)
        known = labels is not None
        labels = np.asarray(labels, np.int64) if known else np.empty(num, np.int64)
        data = torch.empty((num, cells.centroids.shape[1]), dtype=torch.bfloat16)
        for start in range(0, num, chunk_size):
            rows = np.arange(start, min(num, start + chunk_size))
            chunk = _bf16(np.asarray(take(rows), np.float32), torch.device("cpu"))
            data[start : start + len(rows)] = chunk
            if not known:
                labels[rows] = nearest_cells(chunk, self.centroids)[:, 0]
        self.order = np.argsort(labels, kind="stable")  # shard rows, cell by cell
        self.offsets = np.searchsorted(labels[self.order], np.arange(cells.nlist + 1))
        self.data = data[torch.from_numpy(self.order)].to(self.dev)
        del data

    @property
    def ntotal(self) -> int:
        return len(self.order)

    def candidates(self, cell: int) -> np.ndarray:
        """Positions (in cell order) of the vectors in `cell`'s probe cells."""
        spans = [np.arange(self.offsets[c], self.offsets[c + 1]) for c in self.cells.probes[cell]]
        return np.concatenate(spans) if spans else np.zeros(0, np.int64)

    def scan(
        self, take: Callable[[np.ndarray], np.ndarray], query_cells: np.ndarray, keep: int, floor: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every query, its best `keep` candidates above `floor`, scored exactly.

        Args:
            take: Sorted query positions -> their Q-by-D float32 (or float16) rows, L2-normalised.
            query_cells: (Q,) or (Q, t): the cell(s) each query is placed in (`nearest_cells`); a query placed in t
                cells is compared with the vectors of all their probe cells (a pair may then come back twice).
            keep: At most this many candidates per query and cell, chosen by their bfloat16 similarity.
            floor: Candidates whose bfloat16 similarity is below `floor - BF16_MARGIN` are dropped (-inf: none).

        Returns:
            (query, id, similarity): query positions, shard rows and exact float32 similarities, unsorted.
        """
        qs, ids, sims = [], [], []
        query_cells = query_cells.reshape(len(query_cells), -1)
        flat = query_cells.reshape(-1)
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(self.cells.nlist + 1))
        order = order // query_cells.shape[1]  # the query of each placement, ascending within a cell
        low = floor - BF16_MARGIN
        dim = self.data.shape[1]
        for cell in np.flatnonzero(np.diff(bounds)):
            pos = self.candidates(cell)
            if not len(pos):
                continue
            members = order[bounds[cell] : bounds[cell + 1]]
            q32 = np.asarray(take(members), np.float32)
            queries = torch.zeros((_padded(len(members), ROW_STEP), dim), dtype=torch.bfloat16, device=self.dev)
            queries[: len(members)] = _bf16(q32, self.dev)
            block = torch.zeros((_padded(len(pos), COLUMN_STEP), dim), dtype=torch.bfloat16, device=self.dev)
            torch.index_select(self.data, 0, torch.from_numpy(pos).to(self.dev), out=block[: len(pos)])
            scores = (queries @ block.T)[: len(members), : len(pos)]
            qi, ci = _best(scores, keep, low)
            if not len(qi):
                continue
            rows = self.order[pos[ci]]
            unique, where = np.unique(rows, return_inverse=True)
            exact = np.einsum("nd,nd->n", q32[qi], np.asarray(self.take(unique), np.float32)[where])
            qs.append(members[qi])
            ids.append(rows)
            sims.append(exact)
        if not qs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        q, i, v = np.concatenate(qs), np.concatenate(ids), np.concatenate(sims).astype(np.float32)
        if query_cells.shape[1] > 1:  # a pair seen from two of its query's cells: once
            _, first = np.unique(q * max(self.ntotal, 1) + i, return_index=True)
            q, i, v = q[first], i[first], v[first]
        return q, i, v

    def search(self, queries: np.ndarray, k: int, refine_factor: int, spill: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar rows of every query (Q-by-k float32 exact similarities and int64 ids, best first, then
        the smaller id; -inf / -1 where fewer were found), from the best `k x refine_factor` by bfloat16 products, each
        query placed in its `spill` nearest cells."""
        num_q = len(queries)
        sims = np.full((num_q, k), -np.inf, np.float32)
        ids = np.full((num_q, k), -1, np.int64)
        if not num_q or not self.ntotal:
            return sims, ids
        placed = nearest_cells(queries, self.centroids, min(spill, self.cells.nlist))
        q, i, s = self.scan(lambda r: queries[r], placed, k * refine_factor, -np.inf)
        order = np.lexsort((i, -s, q))
        q, i, s = q[order], i[order], s[order]
        rank = np.arange(len(q)) - np.searchsorted(q, q, side="left")
        best = rank < k
        sims[q[best], rank[best]] = s[best]
        ids[q[best], rank[best]] = i[best]
        return sims, ids
