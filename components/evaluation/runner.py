"""Every configured task for one backbone: the task registry, and the images shared across models.

`evaluate_model` runs one frozen backbone through the tasks of `EvaluateConfig.tasks`, in the order of `TASKS` (a
registry: task name -> function of a `TaskContext` -> {result name: (metrics, details)}), sharing work where the
protocols allow it: one forward pass over the classification splits feeds kNN, the linear probes, logistic regression
and the clean robustness error; decoded images and the corrupted test sets live in an `ImageCache` shared by all
models. `robustness.finalize_robustness` then turns each model's corruption errors into mCE, normalised by the
baseline's. A new task is a module with its task function and one line of `TASKS`; a new protocol of a task, a line
of that task's own table (`segmentation.PROTOCOLS`).

Result names (the tasks in metrics/eval/<model>/<task>.json): knn, linear, logreg, retrieval, segmentation_linear,
segmentation_ms, segmentation_m2f, depth_linear, depth_linear4, depth_dpt, robustness.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from components.config import EvaluateConfig
from components.evaluation import corruptions as corr
from components.evaluation.context import ModelResult, TaskContext, TaskOutputs, TaskResult
from components.evaluation.datasets import EvalDatasets
from components.evaluation.depth import depth_task
from components.evaluation.features import (
    ImageFeatures,
    extract_features,
    extract_patch_maps,
    load_images,
    num_blocks,
)
from components.evaluation.knn import knn_task
from components.evaluation.linear import linear_task, logreg_task
from components.evaluation.models import ModelSpec
from components.evaluation.retrieval import retrieval_task
from components.evaluation.robustness import robustness_subset, robustness_task
from components.evaluation.segmentation import segmentation_task
from components.log import get_logger

log = get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Shared images
# --------------------------------------------------------------------------------------------------------------------


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
# One model: the task registry
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalTask:
    """An entry of the task registry."""

    run: Callable[[TaskContext], TaskOutputs]
    """Trains and scores the task's protocols on one backbone."""
    data: str
    """The `EvalDatasets` field the task reads; the task is skipped when the raw layout has none."""


TASKS: dict[str, EvalTask] = {
    "knn": EvalTask(knn_task, "classification"),
    "linear": EvalTask(linear_task, "classification"),
    "logreg": EvalTask(logreg_task, "classification"),
    "robustness": EvalTask(robustness_task, "classification"),  # after linear: it classifies with the chosen probe
    "retrieval": EvalTask(retrieval_task, "retrieval"),
    "segmentation": EvalTask(segmentation_task, "segmentation"),
    "depth": EvalTask(depth_task, "depth"),
}
"""Task name (`evaluate.tasks`) -> entry, in the order tasks run and their results are written."""


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
    ctx = TaskContext(model, spec, data, cfg, cache, seed, device, result)
    for name, task in TASKS.items():
        if name not in cfg.tasks or getattr(data, task.data) is None:
            continue
        if task.data == "classification":
            ctx.classification_features()  # shared by the classification tasks, timed as `features`
        with ctx.timed(name):
            outputs = task.run(ctx)
        for result_name, (metrics, details) in outputs.items():
            result.tasks[result_name] = TaskResult(result_name, metrics, details, result.timing[name])
    with ctx.timed("figures"):
        result.samples.update(_pca_samples(ctx))
    timing = result.timing
    if timing.get("features", 0.0) > 0:
        timing["img_s"] = sum(len(f) for f in ctx.classification_features().values()) / timing["features"]
    timing["images"] = float(ctx.num_extracted)
    return result


def _pca_samples(ctx: TaskContext) -> dict[str, np.ndarray]:
    """Images and their last-block patch tokens for the report's PCA figure (the paper's Figure 1)."""
    k, data, model = ctx.cfg.num_figure_samples, ctx.data, ctx.model
    if k == 0:
        return {}
    if data.segmentation is not None:
        uris = data.segmentation.splits["val"].image_uris[:k]
    elif data.classification is not None:
        uris = data.classification.splits["test"].uris[:k]
    else:
        return {}
    images = load_images(uris, ctx.dense_side, crop=False)
    ((maps, _),) = extract_patch_maps(model, images, blocks=[num_blocks(model) - 1], **ctx.extract_kwargs)
    return {"pca_images": images, "pca_tokens": maps.permute(0, 2, 3, 1).numpy().astype(np.float16)}  # (S, h, w, D)


# --------------------------------------------------------------------------------------------------------------------
# Across models
# --------------------------------------------------------------------------------------------------------------------


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
