"""Monocular depth estimation with heads on frozen features (DINOv2, section 7.4).

- `linear` / `linear4`: DINOv2's linear depth head (`BNHead` with `classify=True`): for each of the last 1 (or 4)
  blocks, the patch-token map concatenated with the CLS token broadcast to every patch (2D channels per block),
  a 1x1 convolution to 256 depth bins, the AdaBins "linear" normalisation p = (ReLU(l) + 0.1) / sum and
  depth = sum_k p_k c_k with the bin centres c_k uniform on [min_depth, max_depth] ("UD" bins), upsampled x4
  (see `LinearDepthHead` for the one difference in order from the release).
- `dpt`: the DPT decoder (Ranftl et al. 2021) as DINOv2's `DPTHead`: four evenly spaced blocks ([2, 5, 8, 11] of 12),
  each reassembled with the "project" readout (Linear(2D -> D) + GELU on [patch, CLS]), projected to D/8 .. D
  channels and resized x4, x2, x1, x1/2; 3x3 convolutions to `features` channels, four fusion blocks of pre-activation
  residual units with x2 upsampling, and the depth head (conv, x2, conv, ReLU, 1x1 conv), depth = ReLU + min_depth.
  The paper's headline depth numbers (NYU RMSE 0.279, KITTI 2.11 with ViT-g/14) use this head.

Heads train on cached frozen features of the train split with the scale-invariant log loss of Eigen et al. (2014)
in DINOv2's form, sqrt(Var(g) + 0.15 mean(g)^2) with g = log(d + 1e-3) - log(d* + 1e-3) on valid pixels (AdamW,
linear decay to 0), taken at the head's output resolution (4x the patch grid for the linear heads) against
nearest-resized ground truth; DINOv2 upsamples to the full map, which here would dominate the training time. Heads
train and predict on the evaluation device, with the feature cache moved there when it fits (else batch by batch).
Predictions are upsampled to each ground-truth map and scored with `metrics.depth_metrics`. Beside them, the same
metrics of an image-blind reference, the train split's mean depth map, tell whether a head reads depth from the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.config import EvaluateConfig
from components.evaluation.datasets import DepthData, depth_range, load_depths
from components.evaluation.features import (
    cache_on_device,
    dense_block_indices,
    dense_blocks,
    extract_patch_maps,
    feature_blocks,
    head_threads,
    load_images,
    patch_multiple,
    predict_batches,
    take_batch,
)
from components.evaluation.metrics import depth_metrics
from components.log import get_logger

if TYPE_CHECKING:
    from components.evaluation.context import TaskContext, TaskOutputs

log = get_logger(__name__)

HEADS = ("linear", "linear4", "dpt")
SIGLOSS_EPS = 1e-3
"""Added inside the logs of DINOv2's SigLoss ("avoid grad explode")."""


def bin_centres(min_depth: float, max_depth: float, n_bins: int) -> Tensor:
    """Uniform ("UD") bin centres on [min_depth, max_depth]."""
    return torch.linspace(min_depth, max_depth, n_bins)


def bins_to_depth(logits: Tensor, centres: Tensor) -> Tensor:
    """AdaBins' linear normalisation of bin logits (B, K, H, W), then the expected depth (B, 1, H, W)."""
    p = torch.relu(logits) + 0.1  # (B, K, H, W)
    return (p * centres.to(p).view(1, -1, 1, 1)).sum(dim=1, keepdim=True) / p.sum(dim=1, keepdim=True)


