"""The pure core of the `curate` stage: prepared manifest + embeddings in, curated manifest + report out.

Steps (DINOv2 section 3 and appendix A.3-A.4; the mode of step 5 from params.yaml `curate.mode`):
1. split the rows into the pool (`source == "pool"`), the seed sets (`seeds/<set>`) and the evaluation sets
   (`eval/<task>`, every split); optionally PCA-whiten everything with statistics of the pool and seeds;
2. calibrate the copy thresholds on the pool itself (calibrate.py): planted copies of sampled pool images against
   their nearest distinct neighbours, and planted copies of sampled evaluation images against the pool;
3. self-deduplicate the pool: kNN candidate pairs, decided by the accept threshold or verified by local features
   (pairs.py, verify.py), union-find, one image kept per group;
4. remove every pool group that holds a copy of an evaluation image (decided the same way), and every seed image
   at or above the leakage accept threshold (seeds become training images when `include_seeds`);
5. select: `retrieval` (sample- and cluster-based retrieval per seed set, capped per seed set), `hkmeans` (balanced
   sampling of `max_images` from a hierarchical k-means of the survivors) or `dedup` (all survivors);
6. check what the gate checks: each curated image's highest similarity to any evaluation image and the size of its
   duplicate group within the curated set at the accept threshold (1 when nothing duplicated is left).

Nothing is removed silently: `removed` lists every removed pool image with the image it duplicates (the kept image
of its group, or the evaluation image), the similarity, the edge that linked it and how that edge was decided.

The curated manifest keeps the prepared manifest's columns and adds provenance: `curation` (seed, sample, cluster,
hkmeans, dedup), `seed_set`, `seed_uri`, `cluster`, `retrieval_similarity`, `dup_group_size`, `pool_dup_group_size`
and `max_eval_similarity`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from components.config import CurateConfig
from components.curation import calibrate, dedup, hkmeans, retrieval, sharded
from components.curation.pairs import CopyPairs, Thresholds, decide_pairs, verify_split
from components.curation.search import SearchIndex, SearchParams
from components.curation.sharded import LOCAL, NO_CACHE, Ranks, Vectors, WorkCache
from components.log import get_logger

log = get_logger(__name__)

PROVENANCE_COLUMNS = (
    "curation",
    "seed_set",
    "seed_uri",
    "cluster",
    "retrieval_similarity",
    "pool_dup_group_size",
    "dup_group_size",
    "max_eval_similarity",
)
REMOVED_COLUMNS = (
    "uri",
    "reason",
    "duplicate_of",
    "similarity",
    "matched_uri",
    "edge_similarity",
    "decided_by",
    "inliers",
)
"""One row per removed pool image: `reason` duplicate / eval_copy / eval_copy_group / seed_copy / seed_copy_group;
`duplicate_of` the kept image of its group, or the evaluation or seed image it (or its group) copies, and their
cosine similarity; `matched_uri` the image of the edge that put it there (its strongest), `edge_similarity`,
`decided_by` (embedding or local_features) and `inliers`."""


def search_params(cfg: CurateConfig, seed: int) -> SearchParams:
    """The similarity-search knobs of the `curate` section."""
    return SearchParams(
        kind=cfg.index,
        exact_max=cfg.exact_max,
        nlist=cfg.nlist,
        nprobe=cfg.nprobe,
        refine_factor=cfg.refine_factor,
        seed=seed,
    )


def seed_set_name(source: str) -> str:
    """`seeds/<name>` -> `<name>`."""
    return source.split("/", 1)[1] if "/" in source else source


@dataclass(frozen=True)
class Whitening:
    """PCA whitening: `(x - mean) @ proj`, then L2-normalised."""

    mean: np.ndarray
    proj: np.ndarray
    """(D, D') projection, columns scaled by 1 / sqrt(eigenvalue)."""

    def apply(self, x: np.ndarray, chunk: int = 65_536) -> np.ndarray:
        out = np.empty((len(x), self.proj.shape[1]), np.float32)
        mean = self.mean.astype(np.float32)
        for start in range(0, len(x), chunk):
            rows = np.asarray(x[start : start + chunk], dtype=np.float32) - mean
            # One row alone goes through another BLAS kernel (a matrix-vector product) that rounds differently: two
            # rows keep every row's numbers the same however rows are grouped (shards, ranks, fetched samples).
            y = (np.concatenate([rows, rows]) @ self.proj)[: len(rows)] if len(rows) == 1 else rows @ self.proj
            out[start : start + chunk] = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return out


def fit_whitening(x: np.ndarray, fit_rows: np.ndarray, *, energy: float = 0.99, chunk: int = 65_536) -> Whitening:
    """PCA whitening fitted on `x[fit_rows]` (at least 2 rows).

    Copy-detection descriptors are whitened before cosine search (Pizzi et al. 2022, the copy detector of DINOv2's
    appendix A.3): the directions every image shares stop dominating the similarity. Components up to `energy` of
    the variance are kept. The covariance is accumulated in chunks (D x D), so N never meets N.
    """
    dim = x.shape[1]
    fit = np.asarray(fit_rows)
    mean = np.zeros(dim, np.float64)
    for start in range(0, len(fit), chunk):
        mean += np.asarray(x[fit[start : start + chunk]], dtype=np.float64).sum(0)
    mean /= len(fit)
    cov = np.zeros((dim, dim), np.float64)
    for start in range(0, len(fit), chunk):
        c = np.asarray(x[fit[start : start + chunk]], dtype=np.float64) - mean
        cov += c.T @ c
    cov /= len(fit) - 1
    return whitening_from_moments(mean, cov, energy=energy)


def whitening_from_moments(mean: np.ndarray, cov: np.ndarray, *, energy: float = 0.99) -> Whitening:
    """PCA whitening from the mean and covariance of the fitted rows: the components up to `energy` of the variance."""
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    eigval = np.clip(eigval, 0.0, None)
    keep = int(np.searchsorted(np.cumsum(eigval) / max(eigval.sum(), 1e-12), energy) + 1)
    keep = max(1, min(keep, int((eigval > 1e-10 * max(eigval[0], 1e-30)).sum()) or 1))
    return Whitening(mean, (eigvec[:, :keep] / np.sqrt(eigval[:keep] + 1e-12)).astype(np.float32))


def whiten(x: np.ndarray, fit_rows: np.ndarray, *, energy: float = 0.99, chunk: int = 65_536) -> np.ndarray:
    """PCA whitening fitted on `x[fit_rows]`, applied to all rows, then L2-normalised (float32); see fit_whitening."""
    if len(np.asarray(fit_rows)) < 2:
        return np.asarray(x, dtype=np.float32)
    return fit_whitening(x, fit_rows, energy=energy, chunk=chunk).apply(x, chunk=chunk)


@dataclass(frozen=True)
class ImageAccess:
    """What calibration and verification need beyond the embeddings: the model, and the images (read by URI)."""

    embed: Callable[[Sequence[Any]], np.ndarray]
    """Decoded images -> their L2-normalised embeddings, computed as the embed stage computed the stored ones."""
    workers: int | None = None
    """Verification threads (None: every usable core)."""


@dataclass
class CurationResult:
    """What `curate` returns: the curated manifest, the report and material for the image grids."""

    manifest: pd.DataFrame
    report: dict[str, Any]
    duplicate_groups: list[list[tuple[str, str]]] = field(default_factory=list)
    """(URI, caption) of the largest duplicate groups of the pool (kept image first), for the grid logged to MLflow."""
    retrieved_examples: list[tuple[str, list[str]]] = field(default_factory=list)
    """(seed URI, retrieved pool URIs) for a few seed images, for the neighbours grid."""
    leak_examples: list[tuple[str, str, float]] = field(default_factory=list)
    """(evaluation URI, removed pool URI, similarity) of removed leaks."""
    removed: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(REMOVED_COLUMNS)))
    """Every removed pool image and why (REMOVED_COLUMNS)."""
    calibrations: dict[str, calibrate.Calibration] = field(default_factory=dict)
    """The calibration of each comparison (`dedup`, `eval`) that ran."""


