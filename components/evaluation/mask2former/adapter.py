"""ViT-Adapter (Chen et al. 2023, "Vision Transformer Adapter for Dense Predictions") on a frozen DINOv2 backbone.

A plain ViT has one feature scale (1/14 here); the adapter gives it a multi-scale pyramid without touching its
weights, as the DINOv2 paper's strongest segmentation result uses it (ViT-g/14 frozen, ViT-Adapter + Mask2Former):

- Spatial prior module: a ResNet-like convolutional stem (three 3x3 convs, max-pool: 1/4) and three stride-2 convs
  give 1/4, 1/8, 1/16 and 1/32 maps, each projected to the ViT width D by a 1x1 conv. The 1/8, 1/16 and 1/32 maps,
  flattened, each with a learned level embedding, are the adapter's spatial features F_sp.
- The backbone's blocks run in N groups (4: blocks [0..2], [3..5], [6..8], [9..11] of 12; the group ends are the DPT
  block choice, `features.dense_block_indices`). Before each group an injector adds spatial priors to the patch
  tokens, F_vit += gamma * MSDA(LN(F_vit), LN(F_sp)) over the three levels (gamma, a per-channel scale, starts at 0,
  so training starts from the backbone's own features); after it an extractor updates the spatial features,
  F_sp += MSDA(LN(F_sp), LN(F_vit)) over the one ViT level, then F_sp += ConvFFN(LN(F_sp)) (Linear, 3x3 depthwise
  conv on each level's map, GELU, Linear). The last group is followed by two extra extractors. The CLS token and
  registers go through the blocks with the patch tokens; only patch tokens take part in the interactions.
- Output pyramid: F_sp split back into its 1/8, 1/16, 1/32 maps, a 1/4 map = the stem's 1/4 map + the 1/8 map
  upsampled by a stride-2 transposed conv; each group's patch-token map (B, D, H/14, W/14) resized bilinearly to one
  of the four sizes (first group to 1/4, ..., last to 1/32) and added; BatchNorm per level.

The backbone is frozen (no gradient reaches its weights, and it stays in eval mode: no drop path), but gradients
flow through its blocks to the injectors before them, as in the paper (with `checkpoint_blocks`, the blocks'
activations are recomputed in the backward pass rather than kept). With patch 14 the ViT grid (H/14) and the
adapter's levels (H/8 ...) need not align: deformable attention reads any level through normalised coordinates, and
maps of different sizes meet through bilinear resizing. Deformable attention heads: the backbone's head count;
points: 4; value width: D / 2 (ViT-Adapter's `deform_ratio`); ConvFFN width D / 4 (`cffn_ratio`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from components.evaluation.features import dense_block_indices, num_blocks
from components.evaluation.mask2former.deform_attn import MSDeformAttn, Shapes, reference_points


@dataclass(frozen=True)
class AdapterConfig:
    """ViT-Adapter's hyperparameters; the defaults are the paper's."""

    inplanes: int = 64
    """Width of the spatial prior module's stem (1/4); its 1/8, 1/16, 1/32 stages have 2, 4, 4 times this."""
    num_interactions: int = 4
    """Groups of backbone blocks, each preceded by an injector and followed by an extractor (at most the depth)."""
    num_points: int = 4
    """Sampling points per head and level of the deformable attentions."""
    value_ratio: float = 0.5
    """Value width of the deformable attentions over D."""
    ffn_ratio: float = 0.25
    """Hidden width of the extractors' ConvFFN over D."""
    extra_extractors: int = 2
    """Extractors added after the last group."""
    checkpoint_blocks: bool = False
    """Recompute the frozen blocks' activations in the backward pass instead of keeping them (ViT-Adapter's `with_cp`):
    what lets ViT-g/14 train on 896 px crops on one GPU, at the cost of a second forward through the blocks."""


