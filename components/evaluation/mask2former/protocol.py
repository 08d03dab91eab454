"""The `mask2former` protocol of the segmentation task: ViT-Adapter + Mask2Former on the frozen backbone.

The DINOv2 paper's strongest segmentation figure (ADE20K, 60.2 mIoU with a frozen ViT-g/14) uses this protocol; the
release shipped only inference configs for it. Here the adapter and the Mask2Former head are trained on the
segmentation set's train split (the backbone frozen) and scored on its val split like the linear heads (one
confusion matrix at each mask's own resolution; results `segmentation_m2f`).

Training (mmsegmentation's ADE20K pipeline, as ViT-Adapter trains): each image rescaled to a shorter side of
crop x U(`m2f_scale_range`) (bilinear; masks nearest), a random crop of `m2f_crop_size` px (re-drawn up to 10 times
while one class covers more than 75% of it), a horizontal flip with probability 0.5, padding to the crop (pixels
outside the image are ignored), ImageNet normalisation; AdamW (`m2f_lr`, `m2f_weight_decay`, none on biases, norms
and embeddings), a linear warm-up over `m2f_warmup_iterations` then polynomial decay of power 0.9 to 0
(`poly_lr`), `m2f_iterations` steps of `m2f_batch_size` crops. No photometric distortion.

Inference: the image resized (keeping its aspect ratio) to a shorter side of `m2f_crop_size`; crop x crop windows
every `m2f_stride` px (mmsegmentation's "slide" mode: the last window of a row or column flush with the border,
windows past a border padded), semantic scores of overlapping windows averaged, resized to the mask and arg-maxed.

Images are decoded once when the split is small (up to `MAX_CACHED_IMAGES`), else batch by batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from components.config import EvaluateConfig
from components.evaluation.context import SegmentationSet, SegOutcome
from components.evaluation.datasets import read_many, read_rgb
from components.evaluation.features import device_autocast, head_threads, normalize, patch_multiple
from components.evaluation.mask2former.adapter import AdapterConfig, ViTAdapter
from components.evaluation.mask2former.criterion import Target, mask2former_loss, semantic_targets
from components.evaluation.mask2former.head import Mask2Former, Mask2FormerConfig, semantic_probs
from components.log import get_logger

log = get_logger(__name__)

POLY_POWER = 0.9
WARMUP_RATIO = 1e-6
"""The warm-up starts at this fraction of the learning rate (mmsegmentation's `warmup_ratio`)."""
CAT_MAX_RATIO = 0.75
MAX_CACHED_IMAGES = 2000
NO_DECAY = ("level_embed", "query_feat", "query_pos", "gamma")
"""Parameters kept out of weight decay besides biases and norms (1-D tensors): embeddings and layer scales."""


# --------------------------------------------------------------------------------------------------------------------
# Schedule and model
# --------------------------------------------------------------------------------------------------------------------


def poly_lr(step: int, *, base_lr: float, total: int, warmup: int) -> float:
    """Learning rate at `step`: linear warm-up from `WARMUP_RATIO` x base over `warmup` steps, then
    base x (1 - step / total)^0.9 (mmsegmentation's poly schedule; the warm-up scales the poly value)."""
    lr = base_lr * (1.0 - min(step, total) / total) ** POLY_POWER
    if step < warmup:
        lr *= WARMUP_RATIO + (1.0 - WARMUP_RATIO) * step / warmup
    return lr


def build_mask2former(backbone: nn.Module, num_classes: int, cfg: EvaluateConfig) -> Mask2Former:
    """ViT-Adapter on the frozen backbone and a Mask2Former head, sized by the `m2f_*` keys."""
    adapter_cfg = AdapterConfig(inplanes=cfg.m2f_adapter_inplanes, checkpoint_blocks=cfg.m2f_activation_checkpointing)
    adapter = ViTAdapter(backbone, adapter_cfg)
    head = Mask2FormerConfig(
        num_classes=num_classes, hidden_dim=cfg.m2f_hidden_dim, num_queries=cfg.m2f_num_queries,
        decoder_layers=cfg.m2f_decoder_layers, encoder_layers=cfg.m2f_encoder_layers, ffn_dim=8 * cfg.m2f_hidden_dim,
    )  # fmt: skip
    return Mask2Former(adapter, head)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters: weight decay on weight matrices and kernels, none on biases, norms, embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or any(k in name for k in NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------------------------------
# Training crops
# --------------------------------------------------------------------------------------------------------------------


def _resize_pair(image: Image.Image, mask: np.ndarray, scale: float) -> tuple[Image.Image, np.ndarray]:
    w, h = image.size
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = Image.fromarray(mask).resize(size, Image.Resampling.NEAREST)
    return image.resize(size, Image.Resampling.BILINEAR), np.asarray(resized)


def train_crop(
    image: Image.Image,
    mask: np.ndarray,
    *,
    crop: int,
    scale_range: tuple[float, float],
    ignore_index: int,
    fill: tuple[int, int, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented training sample: (crop, crop, 3) uint8 and (crop, crop) mask, padded with `fill` (the mean
    colour: 0 once normalised) and the ignore index where the rescaled image is smaller than the crop."""
    w, h = image.size
    scale = crop * rng.uniform(*scale_range) / min(w, h)
    image, mask = _resize_pair(image, mask, scale)
    pixels = np.asarray(image)
    H, W = mask.shape
    for _ in range(10):  # mmsegmentation's RandomCrop with cat_max_ratio
        top, left = rng.integers(0, max(H - crop, 0) + 1), rng.integers(0, max(W - crop, 0) + 1)
        window = mask[top : top + crop, left : left + crop]
        _, counts = np.unique(window[window != ignore_index], return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < CAT_MAX_RATIO:
            break
    pixels, mask = pixels[top : top + crop, left : left + crop], window
    if rng.random() < 0.5:
        pixels, mask = pixels[:, ::-1], mask[:, ::-1]
    out_img = np.empty((crop, crop, 3), np.uint8)
    out_img[:] = fill
    out_mask = np.full((crop, crop), ignore_index, np.uint8)
    out_img[: pixels.shape[0], : pixels.shape[1]] = pixels
    out_mask[: mask.shape[0], : mask.shape[1]] = mask
    return out_img, out_mask


class TrainSamples:
    """Endless shuffled batches of augmented crops of the train split."""

    def __init__(self, seg: SegmentationSet, cfg: EvaluateConfig, crop: int) -> None:
        self.seg, self.cfg, self.crop = seg, cfg, crop
        self.uris = seg.data.splits["train"].image_uris
        self.images = read_many(read_rgb, self.uris) if len(self.uris) <= MAX_CACHED_IMAGES else None
        self.rng = np.random.default_rng(seg.seed)
        self.fill = tuple(round(255 * m) for m in seg.mean)

    def _order(self) -> Iterator[int]:
        while True:
            yield from self.rng.permutation(len(self.uris)).tolist()

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(B, crop, crop, 3) uint8 images and (B, crop, crop) masks."""
        order = self._order()
        while True:
            idx = [next(order) for _ in range(batch_size)]
            images = [self.images[i] for i in idx] if self.images is not None else read_many(
                read_rgb, [self.uris[i] for i in idx])  # fmt: skip
            pairs = [
                train_crop(img, self.seg.masks_train[i], crop=self.crop, scale_range=self.cfg.m2f_scale_range,
                           ignore_index=self.seg.data.ignore_index, fill=self.fill, rng=self.rng)
                for img, i in zip(images, idx, strict=True)
            ]  # fmt: skip
            yield np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# --------------------------------------------------------------------------------------------------------------------
# Training and inference
# --------------------------------------------------------------------------------------------------------------------


def train_step(
    model: Mask2Former,
    opt: torch.optim.Optimizer,
    images: Tensor,
    targets: list[Target],
    *,
    num_points: int,
    generator: torch.Generator,
) -> dict[str, float]:
    """One optimizer step on a normalised batch (B, 3, crop, crop) (bf16 autocast on a GPU): the loss summed over
    every decoder stage, backward, AdamW. Returns the total and the last stage's unweighted terms."""
    with device_autocast(str(images.device)):
        outputs = model(images)
    loss, terms = mask2former_loss(outputs, targets, num_points=num_points, generator=generator)
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"mask2former: non-finite loss {loss.item()} ({terms})")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": loss.item(), **terms}


def train_mask2former(model: Mask2Former, seg: SegmentationSet, cfg: EvaluateConfig, crop: int) -> dict[str, Any]:
    """`m2f_iterations` AdamW steps on augmented crops; returns the run's figures (time, images/s, last losses)."""
    device, ignore = seg.device, seg.data.ignore_index
    opt = torch.optim.AdamW(param_groups(model, cfg.m2f_weight_decay), lr=cfg.m2f_lr, foreach=True)
    generator = torch.Generator().manual_seed(seg.seed)  # matching and loss points
    batches = TrainSamples(seg, cfg, crop).batches(cfg.m2f_batch_size)
    model.train()
    start, terms, every = time.perf_counter(), {}, max(1, cfg.m2f_iterations // 10)
    for step in range(cfg.m2f_iterations):
        for group in opt.param_groups:
            group["lr"] = poly_lr(step, base_lr=cfg.m2f_lr, total=cfg.m2f_iterations, warmup=cfg.m2f_warmup_iterations)
        images, masks = next(batches)
        targets = [semantic_targets(torch.from_numpy(m).to(device), ignore) for m in masks]
        x = normalize(images, seg.mean, seg.std, device)  # (B, 3, crop, crop)
        terms = train_step(model, opt, x, targets, num_points=cfg.m2f_num_points, generator=generator)
        if (step + 1) % every == 0 or step == 0:
            log.info("mask2former step %d/%d: loss %.3f (ce %.3f, mask %.3f, dice %.3f), %.1f s", step + 1,
                     cfg.m2f_iterations, terms["loss"], terms["ce"], terms["mask"], terms["dice"],
                     time.perf_counter() - start)  # fmt: skip
    seconds = time.perf_counter() - start
    model.eval()
    return {"train_s": round(seconds, 3), "train_img_s": cfg.m2f_iterations * cfg.m2f_batch_size / seconds,
            "final_loss": terms}  # fmt: skip


def windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of mmsegmentation's sliding windows over an image: every `stride` px, the last
    flush with the border, one window along a side shorter than the crop."""

    def starts(size: int) -> list[int]:
        n = max(size - crop + stride - 1, 0) // stride + 1
        return sorted({max(min(i * stride + crop, size) - crop, 0) for i in range(n)})

    return [(y, min(y + crop, height), x, min(x + crop, width)) for y in starts(height) for x in starts(width)]


@torch.no_grad()
def slide_inference(model: Mask2Former, image: Tensor, *, crop: int, stride: int, batch_size: int) -> Tensor:
    """Semantic scores (C, H, W) of a normalised image (3, H, W): windows padded to crop x crop, batched, averaged
    where they overlap."""
    _, H, W = image.shape
    boxes = windows(H, W, crop, stride)
    scores: Tensor | None = None
    count = image.new_zeros(1, H, W)
    for i in range(0, len(boxes), batch_size):
        part = boxes[i : i + batch_size]
        batch = torch.stack([F.pad(image[:, y0:y1, x0:x1], (0, crop - (x1 - x0), 0, crop - (y1 - y0)))
                             for y0, y1, x0, x1 in part])  # fmt: skip
        with device_autocast(str(image.device)):
            logits, masks = model(batch)[-1]
        probs = semantic_probs(logits.float(), masks.float(), (crop, crop))  # (n, C, crop, crop)
        if scores is None:
            scores = image.new_zeros(probs.shape[1], H, W)
        for p, (y0, y1, x0, x1) in zip(probs, part, strict=True):
            scores[:, y0:y1, x0:x1] += p[:, : y1 - y0, : x1 - x0]
            count[:, y0:y1, x0:x1] += 1
    assert scores is not None
    return scores / count


def predict_val(
    model: Mask2Former, seg: SegmentationSet, cfg: EvaluateConfig, crop: int, stride: int
) -> list[np.ndarray]:
    """Predictions (H, W) uint8 of every val image at its mask's resolution."""
    preds = []
    for uri, mask in zip(seg.data.splits["val"].image_uris, seg.masks_val, strict=True):
        image = read_rgb(uri)
        scale = crop / min(image.size)
        image = image.resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))),
                             Image.Resampling.BILINEAR)  # fmt: skip
        x = normalize(np.array(image)[None], seg.mean, seg.std, seg.device)[0]  # (3, H', W')
        scores = slide_inference(model, x, crop=crop, stride=stride, batch_size=cfg.m2f_batch_size)
        scores = F.interpolate(scores[None], size=mask.shape, mode="bilinear", align_corners=False)[0]
        preds.append(scores.argmax(dim=0).cpu().numpy().astype(np.uint8))
    return preds


