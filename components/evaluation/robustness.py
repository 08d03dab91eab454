"""ImageNet-C robustness (Hendrycks & Dietterich 2019) of the model's classifier on corrupted test images.

The `robustness` task classifies every (corruption, severity) version of a subset of the classification test
images (rendered once for all models by `ImageCache.corrupted`) with the selected linear probe (the paper's) or kNN,
and keeps each model's raw top-1 errors. Once every model is evaluated, `finalize_robustness` turns them into the
`robustness` results: mCE and relative mCE normalised by a baseline's errors (an evaluated model, or a JSON table),
and the error per corruption.

With the released ImageNet-C (`ClassificationData.corrupted`, the `imagenet_c` benchmark) the corrupted images are
read from its `<corruption>/<severity>/<wnid>/` folders instead of rendered, and the baseline is AlexNet's published
table (`robustness_baseline: alexnet`, components/evaluation/alexnet_c.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from components import storage
from components.config import EvaluateConfig
from components.evaluation import alexnet_c
from components.evaluation.context import ModelResult, TaskContext, TaskOutputs, TaskResult
from components.evaluation.datasets import ImageSet
from components.evaluation.features import ImageFeatures, extract_features, load_images
from components.evaluation.knn import headline_k, knn_scores
from components.evaluation.metrics import (
    corruption_errors,
    mean_corruption_error,
    mean_corruption_error_against_means,
    relative_mean_corruption_error,
    topk_accuracy,
)
from components.log import get_logger

log = get_logger(__name__)


def robustness_subset(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Indices of the test images that are corrupted: the first `per_class` of each class (all when None)."""
    if per_class is None:
        return np.arange(len(labels))
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]))


def robustness_task(ctx: TaskContext) -> TaskOutputs:
    """Top-1 errors of the model's classifier on every corrupted set and on the clean subset, kept in `ctx.result`
    until `finalize_robustness` normalises them across models (so no result yet)."""
    cfg, cache, result = ctx.cfg, ctx.cache, ctx.result
    feats, labels = ctx.classification_features(), ctx.labels
    index = cache.robustness_index()
    y = labels["test"][index]
    bank = feats["train"].output
    bank_labels = torch.as_tensor(labels["train"], dtype=torch.long)
    k = headline_k(cfg.knn_k)
    probe = ctx.probe
    n_blocks = probe.n_blocks if probe is not None else 1

    def classify(f: ImageFeatures) -> Tensor:
        if cfg.robustness_classifier == "linear" and probe is not None:
            return probe.scores(f)
        return knn_scores(bank, bank_labels, f.output, k=k, temperature=cfg.knn_temperature,
                          num_classes=ctx.num_classes)  # fmt: skip

    result.clean_error = 1.0 - topk_accuracy(classify(feats["test"].subset(index)), y, 1)
    released = ctx.classification.corrupted
    if released is not None:
        result.corruption_errors = _released_errors(ctx, released, classify, n_blocks)
        return {}
    errors: dict[str, list[float]] = {name: [] for name in cfg.corruptions}
    corrupted = cache.corrupted(ctx.side)
    # One extraction over every corrupted set (full batches), then the classifier per set.
    keys = list(corrupted)
    f = extract_features(ctx.model, np.concatenate([corrupted[key] for key in keys]), n_blocks=n_blocks,
                         **ctx.extract_kwargs)  # fmt: skip
    scores = classify(f)
    for i, (name, _severity) in enumerate(keys):
        part = scores[i * len(index) : (i + 1) * len(index)]
        errors[name].append(1.0 - topk_accuracy(part, y, 1))
    result.corruption_errors = errors
    ctx.num_extracted += len(corrupted) * len(index)
    return {}


CHUNK_IMAGES = 2048


def _released_errors(
    ctx: TaskContext, released: dict[tuple[str, int], ImageSet], classify: Any, n_blocks: int
) -> dict[str, list[float]]:
    """Top-1 errors on the released corrupted sets, severity by severity (images decoded chunk by chunk: ImageNet-C
    is 75 sets of 50,000), on the first `robustness_images_per_class` images of each class of each set."""
    errors: dict[str, list[float]] = {}
    for (name, _severity), images in sorted(released.items()):
        part = images.subset(robustness_subset(images.labels, ctx.cfg.robustness_images_per_class))
        wrong = 0
        for start in range(0, len(part), CHUNK_IMAGES):
            chunk = part.uris[start : start + CHUNK_IMAGES]
            f = extract_features(ctx.model, load_images(chunk, ctx.side), n_blocks=n_blocks, **ctx.extract_kwargs)
            labels = part.labels[start : start + CHUNK_IMAGES]
            wrong += round((1.0 - topk_accuracy(classify(f), labels, 1)) * len(chunk))
        errors.setdefault(name, []).append(wrong / max(1, len(part)))
        ctx.num_extracted += len(part)
    return errors


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
    if cfg.robustness_baseline == alexnet_c.NAME:
        for r in with_errors:
            r.tasks["robustness"] = _against_alexnet(r, cfg)
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


def _against_alexnet(r: ModelResult, cfg: EvaluateConfig) -> TaskResult:
    """The `robustness` result of one model normalised by AlexNet's published errors (ImageNet-C's own mCE)."""
    errors = r.corruption_errors or {}
    mce, ce = mean_corruption_error_against_means(errors, alexnet_c.MEAN_ERRORS)
    num_severities = {name: len(errs) for name, errs in errors.items()}
    metrics = {"clean_error": float(r.clean_error if r.clean_error is not None else math.nan), "mce": mce}
    metrics.update({f"error_{name}": float(np.mean(errs)) for name, errs in errors.items()})
    details = {
        "baseline": alexnet_c.NAME,
        "citation": alexnet_c.CITATION,
        "ce": ce,
        "errors": errors,
        "num_severities": num_severities,
        "all_severities": all(n == 5 for n in num_severities.values()),
        "classifier": cfg.robustness_classifier,
    }
    metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
    return TaskResult("robustness", metrics, details, r.timing.get("robustness", 0.0))