def block_groups(depth: int, num_groups: int) -> list[tuple[int, int]]:
    """(first, last) block of each interaction group: [(0, 2), (3, 5), (6, 8), (9, 11)] for 12 blocks and 4 groups."""
    n = min(num_groups, depth)
    ends = dense_block_indices(depth, n)
    return [(0 if i == 0 else ends[i - 1] + 1, end) for i, end in enumerate(ends)]


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """Convolutional stem: images (B, 3, H, W) -> maps at 1/4, 1/8, 1/16, 1/32, each with D channels."""

    def __init__(self, inplanes: int, dim: int) -> None:
        super().__init__()
        c = inplanes
        self.stem = nn.Sequential(
            *_conv_bn_relu(3, c, 2), *_conv_bn_relu(c, c, 1), *_conv_bn_relu(c, c, 1), nn.MaxPool2d(3, 2, 1)
        )  # 1/4
        self.conv2 = nn.Sequential(*_conv_bn_relu(c, 2 * c, 2))  # 1/8
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * c, 4 * c, 2))  # 1/16
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * c, 4 * c, 2))  # 1/32
        self.proj = nn.ModuleList(nn.Conv2d(w, dim, 1) for w in (c, 2 * c, 4 * c, 4 * c))

    def forward(self, x: Tensor) -> list[Tensor]:
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [proj(c) for proj, c in zip(self.proj, (c1, c2, c3, c4), strict=True)]


def _flatten(maps: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
    """Maps (B, D, h_l, w_l) -> tokens (B, sum h_l w_l, D) and their shapes."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1), [tuple(m.shape[-2:]) for m in maps]


def _unflatten(tokens: Tensor, shapes: Shapes) -> list[Tensor]:
    """Tokens (B, S, D) -> maps (B, D, h_l, w_l) (the inverse of `_flatten`)."""
    B, _, D = tokens.shape
    parts = tokens.split([h * w for h, w in shapes], dim=1)
    return [p.transpose(1, 2).reshape(B, D, h, w) for p, (h, w) in zip(parts, shapes, strict=True)]


class ConvFFN(nn.Module):
    """Linear -> 3x3 depthwise conv on each level's map -> GELU -> Linear, on flattened multi-level tokens."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, shapes: Shapes) -> Tensor:
        x = self.fc1(x)  # (B, S, hidden)
        x = torch.cat([m.flatten(2).transpose(1, 2) for m in map(self.dwconv, _unflatten(x, shapes))], dim=1)
        return self.fc2(F.gelu(x))


class Injector(nn.Module):
    """Spatial priors into the patch tokens: F_vit + gamma * MSDA(LN(F_vit), LN(F_sp)), gamma starting at 0."""

    def __init__(self, dim: int, heads: int, cfg: AdapterConfig) -> None:
        super().__init__()
        self.query_norm, self.feat_norm = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, num_levels=3, num_heads=heads, num_points=cfg.num_points,
                                 value_ratio=cfg.value_ratio)  # fmt: skip
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, ref: Tensor, feat: Tensor, shapes: Shapes) -> Tensor:
        return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(feat), shapes)


class Extractor(nn.Module):
    """Backbone features into the spatial features: F_sp + MSDA(LN(F_sp), LN(F_vit)), then + ConvFFN(LN(F_sp))."""

    def __init__(self, dim: int, heads: int, cfg: AdapterConfig) -> None:
        super().__init__()
        self.query_norm, self.feat_norm = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, num_levels=1, num_heads=heads, num_points=cfg.num_points,
                                 value_ratio=cfg.value_ratio)  # fmt: skip
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = ConvFFN(dim, int(dim * cfg.ffn_ratio))

    def forward(self, c: Tensor, ref: Tensor, x: Tensor, vit_shape: tuple[int, int], shapes: Shapes) -> Tensor:
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x), [vit_shape])
        return c + self.ffn(self.ffn_norm(c), shapes)


