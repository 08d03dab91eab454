"""Axial rotary position embedding (RoPE) of the DINOv3 ViT (Siméoni et al. 2025), as released.

DINOv3 has no learned position table: every attention rotates the queries and keys of the patch tokens by angles
that depend on the patch's place in the grid, so any grid size works without interpolation.

- Coordinates: the patch at row r, column c of an H x W grid has its centre ((r + 0.5), (c + 0.5)) divided per axis
  by H and W (`separate`, the release's choice), or both by max(H, W) or min(H, W); then mapped to [-1, 1] by 2 u - 1.
- Frequencies: a head of width d_h holds d_h / 4 periods per axis, `periods[j] = base^(2 j / (d_h / 2))` (base 100),
  or spaced geometrically from `min_period` to `max_period`. The periods are a persistent buffer
  (`rope_embed.periods` in the released files), recomputed by `init_weights`.
- Angles: 2 pi coord / period for each axis and period: (HW, 2, d_h / 4) flattened to (HW, d_h / 2), the row angles
  first, then tiled twice to (HW, d_h), which pairs channel i with channel i + d_h / 2.
- Rotation ("rotate half"): x cos + rotate_half(x) sin with rotate_half([a, b]) = [-b, a] on the two halves of a
  head, applied to q and k of the patch tokens only; the prefix tokens (CLS, storage) are not rotated. Computed in
  the rope's dtype (float32 in the released backbones) and cast back to q's and k's dtype.
- Training-time augmentations of the coordinates (training mode only, drawn afresh at each call, that is for every
  block and crop batch, as released): a shift of each axis by a uniform value in [-shift, shift], a jitter of each
  axis by a log-uniform factor in [1/jitter, jitter], and a rescale of both axes by one log-uniform factor in
  [1/rescale, rescale] (the released backbones were trained with rescale 2).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

NormalizeCoords = Literal["min", "max", "separate"]


class RopePositionEmbedding(nn.Module):
    """The (sin, cos) tables of an H x W patch grid for one attention head width.

    Args:
        embed_dim: D, the token width.
        num_heads: heads; the head width D / heads must be a multiple of 4 (two axes, two halves).
        base: period base (100 in the release); exclusive with `min_period` + `max_period`.
        min_period: shortest period, with `max_period` instead of `base`.
        max_period: longest period.
        normalize_coords: divide the patch centres per axis (`separate`) or by max(H, W) / min(H, W).
        shift_coords: training-time shift bound (None: off).
        jitter_coords: training-time per-axis jitter factor bound, > 1 (None: off).
        rescale_coords: training-time rescale factor bound, > 1 (None: off).
        dtype: dtype of the periods and of the rotation (float32 in the released backbones).
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        num_heads: int,
        base: float | None = 100.0,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize_coords: NormalizeCoords = "separate",
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rescale_coords: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if embed_dim % (4 * num_heads):
            raise ValueError(
                f"RoPE needs a head width divisible by 4: embed_dim = {embed_dim}, num_heads = {num_heads}"
            )
        both_periods = min_period is not None and max_period is not None
        if (base is None and not both_periods) or (base is not None and both_periods):
            raise ValueError(
                f"RoPE takes either a base or min_period and max_period: base = {base}, min_period = {min_period}, "
                f"max_period = {max_period}"
            )
        if normalize_coords not in ("min", "max", "separate"):
            raise ValueError(f"normalize_coords = {normalize_coords!r}: expected 'min', 'max' or 'separate'")
        for name, bound in (("jitter_coords", jitter_coords), ("rescale_coords", rescale_coords)):
            if bound is not None and bound < 1:
                raise ValueError(f"{name} = {bound}: a factor bound must be >= 1")
        self.head_dim = embed_dim // num_heads
        self.base, self.min_period, self.max_period = base, min_period, max_period
        self.normalize_coords = normalize_coords
        self.shift_coords, self.jitter_coords, self.rescale_coords = shift_coords, jitter_coords, rescale_coords
        self.dtype = dtype  # the computation's dtype, whatever a later `.to()` makes of the buffer
        # Persistent: the released files hold it, and a teacher is initialised from the student's state dict.
        self.register_buffer("periods", torch.empty(self.head_dim // 4, dtype=dtype), persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The periods from `base`, or geometric between `min_period` and `max_period` (d_h / 4 of them)."""
        n, dd = self.head_dim // 4, {"device": self.periods.device, "dtype": self.dtype}
        if self.base is not None:
            periods = self.base ** (2 * torch.arange(n, **dd) / (self.head_dim // 2))  # (d_h / 4,)
        else:
            ratio = self.max_period / self.min_period
            periods = ratio ** torch.linspace(0, 1, n, **dd)  # from 1 to max / min
            periods = periods / ratio * self.max_period  # from min_period to max_period
        with torch.no_grad():
            self.periods.copy_(periods)

    @property
    def augments(self) -> bool:
        """Whether a call draws random coordinate augmentations (training mode with one of them on)."""
        return self.training and any(
            a is not None for a in (self.shift_coords, self.jitter_coords, self.rescale_coords)
        )

    def coordinates(self, H: int, W: int) -> Tensor:
        """Patch centres of an H x W grid in [-1, 1] (before augmentation): (H W, 2), row-major, (row, column)."""
        dd = {"device": self.periods.device, "dtype": self.dtype}
        if self.normalize_coords == "separate":
            norm_h, norm_w = H, W
        else:  # sym_max / sym_min keep H and W symbolic under torch.export (dynamic image size)
            norm_h = norm_w = torch.sym_max(H, W) if self.normalize_coords == "max" else torch.sym_min(H, W)
        coords_h = (torch.arange(H, **dd) + 0.5) / norm_h  # (H,), the release's arange(0.5, H) exactly
        coords_w = (torch.arange(W, **dd) + 0.5) / norm_w  # (W,)
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1)  # (H, W, 2)
        return 2.0 * coords.flatten(0, 1) - 1.0  # (H W, 2)

    def forward(self, *, H: int, W: int) -> tuple[Tensor, Tensor]:
        """(sin, cos), each (H W, d_h), for a grid of H x W patches; augmented in training mode."""
        coords = self.coordinates(H, W)  # (H W, 2)
        dd = {"device": coords.device, "dtype": self.dtype}
        # The draws below happen in the release's order and shapes, so that a seeded run matches it.
        if self.training and self.shift_coords is not None:
            coords = coords + torch.empty(2, **dd).uniform_(-self.shift_coords, self.shift_coords)  # per axis
        if self.training and self.jitter_coords is not None:
            log_j = math.log(self.jitter_coords)
            coords = coords * torch.empty(2, **dd).uniform_(-log_j, log_j).exp()  # per axis
        if self.training and self.rescale_coords is not None:
            log_r = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, **dd).uniform_(-log_r, log_r).exp()  # both axes alike
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # (H W, 2, d_h / 4)
        angles = angles.flatten(1, 2).tile(2)  # (H W, d_h): [rows | columns | rows | columns]
        return torch.sin(angles), torch.cos(angles)


def rotate_half(x: Tensor) -> Tensor:
    """[a, b] -> [-b, a] on the two halves of the last axis (channel i pairs with channel i + d_h / 2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_apply(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotates each channel pair of x (..., N, d_h) by the angles whose sin and cos are given (N, d_h)."""
    return x * cos + rotate_half(x) * sin


def apply_rope(q: Tensor, k: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """RoPE on queries and keys (B, heads, N, d_h) whose last H W tokens are the patches; the prefix is kept.

    Computed in the dtype of `rope` (float32 in the released backbones) and cast back to q's and k's dtype.
    """
    sin, cos = rope  # (H W, d_h) each
    prefix = q.shape[-2] - sin.shape[-2]  # 1 + storage tokens
    out = []
    for t in (q, k):
        r = t.to(sin.dtype)
        rotated = rope_apply(r[:, :, prefix:], sin, cos)  # (B, heads, H W, d_h)
        out.append(torch.cat((r[:, :, :prefix], rotated), dim=-2).to(t.dtype))  # (B, heads, N, d_h)
    return out[0], out[1]
