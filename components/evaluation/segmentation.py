"""The segmentation task: its protocols (`PROTOCOLS`), and the linear heads on frozen patch tokens (DINOv2, section
7.4, "linear" and "+ms"); the paper's third protocol, ViT-Adapter + Mask2Former, is `mask2former/`.

- `linear`: the last block's patch-token map (B, D, h, w) -> BatchNorm -> 1x1 convolution to C classes; logits
  upsampled bilinearly to the mask. This is DINOv2's `BNHead` on one layer.
- `ms`: the paper's "+ms" setting: the patch-token maps of the last 4 blocks concatenated (4D channels) into the same
  BatchNorm + 1x1 head, and multi-scale test-time augmentation: the image at several scales (rounded to the patch
  size), each also mirrored, softmax probabilities averaged at the mask's resolution.

Heads train on cached features of the train split (AdamW, weight decay 1e-4, polynomial decay of power 1, as
mmsegmentation's schedule; cross-entropy on logits upsampled to 4x the patch grid, against nearest-resized masks, the
ignore index left out), on the evaluation device, with the feature cache moved there when it fits (else batch by
batch).
Images are resized whole to a square of `side` px; masks are compared at their own resolution (predictions are
upsampled to each mask), so mIoU is measured on the original ground truth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.config import EvaluateConfig
from components.evaluation.context import SegmentationSet, SegOutcome
from components.evaluation.datasets import SegmentationData
from components.evaluation.features import (
    cache_on_device,
    extract_patch_maps,
    head_threads,
    patch_multiple,
    predict_batches,
    take_batch,
)
from components.evaluation.mask2former.protocol import mask2former_protocol
from components.log import get_logger

if TYPE_CHECKING:
    from components.evaluation.context import TaskContext, TaskOutputs

log = get_logger(__name__)

VARIANTS = ("linear", "ms")


class LinearSegHead(nn.Module):
    """BatchNorm + 1x1 convolution on (concatenated) patch-token maps, as DINOv2's linear `BNHead`."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)  # mmseg's conv_seg init
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, D_in, h, w) -> (B, C, h, w) logits at patch resolution."""
        return self.conv(self.bn(x))


def resize_masks(masks: Sequence[np.ndarray], side: int) -> Tensor:
    """(N, side, side) int64 masks, nearest-neighbour resized (class indices must not be interpolated)."""
    t = [torch.from_numpy(m.astype(np.int64))[None, None].float() for m in masks]
    return torch.cat([F.interpolate(m, size=(side, side), mode="nearest") for m in t])[:, 0].long()


@head_threads()
def train_seg_head(
    features: Tensor,
    targets: Tensor,
    *,
    num_classes: int,
    ignore_index: int,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: str = "cpu",
) -> LinearSegHead:
    """Fits a linear head on `device` on cached features (N, D_in, h, w) against targets (N, H, W); the batch order
    is drawn on the CPU (the same on every device), the cache moved to `device` when it fits (`cache_on_device`)."""
    torch.manual_seed(seed)
    head = LinearSegHead(features.shape[1], num_classes).to(device)
    features, targets = cache_on_device(features, device), cache_on_device(targets, device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    steps = max(1, epochs * -(-len(features) // batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))  # poly, power 1
    generator = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(features), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            logits = head(take_batch(features, idx, device))
            logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, take_batch(targets, idx, device), ignore_index=ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


def _concat_maps(maps: list[tuple[Tensor, Tensor]]) -> Tensor:
    return torch.cat([m for m, _ in maps], dim=1)  # (N, sum D, h, w)


# --------------------------------------------------------------------------------------------------------------------
# The task: protocols on one segmentation set
# --------------------------------------------------------------------------------------------------------------------


def _train_linear(seg: SegmentationSet, cfg: EvaluateConfig, blocks: Sequence[int]) -> LinearSegHead:
    patch = int(seg.model.patch_size)
    maps = seg.train_maps()
    feats = _concat_maps(maps[len(maps) - len(blocks) :])
    # The loss is taken at 4x the patch grid (targets nearest-resized) rather than at the full mask: at these head
    # sizes the upsampling to full resolution would dominate training time and adds little to a linear head.
    targets = resize_masks(seg.masks_train, min(seg.side, 4 * (seg.side // patch)))
    return train_seg_head(
        feats, targets, num_classes=seg.num_classes, ignore_index=seg.data.ignore_index, epochs=cfg.segmentation_epochs,
        lr=cfg.segmentation_lr, batch_size=cfg.head_batch_size, seed=seg.seed, device=seg.device,
    )  # fmt: skip


def _linear_protocol(seg: SegmentationSet, cfg: EvaluateConfig, *, multiscale: bool) -> SegOutcome:
    """The linear head (last block) or +ms (last 4 blocks, multi-scale and flipped test inputs): softmax
    probabilities averaged at each mask's resolution."""
    patch = int(seg.model.patch_size)
    blocks = seg.last4 if multiscale else seg.last4[-1:]
    head = _train_linear(seg, cfg, blocks)
    scales = tuple(cfg.segmentation_ms_scales) if multiscale else (1.0,)
    flips = (False, True) if multiscale else (False,)
    probs: list[Tensor | None] = [None] * len(seg.masks_val)
    for scale in scales:
        images = seg.val_images(patch_multiple(round(seg.side * scale), patch))
        for flip in flips:
            maps = extract_patch_maps(seg.model, images, blocks=blocks, flip=flip, **seg.extract_kwargs)
            logits = predict_batches(head, _concat_maps(maps), batch_size=cfg.head_batch_size, device=seg.device)
            if flip:
                logits = logits.flip(-1)  # (N, C, h, w)
            for i, mask in enumerate(seg.masks_val):
                p = F.interpolate(logits[i : i + 1], size=mask.shape, mode="bilinear", align_corners=False)
                p = p.softmax(dim=1)[0]  # (C, H, W)
                probs[i] = p if probs[i] is None else probs[i] + p
    preds = [p.argmax(dim=0).numpy().astype(np.uint8) for p in probs]  # (H, W) each
    metrics, details = seg.score(preds)
    details = {**details, "blocks": list(blocks), "scales": list(scales), "flip": len(flips) > 1, "side": seg.side}
    return SegOutcome(metrics, details, preds)