class ViTAdapter(nn.Module):
    """A frozen DINOv2 backbone with ViT-Adapter: images (B, 3, H, W) -> [1/4, 1/8, 1/16, 1/32] maps, D channels.

    H and W must be multiples of the backbone's patch size; they need not be equal.
    """

    def __init__(self, backbone: nn.Module, cfg: AdapterConfig = AdapterConfig()) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        if not hasattr(backbone, "num_heads"):
            raise ValueError(
                f"the ViT-Adapter (mask2former protocol) runs a ViT's blocks; {type(backbone).__name__} has none: "
                "evaluate it with the linear segmentation protocols"
            )
        dim, heads = int(backbone.embed_dim), int(backbone.num_heads)
        self.groups = block_groups(num_blocks(backbone), cfg.num_interactions)
        self.level_embed = nn.Parameter(torch.randn(3, dim) * 0.02)
        self.spm = SpatialPriorModule(cfg.inplanes, dim)
        self.injectors = nn.ModuleList(Injector(dim, heads, cfg) for _ in self.groups)
        self.extractors = nn.ModuleList(Extractor(dim, heads, cfg) for _ in self.groups)
        self.extra_extractors = nn.ModuleList(Extractor(dim, heads, cfg) for _ in range(cfg.extra_extractors))
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norms = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(4))
        self.embed_dim, self.cfg = dim, cfg

    def train(self, mode: bool = True) -> ViTAdapter:
        super().train(mode)
        self.backbone.eval()  # frozen: no drop path, whatever the adapter's mode
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        B, _, H, W = images.shape
        p = int(self.backbone.patch_size)
        c1, *c_maps = self.spm(images)  # (B, D, H/4, W/4), then 1/8, 1/16, 1/32
        c, shapes = _flatten([m + e[None, :, None, None] for m, e in zip(c_maps, self.level_embed, strict=True)])
        vit_shape = (H // p, W // p)
        ref_vit = reference_points([vit_shape], images.device)[None, :, None]  # (1, N, 1, 2)
        ref_c = reference_points(shapes, images.device)[None, :, None]  # (1, S, 1, 2)
        tokens = self.backbone.prepare_tokens_with_masks(images)  # (B, 1 + R + N, D)
        rope = None
        if isinstance(tokens, tuple):  # DINOv3: the tokens and their grid, whose RoPE table every block takes
            tokens, (rows, cols) = tokens
            rope = self.backbone.rope_embed(H=rows, W=cols)
        num_prefix = 1 + int(self.backbone.num_register_tokens)
        prefix, x = tokens[:, :num_prefix], tokens[:, num_prefix:]  # CLS and registers; patch tokens (B, N, D)
        vit_maps = []
        for i, (first, last) in enumerate(self.groups):
            x = self.injectors[i](x, ref_vit, c, shapes)
            h = torch.cat([prefix, x], dim=1)
            for block in self.backbone.blocks[first : last + 1]:
                recompute = self.cfg.checkpoint_blocks and self.training and torch.is_grad_enabled()
                h = checkpoint(block, h, rope, use_reentrant=False) if recompute else block(h, rope)
            prefix, x = h[:, :num_prefix], h[:, num_prefix:]
            c = self.extractors[i](c, ref_c, x, vit_shape, shapes)
            vit_maps.append(x.transpose(1, 2).reshape(B, self.embed_dim, *vit_shape))  # (B, D, H/p, W/p)
        for extractor in self.extra_extractors:
            c = extractor(c, ref_c, x, vit_shape, shapes)
        c2, c3, c4 = _unflatten(c, shapes)
        c1 = c1 + _resize(self.up(c2), c1.shape[-2:])
        pyramid = [c1, c2, c3, c4]
        # Each group's patch map joins one level, first group the finest (as ViT-Adapter's `add_vit_feature`).
        vit_maps = vit_maps + vit_maps[-1:] * (4 - len(vit_maps))  # fewer than 4 groups (a very shallow backbone)
        return [norm(f + _resize(v, f.shape[-2:])) for norm, f, v in zip(self.norms, pyramid, vit_maps, strict=True)]


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
