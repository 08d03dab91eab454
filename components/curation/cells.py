"""The `ivf_gemm` index: an inverted file whose cells are scanned by bfloat16 matrix products, candidates re-scored
exactly.

The vectors are cut into `nlist` cells by spherical k-means (the coarse quantizer of an IVF index). A query is placed
in its `nprobe` nearest cells and compared with every vector of those cells, as in faiss's IVF-Flat; but the work is
done cell by cell, not query by query: all queries placed in one cell against that cell's vectors is one matrix
product (thousands of queries by hundreds of vectors at a million), the shape where a CPU with AMX or any GPU runs
bfloat16 products at its peak. A self-join of N vectors costs about N x nprobe x N / nlist x 2 D multiply-adds in
nlist products, instead of N small searches.

The bfloat16 products only choose: every pair kept (above the search floor, among a query's best `k x refine_factor`
of the cell) is scored again in float32 from the vectors themselves, so the similarities handed on are exact, as with
`ivf_pq`'s re-ranking. A bfloat16 product of unit vectors is within `BF16_ERROR` of the exact one, and the floor is
lowered by as much, so that no pair above the threshold is lost to rounding.

Results depend only on the data and the trained cells (every product's shape follows from them), never on how many
ranks share the shards. Memory: the indexed vectors as bfloat16 (2 D bytes each, what `ivf_pq`'s float16 re-ranking
copy takes) sorted by cell, plus one cell's product at a time. Runs on a GPU when torch sees one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

RESCORE_PAIRS = 65_536
"""Candidate pairs re-scored in float32 at a time."""

READ_ROWS = 16_384
"""Query rows read (as float32) at a time while a block of them is turned into bfloat16."""

BF16_ERROR = 0.0125
"""Bound on |bfloat16 similarity - exact similarity| for unit vectors: inputs rounded to bfloat16 (8 significant
bits, relative error 2^-8 each) give at most (2 2^-8 + 2^-16) sum |x_i c_i| <= 0.0079 (Cauchy-Schwarz), the product
rounded to bfloat16 adds 2^-8, and the float32 accumulation a few 1e-5. Candidates are kept this far below a
threshold before their exact re-scoring; k-means trusts a bfloat16 ranking only beyond it."""

INT16_MIN = np.iinfo(np.int16).min


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

    @property
    def nlist(self) -> int:
        return len(self.centroids)


def train_cells(train: np.ndarray, nlist: int, *, niter: int = 10, seed: int = 0) -> Cells:
    """Spherical k-means of `train` (L2-normalised rows) into `nlist` cells, with bfloat16 products."""
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
    return Cells(centroids.cpu().numpy().astype(np.float32))


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


def _bits_to_float(bits: np.ndarray) -> np.ndarray:
    """The float32 values of bfloat16 numbers given by their bits (int16)."""
    return (bits.astype(np.int32) << 16).view(np.float32)


def top_two(scores: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's best column of the bfloat16 `scores`, its score, and the best score of all its other columns:
    (columns int64, best float32, others float32; others is -inf with one column).

    On a CPU, as in `_above`, the maxima are taken on the bits read as int16 (the order of non-negative numbers;
    negative ones sort below them): several times faster than torch's bfloat16 `topk`. A row whose best is negative
    (every score negative, where int16 order is reversed) is settled by `topk`.
    """
    if scores.device.type != "cpu" or scores.shape[1] < 2:
        k = min(2, scores.shape[1])
        vals, cols = torch.topk(scores, k, dim=1)
        others = vals[:, 1].float() if k == 2 else torch.full((len(scores),), -torch.inf)
        return cols[:, 0].cpu().numpy(), vals[:, 0].float().cpu().numpy(), others.cpu().numpy()
    bits = scores.view(torch.int16).numpy()
    rows = np.arange(len(bits))
    first = bits.argmax(axis=1)
    top = bits[rows, first]
    bits[rows, first] = INT16_MIN  # the best set aside (and put back): the maximum of the others
    second = torch.from_numpy(bits).amax(dim=1).numpy()
    bits[rows, first] = top
    best = _bits_to_float(top)
    others = np.where(second < 0, np.float32(0.0), _bits_to_float(second))  # a negative maximum: all others < 0
    negative = np.flatnonzero(top < 0)
    if len(negative):
        vals, cols = torch.topk(scores[torch.from_numpy(negative)], 2, dim=1)
        first[negative], best[negative], others[negative] = cols[:, 0].numpy(), vals[:, 0].float(), vals[:, 1].float()
    return first.astype(np.int64), best, others


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


