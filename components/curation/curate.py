"""The pure core of the `curate` stage: prepared manifest + embeddings in, curated manifest + report out.

Steps (DINOv2 section 3 and appendix A.3-A.4; the mode of step 4 from params.yaml `curate.mode`):
1. split the rows into the pool (`source == "pool"`), the seed sets (`seeds/<set>`) and the evaluation sets
   (`eval/<task>`, every split); optionally PCA-whiten everything with statistics of the pool and seeds;
2. self-deduplicate the pool (kNN graph above `dedup_threshold`, union-find, one image kept per group);
3. remove every pool group that touches an evaluation image at `eval_threshold` or more, and every seed image that
   does (seeds become training images when `include_seeds`, so they must not leak either);
4. select: `retrieval` (sample- and cluster-based retrieval per seed set, capped per seed set), `hkmeans` (balanced
   sampling of `max_images` from a hierarchical k-means of the survivors) or `dedup` (all survivors);
5. verify what the gate checks: each curated image's highest similarity to any evaluation image and the size of its
   duplicate group within the curated set (1 when nothing duplicated is left).

The curated manifest keeps the prepared manifest's columns and adds provenance: `curation` (seed, sample, cluster,
hkmeans, dedup), `seed_set`, `seed_uri`, `cluster`, `retrieval_similarity`, `dup_group_size`, `pool_dup_group_size`
and `max_eval_similarity`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from components.config import CurateConfig
from components.curation import dedup, hkmeans, retrieval
from components.curation.search import SearchParams, assign, kmeans, max_similarity
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


def search_params(cfg: CurateConfig, seed: int) -> SearchParams:
    """The faiss knobs of the `curate` section."""
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


def whiten(x: np.ndarray, fit_rows: np.ndarray, *, energy: float = 0.99, chunk: int = 65_536) -> np.ndarray:
    """PCA whitening fitted on `x[fit_rows]`, applied to all rows, then L2-normalised (float32).

    Copy-detection descriptors are whitened before cosine search (Pizzi et al. 2022, the copy detector of DINOv2's
    appendix A.3): the directions every image shares stop dominating the similarity. Components up to `energy` of
    the variance are kept. The covariance is accumulated in chunks (D x D), so N never meets N.
    """
    dim = x.shape[1]
    fit = np.asarray(fit_rows)
    if len(fit) < 2:
        return np.asarray(x, dtype=np.float32)
    mean = np.zeros(dim, np.float64)
    for start in range(0, len(fit), chunk):
        mean += np.asarray(x[fit[start : start + chunk]], dtype=np.float64).sum(0)
    mean /= len(fit)
    cov = np.zeros((dim, dim), np.float64)
    for start in range(0, len(fit), chunk):
        c = np.asarray(x[fit[start : start + chunk]], dtype=np.float64) - mean
        cov += c.T @ c
    cov /= len(fit) - 1
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    eigval = np.clip(eigval, 0.0, None)
    keep = int(np.searchsorted(np.cumsum(eigval) / max(eigval.sum(), 1e-12), energy) + 1)
    keep = max(1, min(keep, int((eigval > 1e-10 * max(eigval[0], 1e-30)).sum()) or 1))
    proj = (eigvec[:, :keep] / np.sqrt(eigval[:keep] + 1e-12)).astype(np.float32)  # (D, D')
    out = np.empty((len(x), keep), np.float32)
    for start in range(0, len(x), chunk):
        y = (np.asarray(x[start : start + chunk], dtype=np.float32) - mean.astype(np.float32)) @ proj
        out[start : start + chunk] = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return out


@dataclass
class CurationResult:
    """What `curate` returns: the curated manifest, the report and material for the image grids."""

    manifest: pd.DataFrame
    report: dict[str, Any]
    duplicate_groups: list[list[str]] = field(default_factory=list)
    """URIs of the largest duplicate groups of the pool (kept image first), for the grid logged to MLflow."""
    retrieved_examples: list[tuple[str, list[str]]] = field(default_factory=list)
    """(seed URI, retrieved pool URIs) for a few seed images, for the neighbours grid."""
    leak_examples: list[tuple[str, str, float]] = field(default_factory=list)
    """(evaluation URI, removed pool URI, similarity) of removed leaks."""


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
    embeddings: np.ndarray,
    cfg: CurateConfig,
    seed: int,
    num_examples: int = 8,
) -> CurationResult:
    """Deduplicates, removes evaluation leakage and selects the curated set.

    Args:
        manifest: Prepared-manifest rows (uri, width, height, source, ...) that have an embedding, in the order of
            `embeddings`.
        embeddings: len(manifest)-by-D L2-normalised embeddings (float16 or float32); rows must be finite.
        cfg: The `curate` section.
        seed: The pipeline seed (sampling, k-means).
        num_examples: Duplicate groups and seed images kept for the image grids.

    Returns:
        The curated manifest (prepared columns + provenance), the report and the grid material.

    Raises:
        ValueError: Shapes disagree, or an embedding is not finite (the embeddings gate names the rows).
    """
    if len(manifest) != len(embeddings):
        raise ValueError(f"{len(manifest)} manifest rows but {len(embeddings)} embeddings")
    manifest = manifest.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    params = search_params(cfg, seed)
    source = manifest["source"].astype(str)
    pool_rows = np.flatnonzero(source.eq("pool").to_numpy())
    seed_rows = np.flatnonzero(source.str.startswith("seeds/").to_numpy())
    eval_rows = np.flatnonzero(source.str.startswith("eval/").to_numpy())
    # Whitening statistics come from the training-side images (pool and seeds), never from the evaluation sets.
    fit_rows = np.concatenate([pool_rows, seed_rows])
    x = whiten(embeddings, fit_rows if len(fit_rows) >= 2 else np.arange(len(manifest))) if cfg.whiten else embeddings
    pool_x, seed_x, eval_x = x[pool_rows], x[seed_rows], x[eval_rows]
    report: dict[str, Any] = {
        "mode": cfg.mode,
        "counts": {
            "input": len(manifest),
            "pool": len(pool_rows),
            "seeds": len(seed_rows),
            "eval": len(eval_rows),
            "other": len(manifest) - len(pool_rows) - len(seed_rows) - len(eval_rows),
        },
        "whitened_dim": int(x.shape[1]) if cfg.whiten else None,
    }

    # 2. self-deduplication of the pool (appendix A.3)
    pool = manifest.iloc[pool_rows].reset_index(drop=True)
    pixels = (pool["width"].astype(np.int64) * pool["height"].astype(np.int64)).to_numpy()
    groups = dedup.self_deduplicate(pool_x, pixels, k=cfg.dedup_k, threshold=cfg.dedup_threshold, params=params)
    sizes = groups.sizes
    report["dedup"] = {
        "threshold": cfg.dedup_threshold,
        "k": cfg.dedup_k,
        "edges": len(groups.edges),
        "groups": int(len(np.unique(groups.labels))) if len(pool) else 0,
        "duplicate_groups": int(len(np.unique(groups.labels[sizes > 1]))),
        "images_in_duplicate_groups": int((sizes > 1).sum()),
        "removed_duplicates": int((~groups.keep).sum()),
        "group_size_histogram": {str(k): v for k, v in groups.size_histogram().items()},
        "largest_group": int(sizes.max()) if len(sizes) else 0,
    }

    # 3. deduplication against the evaluation sets
    leaks = dedup.eval_leakage(pool_x, eval_x, groups.labels, threshold=cfg.eval_threshold, params=params)
    seed_eval_sim, _ = (
        max_similarity(seed_x, eval_x, params) if len(eval_x) and len(seed_x) else (np.full(len(seed_x), -np.inf), None)
    )
    seed_leaks = seed_eval_sim >= cfg.eval_threshold
    survivors = groups.keep & ~leaks.removed
    report["eval_dedup"] = {
        "threshold": cfg.eval_threshold,
        "eval_images": len(eval_rows),
        "pool_images_touching_eval": int(leaks.touching.sum()),
        "pool_images_removed": int(leaks.removed.sum()),
        "pool_groups_removed": int(len(np.unique(groups.labels[leaks.removed]))),
        "removed_by_eval_source": _count(manifest["source"].to_numpy()[eval_rows[leaks.nearest_eval[leaks.removed]]])
        if leaks.removed.any() and (leaks.nearest_eval[leaks.removed] >= 0).all()
        else {},
        "seed_images_removed": int(seed_leaks.sum()),
    }
    report["counts"]["pool_after_dedup"] = int(groups.keep.sum())
    report["counts"]["pool_after_eval_dedup"] = int(survivors.sum())

    # 4. selection
    surv_idx = np.flatnonzero(survivors)  # rows of `pool`
    frame = _empty_provenance(pool.iloc[surv_idx])
    frame["pool_dup_group_size"] = sizes[surv_idx]
    frame["max_eval_similarity"] = leaks.max_similarity[surv_idx].astype(np.float64)
    frame["_x_row"] = pool_rows[surv_idx]
    examples: list[tuple[str, list[str]]] = []
    if cfg.mode == "retrieval":
        selected, report["retrieval"], examples = _retrieve(
            frame, x, manifest, seed_rows[~seed_leaks], cfg, params, rng, num_examples
        )
    elif cfg.mode == "hkmeans":
        # max_images bounds the whole curated set: the seeds that join it take their places first.
        num_seeds = int((~seed_leaks).sum()) if cfg.include_seeds else 0
        target = max(0, int(cfg.max_images or len(frame)) - num_seeds)
        selected, report["hkmeans"] = _hkmeans_select(frame, x, cfg, seed, rng, target)
    else:
        selected = frame.assign(curation="dedup")
    if cfg.include_seeds and len(seed_rows):
        seeds = _empty_provenance(manifest.iloc[seed_rows[~seed_leaks]])
        seeds["curation"] = "seed"
        seeds["seed_set"] = seeds["source"].map(seed_set_name)
        seeds["max_eval_similarity"] = seed_eval_sim[~seed_leaks].astype(np.float64)
        seeds["_x_row"] = seed_rows[~seed_leaks]
        selected = pd.concat([seeds, selected], ignore_index=True)
    if cfg.max_images is not None and cfg.mode != "hkmeans" and len(selected) > cfg.max_images:
        # Seeds first (they are the curated sources), then a seeded random sample of the retrieved images.
        is_seed = selected["curation"].eq("seed").to_numpy()
        rest = rng.permutation(np.flatnonzero(~is_seed))
        keep = np.sort(np.concatenate([np.flatnonzero(is_seed), rest])[: cfg.max_images])
        report["counts"]["capped_by_max_images"] = int(len(selected) - len(keep))
        selected = selected.iloc[keep]
    selected = selected.reset_index(drop=True)

    # 5. verification (the gate's columns)
    cur_x = x[selected["_x_row"].to_numpy()] if len(selected) else x[:0]
    selected["dup_group_size"] = (
        dedup.curated_group_sizes(cur_x, k=cfg.dedup_k, threshold=cfg.dedup_threshold, params=params)
        if len(selected)
        else np.zeros(0, np.int64)
    )
    if len(eval_x) == 0:
        selected["max_eval_similarity"] = -1.0  # nothing to leak into; a finite value keeps the gate's column valid
    selected = selected.drop(columns=["_x_row"])
    ordered = [c for c in manifest.columns] + [c for c in PROVENANCE_COLUMNS if c not in manifest.columns]
    selected = selected[ordered]

    report["counts"]["curated"] = len(selected)
    report["per_source"] = _count(selected["source"].to_numpy())
    report["per_curation"] = _count(selected["curation"].to_numpy())
    clusters = selected.loc[selected["cluster"] >= 0, "cluster"].to_numpy()
    report["per_cluster"] = {str(k): v for k, v in sorted(_count(clusters).items(), key=lambda kv: int(kv[0]))}
    report["verification"] = {
        "max_eval_similarity": float(selected["max_eval_similarity"].max()) if len(selected) else None,
        "max_dup_group_size": int(selected["dup_group_size"].max()) if len(selected) else 0,
    }
    dup_groups = _largest_groups(pool, groups, num_examples)
    leak_examples = [
        (
            str(manifest["uri"].iloc[eval_rows[leaks.nearest_eval[i]]]),
            str(pool["uri"].iloc[i]),
            float(leaks.max_similarity[i]),
        )
        for i in np.flatnonzero(leaks.touching)[:num_examples]
    ]
    return CurationResult(selected, report, dup_groups, examples, leak_examples)


def _count(values: np.ndarray) -> dict[str, int]:
    keys, counts = np.unique(np.asarray(values).astype(str), return_counts=True) if len(values) else ([], [])
    return {str(k): int(c) for k, c in zip(keys, counts, strict=True)}


def _largest_groups(pool: pd.DataFrame, groups: dedup.SelfDedup, num: int) -> list[list[str]]:
    sizes = groups.sizes
    if not len(sizes) or sizes.max() < 2:
        return []
    roots, counts = np.unique(groups.labels[sizes > 1], return_counts=True)
    out = []
    for root in roots[np.argsort(-counts, kind="stable")][:num]:
        members = np.flatnonzero(groups.labels == root)
        members = members[np.argsort(~groups.keep[members], kind="stable")]  # the kept image first
        out.append(pool["uri"].iloc[members].astype(str).tolist())
    return out


def _retrieve(
    frame: pd.DataFrame,
    x: np.ndarray,
    manifest: pd.DataFrame,
    seed_rows: np.ndarray,
    cfg: CurateConfig,
    params: SearchParams,
    rng: np.random.Generator,
    num_examples: int,
) -> tuple[pd.DataFrame, dict[str, Any], list[tuple[str, list[str]]]]:
    """Sample- and cluster-based retrieval from the surviving pool `frame`, per seed set (appendix A.4)."""
    pool_x = x[frame["_x_row"].to_numpy()]
    stats: dict[str, Any] = {"method": cfg.retrieval, "per_seed_set": {}}
    pool_labels = pool_sims = centroids = None
    if cfg.retrieval in ("cluster", "both") and len(pool_x):
        km = kmeans(pool_x, cfg.num_clusters, niter=cfg.kmeans_iters, seed=params.seed)
        pool_labels, pool_sims, centroids = km.labels, km.similarity, km.centroids
        stats["num_clusters"] = len(centroids)
        stats["pool_cluster_sizes"] = {
            "min": int(np.bincount(pool_labels).min()),
            "max": int(np.bincount(pool_labels).max()),
        }
    seed_sources = manifest["source"].to_numpy()[seed_rows]
    parts: list[pd.DataFrame] = []
    examples: list[tuple[str, list[str]]] = []
    for source in sorted(set(seed_sources.tolist())):
        name = seed_set_name(source)
        rows = seed_rows[seed_sources == source]
        seed_x = x[rows]
        found: list[retrieval.Retrieved] = []
        if cfg.retrieval in ("sample", "both"):
            k = cfg.sample_k_per_set.get(name, cfg.sample_k)
            found.append(
                retrieval.sample_retrieval(pool_x, seed_x, k=k, min_similarity=cfg.sample_min_similarity, params=params)
            )
        if centroids is not None:
            seed_labels, _ = assign(seed_x, centroids)
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
    frame: pd.DataFrame, x: np.ndarray, cfg: CurateConfig, seed: int, rng: np.random.Generator, target: int
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Balanced sampling of `max_images` survivors from a hierarchical k-means (Vo et al. 2024)."""
    if not len(frame):
        return frame.assign(curation="hkmeans"), {"levels": []}
    pool_x = x[frame["_x_row"].to_numpy()]
    hierarchy = hkmeans.hierarchical_kmeans(
        pool_x,
        cfg.hkmeans_levels,
        niter=cfg.kmeans_iters,
        resampling_steps=cfg.hkmeans_resampling_steps,
        seed=seed,
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
