"""Frozen feature extraction through the backbone API (`get_intermediate_layers`, as in the official release).

Image-level features come from one forward pass per image: the CLS token of each of the last n blocks (after the
final LayerNorm, as DINOv2's linear evaluation takes them) and the average-pooled patch tokens of the last block.
The last block's CLS is the model's own output (`forward(x)`), used by kNN and retrieval. Dense tasks take patch
token maps (B, D, h, w) of chosen blocks, with the CLS token of each.

Preprocessing follows the official evaluation transform: resize the shorter side to side * 256 / 224 (bicubic),
centre-crop `side`, scale to [0, 1], normalise with the preset's mean and std (ImageNet's). Dense tasks resize the
whole image to a square instead (no crop: every pixel of the target is predicted). Sides are rounded down to a
multiple of the model's patch size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from components.evaluation.datasets import read_many, read_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 256 / 224
"""Shorter side over crop side in the official evaluation transform (resize 256, centre crop 224)."""


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------


def patch_multiple(side: int, patch_size: int) -> int:
    """`side` rounded down to a multiple of the patch size (at least one patch)."""
    return max(patch_size, side // patch_size * patch_size)


def center_crop(img: Image.Image, side: int) -> np.ndarray:
    """The official evaluation transform up to the tensor: (side, side, 3) uint8."""
    w, h = img.size
    short = round(side * RESIZE_RATIO)
    scale = short / min(w, h)
    img = img.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - side) // 2, (h - side) // 2
    return np.asarray(img.crop((left, top, left + side, top + side)))


def square_resize(img: Image.Image, side: int) -> np.ndarray:
    """The whole image resized to (side, side, 3) uint8 (dense tasks: the aspect ratio is not kept)."""
    return np.asarray(img.resize((side, side), Image.Resampling.BICUBIC))


def load_images(uris: Sequence[str], side: int, *, crop: bool = True) -> np.ndarray:
    """Decodes and resizes images: (N, side, side, 3) uint8, centre-cropped (`crop`) or squashed to the square."""
    transform = center_crop if crop else square_resize
    images = read_many(lambda uri: transform(read_rgb(uri), side), uris)
    return np.stack(images) if images else np.zeros((0, side, side, 3), np.uint8)


def normalize(images: np.ndarray | Tensor, mean: Sequence[float], std: Sequence[float], device: str) -> Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 on `device`, scaled to [0, 1] and normalised per channel."""
    x = torch.as_tensor(images).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def device_autocast(device: str):  # noqa: ANN202 - a context manager
    # bf16 on GPUs as DINOv2's evaluations run; fp32 on the CPU (bf16 matmuls are slow there).
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()


@contextmanager
def head_threads(num: int = 1) -> Iterator[None]:
    """Runs a block with `num` intra-op threads: the heads' tensors are tiny, and OpenMP's thread hand-offs cost more
    than they save (20x slower on a busy 2-core machine); the backbone passes keep torch's default."""
    before = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def num_blocks(model: nn.Module) -> int:
    """L, the backbone's depth (`n_blocks` in the release)."""
    return int(getattr(model, "n_blocks", None) or len(model.blocks))  # type: ignore[arg-type]


def feature_blocks(model: nn.Module) -> list[int]:
    """Indices of the blocks whose outputs the frozen protocols stack or concatenate: every block of a ViT; the last
    stage of a ConvNeXt, whose stages differ in width (its features are the last stage's, as the release reads them).
    """
    depth, widths = num_blocks(model), getattr(model, "embed_dims", None)
    return [depth - 1] if widths is not None and len(set(widths)) > 1 else list(range(depth))


def dense_blocks(model: nn.Module, count: int) -> list[int]:
    """`count` evenly spaced blocks among `feature_blocks` (`dense_block_indices`: DPT's choice of layers)."""
    blocks = feature_blocks(model)
    return [blocks[i] for i in dense_block_indices(len(blocks), count)]


# --------------------------------------------------------------------------------------------------------------------
# Image-level features
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFeatures:
    """Frozen image-level features of N images."""

    cls: Tensor
    """(N, n, D) CLS tokens of the last n blocks, oldest first; `cls[:, -1]` is the model's output."""
    patch_mean: Tensor
    """(N, D) average-pooled patch tokens of the last block."""

    @property
    def output(self) -> Tensor:
        """(N, D) the model's CLS output (kNN, retrieval)."""
        return self.cls[:, -1]

    def __len__(self) -> int:
        return self.cls.shape[0]

    def linear_input(self, n_blocks: int, avgpool: bool) -> Tensor:
        """DINOv2's `create_linear_input`: CLS of the last `n_blocks` blocks concatenated, then the pooled patches.

        `n_blocks` is clipped to the blocks extracted (a 2-block test model has no 4 last blocks).
        """
        n = min(n_blocks, self.cls.shape[1])
        out = self.cls[:, -n:].flatten(1)  # (N, n * D)
        if avgpool:
            out = torch.cat([out, self.patch_mean], dim=1)  # (N, (n + 1) * D)
        return out

    def subset(self, index: Sequence[int] | np.ndarray | Tensor) -> ImageFeatures:
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return ImageFeatures(self.cls[index], self.patch_mean[index])


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    images: np.ndarray,
    *,
    n_blocks: int = 4,
    batch_size: int = 64,
    device: str = "cpu",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scales: Sequence[float] = (1.0,),
) -> ImageFeatures:
    """CLS tokens of the last `n_blocks` blocks and pooled patch tokens, in one pass per scale.

    Args:
        model: A backbone with the release's `get_intermediate_layers`, in eval mode.
        images: (N, H, W, 3) uint8, H and W multiples of the patch size.
        n_blocks: How many last blocks' CLS tokens to keep (clipped to the depth).
        batch_size: Images per forward pass.
        device: Where the model runs.
        mean, std: The preset's normalisation.
        scales: Multi-scale features: the images are resized (bilinear) by each factor, rounded to the patch size,
            and the features averaged over scales (DINO's multi-scale retrieval uses 1, 1/sqrt(2), 1/2).

    Returns:
        Features on the CPU in float32.
    """
    n = min(n_blocks, len(feature_blocks(model)))
    patch = int(model.patch_size)
    cls_out, mean_out = [], []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size], mean, std, device)  # (B, 3, H, W)
        cls_sum, pooled_sum = None, None
        for scale in scales:
            xs = x
            if scale != 1.0:
                size = [patch_multiple(round(s * scale), patch) for s in x.shape[-2:]]
                xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
            with device_autocast(device):
                outputs = model.get_intermediate_layers(xs, n, return_class_token=True, norm=True)
            cls = torch.stack([c for _, c in outputs], dim=1).float()  # (B, n, D)
            pooled = outputs[-1][0].float().mean(dim=1)  # (B, D)
            cls_sum = cls if cls_sum is None else cls_sum + cls
            pooled_sum = pooled if pooled_sum is None else pooled_sum + pooled
        cls_out.append((cls_sum / len(scales)).cpu())
        mean_out.append((pooled_sum / len(scales)).cpu())
    if not cls_out:
        raise ValueError("no images to extract features from")
    return ImageFeatures(torch.cat(cls_out), torch.cat(mean_out))