class _Rows:
    """A reusable bfloat16 buffer of rows, grown when a cell needs more."""

    def __init__(self, dim: int, dev: torch.device) -> None:
        self.held = torch.empty((0, dim), dtype=torch.bfloat16, device=dev)

    def take(self, num: int) -> torch.Tensor:
        if len(self.held) < num:
            self.held = torch.empty((max(num, 2 * len(self.held)), self.held.shape[1]), dtype=torch.bfloat16,
                                    device=self.held.device)  # fmt: skip
        return self.held[:num]


class CellIndex:
    """The vectors of one shard, sorted by cell (bfloat16), searched cell by cell.

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
        nearest cells when already known (`nearest_cells`), else computed here."""
        self.cells = cells
        self.take = take
        self.dev = device()
        self.centroids = _bf16(cells.centroids, self.dev)
        dim = cells.centroids.shape[1]
        if labels is None:  # a first pass to place every row
            labels = np.empty(num, np.int64)
            for start in range(0, num, chunk_size):
                rows = np.arange(start, min(num, start + chunk_size))
                labels[rows] = nearest_cells(np.asarray(take(rows), np.float32), self.centroids)[:, 0]
        labels = np.asarray(labels, np.int64)
        self.order = np.argsort(labels, kind="stable")  # shard rows, cell by cell
        self.offsets = np.searchsorted(labels[self.order], np.arange(cells.nlist + 1))
        position = torch.from_numpy(np.argsort(self.order))  # where each row goes
        # A cell's block is a view of this array, read padded to COLUMN_STEP rows: the padding rows past the end
        # are zeros (any rows would do: their scores are cut away).
        data = torch.zeros((num + COLUMN_STEP, dim), dtype=torch.bfloat16)
        for start in range(0, num, chunk_size):
            rows = np.arange(start, min(num, start + chunk_size))
            data[position[rows]] = _bf16(np.asarray(take(rows), np.float32), torch.device("cpu"))
        self.data = data.to(self.dev)

    @property
    def ntotal(self) -> int:
        return len(self.order)

    def scan(
        self, queries: torch.Tensor, query_cells: np.ndarray, keep: int, floor: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Candidate pairs: for every query, its best `keep` vectors of each cell it is placed in, above `floor`, by
        their bfloat16 similarity.

        Args:
            queries: Q-by-D bfloat16 rows (on this index's device), L2-normalised.
            query_cells: (Q, nprobe) the cells each query is placed in (`nearest_cells`), distinct per query.
            keep: At most this many candidates per query and cell.
            floor: Candidates whose bfloat16 similarity is below `floor - BF16_ERROR` are dropped (-inf: none).

        Returns:
            (query, id): query positions and shard rows, each pair once, unsorted.
        """
        qs, ids = [], []
        query_cells = query_cells.reshape(len(query_cells), -1)
        flat = query_cells.reshape(-1)
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(self.cells.nlist + 1))
        order = order // query_cells.shape[1]  # the query of each placement, ascending within a cell
        low = floor - BF16_ERROR
        block = _Rows(self.data.shape[1], self.dev)
        for cell in np.flatnonzero((np.diff(bounds) > 0) & (np.diff(self.offsets) > 0)):  # queries and vectors
            first, size = int(self.offsets[cell]), int(self.offsets[cell + 1] - self.offsets[cell])
            members = order[bounds[cell] : bounds[cell + 1]]
            rows = block.take(_padded(len(members), ROW_STEP))
            torch.index_select(queries, 0, torch.from_numpy(members).to(self.dev), out=rows[: len(members)])
            # Both sides padded: a handful of product shapes, whatever the cell sizes; the padding is cut away.
            scores = (rows @ self.data[first : first + _padded(size, COLUMN_STEP)].T)[: len(members), :size]
            qi, ci = _best(scores, keep, low)
            qs.append(members[qi])
            ids.append(self.order[first + ci])
        if not qs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(qs), np.concatenate(ids)

    def rescore(self, take: Callable[[np.ndarray], np.ndarray], query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact float32 similarities of pairs (query positions read through `take`, shard rows), `RESCORE_PAIRS`
        pairs at a time (memory stays bounded however many pairs there are)."""
        out = np.empty(len(query), np.float32)
        for start in range(0, len(query), RESCORE_PAIRS):
            part = slice(start, start + RESCORE_PAIRS)
            q_rows, q_where = np.unique(query[part], return_inverse=True)
            d_rows, d_where = np.unique(ids[part], return_inverse=True)
            q = np.asarray(take(q_rows), np.float32)
            d = np.asarray(self.take(d_rows), np.float32)
            out[part] = np.einsum("nd,nd->n", q[q_where], d[d_where])
        return out

    def join(
        self,
        take: Callable[[np.ndarray], np.ndarray],
        blocks: list[tuple[int, int]],
        query_cells: np.ndarray,
        keep: int,
        floor: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`scan` of many queries (a whole pool), a block of rows at a time: each block is read once and held as
        bfloat16 (2 D bytes a row), then every cell's share of it is searched; the kept pairs are scored exactly.

        Args:
            take: Sorted query rows -> their float32 vectors.
            blocks: (start, end) query rows, the blocks to read, in order.
            query_cells: (N_q, nprobe) the cells of every query row.
            keep, floor: As in `scan`.

        Returns:
            (query, id, similarity): query rows, shard rows and exact similarities at or above `floor`.
        """
        qs, ids, sims = [], [], []
        for start, end in blocks:
            queries = torch.empty((end - start, self.data.shape[1]), dtype=torch.bfloat16)
            for a in range(start, end, READ_ROWS):
                b = min(end, a + READ_ROWS)
                queries[a - start : b - start] = _bf16(np.asarray(take(np.arange(a, b)), np.float32), queries.device)
            q, i = self.scan(queries.to(self.dev), query_cells[start:end], keep, floor)
            v = self.rescore(lambda rows, first=start: take(first + rows), q, i)
            above = v >= floor
            qs.append(q[above] + start)
            ids.append(i[above])
            sims.append(v[above])
        if not qs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(qs), np.concatenate(ids), np.concatenate(sims)

    def search(self, queries: np.ndarray, k: int, nprobe: int, refine_factor: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar rows of every query (Q-by-k float32 exact similarities and int64 ids, best first, then
        the smaller id; -inf / -1 where fewer were found), each query placed in its `nprobe` nearest cells, from the
        best `k x refine_factor` of each cell by bfloat16 products."""
        num_q = len(queries)
        sims = np.full((num_q, k), -np.inf, np.float32)
        ids = np.full((num_q, k), -1, np.int64)
        if not num_q or not self.ntotal:
            return sims, ids
        placed = nearest_cells(queries, self.centroids, min(nprobe, self.cells.nlist))
        q, i = self.scan(_bf16(np.asarray(queries, np.float32), self.dev), placed, k * refine_factor, -np.inf)
        s = self.rescore(lambda rows: queries[rows], q, i)
        order = np.lexsort((i, -s, q))
        q, i, s = q[order], i[order], s[order]
        rank = np.arange(len(q)) - np.searchsorted(q, q, side="left")
        best = rank < k
        sims[q[best], rank[best]] = s[best]
        ids[q[best], rank[best]] = i[best]
        return sims, ids
