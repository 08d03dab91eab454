"""The DINOv3 ConvNeXt backbones (Liu et al. 2022, "A ConvNet for the 2020s"), distilled from the DINOv3 7B
(Siméoni et al. 2025, "DINOv3"), interchangeable with the release.

Architecture choices, each as released so that the released files load and give the same features:

- Stem: a 4 x 4 convolution with stride 4, then a channels-first LayerNorm (eps 1e-6).
- Four stages of widths C0..C3 at strides 4, 8, 16, 32. Before stages 1-3, a downsample layer: channels-first
  LayerNorm, then a 2 x 2 convolution with stride 2 (C_{i-1} -> C_i).
- Blocks: depthwise 7 x 7 convolution (padding 3) -> channels-last LayerNorm (eps 1e-6) -> pointwise Linear
  (C -> 4 C) -> GELU -> pointwise Linear (4 C -> C) -> LayerScale `gamma` (per channel, initialised at 1e-6; absent
  when the init is 0) -> stochastic depth -> residual. Drop rates rise linearly from 0 over all blocks.
- A final LayerNorm (eps 1e-6) over the last stage's channels. The release also lists it as `norms[3]` (with
  identities for stages 0-2: the per-stage output norms of `get_intermediate_layers`), so its state dict carries the
  final norm's weights twice, as `norm.*` and `norms.3.*`; ours too.
- DINO outputs: the "CLS token" is the global average of the last stage's map; it and the stride-32 tokens go
  through the final norm together. There are no storage (register) tokens and no mask token: iBOT masks are
  returned as given, unused (the release distils its ConvNeXts with unmasked students).
- The pseudo patch: `patch_size` (16 in the release's distillation configs) makes `get_intermediate_layers` resize
  each stage's map to the grid of a ViT with that patch, H/p x W/p (bilinear, antialiased), so that a ConvNeXt
  stands in for a ViT/16 in dense evaluation. `resize_patch_tokens` does the same to `forward_features`' patch tokens
  (off in the release): what distillation from a ViT/16 teacher needs, whose iBOT targets live on that grid.

Module and parameter names follow the release (`downsample_layers.{i}`, `stages.{i}.{j}.dwconv`, ...), so our state
dict is the released layout; `adapter.py` keeps the explicit key map and the checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.model.vit import Preset, _exporting, drop_path

NUM_STAGES = 4
STRIDE = 32
"""Total stride of the last stage (stem 4, then three 2x downsamplings)."""


@dataclass(frozen=True)
class ConvNeXtConfig:
    """Hyperparameters of a DINOv3 ConvNeXt. Defaults are those of the released ConvNeXt-Tiny."""

    depths: tuple[int, ...] = (3, 3, 9, 3)
    """Blocks in each of the four stages."""
    dims: tuple[int, ...] = (96, 192, 384, 768)
    """Channels of each of the four stages; the last one is the feature width D."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate of the last block (rising linearly from 0 over all blocks; training only)."""
    layer_scale_init: float = 1.0e-6
    """Initial LayerScale gamma (overwritten by a checkpoint); 0 builds blocks without gamma."""
    patch_size: int | None = 16
    """Pseudo patch p: intermediate feature maps are resized to H/p x W/p; None keeps each stage's own grid."""
    resize_patch_tokens: bool = False
    """Resize `forward_features`' patch tokens to the pseudo-patch grid too (the release keeps them at stride 32)."""
    in_chans: int = 3
    """Input channels."""

    @property
    def embed_dim(self) -> int:
        """Width of the output features: the last stage's channels (the ViT configs' `embed_dim`)."""
        return self.dims[-1]

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if len(self.depths) != NUM_STAGES or min(self.depths) < 1:
            raise ValueError(f"depths = {list(self.depths)}: expected {NUM_STAGES} stages of at least 1 block")
        if len(self.dims) != NUM_STAGES or min(self.dims) < 1:
            raise ValueError(f"dims = {list(self.dims)}: expected {NUM_STAGES} positive widths")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate = {self.drop_path_rate}: expected 0 <= rate < 1")
        if self.layer_scale_init < 0:
            raise ValueError(f"layer_scale_init = {self.layer_scale_init}: expected >= 0 (0: no LayerScale)")
        if self.patch_size is not None and self.patch_size < 1:
            raise ValueError(f"patch_size = {self.patch_size}: expected a positive pseudo patch or None")
        if self.resize_patch_tokens and self.patch_size is None:
            raise ValueError("resize_patch_tokens = True needs a pseudo patch_size (got None)")