@dataclass
class _Space:
    """The rows of each part and the vectors every search runs on: the pool in shards, seeds and evaluation images
    whole (every rank holds them)."""

    manifest: pd.DataFrame
    pool: np.ndarray
    seeds: np.ndarray
    eval: np.ndarray
    pool_x: Vectors
    """The pool's vectors (whitened when the stage whitens), in shards of `curate.shard_size` rows."""
    seed_x: np.ndarray
    eval_x: np.ndarray
    whitening: Whitening | None
    ranks: Ranks
    work: WorkCache

    @property
    def uris(self) -> np.ndarray:
        return self.manifest["uri"].astype(str).to_numpy()

    def on(self, name: str) -> dict[str, Any]:
        """The sharding arguments of a distributed step called `name` (its results' folder in the work cache)."""
        return {"ranks": self.ranks, "cache": self.work, "name": name}


def _space(manifest: pd.DataFrame, embeddings: Any, cfg: CurateConfig, ranks: Ranks, work: WorkCache) -> _Space:
    source = manifest["source"].astype(str)
    pool = np.flatnonzero(source.eq("pool").to_numpy())
    seeds = np.flatnonzero(source.str.startswith("seeds/").to_numpy())
    evals = np.flatnonzero(source.str.startswith("eval/").to_numpy())
    dim = int(embeddings.shape[1])

    def raw(rows: np.ndarray) -> np.ndarray:
        return np.asarray(embeddings[rows], dtype=np.float32) if len(rows) else np.zeros((0, dim), np.float32)

    bounds = sharded.shard_bounds(len(pool), cfg.shard_size)
    raw_pool = Vectors(bounds, lambda r: raw(pool[r]), dim)
    seed_raw = raw(seeds)
    # Whitening statistics come from the training-side images (pool and seeds), never from the evaluation sets.
    fit = cfg.whiten and len(pool) + len(seeds) >= 2
    whitening = _fit_whitening(raw_pool, seed_raw, ranks, work) if fit else None
    if whitening is None:
        return _Space(manifest, pool, seeds, evals, raw_pool, seed_raw, raw(evals), None, ranks, work)
    pool_x = Vectors(bounds, lambda r: whitening.apply(raw(pool[r])), whitening.proj.shape[1])
    return _Space(manifest, pool, seeds, evals, pool_x, whitening.apply(seed_raw), whitening.apply(raw(evals)),
                  whitening, ranks, work)  # fmt: skip


def _fit_whitening(raw_pool: Vectors, seed_raw: np.ndarray, ranks: Ranks, work: WorkCache) -> Whitening:
    """PCA whitening fitted on the pool and the seeds: per-shard float64 sums (each shard on its rank), added in shard
    order, then the seeds' (the last chunk), so any number of ranks gets the same statistics."""
    chunk = 65_536

    def blocks(c: int) -> Any:
        if c < raw_pool.num_shards:
            for start, end in raw_pool.chunks(c):
                yield raw_pool.read(start, end).astype(np.float64)
        else:
            for start in range(0, len(seed_raw), chunk):
                yield seed_raw[start : start + chunk].astype(np.float64)

    dim, num_chunks = raw_pool.dim, raw_pool.num_shards + 1

    def sums(c: int, _: Any) -> dict[str, np.ndarray]:
        total, count = np.zeros(dim, np.float64), 0
        for block in blocks(c):
            total += block.sum(0)
            count += len(block)
        return {"sum": total, "count": np.array(count)}

    parts = sharded.map_chunks(ranks, num_chunks, sums, cache=work, name="whitening/mean")
    count = sum(int(p["count"]) for p in parts)
    mean = np.zeros(dim, np.float64)
    for p in parts:
        mean += p["sum"]
    mean /= count

    def scatter(c: int, _: Any) -> dict[str, np.ndarray]:
        cov = np.zeros((dim, dim), np.float64)
        for block in blocks(c):
            centred = block - mean
            cov += centred.T @ centred
        return {"cov": cov}

    digest = hashlib.sha256(mean.tobytes()).hexdigest()[:16]
    cov = np.zeros((dim, dim), np.float64)
    for p in sharded.map_chunks(ranks, num_chunks, scatter, cache=work, name="whitening/cov", inputs=digest):
        cov += p["cov"]
    return whitening_from_moments(mean, cov / (count - 1))


