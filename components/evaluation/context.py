"""What an evaluation task reads, and what it returns.

A task (`runner.TASKS`: knn, linear, logreg, robustness, retrieval, segmentation, depth) is a function of a
`TaskContext` (one frozen backbone, the datasets, the `evaluate` section, images shared across models, and the work
tasks of one model share: the classification features, the selected linear probe) that returns its results,
{result name: (metrics, details)}: `knn`, or `segmentation_linear` and `segmentation_ms` for one task with two
protocols. Figure samples go to `ctx.result.samples`.

The segmentation task's protocols (`segmentation.PROTOCOLS`) are functions of a `SegmentationSet` (the backbone and
the split's images and masks, each decoded or extracted once for every protocol) that return a `SegOutcome`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from components.config import EvaluateConfig
from components.evaluation.datasets import (
    ClassificationData,
    EvalDatasets,
    SegmentationData,
    load_masks,
    num_segmentation_classes,
)
from components.evaluation.features import (
    ImageFeatures,
    extract_patch_maps,
    feature_blocks,
    load_images,
    patch_multiple,
)
from components.evaluation.metrics import confusion_matrix, segmentation_scores
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


# --------------------------------------------------------------------------------------------------------------------
# Segmentation: what its protocols read and return
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SegmentationSet:
    """What every protocol of the segmentation task reads: one frozen backbone and the split's images and masks,
    each decoded or extracted once for all protocols."""

    model: nn.Module
    data: SegmentationData
    side: int
    """Square input side of the linear heads, a multiple of the patch size."""
    device: str
    mean: Sequence[float]
    std: Sequence[float]
    seed: int
    feature_batch_size: int
    masks_train: list[np.ndarray]
    masks_val: list[np.ndarray]
    num_classes: int
    _val_images: dict[int, np.ndarray] = field(default_factory=dict)
    _train_maps: list[tuple[Tensor, Tensor]] | None = None

    @classmethod
    def load(cls, model: nn.Module, data: SegmentationData, *, side: int, **kwargs: Any) -> SegmentationSet:
        masks_train, masks_val = load_masks(data, "train"), load_masks(data, "val")
        num_classes = num_segmentation_classes(data, [*masks_train, *masks_val])
        side = patch_multiple(side, int(model.patch_size))
        return cls(model, data, side, masks_train=masks_train, masks_val=masks_val, num_classes=num_classes, **kwargs)

    @property
    def extract_kwargs(self) -> dict[str, Any]:
        return dict(batch_size=self.feature_batch_size, device=self.device, mean=self.mean, std=self.std)

    @property
    def last4(self) -> list[int]:
        return feature_blocks(self.model)[-4:]

    def val_images(self, side: int) -> np.ndarray:
        """The val images squashed to `side` px, decoded once per side."""
        if side not in self._val_images:
            self._val_images[side] = load_images(self.data.splits["val"].image_uris, side, crop=False)
        return self._val_images[side]

    def first_val_images(self, k: int) -> np.ndarray:
        """The first `k` val images at `side` px (decoded alone when no protocol needed them all at that side)."""
        if self.side in self._val_images:
            return self._val_images[self.side][:k]
        return load_images(self.data.splits["val"].image_uris[:k], self.side, crop=False)

    def train_maps(self) -> list[tuple[Tensor, Tensor]]:
        """Patch maps of the train images at `side` px from the last 4 blocks (the linear heads' features)."""
        if self._train_maps is None:
            images = load_images(self.data.splits["train"].image_uris, self.side, crop=False)
            self._train_maps = extract_patch_maps(self.model, images, blocks=self.last4, **self.extract_kwargs)
        return self._train_maps

    def score(self, preds: Sequence[np.ndarray]) -> tuple[dict[str, float], dict[str, Any]]:
        """mIoU, pixel accuracy and mean class accuracy of predictions at the masks' resolution, and the details
        every protocol reports (its own are added by the protocol)."""
        conf = np.zeros((self.num_classes, self.num_classes), np.int64)
        for pred, mask in zip(preds, self.masks_val, strict=True):
            conf += confusion_matrix(pred, mask, self.num_classes, self.data.ignore_index)
        scores = segmentation_scores(conf)
        metrics = {k: float(scores[k]) for k in ("miou", "pixel_acc", "macc")}
        details = {
            "num_classes": self.num_classes,
            "iou_per_class": scores["iou_per_class"],
            "class_names": list(self.data.class_names),
            "num_train": len(self.masks_train),
            "num_val": len(self.masks_val),
        }
        return metrics, details


@dataclass(frozen=True)
class SegOutcome:
    """A protocol's scores on the val split and its predictions (H, W) uint8 at each mask's resolution."""

    metrics: dict[str, float]
    details: dict[str, Any]
    preds: list[np.ndarray]