# --------------------------------------------------------------------------------------------------------------------
# Presets by Torch Hub name
# --------------------------------------------------------------------------------------------------------------------

CONVNEXT_MODELS: dict[str, ConvNeXtConfig] = {
    # A very cheap ConvNeXt for unit tests and smoke runs; no released weights.
    "convnext_test": ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)),
    "dinov3_convnext_tiny": ConvNeXtConfig(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "dinov3_convnext_small": ConvNeXtConfig(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "dinov3_convnext_base": ConvNeXtConfig(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "dinov3_convnext_large": ConvNeXtConfig(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
}
"""Hub name -> architecture; the pseudo patch is 16 as in the release's distillation configs (its hub builds None)."""

CONVNEXT_FILES: dict[str, str] = {
    "dinov3_convnext_tiny": "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth",
    "dinov3_convnext_small": "dinov3_convnext_small_pretrain_lvd1689m-296db49d.pth",
    "dinov3_convnext_base": "dinov3_convnext_base_pretrain_lvd1689m-801f2ba9.pth",
    "dinov3_convnext_large": "dinov3_convnext_large_pretrain_lvd1689m-61fa432d.pth",
}
"""Hub name -> the released weights' file (LVD-1689M), as the release's hub composes it (`dinov3_<arch>/<file>`)."""

_OVERRIDABLE = ("depths", "dims", "drop_path_rate", "patch_size", "resize_patch_tokens", "layer_scale_init")


def convnext_config(name: str, **overrides: Any) -> ConvNeXtConfig:
    """The `ConvNeXtConfig` of preset `name` with `overrides` applied (see `build_convnext`)."""
    if name not in CONVNEXT_MODELS:
        raise KeyError(f"unknown ConvNeXt preset {name!r}; known: {', '.join(CONVNEXT_MODELS)}")
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise TypeError(f"unknown ConvNeXt override(s) {unknown}; allowed: {list(_OVERRIDABLE)}")
    return replace(CONVNEXT_MODELS[name], **overrides)


def build_convnext(name: str, **overrides: Any) -> ConvNeXt:
    """Builds a ConvNeXt preset with a fresh initialisation.

    Args:
        name: a hub name (`dinov3_convnext_tiny`, `_small`, `_base`, `_large`) or `convnext_test`.
        **overrides: `depths`, `dims` (four each), `drop_path_rate`, `patch_size` (None: no resize, as the
            release's hub builds), `resize_patch_tokens`, `layer_scale_init`.

    Raises:
        TypeError: an unknown override (named). KeyError: an unknown preset. ValueError: an inconsistent value.
    """
    return ConvNeXt(convnext_config(name, **overrides))


FAMILY = "dinov3_convnext"
PRESETS: dict[str, Preset] = {
    name: Preset(name, cfg, official_name=name if name in CONVNEXT_FILES else None, family=FAMILY)
    for name, cfg in CONVNEXT_MODELS.items()
}
"""The ConvNeXt presets as the family registry (`families.py`) lists them, with the release's preprocessing."""
OFFICIAL_MODELS: dict[str, tuple[str, dict[str, Any]]] = {name: (name, {}) for name in CONVNEXT_FILES}
"""Torch Hub name -> (preset, overrides): each released ConvNeXt is a preset of its own."""
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov3/{name}/{file}"


def official_checkpoint_url(official_name: str) -> str:
    """Download address of a released ConvNeXt (the release hands out its links on request; this is the hub's URL)."""
    if official_name not in CONVNEXT_FILES:
        raise KeyError(f"unknown released ConvNeXt {official_name!r}; known: {', '.join(CONVNEXT_FILES)}")
    return OFFICIAL_URL.format(name=official_name, file=CONVNEXT_FILES[official_name])


# --------------------------------------------------------------------------------------------------------------------
# Layers, in forward order
# --------------------------------------------------------------------------------------------------------------------


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (the release's `channels_first` LayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)  # (B, 1, H, W)
        var = (x - mean).pow(2).mean(1, keepdim=True)  # biased variance, as LayerNorm
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """x + drop_path(gamma * pwconv2(GELU(pwconv1(LN(dwconv(x)))))), the pointwise layers on channels-last tokens."""

    def __init__(self, dim: int, drop_path_rate: float, layer_scale_init: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)  # depthwise
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.layer_scale_init = layer_scale_init
        # A bare parameter named `gamma` (not a LayerScale module), for the released key `stages.{i}.{j}.gamma`.
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init))) if layer_scale_init > 0 else None
        self.drop_path_rate = drop_path_rate

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x)  # (B, C, H, W)
        y = y.permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))  # (B, H, W, C)
        if self.gamma is not None:
            y = self.gamma * y
        y = y.permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + drop_path(y, self.drop_path_rate, self.training)


