"""The similarity indexes of curation: train and fill inner-product indexes (faiss, or `ivf_gemm` on torch), search
them in bounded chunks.

Every similarity in curation is a cosine similarity between L2-normalised embeddings, i.e. an inner product
(`METRIC_INNER_PRODUCT`). Four index kinds, picked by `SearchParams.kind`:

- `flat`: exact search (`IndexFlatIP`). Cost N_q x N_b x D per search; the right choice while the pool is small
  (the embedded demo) or on a GPU up to a few million vectors.
- `ivf_flat`: an inverted file (`IVF<nlist>,Flat`): a coarse k-means quantizer of `nlist` cells, each query scans the
  `nprobe` nearest cells. Stores the full float32 vectors (4 D bytes each).
- `ivf_pq`: the inverted file with product-quantised codes (`IVF<nlist>,PQ<m>x4fs`, 4-bit fast-scan codes, D / 8
  bytes per vector for m = D / 4) and an exact re-ranking (`Refine(SQfp16)`) of the best `k * refine_factor`
  candidates on float16 copies of the vectors. The embeddings are stored as float16, so the re-ranked similarities
  are exact.
- `ivf_gemm` (components/curation/cells.py): the inverted file of `ivf_flat`, scanned cell by cell with bfloat16
  matrix products (all queries placed in a cell against its vectors at once), the kept candidates re-scored
  exactly in float32. Stores the vectors as bfloat16 (2 D bytes, as `ivf_pq`'s re-ranking copy). On a CPU with AMX
  or on a GPU it is several times faster than `ivf_pq` at the same recall (benchmarks/curation.py); runs on torch,
  not faiss.

`auto` picks `flat` up to `exact_max` database vectors and `ivf_gemm` above. On a machine with faiss-gpu and a GPU the
index is moved to the GPUs (`flat`, `ivf_flat`; `ivf_pq` uses 8-bit PQ codes there, as GPU faiss has no fast-scan
codes), and `ivf_gemm` runs on torch's GPU; elsewhere everything runs on the CPU (faiss's OpenMP threads, torch's).

Memory stays bounded: vectors are added and queried `chunk_size` rows at a time (float16 -> float32 per chunk), a
search returns N_q x k results and a thresholded search returns only the edges above its threshold. Nothing here ever
builds an N x N similarity matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from components.log import get_logger

log = get_logger(__name__)

IndexKind = Literal["auto", "flat", "ivf_flat", "ivf_pq", "ivf_gemm"]
KINDS = ("auto", "flat", "ivf_flat", "ivf_pq", "ivf_gemm")


@dataclass(frozen=True)
class SearchParams:
    """How a similarity index is built and searched (params.yaml `curate.search`)."""

    kind: IndexKind = "auto"
    """`flat` (exact), `ivf_flat`, `ivf_pq`, `ivf_gemm`, or `auto` (exact up to `exact_max` vectors, `ivf_gemm`
    above)."""
    exact_max: int = 50_000
    """`auto` switches from exact search to `ivf_gemm` above this many database vectors."""
    nlist: int | None = None
    """Inverted lists (coarse k-means cells); None: about 4 sqrt(N) (`ivf_gemm`: 2 sqrt(N)), at least 1 and at most
    N / 39."""
    nprobe: int = 16
    """Cells scanned per query; recall grows with it, time linearly."""
    pq_m: int | None = None
    """Sub-quantizers of `ivf_pq` (the code is m / 2 bytes at 4 bits); None: D / 4 (2 dimensions per byte)."""
    refine_factor: int = 2
    """`ivf_pq`: the best k x this many PQ candidates are re-ranked with exact float16 inner products; `ivf_gemm`:
    the best k x this many by bfloat16 products are re-scored in float32."""
    train_per_list: int = 16
    """Training vectors per inverted list for the coarse quantizer and PQ (sampled without replacement)."""
    train_iters: int = 10
    """Lloyd iterations of the coarse quantizer's k-means (faiss's default is 25; cells need not be optimal)."""
    chunk_size: int = 16_384
    """Rows added or searched per call; bounds the float32 copies and result buffers."""
    use_gpu: bool = True
    """Use faiss-gpu when it is installed and a GPU is visible; False forces the CPU."""
    seed: int = 0
    """Seed of the training samples and of the quantizers' k-means."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind = {self.kind!r}: expected one of {', '.join(KINDS)}")
        for name in ("exact_max", "nprobe", "refine_factor", "train_per_list", "train_iters", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be at least 1")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"nlist = {self.nlist} must be at least 1")


DEFAULT_SEARCH = SearchParams()
"""The default knobs (exact up to 50,000 vectors, ivf_pq above)."""


def _faiss() -> Any:
    import faiss

    return faiss


def num_gpus() -> int:
    """GPUs that faiss can use (0 with faiss-cpu or without a visible GPU)."""
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def resolve_kind(params: SearchParams, num_vectors: int) -> str:
    """The concrete index kind for a database of `num_vectors`."""
    if params.kind != "auto":
        return params.kind
    return "flat" if num_vectors <= params.exact_max else "ivf_gemm"


def default_nlist(num_vectors: int, kind: str = "ivf_pq") -> int:
    """About 4 sqrt(N) cells (faiss's guideline is 4 to 16 sqrt(N)), and at least 39 training points per cell;
    `ivf_gemm`: 2 sqrt(N), cells of sqrt(N) / 2 vectors, so that a cell's product is hundreds by thousands."""
    per_root = 2 if kind == "ivf_gemm" else 4
    return int(max(1, min(round(per_root * math.sqrt(max(num_vectors, 1))), num_vectors // 39)))


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def sample_rows(num_total: int, num: int, seed: int) -> np.ndarray:
    """`num` of the rows 0 .. num_total - 1 (all of them if fewer), drawn without replacement, sorted."""
    if num >= num_total:
        return np.arange(num_total)
    return np.sort(np.random.default_rng(seed).choice(num_total, size=num, replace=False))


def _sample_rows(x: np.ndarray, num: int, seed: int) -> np.ndarray:
    """`num` rows of x (all of them if fewer), sampled without replacement, as float32."""
    if num >= len(x):
        return _as_f32(x)
    return _as_f32(x[sample_rows(len(x), num, seed)])


class SearchIndex:
    """An inner-product index over a database of L2-normalised vectors, searched in chunks.

    Build it with `build_index`; ids returned by searches are database row numbers (0 .. ntotal - 1).
    """

    def __init__(self, index: object, kind: str, dim: int, params: SearchParams, on_gpu: bool) -> None:
        self.index = index
        self.kind = kind
        self.dim = dim
        self.params = params
        self.on_gpu = on_gpu

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def _search_params(self, k: int) -> object | None:
        faiss = _faiss()
        if self.kind == "flat" or self.on_gpu:
            return None
        ivf = faiss.SearchParametersIVF(nprobe=self.params.nprobe)
        if self.kind == "ivf_pq":
            return faiss.IndexRefineSearchParameters(k_factor=float(self.params.refine_factor), base_index_params=ivf)
        return ivf

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar database vectors of every query.

        Args:
            queries: N_q-by-D array (float16 or float32), L2-normalised.
            k: Neighbours per query; results beyond the database size are padded with similarity -inf and id -1.

        Returns:
            (similarities, ids): N_q-by-k float32 and int64, best first.
        """
        num_queries = len(queries)
        sims = np.full((num_queries, k), -np.inf, dtype=np.float32)
        ids = np.full((num_queries, k), -1, dtype=np.int64)
        k_eff = min(k, self.ntotal)
        if num_queries == 0 or k_eff == 0:
            return sims, ids
        _check_dim(queries, self.dim, "queries")
        if self.kind == "ivf_gemm":
            return self.index.search(queries, k, self.params.nprobe, self.params.refine_factor)
        search_params = self._search_params(k_eff)
        for start, end in _chunks(num_queries, self.params.chunk_size):
            if search_params is None:
                d, i = self.index.search(_as_f32(queries[start:end]), k_eff)
            else:
                d, i = self.index.search(_as_f32(queries[start:end]), k_eff, params=search_params)
            sims[start:end, :k_eff] = d
            ids[start:end, :k_eff] = i
        ids_missing = ids < 0  # an IVF probe that found fewer than k vectors pads with -1
        sims[ids_missing] = -np.inf
        return sims, ids

    def edges_above(
        self, queries: np.ndarray, k: int, threshold: float, *, query_offset: int | None = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pairs (query, database row) among the k nearest neighbours whose similarity is at least `threshold`.

        Only the edges are kept, chunk by chunk, so memory is bounded by their number rather than N_q x k.

        Args:
            queries: N_q-by-D array, L2-normalised.
            k: Neighbours searched per query.
            threshold: Minimum cosine similarity of an edge.
            query_offset: For a self-search (queries are database rows `query_offset ..`), drop each query's match
                with itself; None when queries are not in the database.

        Returns:
            (src, dst, sim): query row, database row and similarity of each edge (int64, int64, float32).
        """
        srcs, dsts, vals = [], [], []
        for start, end in _chunks(len(queries), self.params.chunk_size):
            sims, ids = self.search(queries[start:end], k)
            keep = sims >= threshold
            if query_offset is not None:
                keep &= ids != (np.arange(start, end)[:, None] + query_offset)
            rows, cols = np.nonzero(keep)
            srcs.append(rows + start)
            dsts.append(ids[rows, cols])
            vals.append(sims[rows, cols])
        if not srcs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return (
            np.concatenate(srcs).astype(np.int64),
            np.concatenate(dsts).astype(np.int64),
            np.concatenate(vals).astype(np.float32),
        )


def _check_dim(x: np.ndarray, dim: int | None, what: str) -> None:
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"{what} must be N-by-{dim or 'D'}, got shape {x.shape}")


HNSW_QUANTIZER_MIN_NLIST = 1024
"""From this many lists on, CPU indexes find a vector's nearest cells with an HNSW graph over the centroids rather
than by comparing it with all of them (that exhaustive step would cost N x nlist x D, as much as the search)."""


def _factory_string(kind: str, nlist: int, pq_m: int, gpu: bool) -> str:
    if kind == "flat":
        return "Flat"
    ivf = f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_MIN_NLIST and not gpu else f"IVF{nlist}"
    if kind == "ivf_flat":
        return f"{ivf},Flat"
    if gpu:  # GPU faiss has 8-bit IVF-PQ but no fast-scan codes; re-ranking happens on the CPU copy
        return f"{ivf},PQ{pq_m // 2}"
    return f"{ivf},PQ{pq_m}x4fs,Refine(SQfp16)"


@dataclass(frozen=True)
class TrainedIndex:
    """A trained, empty index: the coarse quantizer and PQ codebooks that every shard of one database shares.

    Shards filled from one `TrainedIndex` probe the same inverted lists for a query and hold the same codes for a
    vector, so searching every shard and merging equals searching one index over their union (before re-ranking,
    which each shard does on its own candidates: never fewer candidates than one index would re-rank).
    """

    index: object
    """The CPU faiss index, trained (flat kinds need no training), with no vectors; `ivf_gemm`: its `Cells`."""
    kind: str
    dim: int
    params: SearchParams
    gpu: bool
    """Whether shards are filled on the GPUs."""


def training_rows(num_vectors: int, params: SearchParams) -> np.ndarray:
    """The database rows an index over `num_vectors` vectors is trained on (none for the flat kind)."""
    if resolve_kind(params, num_vectors) == "flat":
        return np.zeros(0, np.int64)
    nlist = min(params.nlist or default_nlist(num_vectors, resolve_kind(params, num_vectors)), max(num_vectors, 1))
    return sample_rows(num_vectors, params.train_per_list * nlist, params.seed)


def train_index(train: np.ndarray, num_vectors: int, dim: int, params: SearchParams = DEFAULT_SEARCH) -> TrainedIndex:
    """Trains the index a database of `num_vectors` vectors of width `dim` is searched with.

    Args:
        train: The rows `training_rows(num_vectors, params)` of the database (ignored by the flat kind).
        num_vectors: The whole database's size (the index kind and nlist follow it, not the shard's).
        dim: D.
        params: Index kind and its knobs.
    """
    kind = resolve_kind(params, num_vectors)
    nlist = min(params.nlist or default_nlist(num_vectors, kind), max(num_vectors, 1))
    if kind == "ivf_gemm":
        from components.curation.cells import train_cells

        _check_dim(train, dim, "training vectors")
        cells = train_cells(_as_f32(train), nlist, niter=params.train_iters, seed=params.seed)
        return TrainedIndex(cells, kind, dim, params, params.use_gpu and cells_on_gpu())
    faiss = _faiss()
    gpu = params.use_gpu and num_gpus() > 0
    pq_m = params.pq_m or max(1, dim // 4)
    if kind == "ivf_pq" and dim % pq_m:
        raise ValueError(f"pq_m = {pq_m} must divide the embedding dimension {dim}")
    if kind == "ivf_pq" and gpu and (pq_m % 2 or dim % (pq_m // 2)):
        gpu = False  # no GPU layout for this code size: stay on the CPU rather than fail
    index = faiss.index_factory(dim, _factory_string(kind, nlist, pq_m, gpu), faiss.METRIC_INNER_PRODUCT)
    if kind != "flat":
        _check_dim(train, dim, "training vectors")
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = params.seed
        ivf.cp.niter = params.train_iters
        ivf.cp.min_points_per_centroid = min(params.train_per_list, 39)  # the sample size is chosen, not too small
        ivf.cp.spherical = True  # cosine k-means: centroids renormalised (the data lie on the sphere)
        index.train(_as_f32(train))
        ivf.nprobe = params.nprobe
    return TrainedIndex(index, kind, dim, params, gpu)


def cells_on_gpu() -> bool:
    """Whether `ivf_gemm` runs on a GPU (torch sees one)."""
    from components.curation.cells import device

    return device().type == "cuda"


def to_bytes(trained: TrainedIndex) -> tuple[Any, str, int, SearchParams, bool]:
    """The trained index as plain data (its faiss bytes, or `ivf_gemm`'s arrays, and fields), to send to other ranks
    or keep on disk."""
    raw = trained.index if trained.kind == "ivf_gemm" else np.asarray(_faiss().serialize_index(trained.index))
    return raw, trained.kind, trained.dim, trained.params, trained.gpu


def from_bytes(data: tuple[Any, str, int, SearchParams, bool]) -> TrainedIndex:
    """The `TrainedIndex` that `to_bytes` described."""
    raw, kind, dim, params, gpu = data
    index = raw if kind == "ivf_gemm" else _faiss().deserialize_index(np.asarray(raw, np.uint8))
    return TrainedIndex(index, kind, dim, params, gpu)


def fill_index(
    trained: TrainedIndex, num: int, take: Callable[[np.ndarray], np.ndarray], labels: np.ndarray | None = None
) -> SearchIndex:
    """A searchable copy of `trained` holding `num` vectors, read `chunk_size` rows at a time.

    Args:
        trained: From `train_index`.
        num: Vectors to add; they get ids 0 .. num - 1.
        take: Sorted rows (0 .. num - 1) -> those vectors (float16 or float32).
        labels: `ivf_gemm`: the cell of every row when already known (`cells.nearest_cells`).
    """
    params = trained.params
    if trained.kind == "ivf_gemm":
        from components.curation.cells import CellIndex

        cell_index = CellIndex(trained.index, num, take, params.chunk_size, labels)
        return SearchIndex(cell_index, trained.kind, trained.dim, params, trained.gpu)
    faiss = _faiss()

    def read(start: int, end: int) -> np.ndarray:
        return take(np.arange(start, end))

    index = faiss.clone_index(trained.index)
    if trained.gpu:
        index = _to_gpu(index, trained.kind)
    for start, end in _chunks(num, params.chunk_size):
        chunk = read(start, end)
        _check_dim(chunk, trained.dim, "database")
        index.add(_as_f32(chunk))
    if trained.gpu and trained.kind == "ivf_pq":
        index = _refined_gpu_index(index, num, read, params)
    return SearchIndex(index, trained.kind, trained.dim, params, trained.gpu)


def build_index(database: np.ndarray, params: SearchParams = DEFAULT_SEARCH) -> SearchIndex:
    """Builds an inner-product index over `database` (N-by-D, L2-normalised, float16 or float32).

    IVF indexes are trained on `train_per_list * nlist` sampled rows, then the database is added in chunks, so the
    float32 working copy never exceeds one chunk (the index itself holds its codes: 4 D bytes per vector for flat
    kinds, about D / 8 + 2 D bytes for `ivf_pq`'s fast-scan codes plus its float16 re-ranking copy).

    Args:
        database: The vectors to search; row i gets id i.
        params: Index kind and its knobs.

    Returns:
        A `SearchIndex` on the GPU when faiss-gpu and a GPU are present and `params.use_gpu`, else on the CPU.
    """
    _check_dim(database, None, "database")
    num, dim = database.shape
    rows = training_rows(num, params)
    trained = train_index(_as_f32(database[rows]) if len(rows) else database[:0], num, dim, params)
    index = fill_index(trained, num, lambda rows: database[rows])
    log.debug(
        "faiss index %s over %d x %d vectors (%s%s)",
        index.kind,
        num,
        dim,
        "GPU" if index.on_gpu else "CPU",
        f", nprobe {params.nprobe}" if index.kind != "flat" else "",
    )
    return index


def _to_gpu(index: object, kind: str) -> object:
    faiss = _faiss()
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True  # split the database across GPUs rather than replicate it
    options.useFloat16 = True  # float16 storage: the embeddings are float16 already
    options.useFloat16LookupTables = kind == "ivf_pq"
    return faiss.index_cpu_to_all_gpus(index, co=options)


def _refined_gpu_index(base: object, num: int, read: Callable[[int, int], np.ndarray], params: SearchParams) -> object:
    """GPU IVF-PQ candidates re-ranked exactly on a CPU float16 copy (faiss's IndexRefine takes any base index)."""
    faiss = _faiss()
    refine = faiss.IndexScalarQuantizer(base.d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    for start, end in _chunks(num, params.chunk_size):
        refine.add(_as_f32(read(start, end)))
    index = faiss.IndexRefine(base, refine)
    index.k_factor = float(params.refine_factor)
    index.own_fields = False
    index._keep = (base, refine)  # the Python wrappers own the C++ objects: keep them alive with the refine index
    return index


def knn(
    queries: np.ndarray, database: np.ndarray, k: int, params: SearchParams = DEFAULT_SEARCH
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest database rows of each query by cosine similarity (builds a throwaway index)."""
    if len(database) == 0:
        return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
    return build_index(database, params).search(queries, k)


def max_similarity(
    queries: np.ndarray, database: np.ndarray, params: SearchParams = DEFAULT_SEARCH
) -> tuple[np.ndarray, np.ndarray]:
    """For every query, its highest similarity to any database row and that row (-inf and -1 if none)."""
    sims, ids = knn(queries, database, 1, params)
    return sims[:, 0], ids[:, 0]
