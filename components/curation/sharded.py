"""Curation on several ranks and nodes: the pool cut into fixed shards, each owned by one rank, joined by collectives.

Run: `torchrun --nproc_per_node R [--nnodes ...] -m components curate ...`, or `curate.nproc_per_node: R` in params.yaml
(the stage relaunches itself); docs/curation_at_scale.md.

Why the output does not depend on the number of ranks: the pool is cut into shards of `curate.shard_size` rows, a
unit of work fixed by the config, not by the world size. Everything that touches pool vectors runs on whole shards
and on a fixed grid of chunks inside them (an index per shard, all shards sharing one trained quantizer; queries in
chunks of `chunk_size` rows of a shard), and results are joined in shard order with ties broken by row number; sums
across ranks are sums of integers (exact in any order). One process runs the same shards one after the other, so one
rank and R ranks compute the same numbers; only where each is computed changes.

Which rank searches what: every rank indexes only the shards it owns (shard s on rank s mod R) and streams every
query chunk of the pool past them, keeping the edges above the threshold. Memory per rank is then its shards'
indexes plus one query chunk, and falls as ranks are added; the other way round (each rank's queries against every
shard) would need every shard's index on every rank. Queries are read from the memory-mapped embeddings, which all
ranks see (the embed stage's shared output folder).

What travels between ranks (torch.distributed, gloo): `all_gather_object` of per-shard results (edges above a
threshold, top-k lists, per-image best matches, verification outcomes) and of the trained index from rank 0, and
`all_reduce` of integer centroid sums in k-means. Per-image metadata (manifest rows, duplicate-group labels, one
best similarity per image) is held by every rank: tens of bytes per image against the D x 2 bytes of its embedding.

Resume: every per-shard (or per-chunk) result is written atomically under the work folder with a fingerprint of
what it depends on (`WorkCache`); a rerun, on any number of ranks, loads the finished ones and computes the rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.curation.cells import BF16_ERROR, top_two
from components.curation.search import (
    DEFAULT_SEARCH,
    SearchIndex,
    SearchParams,
    TrainedIndex,
    fill_index,
    from_bytes,
    to_bytes,
    train_index,
    training_rows,
)
from components.log import get_logger

log = get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Ranks and collectives
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks that share the work, and the collectives between them."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The ranks of the running process group (one rank without one)."""
        from components.runtime import several_ranks

        if not several_ranks():
            return cls()
        import torch.distributed as dist

        return cls(dist.get_rank(), dist.get_world_size())

    def owns(self, chunk: int) -> bool:
        """Whether this rank computes `chunk` (chunks go round the ranks: chunk c to rank c mod R)."""
        return chunk % self.world == self.rank

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (`all_gather_object`)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_exact(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum of an int64 array over the ranks (integers: exact in any order)."""
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(np.asarray(values, dtype=np.int64))  # a copy: all_reduce works in place
        dist.all_reduce(tensor)
        return tensor.numpy()


LOCAL = Ranks()
"""One process owning every shard; also what every rank uses for data it holds whole (seeds, evaluation sets)."""


# --------------------------------------------------------------------------------------------------------------------
# Resumable per-chunk results
# --------------------------------------------------------------------------------------------------------------------


class WorkCache:
    """Per-chunk results written atomically as .npz under `folder`, each with the fingerprint of its inputs.

    A result is reused only when its recorded fingerprint (the run's fingerprint, the step's name and the step's own
    inputs, e.g. a threshold) matches; anything else is computed again and overwritten. No folder: nothing is kept.
    """

    def __init__(self, folder: str | Path | None, fingerprint: str = "") -> None:
        self.folder = Path(folder) if folder is not None else None
        self.fingerprint = fingerprint

    def _key(self, name: str, inputs: str) -> str:
        return hashlib.sha256(f"{self.fingerprint}\n{name}\n{inputs}".encode()).hexdigest()[:16]

    def path(self, name: str) -> Path | None:
        return self.folder / f"{name}.npz" if self.folder is not None else None

    def load(self, name: str, inputs: str = "") -> dict[str, np.ndarray] | None:
        """The stored result of `name`, or None when absent, unreadable or of other inputs."""
        path = self.path(name)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["__fingerprint__"]) != self._key(name, inputs):
                    return None
                return {k: data[k] for k in data.files if k != "__fingerprint__"}
        except Exception as err:  # a truncated file from a killed run: computed again
            log.warning("work cache: %s unreadable (%s), computed again", path, err)
            return None

    def save(self, name: str, inputs: str, arrays: dict[str, np.ndarray]) -> None:
        path = self.path(name)
        if path is None:
            return
        from components import storage

        path.parent.mkdir(parents=True, exist_ok=True)
        with storage.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, __fingerprint__=np.array(self._key(name, inputs)), **arrays)


NO_CACHE = WorkCache(None)

Result = dict[str, np.ndarray]


def map_chunks(
    ranks: Ranks,
    num_chunks: int,
    compute: Callable[[int, Any], Result],
    *,
    cache: WorkCache = NO_CACHE,
    name: str,
    inputs: str = "",
    prepare: Callable[[], Any] | None = None,
) -> list[Result]:
    """Computes chunk c on rank c mod R (or loads it from the cache), and gives every rank all results in order.

    Args:
        ranks: The ranks sharing the work.
        num_chunks: Chunks 0 .. num_chunks - 1 (a grid fixed by the data, never by the number of ranks).
        compute: (chunk, what `prepare` returned) -> the chunk's arrays; pure and local (no collectives).
        cache: Where finished chunks are kept.
        name: The step's name (the cache's sub-folder).
        inputs: What else the step's results depend on (a threshold, a k), for their fingerprint.
        prepare: Work shared by a rank's chunks that may use collectives (training an index); called on every rank,
            and only when some rank has a chunk to compute.
    """
    mine = {c: cache.load(f"{name}/{c:05d}", inputs) for c in range(num_chunks) if ranks.owns(c)}
    missing = [c for c, found in mine.items() if found is None]
    if len(missing) < len(mine):
        log.info("%s: %d of %d chunks reused from %s", name, len(mine) - len(missing), len(mine), cache.folder)
    state = prepare() if prepare is not None and any(ranks.gather(bool(missing))) else None
    for c in missing:
        mine[c] = compute(c, state)
        cache.save(f"{name}/{c:05d}", inputs, mine[c])
    joined: dict[int, Result] = {}
    for part in ranks.gather(mine):
        joined.update(part)
    return [joined[c] for c in range(num_chunks)]


def concat(results: Sequence[Result], key: str, dtype: Any, width: int | None = None) -> np.ndarray:
    """The `key` arrays of `results`, concatenated (an empty array of `dtype` when there are none)."""
    parts = [r[key] for r in results]
    if parts:
        return np.concatenate(parts).astype(dtype, copy=False)
    return np.zeros((0, width) if width is not None else 0, dtype)


# --------------------------------------------------------------------------------------------------------------------
# Vectors cut into shards
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vectors:
    """Rows 0 .. n - 1 of a set of L2-normalised vectors, cut into shards of consecutive rows; read on demand.

    `take(rows)` returns the float32 vectors of sorted rows (read from memory maps, whitened when the stage whitens);
    no rank ever holds all of them.
    """

    bounds: np.ndarray
    """(S + 1,) first row of each shard, then n."""
    take: Callable[[np.ndarray], np.ndarray]
    dim: int
    chunk_size: int = DEFAULT_SEARCH.chunk_size
    """Rows read, indexed or searched at a time (the fixed grid inside each shard)."""

    def __len__(self) -> int:
        return int(self.bounds[-1])

    @property
    def num_shards(self) -> int:
        return len(self.bounds) - 1

    def shard(self, s: int) -> tuple[int, int]:
        """(first row, end row) of shard s."""
        return int(self.bounds[s]), int(self.bounds[s + 1])

    def read(self, start: int, end: int) -> np.ndarray:
        """Rows start .. end - 1 as float32."""
        return self.take(np.arange(start, end))

    def chunks(self, s: int) -> Iterator[tuple[int, int]]:
        """The fixed chunks of shard s: (start, end) rows."""
        first, last = self.shard(s)
        for start in range(first, last, self.chunk_size):
            yield start, min(last, start + self.chunk_size)

    def all_chunks(self) -> Iterator[tuple[int, int]]:
        for s in range(self.num_shards):
            yield from self.chunks(s)

    def subset(self, rows: np.ndarray) -> Vectors:
        """The vectors of sorted `rows`, renumbered 0 .. len(rows) - 1, each shard keeping those that were its own."""
        rows = np.asarray(rows, np.int64)
        bounds = np.searchsorted(rows, self.bounds)
        return Vectors(bounds, lambda r: self.take(rows[r]), self.dim, self.chunk_size)


def in_memory(x: np.ndarray, *, shard_size: int | None = None, chunk_size: int = DEFAULT_SEARCH.chunk_size) -> Vectors:
    """`x` (N-by-D, float16 or float32) as `Vectors` of shards of `shard_size` rows (None: one shard)."""
    if x.ndim != 2:
        raise ValueError(f"vectors must be N-by-D, got shape {x.shape}")
    return Vectors(shard_bounds(len(x), shard_size), lambda r: np.asarray(x[r], np.float32), x.shape[1], chunk_size)


def shard_bounds(num: int, shard_size: int | None) -> np.ndarray:
    """(S + 1,) bounds of shards of `shard_size` rows (the last one shorter); one shard if None or empty."""
    if not num or shard_size is None or shard_size >= num:
        return np.array([0, num], np.int64)
    return np.append(np.arange(0, num, shard_size), num).astype(np.int64)


def concat_vectors(a: Vectors, b: Vectors) -> Vectors:
    """The rows of `a`, then those of `b` (numbered on), the shards of both kept."""
    num_a = len(a)

    def take(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), a.dim), np.float32)
        first = rows < num_a
        if first.any():
            out[first] = a.take(rows[first])
        if (~first).any():
            out[~first] = b.take(rows[~first] - num_a)
        return out

    if a.dim != b.dim:
        raise ValueError(f"vectors of width {a.dim} and {b.dim} cannot be joined")
    return Vectors(np.concatenate([a.bounds, b.bounds[1:] + num_a]), take, a.dim, a.chunk_size)


def as_vectors(x: np.ndarray | Vectors, chunk_size: int) -> Vectors:
    return x if isinstance(x, Vectors) else in_memory(x, chunk_size=chunk_size)


# --------------------------------------------------------------------------------------------------------------------
# Indexes of shards
# --------------------------------------------------------------------------------------------------------------------


def shared_training(vectors: Vectors, params: SearchParams, ranks: Ranks) -> TrainedIndex:
    """The index every shard of `vectors` is filled from: trained once, on rank 0, from a sample of all rows, and
    sent to the other ranks (faiss's HNSW quantizer is built in a thread-dependent order: one copy for all)."""
    data = None
    if ranks.rank == 0:
        rows = training_rows(len(vectors), params)
        train = vectors.take(rows) if len(rows) else np.zeros((0, vectors.dim), np.float32)
        data = to_bytes(train_index(train, len(vectors), vectors.dim, params))
    return from_bytes(ranks.broadcast(data))


def shard_index(vectors: Vectors, trained: TrainedIndex, s: int) -> SearchIndex:
    """An index over shard s of `vectors` (ids are rows within the shard)."""
    first, last = vectors.shard(s)
    return fill_index(trained, last - first, lambda rows: vectors.take(first + rows))


def cell_labels(vectors: Vectors, trained: TrainedIndex, ranks: Ranks) -> np.ndarray:
    """`ivf_gemm`: the `nprobe` nearest cells of every row, nearest first (N-by-nprobe int32), each rank placing the
    rows of its shards (a fixed grid of chunks), every rank receiving all of them."""
    from components.curation.cells import nearest_cells

    centroids = torch.from_numpy(trained.index.centroids).to(torch.bfloat16)
    nprobe = min(trained.params.nprobe, len(centroids))

    def compute(s: int, _: Any) -> Result:
        parts = [nearest_cells(vectors.read(a, b), centroids, nprobe).astype(np.int32) for a, b in vectors.chunks(s)]
        return {"labels": np.concatenate(parts) if parts else np.zeros((0, nprobe), np.int32)}

    return concat(map_chunks(ranks, vectors.num_shards, compute, name="cells"), "labels", np.int32, nprobe)


QUERY_BLOCK_ROWS = 1 << 20
"""`ivf_gemm` self-join: pool rows read and held (as bfloat16, 2 D bytes a row) at a time on each rank."""


def query_blocks(vectors: Vectors, rows: int = QUERY_BLOCK_ROWS) -> list[tuple[int, int]]:
    """The fixed chunks of `vectors`, joined into consecutive blocks of about `rows` rows (never cut)."""
    blocks: list[tuple[int, int]] = []
    for start, end in vectors.all_chunks():
        if blocks and blocks[-1][1] == start and end - blocks[-1][0] <= rows:
            blocks[-1] = (blocks[-1][0], end)
        else:
            blocks.append((start, end))
    return blocks


def merge_top_k(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best of its candidates (Q-by-C, -inf / -1 for none): highest similarity, then smallest id."""
    if sims.shape[1] == 0:
        return np.full((len(sims), k), -np.inf, np.float32), np.full((len(sims), k), -1, np.int64)
    by_id = np.argsort(np.where(ids < 0, np.iinfo(np.int64).max, ids), axis=1, kind="stable")
    sims, ids = np.take_along_axis(sims, by_id, 1), np.take_along_axis(ids, by_id, 1)
    best = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    sims, ids = np.take_along_axis(sims, best, 1), np.take_along_axis(ids, best, 1)
    if sims.shape[1] < k:
        pad = k - sims.shape[1]
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    ids = np.where(np.isneginf(sims), -1, ids)
    return sims.astype(np.float32), ids.astype(np.int64)


def knn(
    queries: np.ndarray,
    vectors: Vectors,
    k: int,
    params: SearchParams = DEFAULT_SEARCH,
    *,
    ranks: Ranks = LOCAL,
    cache: WorkCache = NO_CACHE,
    name: str = "knn",
) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar rows of `vectors` for each of a few queries (held by every rank): each shard searched by
    its rank, the candidates merged. Returns (sims, ids) Q-by-k, -inf / -1 where there are fewer rows."""
    num_q = len(queries)
    if len(vectors) == 0 or num_q == 0 or k == 0:
        return np.full((num_q, k), -np.inf, np.float32), np.full((num_q, k), -1, np.int64)

    def compute(s: int, trained: TrainedIndex) -> Result:
        first, last = vectors.shard(s)
        if last == first:
            return {"sims": np.zeros((num_q, 0), np.float32), "ids": np.zeros((num_q, 0), np.int64)}
        sims, ids = shard_index(vectors, trained, s).search(queries, min(k, last - first))
        return {"sims": sims, "ids": np.where(ids >= 0, ids + first, -1)}

    parts = map_chunks(ranks, vectors.num_shards, compute, cache=cache, name=name, inputs=f"k={k}",
                       prepare=lambda: shared_training(vectors, params, ranks))  # fmt: skip
    sims = np.concatenate([p["sims"] for p in parts], axis=1)
    ids = np.concatenate([p["ids"] for p in parts], axis=1)
    return merge_top_k(sims, ids, k)


def self_edges(
    vectors: Vectors,
    k: int,
    threshold: float,
    params: SearchParams = DEFAULT_SEARCH,
    *,
    ranks: Ranks = LOCAL,
    cache: WorkCache = NO_CACHE,
    name: str = "self_edges",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kNN graph of `vectors` above `threshold`: each row's k nearest other rows with similarity >= threshold.

    Each rank indexes its shards and streams every chunk of queries past them, keeping the candidates above the
    threshold (sparse: memory follows the edges, not N x k); the candidates of all shards are then joined and each
    row keeps its k + 1 best (the row itself among them, then dropped), as one index over all rows would.

    Returns:
        (src, dst, sim): int64, int64, float32, src != dst, sorted by src then similarity.
    """
    num = len(vectors)
    if num < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    k_search = min(k + 1, num)

    def prepare() -> tuple[TrainedIndex, np.ndarray | None]:
        trained = shared_training(vectors, params, ranks)
        return trained, cell_labels(vectors, trained, ranks) if trained.kind == "ivf_gemm" else None

    def compute(s: int, state: tuple[TrainedIndex, np.ndarray | None]) -> Result:
        trained, labels = state
        first, last = vectors.shard(s)
        src, dst, sim = [], [], []
        if last > first and labels is not None:  # ivf_gemm: every cell's queries against the shard at once
            index = fill_index(trained, last - first, lambda rows: vectors.take(first + rows), labels[first:last, 0])
            q, i, v = index.index.join(vectors.take, query_blocks(vectors), labels, k_search * params.refine_factor,
                                       threshold)  # fmt: skip
            src, dst, sim = [q], [i + first], [v]
        elif last > first:
            index = shard_index(vectors, trained, s)
            for start, end in vectors.all_chunks():
                sims, ids = index.search(vectors.read(start, end), min(k_search, last - first))
                rows, cols = np.nonzero(sims >= threshold)
                src.append(rows + start)
                dst.append(ids[rows, cols] + first)
                sim.append(sims[rows, cols])
        return {
            "src": np.concatenate(src).astype(np.int64) if src else np.zeros(0, np.int64),
            "dst": np.concatenate(dst).astype(np.int64) if dst else np.zeros(0, np.int64),
            "sim": np.concatenate(sim).astype(np.float32) if sim else np.zeros(0, np.float32),
        }

    parts = map_chunks(ranks, vectors.num_shards, compute, cache=cache, name=name,
                       inputs=f"k={k_search},threshold={threshold!r}", prepare=prepare)  # fmt: skip
    src, dst, sim = concat(parts, "src", np.int64), concat(parts, "dst", np.int64), concat(parts, "sim", np.float32)
    order = np.lexsort((dst, -sim, src))  # per source row: most similar first, then the smaller row
    src, dst, sim = src[order], dst[order], sim[order]
    rank_in_row = np.arange(len(src)) - np.searchsorted(src, src, side="left")
    keep = (rank_in_row < k_search) & (src != dst)
    return src[keep], dst[keep], sim[keep]


@dataclass(frozen=True)
class BestMatches:
    """Every row of a sharded set searched against a small database held by every rank."""

    best_sim: np.ndarray
    """(N,) similarity of each row's nearest database row (-inf without one)."""
    best_id: np.ndarray
    """(N,) that database row (-1 without one)."""
    src: np.ndarray
    """Candidate pairs among each row's k nearest with similarity >= the floor: the row, ..."""
    dst: np.ndarray
    """... the database row, ..."""
    sim: np.ndarray
    """... and their similarity."""


def match_rows(
    vectors: Vectors,
    database: SearchIndex | None,
    k: int,
    floor: float,
    *,
    ranks: Ranks = LOCAL,
    cache: WorkCache = NO_CACHE,
    name: str = "match",
) -> BestMatches:
    """Each row of `vectors` (sharded) against `database` (small, the same index on every rank): its best match, and
    its candidate pairs among its k nearest above `floor` (evaluation leakage, copies of seed images)."""
    num = len(vectors)
    if database is None or database.ntotal == 0 or num == 0:
        empty = np.zeros(0, np.int64)
        return BestMatches(np.full(num, -np.inf, np.float32), np.full(num, -1, np.int64), empty, empty,
                           np.zeros(0, np.float32))  # fmt: skip

    def compute(s: int, _: Any) -> Result:
        best_sim, best_id, src, dst, sim = [], [], [], [], []
        for start, end in vectors.chunks(s):
            sims, ids = database.search(vectors.read(start, end), k)
            best_sim.append(sims[:, 0])
            best_id.append(ids[:, 0])
            rows, cols = np.nonzero(sims >= floor)
            src.append(rows + start)
            dst.append(ids[rows, cols])
            sim.append(sims[rows, cols])
        out = {"best_sim": best_sim, "best_id": best_id, "src": src, "dst": dst, "sim": sim}
        dtypes = {"best_sim": np.float32, "best_id": np.int64, "src": np.int64, "dst": np.int64, "sim": np.float32}
        return {key: np.concatenate(v).astype(dtypes[key]) if v else np.zeros(0, dtypes[key]) for key, v in out.items()}

    parts = map_chunks(ranks, vectors.num_shards, compute, cache=cache, name=name, inputs=f"k={k},floor={floor!r}")
    return BestMatches(
        concat(parts, "best_sim", np.float32),
        concat(parts, "best_id", np.int64),
        concat(parts, "src", np.int64),
        concat(parts, "dst", np.int64),
        concat(parts, "sim", np.float32),
    )


# --------------------------------------------------------------------------------------------------------------------
# k-means with exact sums across ranks
# --------------------------------------------------------------------------------------------------------------------

FIXED_POINT_BITS = 30
"""Centroid sums are sums of integers: each coordinate (|x| <= 1) rounded to a multiple of 2^-30, below float32's
resolution for the coordinates of a unit vector; the int64 sums hold 8e9 rows before they could overflow."""


def _fixed(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.float16:  # multiples of 2^-24: exact integers once scaled, in float32 already
        return (x.astype(np.float32) * np.float32(1 << FIXED_POINT_BITS)).astype(np.int64)
    return np.rint(np.asarray(x, np.float64) * (1 << FIXED_POINT_BITS)).astype(np.int64)


def _centroids(sums: np.ndarray, counts: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Normalised cluster means (spherical k-means); an empty cluster keeps its previous centroid."""
    means = sums.astype(np.float64) / (1 << FIXED_POINT_BITS)
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    out = np.where((counts[:, None] > 0) & (norms > 0), means / np.maximum(norms, 1e-30), previous)
    return out.astype(np.float32)


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The inner product of each row of `a` with the same row of `b`, in float32 (each row on its own: the result
    of a row does not depend on the others)."""
    return torch.einsum("nd,nd->n", a, b)


def _float32_rows(x: np.ndarray) -> torch.Tensor:
    """Rows (float16 or float32, possibly a read-only memory map) as a float32 tensor, read-only use (it shares the
    memory of a writable float32 array). Torch converts float16 several times faster than numpy."""
    rows = np.asarray(x)
    if not (rows.flags.writeable and rows.flags.c_contiguous):
        rows = np.array(rows)
    tensor = torch.from_numpy(rows)
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def _nearest(x: np.ndarray, centroids: np.ndarray, params: SearchParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The most similar centroid of every row, its exact similarity, and an upper bound on the similarity of every
    other centroid (all Hamerly's lower bound needs): (ids int64, sims float32, others float32), each (N,).

    On the CPU the similarity matrix is a bfloat16 product (AMX or AVX-512 BF16 where the CPU has them: 3x the float32
    rate here) and each row's bfloat16 best is scored again in float32. It is the exact best whenever that exact
    score beats the others' bfloat16 maximum by `BF16_ERROR`, which then bounds every other centroid. Any other row
    (a near tie) is scored in float32 against every centroid, in one product for all such rows of the block (faster
    than scoring a few candidates each: the gathers cost more than the product). So the assignment is the exact one,
    and exact scores, computed row by row, do not depend on which rows are searched together (on how many ranks).
    """
    from components.curation.search import build_index, num_gpus

    num = len(x)
    if params.use_gpu and num_gpus() > 0:
        flat = SearchParams(kind="flat", chunk_size=params.chunk_size, use_gpu=True)
        sims, ids = build_index(centroids, flat).search(x, min(2, len(centroids)))
        others = sims[:, 1] if sims.shape[1] > 1 else np.full(num, -np.inf, np.float32)
        return ids[:, 0].astype(np.int64), sims[:, 0].astype(np.float32), others.astype(np.float32)
    ids_out, sims_out = np.empty(num, np.int64), np.empty(num, np.float32)
    others_out = np.full(num, -np.inf, np.float32)
    c32 = torch.from_numpy(np.ascontiguousarray(centroids, np.float32))
    if len(centroids) < 2:
        sims_out[:] = (_float32_rows(x) @ c32[0]).numpy()
        ids_out[:] = 0
        return ids_out, sims_out, others_out
    c_bf = c32.to(torch.bfloat16).T.contiguous()  # (D, C)
    rows_per_block = max(2, min(8192, (1 << 25) // len(centroids)))
    for start in range(0, num, rows_per_block):
        block = _float32_rows(x[start : start + rows_per_block])  # (n, D)
        approx = block.to(torch.bfloat16) @ c_bf  # (n, C)
        first, _, others = top_two(approx)
        best = _row_dots(block, c32.index_select(0, torch.from_numpy(first))).numpy()  # float32, row by row
        outside = others + BF16_ERROR  # no centroid but the best scores above this
        done = slice(start, start + len(block))
        ids_out[done], sims_out[done], others_out[done] = first, best, outside
        unsure = np.flatnonzero(best <= outside)
        if len(unsure):  # near ties: every centroid in float32 (a few percent of the rows, then fewer)
            exact = _exact_rows(block[torch.from_numpy(unsure)], c32)
            ids_out[start + unsure], sims_out[start + unsure], others_out[start + unsure] = exact
    return ids_out, sims_out, others_out


EXACT_ROWS = 256
"""Rows per float32 product of `_exact_rows` (the last one padded with zeros)."""


def _exact_rows(rows: torch.Tensor, c32: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best centroid of each row scored in float32 against every centroid, its similarity and the runner-up's:
    (ids, sims, others). Products of `EXACT_ROWS` rows, padded: BLAS picks its kernel by the shape (small ones take
    another, which rounds differently), so with one shape a row's scores do not depend on the rows beside it."""
    num = len(rows)
    padded = np.zeros((-(-num // EXACT_ROWS) * EXACT_ROWS, rows.shape[1]), np.float32)
    padded[:num] = rows.numpy()
    c_t = c32.numpy().T
    scores = np.concatenate([padded[i : i + EXACT_ROWS] @ c_t for i in range(0, len(padded), EXACT_ROWS)])[:num]
    at = np.arange(num)
    ids = np.argmax(scores, axis=1)
    sims = scores[at, ids]
    scores[at, ids] = -np.inf
    return ids, sims, scores.max(axis=1)


def _segment_sums(labels: np.ndarray, x: np.ndarray, num_clusters: int, sign: int = 1) -> np.ndarray:
    """(C, D) integer sums of the fixed-point rows of x per label (times `sign`)."""
    sums = np.zeros((num_clusters, x.shape[1]), np.int64)
    if not len(labels):
        return sums
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    for begin in range(0, len(order), 65_536):  # bounded int64 copies; segments cut at block edges add up the same
        part = order[begin : begin + 65_536]
        part_labels = sorted_labels[begin : begin + 65_536]
        heads = np.flatnonzero(np.r_[True, part_labels[1:] != part_labels[:-1]])
        sums[part_labels[heads]] += sign * np.add.reduceat(_fixed(x[part]), heads, axis=0)
    return sums


def _distance(sims: np.ndarray) -> np.ndarray:
    """Euclidean distance between unit vectors from their inner product."""
    return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * sims.astype(np.float64)))


@dataclass(frozen=True)
class KMeans:
    """Centroids and the assignment of every row."""

    centroids: np.ndarray
    """C-by-D float32 unit-norm centroids."""
    labels: np.ndarray
    """(N,) int64 cluster of every row."""
    similarity: np.ndarray
    """(N,) float32 inner product of every row with its centroid."""
    train_size: int
    """Rows the centroids were fitted on."""
    recomputed_share: float = 1.0
    """Share of the training rows' nearest-centroid searches the distance bounds did not rule out (1: plain Lloyd)."""


def kmeans(
    vectors: Vectors,
    num_clusters: int,
    *,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    init_centroids: np.ndarray | None = None,
    params: SearchParams = DEFAULT_SEARCH,
    ranks: Ranks = LOCAL,
    cache: WorkCache = NO_CACHE,
    name: str = "kmeans",
) -> KMeans:
    """Spherical k-means (Lloyd), distributed, with Hamerly's bounds, then every row assigned.

    Fitted on at most `max_points_per_centroid * C` rows (sampled; faiss's default, more points barely move the
    centroids). Each rank assigns the training rows of its shards and the centroid sums are joined by an integer
    `all_reduce` (`FIXED_POINT_BITS`), so every rank holds the same centroids and the result does not depend on the
    number of ranks. Hamerly's bounds (an upper bound on each row's distance to its centroid, a lower bound on the
    distance to any other, both moved by how far centroids move) skip the search for rows whose centroid cannot have
    changed; a skipped row keeps the assignment a full search would give it (up to float rounding of the bounds, which
    carry a margin). Initial centroids: C distinct training rows drawn with `seed`.

    Args:
        vectors: The rows to cluster (L2-normalised).
        num_clusters: C; clipped to the number of rows.
        niter: Lloyd iterations.
        seed: Seed of the sample and the initialisation.
        max_points_per_centroid: Training-sample cap per centroid.
        init_centroids: Optional C-by-D starting centroids (k-means with resampling starts from its last ones).
        params: The flat search's knobs (GPU or not, chunk size).
        ranks: The ranks sharing the rows.
        cache: Where the final assignment of each shard is kept.
        name: The step's name in the cache.
    """
    num = len(vectors)
    if num == 0:
        raise ValueError("k-means of an empty set")
    num_clusters = int(min(num_clusters, num))
    train_rows = training_sample(num, max_points_per_centroid * num_clusters, seed)
    if init_centroids is None:
        init = np.sort(np.random.default_rng(seed).choice(len(train_rows), size=num_clusters, replace=False))
        centroids = _unit(vectors.take(train_rows[init]))
    else:
        centroids = _unit(np.asarray(init_centroids, np.float32))
    # This rank's training rows: those in its shards (every row belongs to one shard).
    shard_of = np.searchsorted(vectors.bounds, train_rows, side="right") - 1
    mine = train_rows[np.array([ranks.owns(int(s)) for s in shard_of], bool)] if len(train_rows) else train_rows
    x = vectors.take(mine) if len(mine) else np.zeros((0, vectors.dim), np.float32)
    centroids, recomputed = _lloyd(x, centroids, niter, params, ranks)
    labels, sims = assign(vectors, centroids, params, ranks=ranks, cache=cache, name=name)
    return KMeans(centroids, labels, sims, len(train_rows), recomputed)


def training_sample(num: int, cap: int, seed: int) -> np.ndarray:
    from components.curation.search import sample_rows

    return sample_rows(num, cap, seed)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)).astype(np.float32)


BOUND_MARGIN = 1e-5
"""Slack on Hamerly's bounds for the float rounding of similarities and centroids."""


def _lloyd(
    x: np.ndarray, centroids: np.ndarray, niter: int, params: SearchParams, ranks: Ranks
) -> tuple[np.ndarray, float]:
    """Lloyd iterations over this rank's rows `x`; returns the centroids every rank agrees on and the share of
    searches the bounds did not skip."""
    num_c = len(centroids)
    labels, sims, others = _nearest(x, centroids, params)
    upper = _distance(sims)  # distance to the own centroid, at most
    lower = _distance(others) if num_c > 1 else np.full(len(x), np.inf)  # to any other centroid, at least
    sums = _segment_sums(labels, x, num_c)
    counts = np.bincount(labels, minlength=num_c).astype(np.int64)
    searched = possible = len(x)
    for _ in range(niter):
        new = _centroids(ranks.sum_exact(sums), ranks.sum_exact(counts), centroids)
        drift = np.linalg.norm(new.astype(np.float64) - centroids.astype(np.float64), axis=1)
        centroids = new
        possible += len(x)
        if not len(x):
            continue
        order = np.argsort(-drift, kind="stable")
        top, second = order[0], order[min(1, num_c - 1)]
        upper += drift[labels] + BOUND_MARGIN
        lower -= np.where(labels == top, drift[second], drift[top]) + BOUND_MARGIN
        # Hamerly's tightening of the upper bound (the exact distance to the own centroid first) is left out: it
        # spared 1-4 % of the searches here and cost as much as a tenth of them.
        check = np.flatnonzero(upper > lower)
        if not len(check):
            continue
        searched += len(check)
        ids, sims, others = _nearest(x[check], centroids, params)
        moved = ids != labels[check]
        rows = check[moved]
        sums -= _segment_sums(labels[rows], x[rows], num_c)  # exact: the integer sums follow every move
        sums += _segment_sums(ids[moved], x[rows], num_c)
        counts += np.bincount(ids[moved], minlength=num_c) - np.bincount(labels[rows], minlength=num_c)
        labels[check] = ids
        upper[check] = _distance(sims)
        lower[check] = _distance(others) if num_c > 1 else np.inf
    searched_all, possible_all = ranks.sum_exact(np.array([searched, possible], np.int64)).tolist()
    return centroids, searched_all / max(possible_all, 1)


def assign(
    vectors: Vectors,
    centroids: np.ndarray,
    params: SearchParams = DEFAULT_SEARCH,
    *,
    ranks: Ranks = LOCAL,
    cache: WorkCache = NO_CACHE,
    name: str = "assign",
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (by inner product) of every row: (labels int64, similarities float32), each shard on its
    rank."""
    digest = hashlib.sha256(np.ascontiguousarray(centroids, np.float32).tobytes()).hexdigest()[:16]

    def compute(s: int, _: Any) -> Result:
        labels, sims = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
        for start, end in vectors.chunks(s):
            ids, best, _ = _nearest(vectors.read(start, end), centroids, params)
            labels.append(ids)
            sims.append(best)
        return {"labels": np.concatenate(labels).astype(np.int64), "sims": np.concatenate(sims).astype(np.float32)}

    parts = map_chunks(ranks, vectors.num_shards, compute, cache=cache, name=name, inputs=f"centroids={digest}")
    return concat(parts, "labels", np.int64), concat(parts, "sims", np.float32)


def cluster_sums(
    vectors: Vectors, rows: np.ndarray, labels: np.ndarray, num_clusters: int, *, ranks: Ranks = LOCAL
) -> tuple[np.ndarray, np.ndarray]:
    """Integer (fixed-point) sums and counts of `rows` (sorted) per cluster `labels[rows]`, over every rank's shards."""
    sums = np.zeros((num_clusters, vectors.dim), np.int64)
    shard_of = np.searchsorted(vectors.bounds, rows, side="right") - 1
    mine = rows[np.array([ranks.owns(int(s)) for s in shard_of], bool)] if len(rows) else rows
    for start in range(0, len(mine), vectors.chunk_size):
        part = mine[start : start + vectors.chunk_size]
        sums += _segment_sums(labels[part], vectors.take(part), num_clusters)
    counts = np.bincount(labels[mine], minlength=num_clusters).astype(np.int64)
    return ranks.sum_exact(sums), ranks.sum_exact(counts)


def centroids_from_sums(sums: np.ndarray, counts: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Normalised means of integer sums; an empty cluster keeps its previous centroid."""
    return _centroids(sums, counts, previous)
