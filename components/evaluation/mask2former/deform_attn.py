"""Multi-scale deformable attention (Zhu et al. 2021, "Deformable DETR"), in plain PyTorch.

A query q with reference point r (normalised (x, y) in [0, 1]) attends to P sampled points per head m and per feature
level l, instead of to every position:

    MSDA(q) = W_o concat_m [ sum_l sum_p A_mlp(q) V_m^l(r + offset_mlp(q) / (w_l, h_l)) ]

The offsets (in pixels of level l) and the weights A (a softmax over the L x P points of each head) are linear
functions of the query; V^l is the value projection of level l, read at fractional positions by bilinear
interpolation, zero outside the map. Location 0 is the left (top) edge of a map's first pixel and 1 the right
(bottom) edge of its last, so pixel j's centre is (j + 0.5) / w: `grid_sample` with `align_corners=False`, as the
CUDA kernel of the release samples.

Sampling is one `F.grid_sample` per level (`ms_deform_attn`), exact up to float rounding against a direct loop over
queries, heads, levels and points (tests/evaluation/test_eval_m2f.py). The fused CUDA op of Deformable DETR (also
in mmcv) is not a dependency of this project; no fused kernel is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Shapes = Sequence[tuple[int, int]]
"""(h_l, w_l) of each level, in the order the levels are concatenated in the flattened value."""


def ms_deform_attn(value: Tensor, shapes: Shapes, locations: Tensor, weights: Tensor) -> Tensor:
    """The sampling core of multi-scale deformable attention.

    Args:
        value: (B, S, M, Dh) values of every level, flattened row-major and concatenated (S = sum_l h_l w_l).
        shapes: (h_l, w_l) per level.
        locations: (B, Q, M, L, P, 2) sampling points as normalised (x, y).
        weights: (B, Q, M, L, P) attention weights.

    Returns:
        (B, Q, M Dh): per head, the weighted sum of the bilinearly sampled values, heads concatenated.
    """
    B, S, M, Dh = value.shape
    _, Q, _, L, P, _ = locations.shape
    if sum(h * w for h, w in shapes) != S or len(shapes) != L:
        raise ValueError(f"value has {S} positions over {L} levels; shapes {list(shapes)} disagree")
    # In float32 at least, whatever the autocast dtype: bf16 locations are off by up to a quarter pixel at 64 px.
    dtype = torch.promote_types(value.dtype, torch.float32)
    grids = 2.0 * locations.to(dtype) - 1.0  # grid_sample's [-1, 1]
    out = value.new_zeros(B * M, Dh, Q, dtype=dtype)
    start = 0
    for level, (h, w) in enumerate(shapes):
        v = value[:, start : start + h * w].to(dtype).permute(0, 2, 3, 1).reshape(B * M, Dh, h, w)  # (B M, Dh, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).reshape(B * M, Q, P, 2)  # (B M, Q, P, 2)
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B M, Dh, Q, P)
        a = weights[:, :, :, level].to(dtype).transpose(1, 2).reshape(B * M, 1, Q, P)
        out = out + (sampled * a).sum(dim=-1)  # (B M, Dh, Q)
        start += h * w
    return out.view(B, M, Dh, Q).permute(0, 3, 1, 2).reshape(B, Q, M * Dh).to(value.dtype)


def reference_points(shapes: Shapes, device: torch.device | str | None = None) -> Tensor:
    """(S, 2) normalised (x, y) centres of every position of the levels, in the flattened order."""
    points = []
    for h, w in shapes:
        y, x = torch.meshgrid(
            (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h,
            (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w,
            indexing="ij",
        )
        points.append(torch.stack([x.flatten(), y.flatten()], dim=-1))  # (h w, 2)
    return torch.cat(points)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with Deformable DETR's initialisation.

    At initialisation the offsets of head m point along the direction 2 pi m / M, point p at p + 1 pixels from the
    reference (every level alike), and the weights are uniform; value and output projections are Xavier-uniform.
    `value_ratio` narrows the values (ViT-Adapter's `deform_ratio`: 0.5).
    """

    def __init__(self, dim: int, *, num_levels: int, num_heads: int, num_points: int, value_ratio: float = 1.0) -> None:
        super().__init__()
        value_dim = int(dim * value_ratio)
        if value_dim % num_heads:
            raise ValueError(f"value width {value_dim} (dim {dim} x {value_ratio}) is not a multiple of {num_heads} "
                             "heads")  # fmt: skip
        self.num_levels, self.num_heads, self.num_points = num_levels, num_heads, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        M, L, P = self.num_heads, self.num_levels, self.num_points
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(M, dtype=torch.float32) * (2.0 * math.pi / M)
        grid = torch.stack([theta.cos(), theta.sin()], dim=-1)  # (M, 2)
        grid = grid / grid.abs().max(dim=-1, keepdim=True).values  # on the unit square's border
        distance = torch.arange(1, P + 1, dtype=torch.float32)[None, None, :, None]  # point p at p + 1 pixels
        grid = grid[:, None, None, :].repeat(1, L, P, 1) * distance  # (M, L, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())  # (M L P 2)
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, reference: Tensor, value: Tensor, shapes: Shapes) -> Tensor:
        """Queries (B, Q, C) with reference points (B or 1, Q, 1 or L, 2) attend to `value` (B, S, C) -> (B, Q, C)."""
        B, Q, _ = query.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points
        if len(shapes) != L:
            raise ValueError(f"{len(shapes)} levels given to an attention over {L}")
        v = self.value_proj(value).view(B, value.shape[1], M, -1)  # (B, S, M, Dh)
        offsets = self.sampling_offsets(query).view(B, Q, M, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, M, L * P).softmax(dim=-1).view(B, Q, M, L, P)
        dtype = torch.promote_types(offsets.dtype, torch.float32)  # locations in float32 at least (see above)
        size = torch.tensor([(w, h) for h, w in shapes], dtype=dtype, device=offsets.device)  # (L, 2): x, y
        offsets = offsets.to(dtype) / size[None, None, None, :, None, :]
        locations = reference.to(dtype)[:, :, None, :, None, :] + offsets  # (B, Q, M, L, P, 2)
        return self.output_proj(ms_deform_attn(v, shapes, locations, weights))
