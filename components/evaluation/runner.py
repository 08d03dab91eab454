"""Every configured task for one backbone, and the robustness normalisation across backbones.

`evaluate_model` runs one frozen backbone through the tasks of `EvaluateConfig.tasks`, sharing work where the
protocols allow it: one forward pass over the classification splits feeds kNN, the linear probes, logistic regression
and the clean robustness error; decoded images and the corrupted test sets live in an `ImageCache` shared by all
models. `finalize_robustness` then turns each model's corruption errors into mCE, normalised by the baseline's.

Task names in the results (and in metrics/eval/<model>/<task>.json): knn, linear, logreg, retrieval,
segmentation_linear, segmentation_ms, depth_linear, depth_linear4, depth_dpt, robustness.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from components import storage
from components.config import EvaluateConfig
from components.evaluation import corruptions as corr
from components.evaluation.datasets import EvalDatasets
from components.evaluation.depth import run_depth
from components.evaluation.features import (
    ImageFeatures,
    extract_features,
    extract_patch_maps,
    load_images,
    num_blocks,
    patch_multiple,
)
from components.evaluation.knn import evaluate_knn, headline_k, knn_scores
from components.evaluation.linear import LinearProbe, evaluate_linear, evaluate_logreg
from components.evaluation.metrics import (
    corruption_errors,
    mean_corruption_error,
    relative_mean_corruption_error,
    topk_accuracy,
)
from components.evaluation.models import ModelSpec, preprocessing
from components.evaluation.retrieval import evaluate_retrieval
from components.evaluation.segmentation import run_segmentation
from components.log import get_logger

log = get_logger(__name__)


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    details: dict[str, Any]
    seconds: float

    def to_json(self, model: str) -> dict[str, Any]:
        return {"model": model, "task": self.task, "metrics": self.metrics, "details": self.details,
                "seconds": round(self.seconds, 3)}  # fmt: skip


@dataclass
class ModelResult:
    spec: ModelSpec
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    corruption_errors: dict[str, list[float]] | None = None
    clean_error: float | None = None
    timing: dict[str, float] = field(default_factory=dict)
    """Seconds per phase (`features`, each task) and `img_s`, the feature-extraction throughput."""


# --------------------------------------------------------------------------------------------------------------------
# Shared images
# --------------------------------------------------------------------------------------------------------------------


def robustness_subset(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Indices of the test images that are corrupted: the first `per_class` of each class (all when None)."""
    if per_class is None:
        return np.arange(len(labels))
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]))


def _render(args: tuple[np.ndarray, str, int, int]) -> np.ndarray:
    images, name, severity, seed = args
    return corr.corrupt_images(images, name, severity, seed)


def _mp_context() -> multiprocessing.context.BaseContext:
    # fork is cheap, but this process already runs torch's OpenMP pool and maybe Prefect's or MLflow's threads;
    # forkserver children start from a clean process (the corruption module preloaded).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([corr.__name__])
    return ctx


MAX_CACHED_IMAGES = 20_000
"""Splits up to this size are decoded once and kept (uint8) for every model; larger ones (ImageNet's train split) are
decoded chunk by chunk for each model, so that memory holds features rather than pixels."""
CHUNK_IMAGES = 2048