# --------------------------------------------------------------------------------------------------------------------
# Dense features
# --------------------------------------------------------------------------------------------------------------------


HeadInputs = Tensor | Sequence[tuple[Tensor, Tensor]]
"""Cached inputs of a dense head: one (N, C, h, w) tensor, or (map (N, D, h, w), CLS (N, D)) pairs per block."""


def cache_on_device(inputs: HeadInputs, device: str, *, max_fraction: float = 0.5) -> HeadInputs:
    """Cached head inputs moved to a GPU when they take at most `max_fraction` of its free memory, so that training
    batches are gathered there; otherwise (and on the CPU) unchanged, and `take_batch` moves batch by batch. Drawn
    from host memory, every step costs a host gather and a copy: on an H200 with ViT-L/14 features at 448 px, the
    +ms segmentation head took 83 s that way."""
    if not device.startswith("cuda"):
        return inputs
    tensors = [inputs] if isinstance(inputs, Tensor) else [t for pair in inputs for t in pair]
    size = sum(t.numel() * t.element_size() for t in tensors)
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    if size > max_fraction * free:
        return inputs
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    return [(m.to(device), c.to(device)) for m, c in inputs]


def take_batch(inputs: HeadInputs, idx: Tensor, device: str = "cpu") -> Any:
    """Rows `idx` of cached head inputs, moved to `device` (the cache itself stays in host memory)."""
    if isinstance(inputs, Tensor):
        return inputs[idx].to(device, non_blocking=True)
    return [(m[idx].to(device, non_blocking=True), c[idx].to(device, non_blocking=True)) for m, c in inputs]


@torch.no_grad()
def predict_batches(head: nn.Module, inputs: HeadInputs, *, batch_size: int, device: str = "cpu") -> Tensor:
    """A head's outputs for every row of cached inputs, computed batch by batch on `device`, returned on the CPU."""
    num = len(inputs) if isinstance(inputs, Tensor) else len(inputs[0][0])
    outputs = [
        head(take_batch(inputs, torch.arange(start, min(start + batch_size, num)), device)).float().cpu()
        for start in range(0, num, batch_size)
    ]
    return torch.cat(outputs)


def dense_block_indices(depth: int, count: int) -> list[int]:
    """`count` evenly spaced block indices ending at the last block (DPT's choice: [2, 5, 8, 11] for 12 blocks,
    [9, 19, 29, 39] for ViT-g); with fewer blocks than `count`, indices repeat."""
    return [max(0, round((i + 1) * depth / count) - 1) for i in range(count)]


@torch.inference_mode()
def extract_patch_maps(
    model: nn.Module,
    images: np.ndarray | Tensor,
    *,
    blocks: Sequence[int],
    batch_size: int = 64,
    device: str = "cpu",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    flip: bool = False,
) -> list[tuple[Tensor, Tensor]]:
    """Patch-token maps and CLS tokens of the given blocks.

    Args:
        model: The backbone, in eval mode.
        images: (N, H, W, 3) uint8, H and W multiples of the patch size.
        blocks: Block indices (0-based; repeats allowed, each block is computed once).
        batch_size: Images per forward pass.
        device, mean, std: As `extract_features`.
        flip: Mirror the images left-right first (test-time augmentation; flip the predictions back).

    Returns:
        One (maps (N, D, h, w), cls (N, D)) pair per entry of `blocks`, on the CPU in float32.
    """
    unique = sorted(set(blocks))
    maps: dict[int, list[Tensor]] = {b: [] for b in unique}
    tokens: dict[int, list[Tensor]] = {b: [] for b in unique}
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size], mean, std, device)  # (B, 3, H, W)
        if flip:
            x = x.flip(-1)
        with device_autocast(device):
            outputs = model.get_intermediate_layers(x, unique, reshape=True, return_class_token=True, norm=True)
        for b, (fmap, cls) in zip(unique, outputs, strict=True):
            maps[b].append(fmap.float().cpu())  # (B, D, h, w)
            tokens[b].append(cls.float().cpu())  # (B, D)
    return [(torch.cat(maps[b]), torch.cat(tokens[b])) for b in blocks]