@head_threads()
def mask2former_protocol(seg: SegmentationSet, cfg: EvaluateConfig) -> SegOutcome:
    """Trains ViT-Adapter + Mask2Former on the train split, scores the val split (results `segmentation_m2f`).

    One intra-op thread, as the linear heads (`head_threads`): on the busy 2-core machine of the CPU runs, a demo-sized
    training step took 20 to 40 s with two OpenMP threads and about 1 s with one; on a GPU it makes no difference.
    """
    patch = int(seg.model.patch_size)
    crop = patch_multiple(cfg.m2f_crop_size, patch)
    stride = cfg.m2f_stride or max(1, crop * 2 // 3)
    torch.manual_seed(seg.seed)
    model = build_mask2former(seg.model, seg.num_classes, cfg).to(seg.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("mask2former: %d trainable parameters, crop %d, %d iterations of %d", trainable, crop,
             cfg.m2f_iterations, cfg.m2f_batch_size)  # fmt: skip
    run = train_mask2former(model, seg, cfg, crop)
    start = time.perf_counter()
    preds = predict_val(model, seg, cfg, crop, stride)
    metrics, details = seg.score(preds)
    details = {
        **details, **run, "predict_s": round(time.perf_counter() - start, 3), "crop": crop, "stride": stride,
        "iterations": cfg.m2f_iterations, "batch_size": cfg.m2f_batch_size, "lr": cfg.m2f_lr,
        "trainable_parameters": trainable, "interaction_groups": model.adapter.groups,
    }  # fmt: skip
    return SegOutcome(metrics, details, preds)