class ImageCache:
    """Decoded, resized evaluation images and corrupted test sets, shared by every model (keyed by side)."""

    def __init__(self, data: EvalDatasets, cfg: EvaluateConfig, seed: int) -> None:
        self.data, self.cfg, self.seed = data, cfg, seed
        self._images: dict[tuple[str, str, int], np.ndarray] = {}
        self._corrupted: dict[int, dict[tuple[str, int], np.ndarray]] = {}
        self.render_s = 0.0

    def uris(self, task: str, split: str) -> tuple[str, ...]:
        """The image URIs of a classification split (train, val, test) or a retrieval split (query, database)."""
        if task == "classification":
            return self.data.classification.splits[split].uris  # type: ignore[union-attr]
        return getattr(self.data.retrieval, split).uris

    def images(self, task: str, split: str, side: int) -> np.ndarray:
        """(N, side, side, 3) uint8 of a split, decoded once (small splits) or now (large ones)."""
        uris = self.uris(task, split)
        if len(uris) > MAX_CACHED_IMAGES:
            return load_images(uris, side)
        key = (task, split, side)
        if key not in self._images:
            self._images[key] = load_images(uris, side)
        return self._images[key]

    def subset(self, task: str, split: str, side: int, index: np.ndarray) -> np.ndarray:
        """Some images of a split (figures, the robustness subset) without decoding a large split whole."""
        uris = self.uris(task, split)
        if len(uris) > MAX_CACHED_IMAGES:
            return load_images([uris[i] for i in np.asarray(index).ravel()], side).reshape(
                *np.shape(index), side, side, 3
            )
        return self.images(task, split, side)[index]

    def features(self, model: nn.Module, task: str, split: str, side: int, **kwargs: Any) -> ImageFeatures:
        """`extract_features` over a split, streamed in chunks when the split is too large to keep decoded."""
        uris = self.uris(task, split)
        if len(uris) <= MAX_CACHED_IMAGES:
            return extract_features(model, self.images(task, split, side), **kwargs)
        parts = [
            extract_features(model, load_images(uris[i : i + CHUNK_IMAGES], side), **kwargs)
            for i in range(0, len(uris), CHUNK_IMAGES)
        ]
        return ImageFeatures(torch.cat([p.cls for p in parts]), torch.cat([p.patch_mean for p in parts]))

    def robustness_index(self) -> np.ndarray:
        labels = self.data.classification.splits["test"].labels  # type: ignore[union-attr]
        return robustness_subset(labels, self.cfg.robustness_images_per_class)

    def corrupted(self, side: int) -> dict[tuple[str, int], np.ndarray]:
        """Every (corruption, severity) version of the robustness subset at `side` px, rendered once."""
        if side not in self._corrupted:
            start = time.perf_counter()
            clean = self.subset("classification", "test", side, self.robustness_index())
            jobs = [
                (clean, name, sev, self.seed) for name in self.cfg.corruptions for sev in self.cfg.corruption_severities
            ]
            workers = min(self.cfg.num_workers, len(jobs))
            if workers > 1 and len(clean) * len(jobs) >= 64:
                with ProcessPoolExecutor(workers, mp_context=_mp_context()) as pool:
                    rendered = list(pool.map(_render, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
            else:
                rendered = [_render(job) for job in jobs]
            self._corrupted[side] = {(job[1], job[2]): out for job, out in zip(jobs, rendered, strict=True)}
            self.render_s += time.perf_counter() - start
            log.info("rendered %d corrupted sets of %d images at %d px in %.1f s", len(jobs), len(clean), side,
                     time.perf_counter() - start)  # fmt: skip
        return self._corrupted[side]


# --------------------------------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------------------------------


class _Timer:
    def __init__(self, timing: dict[str, float], name: str) -> None:
        self.timing, self.name = timing, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timing[self.name] = self.timing.get(self.name, 0.0) + time.perf_counter() - self.start


def evaluate_model(
    model: nn.Module,
    spec: ModelSpec,
    data: EvalDatasets,
    cfg: EvaluateConfig,
    cache: ImageCache,
    *,
    seed: int,
    device: str,
) -> ModelResult:
    """Runs every configured task with one frozen backbone.

    Args:
        model: The backbone, in eval mode, on `device`.
        spec: Its description (name, preprocessing).
        data: The evaluation datasets.
        cfg: The `evaluate` section.
        cache: Images shared across models.
        seed: Seeds heads, probes and few-shot draws.
        device: `cpu` or `cuda`.

    Returns:
        Metrics per task (robustness holds raw errors until `finalize_robustness`), figure samples and timings.
    """
    result = ModelResult(spec)
    mean, std = preprocessing(spec)
    patch = int(model.patch_size)
    side = patch_multiple(cfg.image_size, patch)
    dense_side = patch_multiple(cfg.dense_image_size or cfg.image_size, patch)
    tasks = set(cfg.tasks)
    timing = result.timing
    extract_kwargs = dict(batch_size=cfg.batch_size, device=device, mean=mean, std=std)
    num_extracted = 0

    def add(task: str, metrics: dict[str, float], details: dict[str, Any]) -> None:
        result.tasks[task] = TaskResult(task, metrics, details, timing.get(task.split("_")[0], 0.0))

    cls_data = data.classification
    feats: dict[str, ImageFeatures] = {}
    probe: LinearProbe | None = None
    if cls_data is not None and tasks & {"knn", "linear", "logreg", "robustness"}:
        n_blocks = max(cfg.linear_n_blocks) if "linear" in tasks else 1
        with _Timer(timing, "features"):
            for split in ("train", "val", "test"):
                if len(cls_data.splits[split]):
                    feats[split] = cache.features(model, "classification", split, side, n_blocks=n_blocks,
                                                  **extract_kwargs)  # fmt: skip
                    num_extracted += len(cls_data.splits[split])
        labels = {split: s.labels for split, s in cls_data.splits.items()}
        num_classes = len(cls_data.class_names)
        empty = ImageFeatures(torch.zeros(0, 1, 1), torch.zeros(0, 1))
        if "knn" in tasks:
            with _Timer(timing, "knn"):
                metrics, details = evaluate_knn(
                    feats["train"].output, labels["train"], feats["test"].output, labels["test"],
                    num_classes=num_classes, ks=cfg.knn_k, temperature=cfg.knn_temperature,
                    few_shot=cfg.knn_few_shot, few_shot_tries=cfg.knn_few_shot_tries, seed=seed,
                )  # fmt: skip
            add("knn", metrics, details)
        if "linear" in tasks:
            with _Timer(timing, "linear"):
                metrics, details, probe = evaluate_linear(
                    feats["train"], labels["train"], feats.get("val", empty), labels["val"], feats["test"],
                    labels["test"], num_classes=num_classes, lrs=cfg.linear_lrs, n_blocks=cfg.linear_n_blocks,
                    avgpool=cfg.linear_avgpool, epochs=cfg.linear_epochs, batch_size=cfg.linear_batch_size, seed=seed,
                )  # fmt: skip
            add("linear", metrics, details)
        if "logreg" in tasks:
            with _Timer(timing, "logreg"):
                val = feats["val"].output if "val" in feats else torch.zeros(0, feats["train"].output.shape[1])
                metrics, details = evaluate_logreg(
                    feats["train"].output, labels["train"], val, labels["val"], feats["test"].output, labels["test"],
                    num_c=cfg.logreg_num_c, max_iter=cfg.logreg_max_iter, seed=seed,
                )  # fmt: skip
            add("logreg", metrics, details)
        if "robustness" in tasks:
            with _Timer(timing, "robustness"):
                num_extracted += _robustness_errors(model, result, cfg, cache, feats, labels, probe, side,
                                                    num_classes, extract_kwargs)  # fmt: skip
    if "retrieval" in tasks and data.retrieval is not None:
        with _Timer(timing, "retrieval"):
            r = data.retrieval
            kw = dict(n_blocks=1, scales=cfg.retrieval_scales, **extract_kwargs)
            q = cache.features(model, "retrieval", "query", side, **kw).output
            db = cache.features(model, "retrieval", "database", side, **kw).output
            num_extracted += (len(r.query) + len(r.database)) * len(cfg.retrieval_scales)
            metrics, details = evaluate_retrieval(
                q, db, r.query.labels, r.database.labels, ks=cfg.retrieval_ks, query_xy=r.query_xy,
                database_xy=r.database_xy, positive_distance=cfg.retrieval_positive_distance,
            )  # fmt: skip
            k = min(cfg.num_figure_samples, len(r.query))
            neighbors = np.asarray(details["neighbors"][:k], dtype=np.int64)  # (k, 5)
            result.samples.update({
                "retrieval_queries": cache.subset("retrieval", "query", side, np.arange(k)),
                "retrieval_neighbors": cache.subset("retrieval", "database", side, neighbors)
                if k else np.zeros((0, 0, side, side, 3), np.uint8),
                "retrieval_positive": np.asarray(details["neighbor_is_positive"][:k], dtype=bool),
            })  # fmt: skip
        add("retrieval", metrics, details)
    if "segmentation" in tasks and data.segmentation is not None:
        with _Timer(timing, "segmentation"):
            seg, samples = run_segmentation(
                model, data.segmentation, side=dense_side, variants=cfg.segmentation_variants,
                ms_scales=cfg.segmentation_ms_scales, epochs=cfg.segmentation_epochs, lr=cfg.segmentation_lr,
                batch_size=cfg.head_batch_size, device=device, mean=mean, std=std, seed=seed,
                num_samples=cfg.num_figure_samples, feature_batch_size=cfg.batch_size,
            )  # fmt: skip
            result.samples.update(samples)
        for variant, (metrics, details) in seg.items():
            add(f"segmentation_{variant}", metrics, details)
    if "depth" in tasks and data.depth is not None:
        with _Timer(timing, "depth"):
            dep, samples = run_depth(
                model, data.depth, side=dense_side, heads=cfg.depth_heads, n_bins=cfg.depth_bins,
                min_depth=cfg.depth_min, max_depth=cfg.depth_max, epochs=cfg.depth_epochs, lr=cfg.depth_lr,
                batch_size=cfg.head_batch_size, dpt_features=cfg.dpt_features, device=device, mean=mean, std=std,
                seed=seed, num_samples=cfg.num_figure_samples, feature_batch_size=cfg.batch_size,
            )  # fmt: skip
            result.samples.update(samples)
        for head, (metrics, details) in dep.items():
            add(f"depth_{head}", metrics, details)
    with _Timer(timing, "figures"):
        result.samples.update(_pca_samples(model, data, cfg, cache, dense_side, extract_kwargs))
    if "features" in timing and timing["features"] > 0:
        timing["img_s"] = sum(len(f) for f in feats.values()) / timing["features"]
    timing["images"] = float(num_extracted)
    return result


def _robustness_errors(
    model: nn.Module,
    result: ModelResult,
    cfg: EvaluateConfig,
    cache: ImageCache,
    feats: dict[str, ImageFeatures],
    labels: dict[str, np.ndarray],
    probe: LinearProbe | None,
    side: int,
    num_classes: int,
    extract_kwargs: dict[str, Any],
) -> int:
    """Top-1 errors of the model's classifier on every corrupted set (and on the clean subset)."""
    index = cache.robustness_index()
    y = labels["test"][index]
    bank = feats["train"].output
    bank_labels = torch.as_tensor(labels["train"], dtype=torch.long)
    k = headline_k(cfg.knn_k)
    n_blocks = probe.n_blocks if probe is not None else 1

    def classify(f: ImageFeatures) -> Tensor:
        if cfg.robustness_classifier == "linear" and probe is not None:
            return probe.scores(f)
        return knn_scores(bank, bank_labels, f.output, k=k, temperature=cfg.knn_temperature, num_classes=num_classes)

    result.clean_error = 1.0 - topk_accuracy(classify(feats["test"].subset(index)), y, 1)
    errors: dict[str, list[float]] = {name: [] for name in cfg.corruptions}
    corrupted = cache.corrupted(side)
    # One extraction over every corrupted set (full batches), then the classifier per set.
    keys = list(corrupted)
    f = extract_features(model, np.concatenate([corrupted[key] for key in keys]), n_blocks=n_blocks, **extract_kwargs)
    scores = classify(f)
    for i, (name, _severity) in enumerate(keys):
        part = scores[i * len(index) : (i + 1) * len(index)]
        errors[name].append(1.0 - topk_accuracy(part, y, 1))
    result.corruption_errors = errors
    return len(corrupted) * len(index)


def _pca_samples(
    model: nn.Module,
    data: EvalDatasets,
    cfg: EvaluateConfig,
    cache: ImageCache,
    side: int,
    extract_kwargs: dict[str, Any],
) -> dict[str, np.ndarray]:
    """Images and their last-block patch tokens for the report's PCA figure (the paper's Figure 1)."""
    k = cfg.num_figure_samples
    if k == 0:
        return {}
    if data.segmentation is not None:
        uris = data.segmentation.splits["val"].image_uris[:k]
    elif data.classification is not None:
        uris = data.classification.splits["test"].uris[:k]
    else:
        return {}
    images = load_images(uris, side, crop=False)
    ((maps, _),) = extract_patch_maps(model, images, blocks=[num_blocks(model) - 1], **extract_kwargs)
    return {"pca_images": images, "pca_tokens": maps.permute(0, 2, 3, 1).numpy().astype(np.float16)}  # (S, h, w, D)


# --------------------------------------------------------------------------------------------------------------------
# Across models
# --------------------------------------------------------------------------------------------------------------------


def load_baseline_errors(reference: str, results: Sequence[ModelResult]) -> tuple[dict[str, list[float]], float | None]:
    """The mCE normaliser: a model evaluated in this run (by name) or a JSON file {corruption: [errors]}."""
    for r in results:
        if r.spec.name == reference and r.corruption_errors is not None:
            return r.corruption_errors, r.clean_error
    if reference.endswith(".json"):
        table = json.loads(storage.read_bytes(reference))
        clean = table.pop("clean", None)
        return {k: [float(e) for e in v] for k, v in table.items()}, clean
    raise KeyError(f"robustness baseline {reference!r} is neither an evaluated model nor a .json file")


def finalize_robustness(results: Sequence[ModelResult], cfg: EvaluateConfig) -> None:
    """Adds the `robustness` task to each model: mCE and relative mCE against the baseline, per-corruption errors."""
    with_errors = [r for r in results if r.corruption_errors is not None]
    if not with_errors:
        return
    try:
        baseline, baseline_clean = load_baseline_errors(cfg.robustness_baseline, results)
    except KeyError as err:
        log.warning("%s; mCE is not computed, only the raw errors", err)
        baseline, baseline_clean = None, None
    severities = list(cfg.corruption_severities)
    for r in with_errors:
        errors = r.corruption_errors or {}
        metrics: dict[str, float] = {"clean_error": float(r.clean_error if r.clean_error is not None else math.nan)}
        details: dict[str, Any] = {
            "severities": severities,
            "errors": errors,
            "baseline": cfg.robustness_baseline,
            "classifier": cfg.robustness_classifier,
        }
        if baseline is not None:
            shared = {k: v for k, v in errors.items() if k in baseline}
            metrics["mce"] = mean_corruption_error(shared, baseline)
            details["ce"] = corruption_errors(shared, baseline)
            if baseline_clean is not None and r.clean_error is not None:
                metrics["relative_mce"] = relative_mean_corruption_error(shared, r.clean_error, baseline,
                                                                         baseline_clean)  # fmt: skip
        metrics.update({f"error_{name}": float(np.mean(errs)) for name, errs in errors.items()})
        # A metric that cannot be normalised (the baseline never errs) is NaN: keep it out of the gated metrics.
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        r.tasks["robustness"] = TaskResult("robustness", metrics, details, r.timing.get("robustness", 0.0))


def long_frame_rows(results: Sequence[ModelResult], spec_fn: Callable[[str], Any]) -> list[dict[str, Any]]:
    """Rows (model, task, metric, value, lower, upper) of every metric, for the gate and the report."""
    rows = []
    for r in results:
        for task, t in r.tasks.items():
            for metric, value in t.metrics.items():
                spec = spec_fn(metric)
                rows.append({"model": r.spec.name, "task": task, "metric": metric, "value": float(value),
                             "lower": spec.lower, "upper": spec.upper})  # fmt: skip
    return rows
