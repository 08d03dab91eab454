"""Semantic segmentation with a linear head on frozen patch tokens (DINOv2, section 7.4, "linear" and "+ms").

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

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.evaluation.datasets import SegmentationData, load_masks, num_segmentation_classes
from components.evaluation.features import (
    cache_on_device,
    extract_patch_maps,
    head_threads,
    load_images,
    num_blocks,
    patch_multiple,
    predict_batches,
    take_batch,
)
from components.evaluation.metrics import confusion_matrix, segmentation_scores
from components.log import get_logger

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


def run_segmentation(
    model: nn.Module,
    data: SegmentationData,
    *,
    side: int,
    variants: Sequence[str] = VARIANTS,
    ms_scales: Sequence[float] = (1.0, 1.32, 1.73),
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 16,
    device: str = "cpu",
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
    num_samples: int = 4,
    feature_batch_size: int = 64,
) -> tuple[dict[str, tuple[dict[str, float], dict[str, Any]]], dict[str, np.ndarray]]:
    """Trains and scores each head variant on the split's masks.

    Returns:
        ({variant: (metrics `miou`, `pixel_acc`, `macc`; details)}, samples for the report: the first val images,
        their masks and the last variant's predictions, at `side` px).
    """
    patch = int(model.patch_size)
    side = patch_multiple(side, patch)
    masks_train, masks_val = load_masks(data, "train"), load_masks(data, "val")
    num_classes = num_segmentation_classes(data, [*masks_train, *masks_val])
    depth = num_blocks(model)
    last4 = list(range(max(0, depth - 4), depth))
    kwargs = dict(batch_size=feature_batch_size, device=device, mean=mean, std=std)
    train_images = load_images(data.splits["train"].image_uris, side, crop=False)
    train_maps = extract_patch_maps(model, train_images, blocks=last4, **kwargs)
    # The loss is taken at 4x the patch grid (targets nearest-resized) rather than at the full mask: at these head
    # sizes the upsampling to full resolution would dominate training time and adds little to a linear head.
    targets = resize_masks(masks_train, min(side, 4 * (side // patch)))
    val_images: dict[int, np.ndarray] = {}
    results: dict[str, tuple[dict[str, float], dict[str, Any]]] = {}
    samples: dict[str, np.ndarray] = {}
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"unknown segmentation variant {variant!r}; known: {VARIANTS}")
        blocks = last4 if variant == "ms" else [depth - 1]
        feats = _concat_maps(train_maps[-len(blocks) :])
        head = train_seg_head(
            feats, targets, num_classes=num_classes, ignore_index=data.ignore_index, epochs=epochs, lr=lr,
            batch_size=batch_size, seed=seed, device=device,
        )  # fmt: skip
        scales = tuple(ms_scales) if variant == "ms" else (1.0,)
        flips = (False, True) if variant == "ms" else (False,)
        probs: list[Tensor | None] = [None] * len(masks_val)
        for scale in scales:
            s_side = patch_multiple(round(side * scale), patch)
            if s_side not in val_images:
                val_images[s_side] = load_images(data.splits["val"].image_uris, s_side, crop=False)
            for flip in flips:
                maps = extract_patch_maps(model, val_images[s_side], blocks=blocks, flip=flip, **kwargs)
                logits = predict_batches(head, _concat_maps(maps), batch_size=batch_size, device=device)  # (N, C, h, w)
                if flip:
                    logits = logits.flip(-1)
                for i, mask in enumerate(masks_val):
                    p = F.interpolate(logits[i : i + 1], size=mask.shape, mode="bilinear", align_corners=False)
                    p = p.softmax(dim=1)[0]  # (C, H, W)
                    probs[i] = p if probs[i] is None else probs[i] + p
        conf = np.zeros((num_classes, num_classes), np.int64)
        preds = []
        for p, mask in zip(probs, masks_val, strict=True):
            pred = p.argmax(dim=0).numpy().astype(np.uint8)  # (H, W)
            preds.append(pred)
            conf += confusion_matrix(pred, mask, num_classes, data.ignore_index)
        scores = segmentation_scores(conf)
        metrics = {k: float(scores[k]) for k in ("miou", "pixel_acc", "macc")}
        details = {
            "num_classes": num_classes,
            "blocks": blocks,
            "scales": list(scales),
            "flip": len(flips) > 1,
            "side": side,
            "iou_per_class": scores["iou_per_class"],
            "class_names": list(data.class_names),
            "num_train": len(masks_train),
            "num_val": len(masks_val),
        }
        results[variant] = (metrics, details)
        k = min(num_samples, len(masks_val))
        samples = {
            "seg_images": val_images.get(side, load_images(data.splits["val"].image_uris[:k], side, crop=False))[:k],
            "seg_gt": np.stack([_resize_nearest(m, side) for m in masks_val[:k]]),
            "seg_pred": np.stack([_resize_nearest(p, side) for p in preds[:k]]),
            "seg_num_classes": np.asarray(num_classes),
        }
        log.info("segmentation %s: mIoU %.3f, pixel accuracy %.3f", variant, metrics["miou"], metrics["pixel_acc"])
    return results, samples


def _resize_nearest(a: np.ndarray, side: int) -> np.ndarray:
    t = torch.from_numpy(a.astype(np.float32))[None, None]
    return F.interpolate(t, size=(side, side), mode="nearest")[0, 0].numpy().astype(np.uint8)