class LinearDepthHead(nn.Module):
    """DINOv2's linear depth head: 1x1 conv to `n_bins` on [patch, CLS] maps, bins to depth, x`upsample`.

    DINOv2 upsamples the features x4 before the 1x1 convolution and normalises the bins at that resolution; here the
    bins are normalised at the patch grid and the one-channel depth map is upsampled (bilinear). The two differ only
    in the order of the bilinear upsampling and the (non-linear) bin normalisation, and this order is 16 times cheaper
    (256 bin maps never exist at 4x resolution), which is what keeps the CPU demo within its time budget.
    """

    def __init__(self, in_channels: int, *, n_bins: int, min_depth: float, max_depth: float, upsample: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, n_bins, kernel_size=1)
        self.upsample = upsample
        self.register_buffer("centres", bin_centres(min_depth, max_depth, n_bins), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, D_in, h, w) -> (B, 1, h * upsample, w * upsample) depth in metres."""
        depth = bins_to_depth(self.conv(x), self.centres)  # (B, 1, h, w)
        return F.interpolate(depth, scale_factor=self.upsample, mode="bilinear", align_corners=False)


def linear_depth_input(maps: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """[patch map, CLS broadcast] per block, blocks concatenated: (N, 2 D n, h, w)."""
    parts = []
    for fmap, cls in maps:
        parts += [fmap, cls[:, :, None, None].expand_as(fmap)]
    return torch.cat(parts, dim=1)


# --------------------------------------------------------------------------------------------------------------------
# DPT
# --------------------------------------------------------------------------------------------------------------------


class _ResidualConvUnit(nn.Module):
    """Pre-activation residual unit: x + conv(relu(conv(relu(x))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _FusionBlock(nn.Module):
    """Adds the skip (after a residual unit), refines, upsamples x2, projects (DPT's FeatureFusionBlock)."""

    def __init__(self, channels: int, with_skip: bool) -> None:
        super().__init__()
        self.skip_unit = _ResidualConvUnit(channels) if with_skip else None
        self.unit = _ResidualConvUnit(channels)
        self.project = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None and self.skip_unit is not None:
            if skip.shape != x.shape:
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.skip_unit(skip)
        x = self.unit(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.project(x)


class DPTHead(nn.Module):
    """DPT decoder on four ViT blocks, as DINOv2's `DPTHead` (readout "project", regression output)."""

    def __init__(self, embed_dim: int, *, features: int = 256, min_depth: float = 1e-3) -> None:
        super().__init__()
        post = [max(8, embed_dim // 8), max(8, embed_dim // 4), max(8, embed_dim // 2), embed_dim]  # [96 .. 768] at B
        self.readout = nn.ModuleList(nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.GELU()) for _ in post)
        self.project = nn.ModuleList(nn.Conv2d(embed_dim, c, 1) for c in post)
        self.resize = nn.ModuleList(
            [
                nn.ConvTranspose2d(post[0], post[0], kernel_size=4, stride=4),  # x4
                nn.ConvTranspose2d(post[1], post[1], kernel_size=2, stride=2),  # x2
                nn.Identity(),  # x1
                nn.Conv2d(post[3], post[3], kernel_size=3, stride=2, padding=1),  # x1/2
            ]
        )
        self.convs = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1, bias=False) for c in post)
        self.fusion = nn.ModuleList(_FusionBlock(features, with_skip=i > 0) for i in range(4))
        self.out_conv = nn.Sequential(nn.Conv2d(features, features, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(
            nn.Conv2d(features, features // 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(features // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
        )
        self.min_depth = min_depth

    def forward(self, maps: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """Four (patch map (B, D, h, w), CLS (B, D)) pairs -> (B, 1, 16 h, 16 w) depth in metres."""
        feats = []
        for i, (fmap, cls) in enumerate(maps):
            b, d, h, w = fmap.shape
            tokens = fmap.flatten(2).transpose(1, 2)  # (B, h w, D)
            tokens = self.readout[i](torch.cat([tokens, cls[:, None].expand_as(tokens)], dim=-1))  # (B, h w, D)
            x = tokens.transpose(1, 2).reshape(b, d, h, w)  # (B, D, h, w)
            feats.append(self.convs[i](self.resize[i](self.project[i](x))))
        out = self.fusion[0](feats[3])
        for i in range(1, 4):
            out = self.fusion[i](out, feats[3 - i])
        return F.relu(self.head(self.out_conv(out))) + self.min_depth


# --------------------------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------------------------


def sig_loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """DINOv2's SigLoss: sqrt(Var(g) + 0.15 mean(g)^2), g = log(d + eps) - log(d* + eps) on valid pixels."""
    g = torch.log(pred[valid] + SIGLOSS_EPS) - torch.log(target[valid] + SIGLOSS_EPS)
    if g.numel() < 2:
        return pred.sum() * 0.0
    return torch.sqrt(torch.var(g) + 0.15 * g.mean() ** 2)


def resize_depths(depths: Sequence[np.ndarray], side: int) -> Tensor:
    """(N, 1, side, side) nearest-resized depth maps (nearest keeps invalid zeros from bleeding into valid pixels)."""
    t = [torch.from_numpy(d.astype(np.float32))[None, None] for d in depths]
    return torch.cat([F.interpolate(d, size=(side, side), mode="nearest") for d in t])


@head_threads()
def _train_head(
    head: nn.Module,
    inputs: Sequence[Any],
    targets: Tensor,
    *,
    min_depth: float,
    max_depth: float,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: str = "cpu",
) -> nn.Module:
    """Fits a head on `device` on cached head inputs (moved there when they fit: `cache_on_device`)."""
    head.to(device)
    inputs, targets = cache_on_device(inputs, device), cache_on_device(targets, device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    num = targets.shape[0]
    steps = max(1, epochs * -(-num // batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    generator = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(num, generator=generator)
        for start in range(0, num, batch_size):
            idx = order[start : start + batch_size]
            pred = head(take_batch(inputs, idx, device))
            target = take_batch(targets, idx, device)
            pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
            loss = sig_loss(pred, target, (target > min_depth) & (target < max_depth))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


def mean_depth_map(depths: Sequence[np.ndarray], side: int, *, min_depth: float, max_depth: float) -> np.ndarray:
    """The per-pixel mean of the valid training depths, maps nearest-resized to `side` x `side`.

    Pixels that are valid in no training map take the mean of every valid depth. It is the best image-blind
    prediction under squared error, and the reference a depth head has to beat to show that it reads the image.
    """
    maps = resize_depths(depths, side)[:, 0].numpy()
    valid = (maps > min_depth) & (maps < max_depth)
    if not valid.any():
        raise ValueError(f"no training depth lies inside ({min_depth}, {max_depth})")
    count = valid.sum(axis=0)
    total = np.where(valid, maps, 0.0).sum(axis=0)
    overall = float(maps[valid].mean())
    return np.where(count > 0, total / np.maximum(count, 1), overall).astype(np.float32)


def mean_map_metrics(
    depths_train: Sequence[np.ndarray],
    depths_val: Sequence[np.ndarray],
    *,
    side: int,
    min_depth: float,
    max_depth: float,
    crop: str | None = None,
) -> dict[str, float]:
    """Eigen metrics of predicting `mean_depth_map` of the train split for every val image (no image is read)."""
    ref = torch.from_numpy(mean_depth_map(depths_train, side, min_depth=min_depth, max_depth=max_depth))[None, None]
    preds = [F.interpolate(ref, size=d.shape, mode="bilinear", align_corners=False)[0, 0].numpy() for d in depths_val]
    out = depth_metrics(preds, depths_val, min_depth=min_depth, max_depth=max_depth, crop=crop)
    out.pop("num_images")
    return out


def _head_and_inputs(
    name: str,
    maps: dict[int, list[tuple[Tensor, Tensor]]],
    usable: list[int],
    cfg: EvaluateConfig,
    lo: float,
    hi: float,
) -> tuple[nn.Module, Any, Any, list[int]]:
    """A fresh head of kind `name` and its (train, val) inputs built from the cached maps of the `usable` blocks
    (`feature_blocks`)."""
    if name == "dpt":
        blocks = [usable[i] for i in dense_block_indices(len(usable), 4)]
        train_in: Any = [maps["train"][b] for b in blocks]
        val_in: Any = [maps["val"][b] for b in blocks]
        return DPTHead(train_in[0][0].shape[1], features=cfg.dpt_features, min_depth=lo), train_in, val_in, blocks
    blocks = usable[-1:] if name == "linear" else usable[-4:]
    train_in = linear_depth_input([maps["train"][b] for b in blocks])
    val_in = linear_depth_input([maps["val"][b] for b in blocks])
    head = LinearDepthHead(train_in.shape[1], n_bins=cfg.depth_bins, min_depth=lo, max_depth=hi)
    return head, train_in, val_in, blocks


def run_depth(
    model: nn.Module,
    data: DepthData,
    cfg: EvaluateConfig,
    *,
    side: int,
    device: str = "cpu",
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
) -> tuple[dict[str, tuple[dict[str, float], dict[str, Any]]], dict[str, np.ndarray]]:
    """Trains and scores each depth head of `cfg.depth_heads`.

    Returns:
        ({head: (Eigen metrics; details)}, samples for the report: the first val images, ground truth and the last
        head's predictions at `side` px). Each head's details hold `mean_map`: the metrics of the image-blind
        reference (`mean_map_metrics`), which a head that reads the image beats.
    """
    side = patch_multiple(side, int(model.patch_size))
    depths_train, depths_val = load_depths(data, "train"), load_depths(data, "val")
    lo, hi = depth_range(data, depths_train, cfg.depth_min, cfg.depth_max)
    usable = feature_blocks(model)
    needed = sorted({*usable[-4:], *(dense_blocks(model, 4) if "dpt" in cfg.depth_heads else ())})
    kwargs = dict(batch_size=cfg.batch_size, device=device, mean=mean, std=std)
    val_images = load_images(data.splits["val"].image_uris, side, crop=False)
    maps = {
        split: dict(zip(needed, extract_patch_maps(model, images, blocks=needed, **kwargs), strict=True))
        for split, images in (("train", load_images(data.splits["train"].image_uris, side, crop=False)),
                              ("val", val_images))
    }  # fmt: skip
    results: dict[str, tuple[dict[str, float], dict[str, Any]]] = {}
    samples: dict[str, np.ndarray] = {}
    reference = mean_map_metrics(depths_train, depths_val, side=side, min_depth=lo, max_depth=hi, crop=data.eval_crop)
    torch.manual_seed(seed)
    for name in cfg.depth_heads:
        if name not in HEADS:
            raise ValueError(f"unknown depth head {name!r}; known: {HEADS}")
        head, train_in, val_in, blocks = _head_and_inputs(name, maps, usable, cfg, lo, hi)
        with torch.no_grad():  # the loss is taken at the head's output resolution (targets nearest-resized to it)
            out_side = head(take_batch(train_in, torch.arange(1))).shape[-1]
        head = _train_head(
            head, train_in, resize_depths(depths_train, out_side), min_depth=lo, max_depth=hi, epochs=cfg.depth_epochs,
            lr=cfg.depth_lr, batch_size=cfg.head_batch_size, seed=seed, device=device,
        )  # fmt: skip
        out = predict_batches(head, val_in, batch_size=cfg.head_batch_size, device=device)  # (N, 1, h', w')
        preds = [
            F.interpolate(out[i : i + 1], size=d.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
            for i, d in enumerate(depths_val)
        ]
        metrics = depth_metrics(preds, depths_val, min_depth=lo, max_depth=hi, crop=data.eval_crop)
        details = {
            "blocks": blocks, "min_depth": lo, "max_depth": hi, "eval_crop": data.eval_crop,
            "n_bins": cfg.depth_bins if name != "dpt" else None, "side": side, "num_train": len(depths_train),
            "num_val_scored": int(metrics.pop("num_images")), "mean_map": reference,
        }  # fmt: skip
        results[name] = (metrics, details)
        samples = _depth_samples(val_images, depths_val, preds, side, cfg.num_figure_samples, lo, hi)
        log.info("depth %s: RMSE %.3f, AbsRel %.3f, delta1 %.3f", name, metrics["rmse"], metrics["abs_rel"],
                 metrics["delta1"])  # fmt: skip
    return results, samples


def _depth_samples(
    images: np.ndarray,
    depths: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    side: int,
    k: int,
    lo: float,
    hi: float,
) -> dict[str, np.ndarray]:
    """The first `k` val images, their ground truth and predictions at `side` px, for the report's figure."""
    k = min(k, len(depths))
    if not k:
        return {}
    return {
        "depth_images": images[:k],
        "depth_gt": resize_depths(depths[:k], side)[:, 0].numpy().astype(np.float16),
        "depth_pred": np.stack([resize_depths([p], side)[0, 0].numpy() for p in preds[:k]]).astype(np.float16),
        "depth_range": np.asarray([lo, hi], np.float32),
    }


def depth_task(ctx: TaskContext) -> TaskOutputs:
    """The `depth` task: every configured head, results as `depth_<head>`."""
    mean, std = ctx.mean_std
    assert ctx.data.depth is not None
    results, samples = run_depth(ctx.model, ctx.data.depth, ctx.cfg, side=ctx.dense_side, device=ctx.device,
                                 mean=mean, std=std, seed=ctx.seed)  # fmt: skip
    ctx.result.samples.update(samples)
    return {f"depth_{name}": out for name, out in results.items()}