# --------------------------------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------------------------------


class ConvNeXt(nn.Module):
    """The DINOv3 ConvNeXt backbone; see the module docstring for the architecture.

    Attributes follow the release and the ViT backbones (`cfg`, `embed_dim`, `num_features`, `embed_dims`,
    `patch_size`, `n_blocks` (= 4 stages, what `get_intermediate_layers` counts), `num_register_tokens` and
    `n_storage_tokens` (0), `chunked_blocks`), so that code written for a ViT backbone keeps working.
    """

    def __init__(self, cfg: ConvNeXtConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dims = cfg.dims
        self.embed_dim = self.num_features = dims[-1]
        self.embed_dims = dims
        self.patch_size = cfg.patch_size
        self.n_blocks = NUM_STAGES
        self.num_register_tokens = self.n_storage_tokens = 0
        self.chunked_blocks = False
        self.pack_crops = False
        """Set by the training engine for multi-crop backbones; no effect here (crop sizes run one after another)."""

        stem = nn.Sequential(nn.Conv2d(cfg.in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(1, NUM_STAGES):
            self.downsample_layers.append(
                nn.Sequential(LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2))
            )
        n = sum(cfg.depths)  # one rate per block, linear over all stages (in Python: the model may be built on meta)
        rates = [cfg.drop_path_rate * k / max(n - 1, 1) for k in range(n)]
        first = [sum(cfg.depths[:i]) for i in range(NUM_STAGES)]
        self.stages = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(dims[i], rates[first[i] + j], cfg.layer_scale_init) for j in range(depth)))
            for i, depth in enumerate(cfg.depths)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        # The per-stage output norms of get_intermediate_layers: identities, then the final norm (shared, so the
        # state dict holds it as `norms.3.*` too, as released).
        self.norms = nn.ModuleList([*(nn.Identity() for _ in range(NUM_STAGES - 1)), self.norm])
        self.head = nn.Identity()  # kept for compatibility: forward() returns head(pooled feature)
        self.init_weights()

    def init_weights(self) -> None:
        """The release's initialisation: truncated normal 0.02 for convolutions and linears, zero biases, unit
        norms, LayerScale at its init value."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm | LayerNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, ConvNeXtBlock) and m.gamma is not None:
                nn.init.constant_(m.gamma, m.layer_scale_init)

    @property
    def blocks(self) -> list[ConvNeXtBlock]:
        """Every residual block, stage after stage (what activation checkpointing and compilation wrap, as a ViT's
        `blocks`); `n_blocks` counts stages."""
        return [blk for stage in self.stages for blk in stage]  # type: ignore[misc]

    # -- stages ------------------------------------------------------------------------------------------------------

    def _stage(self, i: int, x: Tensor) -> Tensor:
        """Stage i: its downsample layer (the stem for i = 0), then its blocks: (B, C_{i-1}, h, w) -> (B, C_i, ...)."""
        return self.stages[i](self.downsample_layers[i](x))

    def _to_patch_grid(self, x: Tensor, H: int, W: int) -> Tensor:
        """A stage's map (B, C, h, w) resized to the pseudo-patch grid (B, C, H/p, W/p), bilinear and antialiased."""
        p = self.patch_size
        return F.interpolate(x, size=(H // p, W // p), mode="bilinear", antialias=True)  # type: ignore[operator]

    def _check_input(self, x: Tensor) -> None:
        H, W = x.shape[-2:]
        if not _exporting() and min(H, W) < STRIDE:  # an exported graph takes any size its Dims allow
            raise ValueError(f"input {H} x {W} is smaller than the ConvNeXt's stride {STRIDE} (use multiples of 32)")

    def _features(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        self._check_input(x)
        H, W = x.shape[-2:]
        for i in range(NUM_STAGES):
            x = self._stage(i, x)  # (B, C3, H/32, W/32) after the last stage
        pooled = x.mean((-2, -1))  # (B, C3), global average pooling: the "CLS token"
        if self.cfg.resize_patch_tokens:
            x = self._to_patch_grid(x, H, W)  # (B, C3, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C3), row-major like a ViT's patch tokens
        x_norm = self.norm(torch.cat((pooled.unsqueeze(1), x), dim=1))  # (B, 1 + N, C3)
        return {
            "x_norm_clstoken": x_norm[:, 0],  # (B, D)
            "x_storage_tokens": x_norm[:, 1:1],  # (B, 0, D): no storage tokens
            "x_norm_patchtokens": x_norm[:, 1:],  # (B, N, D)
            "x_prenorm": x,  # (B, N, D): the patch tokens before the norm, as released (no pooled token)
            "masks": masks,  # returned as given, unused
        }

    # -- forward -----------------------------------------------------------------------------------------------------

    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> dict[str, Tensor | None] | list[dict[str, Tensor | None]]:
        """Features of a batch, or of a list of batches with different crop sizes (the multi-crop student).

        Args:
            x: images (B, C, H, W), or a list of such batches; H and W multiples of 32 give the exact stride-32
                grid (and, with `patch_size`, an exact pseudo-patch grid).
            masks: for a tensor input, None or a tensor; for a list input, None or one entry per batch. Returned as
                given under `masks`: a ConvNeXt has no mask token (as released).

        Returns:
            For a tensor input, a dict with `x_norm_clstoken` (B, D), `x_storage_tokens` (B, 0, D),
            `x_norm_patchtokens` (B, N, D) with N = H/32 x W/32 (H/p x W/p with `resize_patch_tokens`), `x_prenorm`
            (B, N, D) and `masks`; for a list input, one such dict per batch.
        """
        if isinstance(x, Tensor):
            if masks is not None and not isinstance(masks, Tensor):
                raise TypeError("masks must be a tensor (or None) when x is a tensor")
            return self._features(x, masks)
        masks_list = list(masks) if masks is not None else [None] * len(x)
        if len(masks_list) != len(x):
            raise ValueError(f"got {len(x)} image batches but {len(masks_list)} masks")
        return [self._features(xi, mi) for xi, mi in zip(x, masks_list, strict=True)]

    def forward(self, x: Tensor | Sequence[Tensor], masks: Any = None, is_training: bool = False) -> Any:
        """The normalised pooled feature (B, D); with `is_training=True`, the `forward_features` output."""
        features = self.forward_features(x, masks)
        if is_training:
            return features
        return self.head(features["x_norm_clstoken"])  # type: ignore[index]

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[Tensor, ...] | tuple[tuple[Tensor, Tensor], ...]:
        """Outputs of the last `n` stages (an int) or of the stages with the given indices, as the release.

        Each stage's "class token" is the global average of its map; its patch tokens are the map, resized to the
        pseudo-patch grid H/p x W/p when `patch_size` is set. With `norm`, both go through that stage's output norm
        (the final LayerNorm for the last stage, none for the others).

        Args:
            x: images (B, C, H, W).
            n: how many last stages, or which stage indices (0-3).
            reshape: return patch tokens as feature maps (B, C_i, h, w) instead of (B, h w, C_i).
            return_class_token: return (patch tokens, class token (B, C_i)) pairs.
            norm: apply each stage's output norm.

        Returns:
            A tuple with one entry per requested stage, in stage order.
        """
        take = list(range(NUM_STAGES - n, NUM_STAGES)) if isinstance(n, int) else list(n)
        self._check_input(x)
        H, W = x.shape[-2:]
        outputs: list[tuple[Tensor, Tensor]] = []
        for i in range(NUM_STAGES):
            x = self._stage(i, x)  # (B, C_i, H / 2^(i+2), W / 2^(i+2))
            if i in take:
                cls = x.mean((-2, -1))  # (B, C_i), pooled before any resize
                maps = self._to_patch_grid(x, H, W) if self.patch_size is not None else x  # (B, C_i, h, w)
                if norm:
                    cls = self.norms[i](cls)
                    tokens = self.norms[i](maps.flatten(2).transpose(1, 2))  # (B, h w, C_i)
                    maps = tokens.transpose(1, 2).reshape(maps.shape).contiguous() if reshape else tokens
                elif not reshape:
                    maps = maps.flatten(2).transpose(1, 2)  # (B, h w, C_i)
                outputs.append((maps, cls))
        if len(outputs) != len(take):
            raise ValueError(f"only {len(outputs)} of the requested stages {take} exist (stages 0-{NUM_STAGES - 1})")
        if return_class_token:
            return tuple(outputs)
        return tuple(maps for maps, _ in outputs)
