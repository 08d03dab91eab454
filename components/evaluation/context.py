"""What an evaluation task reads, and what it returns.

A task (`runner.TASKS`: knn, linear, logreg, robustness, retrieval, segmentation, depth) is a function of a
`TaskContext` (one frozen backbone, the datasets, the `evaluate` section, images shared across models, and the work
tasks of one model share: the classification features, the selected linear probe) that returns its results,
{result name: (metrics, details)}: `knn`, or `segmentation_linear` and `segmentation_ms` for one task with two
protocols. Figure samples go to `ctx.result.samples`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from components.config import EvaluateConfig
from components.evaluation.datasets import ClassificationData, EvalDatasets
from components.evaluation.features import ImageFeatures, patch_multiple
from components.evaluation.models import ModelSpec, preprocessing

if TYPE_CHECKING:
    from components.evaluation.linear import LinearProbe
    from components.evaluation.runner import ImageCache

TaskOutputs = dict[str, tuple[dict[str, float], dict[str, Any]]]
"""{result name: (metrics, details)}: what a task returns, one entry per protocol it ran."""


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


@dataclass
class TaskContext:
    """One frozen backbone's evaluation: its inputs, and the work its tasks share."""

    model: nn.Module
    """The backbone, in eval mode, on `device`."""
    spec: ModelSpec
    data: EvalDatasets
    cfg: EvaluateConfig
    cache: ImageCache
    """Decoded images and corrupted sets shared by every model."""
    seed: int
    """Seeds heads, probes and few-shot draws."""
    device: str
    result: ModelResult
    """Where tasks put figure samples (and robustness its raw errors); timings accumulate in `result.timing`."""
    probe: LinearProbe | None = None
    """The linear probe selected by the `linear` task (the robustness classifier)."""
    num_extracted: int = 0
    """Images passed through the backbone for this model (a throughput figure)."""
    _features: dict[str, ImageFeatures] | None = None

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return preprocessing(self.spec)

    @property
    def patch(self) -> int:
        return int(self.model.patch_size)

    @property
    def side(self) -> int:
        """Classification and retrieval input side, a multiple of the patch size."""
        return patch_multiple(self.cfg.image_size, self.patch)

    @property
    def dense_side(self) -> int:
        """Segmentation and depth input side, a multiple of the patch size."""
        return patch_multiple(self.cfg.dense_image_size or self.cfg.image_size, self.patch)

    @property
    def extract_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of every backbone pass (`extract_features`, `extract_patch_maps`)."""
        mean, std = self.mean_std
        return dict(batch_size=self.cfg.batch_size, device=self.device, mean=mean, std=std)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Adds the block's wall time to `result.timing[phase]`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            timing = self.result.timing
            timing[phase] = timing.get(phase, 0.0) + time.perf_counter() - start

    # -- classification: one forward pass feeds kNN, the probes, logistic regression and the clean error --------------

    @property
    def classification(self) -> ClassificationData:
        if self.data.classification is None:
            raise ValueError("no classification data")
        return self.data.classification

    @property
    def labels(self) -> dict[str, np.ndarray]:
        """Class labels of the train, val and test splits."""
        return {split: s.labels for split, s in self.classification.splits.items()}

    @property
    def num_classes(self) -> int:
        return len(self.classification.class_names)

    def classification_features(self) -> dict[str, ImageFeatures]:
        """Features of the non-empty classification splits, extracted once (timed as `features`), with the CLS tokens
        of as many last blocks as the linear probes read."""
        if self._features is None:
            cfg = self.cfg
            n_blocks = max(cfg.linear_n_blocks) if "linear" in cfg.tasks else 1
            feats = {}
            with self.timed("features"):
                for split in ("train", "val", "test"):
                    if len(self.classification.splits[split]):
                        feats[split] = self.cache.features(self.model, "classification", split, self.side,
                                                           n_blocks=n_blocks, **self.extract_kwargs)  # fmt: skip
                        self.num_extracted += len(self.classification.splits[split])
            self._features = feats
        return self._features

    def empty_features(self) -> ImageFeatures:
        """No images: the val split of a set without one (the probes then hold out part of train)."""
        return ImageFeatures(torch.zeros(0, 1, 1), torch.zeros(0, 1))