def linear_protocol(seg: SegmentationSet, cfg: EvaluateConfig) -> SegOutcome:
    return _linear_protocol(seg, cfg, multiscale=False)


def ms_protocol(seg: SegmentationSet, cfg: EvaluateConfig) -> SegOutcome:
    return _linear_protocol(seg, cfg, multiscale=True)


@dataclass(frozen=True)
class SegProtocol:
    """A segmentation protocol: its result name (`segmentation_<result>`), the function that trains and scores it,
    and the figure sample its predictions go to."""

    result: str
    run: Callable[[SegmentationSet, EvaluateConfig], SegOutcome]
    sample: str = "seg_pred"


PROTOCOLS: dict[str, SegProtocol] = {
    "linear": SegProtocol("linear", linear_protocol),
    "ms": SegProtocol("ms", ms_protocol),
    "mask2former": SegProtocol("m2f", mask2former_protocol, "seg_pred_m2f"),
}
"""`evaluate.segmentation_variants` -> protocol."""


def run_segmentation(
    model: nn.Module,
    data: SegmentationData,
    cfg: EvaluateConfig,
    *,
    side: int,
    device: str = "cpu",
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
) -> tuple[dict[str, tuple[dict[str, float], dict[str, Any]]], dict[str, np.ndarray]]:
    """Trains and scores each protocol of `cfg.segmentation_variants` on the split's masks.

    Returns:
        ({result name: (metrics `miou`, `pixel_acc`, `macc`; details)}, samples for the report: the first val
        images, their masks and each protocol's predictions (the linear heads': the last one's), at `side` px).
    """
    seg = SegmentationSet.load(model, data, side=side, device=device, mean=mean, std=std, seed=seed,
                               feature_batch_size=cfg.batch_size)  # fmt: skip
    results: dict[str, tuple[dict[str, float], dict[str, Any]]] = {}
    samples: dict[str, np.ndarray] = {}
    k = min(cfg.num_figure_samples, len(seg.masks_val))
    for variant in cfg.segmentation_variants:
        if variant not in PROTOCOLS:
            raise ValueError(f"unknown segmentation variant {variant!r}; known: {tuple(PROTOCOLS)}")
        protocol = PROTOCOLS[variant]
        out = protocol.run(seg, cfg)
        results[protocol.result] = (out.metrics, out.details)
        if k:
            samples[protocol.sample] = np.stack([_resize_nearest(p, seg.side) for p in out.preds[:k]])
        log.info("segmentation %s: mIoU %.3f, pixel accuracy %.3f", variant, out.metrics["miou"],
                 out.metrics["pixel_acc"])  # fmt: skip
    if k:
        samples.update({
            "seg_images": seg.first_val_images(k),
            "seg_gt": np.stack([_resize_nearest(m, seg.side) for m in seg.masks_val[:k]]),
            "seg_num_classes": np.asarray(seg.num_classes),
        })  # fmt: skip
    return results, samples


def segmentation_task(ctx: TaskContext) -> TaskOutputs:
    """The `segmentation` task: every configured protocol, results as `segmentation_<protocol>`."""
    mean, std = ctx.mean_std
    assert ctx.data.segmentation is not None
    results, samples = run_segmentation(ctx.model, ctx.data.segmentation, ctx.cfg, side=ctx.dense_side,
                                        device=ctx.device, mean=mean, std=std, seed=ctx.seed)  # fmt: skip
    ctx.result.samples.update(samples)
    return {f"segmentation_{name}": out for name, out in results.items()}


def _resize_nearest(a: np.ndarray, side: int) -> np.ndarray:
    t = torch.from_numpy(a.astype(np.float32))[None, None]
    return F.interpolate(t, size=(side, side), mode="nearest")[0, 0].numpy().astype(np.uint8)