def _empty_provenance(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["curation"] = pd.Series([""] * len(frame), dtype=object, index=frame.index)
    frame["seed_set"] = ""
    frame["seed_uri"] = ""
    frame["cluster"] = np.int64(-1)
    frame["retrieval_similarity"] = np.nan
    frame["pool_dup_group_size"] = np.int64(1)
    return frame


def curate(
    *,
    manifest: pd.DataFrame,
    embeddings: Any,
    cfg: CurateConfig,
    seed: int,
    access: ImageAccess | None = None,
    num_examples: int = 8,
    ranks: Ranks = LOCAL,
    work: WorkCache = NO_CACHE,
) -> CurationResult | None:
    """Calibrates, deduplicates, removes evaluation leakage and selects the curated set.

    On several ranks every rank calls this with the same manifest and config: each indexes the pool shards it owns
    (components/curation/sharded.py), the ranks exchange their results, and rank 0 returns the result, the same as
    one process would; the other ranks return None.

    Args:
        manifest: Prepared-manifest rows (uri, width, height, source, ...) that have an embedding, in the order of
            `embeddings`.
        embeddings: len(manifest)-by-D L2-normalised embeddings (float16 or float32), an array or anything indexed by
            an array of rows (memory maps): only the rows a rank needs are read; rows must be finite.
        cfg: The `curate` section.
        seed: The pipeline seed (sampling, k-means, calibration).
        access: The model and the images, for calibration and verification; None: neither runs (fixed thresholds
            and `verify: off` are then required).
        num_examples: Duplicate groups and seed images kept for the image grids.
        ranks: The ranks sharing the work (one process by default).
        work: Where finished per-shard results are kept, so that a rerun resumes (nothing kept by default).

    Returns:
        On rank 0: the curated manifest (prepared columns + provenance), the report, the removed images and the grid
        material. None on the other ranks.

    Raises:
        ValueError: Shapes disagree, or calibration or verification is needed without `access`.
    """
    if len(manifest) != len(embeddings):
        raise ValueError(f"{len(manifest)} manifest rows but {len(embeddings)} embeddings")
    if access is None and (cfg.verify != "off" or cfg.dedup_threshold is None or cfg.eval_threshold is None):
        raise ValueError(
            "calibration and verification need the images: pass access, or fix both thresholds and "
            "set curate.verify off"
        )
    rng = np.random.default_rng(seed)
    params = search_params(cfg, seed)
    space = _space(manifest.reset_index(drop=True), embeddings, cfg, ranks, work)
    report = _counts(space, cfg)
    calibrations = _calibrate(space, cfg, params, access, rng) if access is not None and cfg.calibration_images else {}
    limits = {name: _thresholds(cfg, name, calibrations.get(name)) for name in ("dedup", "eval")}
    report["calibration"] = {name: c.report() for name, c in calibrations.items()}
    groups, dedup_pairs = _deduplicate(space, cfg, params, limits["dedup"], access)
    report["dedup"] = _dedup_report(groups, dedup_pairs, limits["dedup"], cfg)
    leaks, leak_pairs = _copies_of(space, space.eval_x, space.eval, groups, cfg, params, limits["eval"], access, "eval")
    seed_eval_sim = _replicated_index(space.eval_x, params, ranks).search(space.seed_x, 1)[0][:, 0] if len(
        space.seeds) and len(space.eval) else np.full(len(space.seeds), -np.inf)  # fmt: skip
    seed_leaks = seed_eval_sim >= (limits["eval"].accept if limits["eval"].accept is not None else 2.0)
    report["eval_dedup"] = _leak_report(space, groups, leaks, leak_pairs, seed_leaks, limits["eval"])
    # Seeds join the curated set: a pool copy of a kept seed image would be a duplicate inside it.
    keep_seeds = ~seed_leaks if cfg.include_seeds else np.zeros(len(space.seeds), bool)
    kept_seeds = space.seeds[keep_seeds]
    seed_copies, seed_pairs = _copies_of(space, space.seed_x[keep_seeds], kept_seeds, groups, cfg, params,
                                         limits["dedup"], access, "seed")  # fmt: skip
    report["dedup"]["seed_copies"] = {"pairs": seed_pairs.stats, "pool_images_removed": int(seed_copies.removed.sum())}
    survivors = groups.keep & ~leaks.removed & ~seed_copies.removed
    report["counts"]["pool_after_dedup"] = int(groups.keep.sum())
    report["counts"]["pool_after_eval_dedup"] = int((groups.keep & ~leaks.removed).sum())
    report["counts"]["pool_after_seed_dedup"] = int(survivors.sum())
    selected, examples = _select(space, groups, leaks, survivors, seed_leaks, seed_eval_sim, cfg, params, rng,
                                 report, num_examples)  # fmt: skip
    selected = _check(selected, space, cfg, params, limits)
    if ranks.rank != 0:
        return None
    _summarise(selected, report)
    removed = _removed(space, groups, dedup_pairs, [("eval", leaks, leak_pairs, space.eval, space.eval_x),
                                                    ("seed", seed_copies, seed_pairs, kept_seeds,
                                                     space.seed_x[keep_seeds])])  # fmt: skip
    report["removed"] = {"count": len(removed), "by_reason": _count(removed["reason"].to_numpy())}
    pool_uris = space.uris[space.pool]
    return CurationResult(
        manifest=selected,
        report=report,
        duplicate_groups=_largest_groups(pool_uris, groups, removed, num_examples),
        retrieved_examples=examples,
        leak_examples=[
            (r.duplicate_of, r.uri, float(r.similarity))
            for r in removed[removed["reason"] == "eval_copy"].head(num_examples).itertuples()
        ],  # fmt: skip
        removed=removed,
        calibrations=calibrations,
    )


def _replicated_index(x: np.ndarray, params: SearchParams, ranks: Ranks) -> SearchIndex:
    """An index over a small set every rank holds (evaluation or seed images): trained on rank 0, the same on all."""
    vectors = sharded.in_memory(x, chunk_size=params.chunk_size)
    return sharded.shard_index(vectors, sharded.shared_training(vectors, params, ranks), 0)


def _counts(space: _Space, cfg: CurateConfig) -> dict[str, Any]:
    n = len(space.manifest)
    other = n - len(space.pool) - len(space.seeds) - len(space.eval)
    return {
        "mode": cfg.mode,
        "counts": {
            "input": n,
            "pool": len(space.pool),
            "seeds": len(space.seeds),
            "eval": len(space.eval),
            "other": other,
        },  # fmt: skip
        "whitened_dim": int(space.pool_x.dim) if space.whitening is not None else None,
    }


EMBED_BATCH = 64
"""Planted images embedded per chunk of calibration work (the embedder's own batch: the same batches on any number of
ranks, so the same features)."""


def _calibrate(
    space: _Space, cfg: CurateConfig, params: SearchParams, access: ImageAccess, rng: np.random.Generator
) -> dict[str, calibrate.Calibration]:
    """Calibration of self-deduplication (pool copies vs pool) and of leakage (evaluation copies vs pool).

    Every rank samples and plants the same images (the same generator); the neighbour search, the embedding of the
    planted images (batches) and their verification (blocks of pairs) are shared between the ranks.
    """
    uris = space.uris
    pool_uris = uris[space.pool]
    out = {}
    parts = (("dedup", space.pool, cfg.dedup_threshold), ("eval", space.eval, cfg.eval_threshold))
    for name, rows, fixed in parts:
        if len(rows) == 0 or len(space.pool) < 2:
            continue
        sample, images = calibrate.sample_images(uris[rows], cfg.calibration_images, rng)
        if len(sample) == 0:
            continue
        query_x = space.pool_x.take(sample) if name == "dedup" else space.eval_x[sample]
        exclude = sample if name == "dedup" else None
        near = space.on(f"calibration/{name}/neighbours")
        sims, neighbours = calibrate.nearest_distinct(query_x, space.pool_x, cfg.verify_k, exclude=exclude,
                                                      params=params, **near)  # fmt: skip
        planted = calibrate.plant(images, rng)

        def embed(images: Sequence[Any], name: str = name) -> np.ndarray:
            def compute(c: int, _: Any) -> dict[str, np.ndarray]:
                return {"x": access.embed(images[c * EMBED_BATCH : (c + 1) * EMBED_BATCH]).astype(np.float32)}

            num_chunks = -(-len(images) // EMBED_BATCH)
            chunks = sharded.map_chunks(space.ranks, num_chunks, compute, cache=space.work,
                                        name=f"calibration/{name}/embed")  # fmt: skip
            raw = np.concatenate([c["x"] for c in chunks]) if chunks else np.zeros((0, space.pool_x.dim), np.float32)
            return space.whitening.apply(raw) if space.whitening is not None else raw

        def verifier(pairs: np.ndarray, sources: Sequence[Any], name: str = name) -> np.ndarray:
            return verify_split(pairs, sources, workers=access.workers, **space.on(f"calibration/{name}/verify"))[0]

        data = calibrate.measure(
            sample_x=query_x,
            planted=planted,
            embed=embed,
            neighbour_sims=sims,
            neighbour_sources=[pool_uris[r] if r >= 0 else "" for r in neighbours.ravel().tolist()],
            verifier=verifier,
        )
        out[name] = calibrate.calibrate(
            name,
            data,
            target=cfg.dedup_precision,
            candidate_recall=cfg.candidate_recall,
            verify=cfg.verify,
            fixed_accept=fixed,
            fixed_candidate=cfg.candidate_threshold,
        )
        log.info("calibration %s: %s", name, {k: v for k, v in out[name].report().items() if k != "curve"})
    return out


def _thresholds(cfg: CurateConfig, name: str, calibration: calibrate.Calibration | None) -> Thresholds:
    if calibration is not None:
        if calibration.accept is None:
            log.warning(
                "calibration %s: no similarity reaches precision %.3f on planted copies; %s",
                name,
                cfg.dedup_precision,
                "nothing is removed (curate.verify is off)" if cfg.verify == "off" else "only verified pairs count",
            )
        return Thresholds(calibration.accept, calibration.candidate)
    fixed = cfg.dedup_threshold if name == "dedup" else cfg.eval_threshold
    if fixed is None:  # no image of this kind to calibrate on (an empty pool or no evaluation set)
        return Thresholds(None, 2.0)
    candidate = cfg.candidate_threshold if cfg.candidate_threshold is not None else fixed
    return Thresholds(fixed, min(candidate, fixed))


def _search_floor(limits: Thresholds, verify: str) -> float:
    """The lowest similarity a comparison must look at."""
    accept = limits.accept if limits.accept is not None else 2.0
    return accept if verify == "off" else min(accept, limits.candidate)


def _deduplicate(
    space: _Space, cfg: CurateConfig, params: SearchParams, limits: Thresholds, access: ImageAccess | None
) -> tuple[dedup.SelfDedup, CopyPairs]:
    """Self-deduplication of the pool (appendix A.3): candidate pairs, decided, grouped.

    The kNN graph is searched shard by shard on the ranks that own them; the candidate edges of every rank are joined,
    decided (verification split between the ranks) and grouped (union-find over all decided edges) on every rank.
    """
    pool = space.manifest.iloc[space.pool]
    pool_uris = space.uris[space.pool]
    floor = _search_floor(limits, cfg.verify)
    edges = dedup.duplicate_edges(space.pool_x, k=cfg.dedup_k, threshold=floor, params=params,
                                  **space.on("dedup/edges"))  # fmt: skip
    pairs = decide_pairs(
        edges.src,
        edges.dst,
        edges.similarity,
        thresholds=limits,
        verify=cfg.verify,
        verify_k=cfg.verify_k,
        max_pairs=cfg.verify_max_pairs,
        sources=(pool_uris, pool_uris) if access is not None else None,
        symmetric=True,
        workers=access.workers if access is not None else None,
        sharding=space.on("dedup/verify"),
    )
    pixels = (pool["width"].astype(np.int64) * pool["height"].astype(np.int64)).to_numpy()
    decided = dedup.DuplicateEdges(pairs.src, pairs.dst, pairs.similarity)
    return dedup.groups_from_edges(len(space.pool), decided, pixels), pairs


def _dedup_report(groups: dedup.SelfDedup, pairs: CopyPairs, limits: Thresholds, cfg: CurateConfig) -> dict[str, Any]:
    sizes = groups.sizes
    return {
        "threshold": limits.accept,
        "candidate_threshold": limits.candidate,
        "verify": cfg.verify,
        "k": cfg.dedup_k,
        "edges": len(pairs),
        "pairs": pairs.stats,
        "groups": int(len(np.unique(groups.labels))) if len(sizes) else 0,
        "duplicate_groups": int(len(np.unique(groups.labels[sizes > 1]))),
        "images_in_duplicate_groups": int((sizes > 1).sum()),
        "removed_duplicates": int((~groups.keep).sum()),
        "group_size_histogram": {str(k): v for k, v in groups.size_histogram().items()},
        "largest_group": int(sizes.max()) if len(sizes) else 0,
    }


def _copies_of(
    space: _Space,
    db_x: np.ndarray,
    db_rows: np.ndarray,
    groups: dedup.SelfDedup,
    cfg: CurateConfig,
    params: SearchParams,
    limits: Thresholds,
    access: ImageAccess | None,
    name: str,
) -> tuple[dedup.EvalLeakage, CopyPairs]:
    """Pool images that copy an image of `db_rows` (evaluation sets: "relative" deduplication, appendix A.3; or the
    seeds that join the curated set), decided like self-deduplication, each with its whole duplicate group.

    The images compared with are few and every rank indexes them all; each rank searches its own pool shards."""
    num = len(space.pool)
    if len(db_x) == 0 or num == 0:
        empty = CopyPairs(*(np.zeros(0, np.int64),) * 2, np.zeros(0, np.float32), np.zeros(0, object),
                          np.zeros(0, np.int64), {"candidates": 0})  # fmt: skip
        none = np.zeros(num, bool)
        return dedup.EvalLeakage(np.full(num, -np.inf, np.float32), np.full(num, -1, np.int64), none, none), empty
    index = _replicated_index(db_x, params, space.ranks)
    k = 1 if cfg.verify == "off" else min(cfg.verify_k, len(db_x))
    found = sharded.match_rows(space.pool_x, index, k, _search_floor(limits, cfg.verify), **space.on(f"{name}/search"))
    pairs = decide_pairs(
        found.src,
        found.dst,
        found.sim,
        thresholds=limits,
        verify=cfg.verify,
        verify_k=cfg.verify_k,
        max_pairs=cfg.verify_max_pairs,
        sources=(space.uris[space.pool], space.uris[db_rows]) if access is not None else None,
        symmetric=False,
        workers=access.workers if access is not None else None,
        sharding=space.on(f"{name}/verify"),
    )
    copies = np.zeros(num, bool)
    copies[pairs.src] = True
    return dedup.leakage_from_copies(groups.labels, found.best_sim, found.best_id, copies), pairs


def _leak_report(
    space: _Space,
    groups: dedup.SelfDedup,
    leaks: dedup.EvalLeakage,
    pairs: CopyPairs,
    seed_leaks: np.ndarray,
    limits: Thresholds,
) -> dict[str, Any]:
    sources = space.manifest["source"].to_numpy()
    return {
        "threshold": limits.accept,
        "candidate_threshold": limits.candidate,
        "eval_images": len(space.eval),
        "pairs": pairs.stats,
        "pool_images_touching_eval": int(leaks.touching.sum()),
        "pool_images_removed": int(leaks.removed.sum()),
        "pool_groups_removed": int(len(np.unique(groups.labels[leaks.removed]))),
        "removed_by_eval_source": _count(sources[space.eval[pairs.dst]]) if len(pairs) else {},
        "seed_images_removed": int(seed_leaks.sum()),
    }


def _select(
    space: _Space,
    groups: dedup.SelfDedup,
    leaks: dedup.EvalLeakage,
    survivors: np.ndarray,
    seed_leaks: np.ndarray,
    seed_eval_sim: np.ndarray,
    cfg: CurateConfig,
    params: SearchParams,
    rng: np.random.Generator,
    report: dict[str, Any],
    num_examples: int,
) -> tuple[pd.DataFrame, list[tuple[str, list[str]]]]:
    """Step 5: the selection mode over the survivors, then the seeds, then the max_images cap."""
    manifest = space.manifest
    surv_idx = np.flatnonzero(survivors)  # rows of the pool
    frame = _empty_provenance(manifest.iloc[space.pool[surv_idx]])
    frame["pool_dup_group_size"] = groups.sizes[surv_idx]
    frame["max_eval_similarity"] = leaks.max_similarity[surv_idx].astype(np.float64)
    frame["_x_row"] = space.pool[surv_idx]  # manifest row
    frame["_pool_row"] = surv_idx
    frame["_seed_row"] = np.int64(-1)
    surv_x = space.pool_x.subset(surv_idx)
    examples: list[tuple[str, list[str]]] = []
    seed_pos = np.flatnonzero(~seed_leaks)  # rows of the seeds
    if cfg.mode == "retrieval":
        selected, report["retrieval"], examples = _retrieve(frame, surv_x, space, seed_pos, cfg, params, rng,
                                                            num_examples)  # fmt: skip
    elif cfg.mode == "hkmeans":
        # max_images bounds the whole curated set: the seeds that join it take their places first.
        num_seeds = len(seed_pos) if cfg.include_seeds else 0
        target = max(0, int(cfg.max_images or len(frame)) - num_seeds)
        selected, report["hkmeans"] = _hkmeans_select(frame, surv_x, space, cfg, params.seed, rng, target)
    else:
        selected = frame.assign(curation="dedup")
    if cfg.include_seeds and len(space.seeds):
        seeds = _empty_provenance(manifest.iloc[space.seeds[seed_pos]])
        seeds["curation"] = "seed"
        seeds["seed_set"] = seeds["source"].map(seed_set_name)
        seeds["max_eval_similarity"] = seed_eval_sim[seed_pos].astype(np.float64)
        seeds["_x_row"] = space.seeds[seed_pos]
        seeds["_pool_row"] = np.int64(-1)
        seeds["_seed_row"] = seed_pos
        selected = pd.concat([seeds, selected], ignore_index=True)
    if cfg.max_images is not None and cfg.mode != "hkmeans" and len(selected) > cfg.max_images:
        # Seeds first (they are the curated sources), then a seeded random sample of the retrieved images.
        is_seed = selected["curation"].eq("seed").to_numpy()
        rest = rng.permutation(np.flatnonzero(~is_seed))
        keep = np.sort(np.concatenate([np.flatnonzero(is_seed), rest])[: cfg.max_images])
        report["counts"]["capped_by_max_images"] = int(len(selected) - len(keep))
        selected = selected.iloc[keep]
    return selected.reset_index(drop=True), examples


def _check(
    selected: pd.DataFrame, space: _Space, cfg: CurateConfig, params: SearchParams, limits: dict[str, Thresholds]
) -> pd.DataFrame:
    """Step 6: the gate's columns, then the manifest's column order.

    The curated set's duplicate groups are searched like the pool's: its seed images as one shard, then its pool
    images in their pool shards."""
    accept = limits["dedup"].accept if cfg.verify != "on" and limits["dedup"].accept is not None else 2.0
    pool_rows = selected["_pool_row"].to_numpy()
    seed_rows = selected["_seed_row"].to_numpy()
    is_seed = seed_rows >= 0
    if accept > 1.0 or len(selected) < 2:  # no similarity reaches the threshold: every group has size 1
        selected["dup_group_size"] = np.ones(len(selected), np.int64)
    else:
        order = np.lexsort((pool_rows, seed_rows, ~is_seed))  # seeds first, then pool images in pool order
        seeds = sharded.in_memory(space.seed_x[seed_rows[order][is_seed[order]]], chunk_size=params.chunk_size)
        curated = sharded.concat_vectors(seeds, space.pool_x.subset(pool_rows[order][~is_seed[order]]))
        sizes = np.empty(len(selected), np.int64)
        sizes[order] = dedup.curated_group_sizes(curated, k=cfg.dedup_k, threshold=accept, params=params,
                                                 **space.on("check/edges"))  # fmt: skip
        selected["dup_group_size"] = sizes
    if len(space.eval) == 0:
        selected["max_eval_similarity"] = -1.0  # nothing to leak into; a finite value keeps the gate's column valid
    selected = selected.drop(columns=["_x_row", "_pool_row", "_seed_row"])
    ordered = [*space.manifest.columns, *(c for c in PROVENANCE_COLUMNS if c not in space.manifest.columns)]
    return selected[ordered]


def leak_bound(cfg: CurateConfig, report: dict[str, Any]) -> float:
    """The gate's bound on a curated image's similarity to any evaluation image: the leakage accept threshold in
    force (above 1 when no pair is accepted on the embedding alone: `verify: on`, or no threshold reached)."""
    threshold = report.get("eval_dedup", {}).get("threshold")
    return float(threshold) if threshold is not None and cfg.verify != "on" else 1.0 + 1e-6


def _summarise(selected: pd.DataFrame, report: dict[str, Any]) -> None:
    report["counts"]["curated"] = len(selected)
    report["per_source"] = _count(selected["source"].to_numpy())
    report["per_curation"] = _count(selected["curation"].to_numpy())
    clusters = selected.loc[selected["cluster"] >= 0, "cluster"].to_numpy()
    report["per_cluster"] = {str(k): v for k, v in sorted(_count(clusters).items(), key=lambda kv: int(kv[0]))}
    report["verification"] = {
        "max_eval_similarity": float(selected["max_eval_similarity"].max()) if len(selected) else None,
        "max_dup_group_size": int(selected["dup_group_size"].max()) if len(selected) else 0,
    }


def _best_edges(num: int, pairs: CopyPairs, symmetric: bool) -> pd.DataFrame:
    """Per row of the query side: its strongest decided edge (partner, similarity, method, inliers)."""
    src, dst = pairs.src, pairs.dst
    sim, method, inliers = pairs.similarity, pairs.method, pairs.inliers
    if symmetric:
        src, dst = np.concatenate([src, dst]), np.concatenate([dst, src])
        sim, method, inliers = np.tile(sim, 2), np.tile(method, 2), np.tile(inliers, 2)
    frame = pd.DataFrame({"row": src, "partner": dst, "sim": sim, "method": method, "inliers": inliers})
    return frame.sort_values(["row", "sim"], ascending=[True, False]).drop_duplicates("row").set_index("row")


def _removed(
    space: _Space,
    groups: dedup.SelfDedup,
    dedup_pairs: CopyPairs,
    against: Sequence[tuple[str, dedup.EvalLeakage, CopyPairs, np.ndarray, np.ndarray]],
) -> pd.DataFrame:
    """REMOVED_COLUMNS for every removed pool image: copies of evaluation images (and their groups), of seed images,
    then duplicates within the pool. `against`: (name, copies found, their pairs, database rows, database vectors)
    per comparison."""
    uris = space.uris[space.pool]
    rows: list[dict[str, Any]] = []
    listed = np.zeros(len(uris), bool)
    for name, found, pairs, db_rows, db_x in against:
        db_uris = space.uris[db_rows]
        best = _best_edges(len(uris), pairs, symmetric=False)
        touching_of_group = {int(groups.labels[r]): r for r in np.flatnonzero(found.touching).tolist()}
        todo = np.flatnonzero(found.removed & ~listed)
        # The image each removed one is reported against: its own edge's partner, or its group's touching image's.
        touching = np.array(
            [r if found.touching[r] else touching_of_group[int(groups.labels[r])] for r in todo.tolist()], np.int64
        )
        partners = best.loc[touching, "partner"].to_numpy().astype(np.int64) if len(todo) else np.zeros(0, np.int64)
        sims = _row_dots(space.pool_x.take(todo), db_x[partners]) if len(todo) else np.zeros(0, np.float32)
        for r, t, e, sim in zip(todo.tolist(), touching.tolist(), partners.tolist(), sims.tolist(), strict=True):
            reason = f"{name}_copy" if t == r else f"{name}_copy_group"
            rows.append(_removed_row(uris[r], reason, db_uris[e], sim, db_uris[e] if t == r else uris[t], best.loc[t]))
            listed[r] = True
    keeper = pd.Series(np.flatnonzero(groups.keep), index=groups.labels[groups.keep])
    best = _best_edges(len(uris), dedup_pairs, symmetric=True)
    todo = np.flatnonzero(~groups.keep & ~listed)
    kept = keeper.loc[groups.labels[todo]].to_numpy().astype(np.int64) if len(todo) else np.zeros(0, np.int64)
    sims = _pool_dots(space.pool_x, todo, kept)
    for r, k, sim in zip(todo.tolist(), kept.tolist(), sims.tolist(), strict=True):
        edge = best.loc[r]
        rows.append(_removed_row(uris[r], "duplicate", uris[k], sim, uris[int(edge.partner)], edge))
    return pd.DataFrame(rows, columns=list(REMOVED_COLUMNS))


def _row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise inner products (float32)."""
    return np.einsum("nd,nd->n", np.asarray(a, np.float32), np.asarray(b, np.float32))


def _pool_dots(pool_x: Vectors, a: np.ndarray, b: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """pool_x[a[i]] . pool_x[b[i]] for every i, read a chunk of pairs at a time."""
    out = np.zeros(len(a), np.float32)
    for start in range(0, len(a), chunk):
        end = start + chunk
        out[start:end] = _row_dots(pool_x.take(a[start:end]), pool_x.take(b[start:end]))
    return out


def _removed_row(uri: str, reason: str, of: str, similarity: float, matched: str, edge: Any) -> dict[str, Any]:
    return {
        "uri": str(uri),
        "reason": reason,
        "duplicate_of": str(of),
        "similarity": float(similarity),
        "matched_uri": str(matched),
        "edge_similarity": float(edge.sim),
        "decided_by": str(edge.method),
        "inliers": int(edge.inliers),
    }


def _count(values: np.ndarray) -> dict[str, int]:
    keys, counts = np.unique(np.asarray(values).astype(str), return_counts=True) if len(values) else ([], [])
    return {str(k): int(c) for k, c in zip(keys, counts, strict=True)}


def _largest_groups(
    uris: np.ndarray, groups: dedup.SelfDedup, removed: pd.DataFrame, num: int
) -> list[list[tuple[str, str]]]:
    """The largest duplicate groups, kept image first, each image captioned with how it was found a copy."""
    sizes = groups.sizes
    if not len(sizes) or sizes.max() < 2:
        return []
    why = removed.set_index("uri") if len(removed) else None
    roots, counts = np.unique(groups.labels[sizes > 1], return_counts=True)
    out = []
    for root in roots[np.argsort(-counts, kind="stable")][:num]:
        members = np.flatnonzero(groups.labels == root)
        members = members[np.argsort(~groups.keep[members], kind="stable")]  # the kept image first
        row = []
        for m in members.tolist():
            uri = str(uris[m])
            if groups.keep[m] or why is None or uri not in why.index:
                row.append((uri, "kept" if groups.keep[m] else "removed"))
                continue
            entry = why.loc[uri]
            how = f"v{int(entry.inliers)}" if entry.decided_by == "local_features" else "emb"
            row.append((uri, f"{entry.similarity:.2f} {how}"))
        out.append(row)
    return out


def _retrieve(
    frame: pd.DataFrame,
    surv_x: Vectors,
    space: _Space,
    seed_pos: np.ndarray,
    cfg: CurateConfig,
    params: SearchParams,
    rng: np.random.Generator,
    num_examples: int,
) -> tuple[pd.DataFrame, dict[str, Any], list[tuple[str, list[str]]]]:
    """Sample- and cluster-based retrieval from the surviving pool `frame` (its vectors `surv_x`, in shards), per
    seed set (appendix A.4); `seed_pos`: the seed images that are not evaluation copies."""
    manifest = space.manifest
    seed_rows = space.seeds[seed_pos]
    stats: dict[str, Any] = {"method": cfg.retrieval, "per_seed_set": {}}
    pool_labels = pool_sims = centroids = None
    if cfg.retrieval in ("cluster", "both") and len(surv_x):
        km = sharded.kmeans(surv_x, cfg.num_clusters, niter=cfg.kmeans_iters, seed=params.seed, params=params,
                            **space.on("retrieval/kmeans"))  # fmt: skip
        pool_labels, pool_sims, centroids = km.labels, km.similarity, km.centroids
        stats["num_clusters"] = len(centroids)
        stats["pool_cluster_sizes"] = {
            "min": int(np.bincount(pool_labels).min()),
            "max": int(np.bincount(pool_labels).max()),
        }
    seed_sources = manifest["source"].to_numpy()[seed_rows]
    parts: list[pd.DataFrame] = []
    examples: list[tuple[str, list[str]]] = []
    for number, source in enumerate(sorted(set(seed_sources.tolist()))):
        name = seed_set_name(source)
        in_set = seed_sources == source
        rows = seed_rows[in_set]
        seed_x = space.seed_x[seed_pos[in_set]]
        found: list[retrieval.Retrieved] = []
        if cfg.retrieval in ("sample", "both"):
            k = cfg.sample_k_per_set.get(name, cfg.sample_k)
            found.append(
                retrieval.sample_retrieval(
                    surv_x,
                    seed_x,
                    k=k,
                    min_similarity=cfg.sample_min_similarity,
                    params=params,
                    **space.on(f"retrieval/sample/set{number:03d}"),
                )  # fmt: skip
            )
        if centroids is not None:
            seed_labels, _ = sharded.assign(sharded.in_memory(seed_x, chunk_size=params.chunk_size), centroids, params)
            found.append(
                retrieval.cluster_retrieval(
                    pool_labels,
                    pool_sims,
                    seed_labels,
                    min_seeds=cfg.cluster_min_seeds,
                    per_cluster=cfg.cluster_take,
                    rng=rng,
                )
            )
        merged = retrieval.best_per_pool_row(retrieval.concat(found))
        capped = retrieval.cap(merged, cfg.max_per_seed_set, rng)
        part = frame.iloc[capped.pool_rows].copy()
        part["curation"] = capped.method
        part["seed_set"] = name
        part["seed_uri"] = [str(manifest["uri"].iloc[rows[r]]) if r >= 0 else "" for r in capped.seed_rows]
        part["cluster"] = capped.cluster
        part["retrieval_similarity"] = capped.similarity.astype(np.float64)
        parts.append(part)
        stats["per_seed_set"][name] = {
            "seed_images": len(rows),
            "sample": int((merged.method == "sample").sum()),
            "cluster": int((merged.method == "cluster").sum()),
            "capped": int(len(merged) - len(capped)),
            "retrieved": len(capped),
        }
        if not len(capped):
            log.warning("seed set %s retrieved no pool image (no match above the thresholds)", name)
        for r in range(min(len(rows), max(0, num_examples - len(examples)))):
            neighbours = part.loc[part["seed_uri"] == str(manifest["uri"].iloc[rows[r]]), "uri"].astype(str).tolist()
            if neighbours:
                examples.append((str(manifest["uri"].iloc[rows[r]]), neighbours))
    if not parts:
        return frame.iloc[:0].assign(curation=""), stats, examples
    union = pd.concat(parts, ignore_index=True)
    # An image retrieved by several seed sets appears once: sample-based first, then the highest similarity.
    union["_sample_first"] = union["curation"].ne("sample")
    union = union.sort_values(["_x_row", "_sample_first", "retrieval_similarity"], ascending=[True, True, False])
    union = union.drop_duplicates("_x_row").drop(columns=["_sample_first"])
    stats["retrieved_union"] = len(union)
    return union, stats, examples


def _hkmeans_select(
    frame: pd.DataFrame,
    surv_x: Vectors,
    space: _Space,
    cfg: CurateConfig,
    seed: int,
    rng: np.random.Generator,
    target: int,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Balanced sampling of `max_images` survivors from a hierarchical k-means (Vo et al. 2024); level 1 runs on the
    ranks' shards."""
    if not len(frame):
        return frame.assign(curation="hkmeans"), {"levels": []}
    hierarchy = hkmeans.hierarchical_kmeans(
        surv_x,
        cfg.hkmeans_levels,
        niter=cfg.kmeans_iters,
        resampling_steps=cfg.hkmeans_resampling_steps,
        seed=seed,
        ranks=space.ranks,
        cache=space.work,
    )
    rows = hkmeans.balanced_sample(hierarchy, target, rng)
    out = frame.iloc[rows].copy()
    out["curation"] = "hkmeans"
    out["cluster"] = hierarchy.levels[0].labels[rows]
    sizes = hierarchy.cluster_sizes()
    stats = {
        "levels": [len(level.centroids) for level in hierarchy.levels],
        "target": target,
        "sampled": len(rows),
        "top_level_sizes": sizes[-1].tolist(),
        "top_level_sampled": np.bincount(
            hierarchy.leaf_labels(len(sizes) - 1)[rows], minlength=len(sizes[-1])
        ).tolist(),
    }
    return out, stats
