"""The DINOv3 vision transformer (Siméoni et al. 2025, "DINOv3"), interchangeable with the release.

Architecture choices, each as released so that the released files load strictly and give the same features:

- Patch embedding: a 16 x 16 convolution with stride 16: an (H/16) x (W/16) grid of patch tokens, flattened
  row-major; the grid's shape goes to RoPE.
- Tokens: [CLS] [storage ...] [patches ...]. The storage tokens (four in the released models) are DINOv2's registers
  (Darcet et al. 2024) under the release's name. There is no learned position table: any input whose sides are
  multiples of the patch works as it is, square or not.
- Positions: axial RoPE (`rope.py`) in every attention, on the queries and keys of the patch tokens only: base 100,
  coordinates normalised per axis, and in training the coordinates rescaled by a log-uniform factor in [1/2, 2]
  (`rope_rescale_coords`), drawn afresh for every block and crop batch.
- Masked image modelling (iBOT): the mask token replaces the patch embedding of masked patches.
- Pre-norm blocks (`vit.Block`, shared with DINOv2): Norm -> attention -> LayerScale (1e-5) -> residual, Norm ->
  feed-forward -> LayerScale -> residual, with
  - norms by the release's names: `layernorm` (LayerNorm, eps 1e-6), `layernormbf16` (LayerNorm, eps 1e-5: the
    released backbones') and `rmsnorm` (RMSNorm, eps 1e-5, computed in float32);
  - the masked key bias: the q, k, v projection's bias times a `bias_mask` buffer that is 0 on the key part, so
    the keys get no bias (`mask_k_bias`; the buffer is in the released files); the 7B has no qkv bias at all;
  - a GELU MLP (ratio 4) or SwiGLU with unfused `w1`, `w2`, `w3` and a hidden width int(2/3 x ratio x D) rounded
    up to a multiple of 8 (`swiglu`), 32, 64 or 128 (`swiglu32`, `swiglu64`, `swiglu128`): ratio 6 for S+, L+
    and H+ (`swiglu`), ratio 3 with `swiglu64` for the 7B;
  - stochastic depth on a random subset of (1 - rate) of the batch at any rate, as released.
- Final norms: `norm` for every token; with `untie_cls_and_patch_norms`, `cls_norm` for CLS and storage tokens and
  `norm` for the patches; with `untie_global_and_local_cls_norm` (the 7B, and the SAT-493M ViT-L), `local_cls_norm`
  for CLS and storage tokens of the local crops (the second batch of a list input) in training mode only.

Module, parameter and buffer names follow the release (`storage_tokens`, `rope_embed.periods`,
`blocks.{i}.attn.qkv.bias_mask`, `blocks.{i}.mlp.w1`, ...), so our state dict is the released layout; `adapter.py`
keeps the explicit key map and the checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.model.rope import NormalizeCoords, RopePositionEmbedding
from components.model.vit import Attention, Block, LayerScale, Mlp, PatchEmbed, Preset

FfnLayer = Literal["mlp", "swiglu", "swiglu32", "swiglu64", "swiglu128"]
NormLayer = Literal["layernorm", "layernormbf16", "rmsnorm"]
RopeDtype = Literal["fp32", "bf16", "fp16"]

SWIGLU_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}
"""The release's SwiGLU variants: the hidden width is rounded up to a multiple of this."""
NORM_EPS = {"layernorm": 1e-6, "layernormbf16": 1e-5, "rmsnorm": 1e-5}
"""Each of the release's norm layer names and its epsilon."""
ROPE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DinoV3ViTConfig:
    """Hyperparameters of a DINOv3 ViT backbone. Defaults are those of the released ViT-S/16."""

    embed_dim: int = 384
    """D, the width of every token."""
    depth: int = 12
    """L, the number of transformer blocks."""
    num_heads: int = 6
    """Attention heads; the head width D / heads must be a multiple of 4 (RoPE: two axes, two halves)."""
    patch_size: int = 16
    """Side p of a square patch in pixels."""
    img_size: int = 224
    """Training crop side; nothing in the model depends on it (RoPE needs no position table)."""
    in_chans: int = 3
    """Input channels."""
    ffn_layer: FfnLayer = "mlp"
    """Feed-forward: GELU MLP, or SwiGLU (`w1`, `w2`, `w3`) with its hidden width aligned to 8, 32, 64 or 128."""
    ffn_ratio: float = 4.0
    """Feed-forward hidden width over D (before the SwiGLU 2/3 rescaling)."""
    qkv_bias: bool = True
    """Bias on the q, k, v projection (False for the 7B)."""
    mask_k_bias: bool = True
    """Zero the key part of the qkv bias through a `bias_mask` buffer (True in every release)."""
    norm_layer: NormLayer = "layernormbf16"
    """The release's norm name: `layernorm` (eps 1e-6), `layernormbf16` (LayerNorm, eps 1e-5), `rmsnorm`."""
    layerscale_init: float | None = 1.0e-5
    """Initial LayerScale gamma (overwritten by a checkpoint); None: no LayerScale."""
    n_storage_tokens: int = 4
    """R, learned storage (register) tokens between CLS and the patches."""
    untie_cls_and_patch_norms: bool = False
    """A separate final norm (`cls_norm`) for CLS and storage tokens."""
    untie_global_and_local_cls_norm: bool = False
    """A separate final norm (`local_cls_norm`) for CLS and storage tokens of local crops in training (the 7B)."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate of every block (training only)."""
    rope_base: float | None = 100.0
    """RoPE period base; None to use `rope_min_period` and `rope_max_period` instead."""
    rope_min_period: float | None = None
    """Shortest RoPE period (with `rope_max_period`, instead of a base)."""
    rope_max_period: float | None = None
    """Longest RoPE period."""
    rope_normalize_coords: NormalizeCoords = "separate"
    """Patch coordinates divided per axis (`separate`) or by max(H, W) / min(H, W)."""
    rope_shift_coords: float | None = None
    """Training-time uniform shift of the coordinates in [-shift, shift] per axis (None: off)."""
    rope_jitter_coords: float | None = None
    """Training-time log-uniform jitter of each axis in [1/jitter, jitter] (None: off)."""
    rope_rescale_coords: float | None = 2.0
    """Training-time log-uniform rescale of both axes in [1/rescale, rescale] (2 in the released backbones)."""
    rope_dtype: RopeDtype = "fp32"
    """Dtype of the RoPE tables and rotation (fp32 in the released backbones; the training default was bf16)."""

    def __post_init__(self) -> None:
        if self.embed_dim % (4 * self.num_heads):
            raise ValueError(
                f"embed_dim = {self.embed_dim} must be a multiple of 4 x num_heads = {4 * self.num_heads} (RoPE)"
            )
        if self.ffn_layer != "mlp" and self.ffn_layer not in SWIGLU_ALIGN:
            raise ValueError(f"ffn_layer = {self.ffn_layer!r}: expected 'mlp' or one of {sorted(SWIGLU_ALIGN)}")
        if self.norm_layer not in NORM_EPS:
            raise ValueError(f"norm_layer = {self.norm_layer!r}: expected one of {sorted(NORM_EPS)}")
        if self.rope_dtype not in ROPE_DTYPES:
            raise ValueError(f"rope_dtype = {self.rope_dtype!r}: expected one of {sorted(ROPE_DTYPES)}")
        if self.patch_size < 1 or self.depth < 1 or self.n_storage_tokens < 0:
            raise ValueError("patch_size and depth must be >= 1 and n_storage_tokens >= 0")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate = {self.drop_path_rate}: expected 0 <= rate < 1")

    @property
    def ffn_hidden_dim(self) -> int:
        """int(ratio x D) for the MLP; for SwiGLU int(2/3 of that), rounded up to the variant's multiple."""
        hidden = int(self.embed_dim * self.ffn_ratio)
        if self.ffn_layer in SWIGLU_ALIGN:
            d = int(hidden * 2 / 3)
            hidden = d + (-d % SWIGLU_ALIGN[self.ffn_layer])
        return hidden


# --------------------------------------------------------------------------------------------------------------------
# Presets: the released backbones by their Torch Hub names (dinov3/hub/backbones.py), and a tiny one for tests
# --------------------------------------------------------------------------------------------------------------------

FAMILY = "dinov3_vit"
_SWIGLU6 = {"ffn_layer": "swiglu", "ffn_ratio": 6.0}  # the "plus" models


def _preset(name: str, official: bool = True, **config: Any) -> Preset:
    """A preset with the release's preprocessing: ImageNet mean / std (LVD-1689M weights), resize 256, crop 224."""
    return Preset(name, DinoV3ViTConfig(**config), official_name=name if official else None, family=FAMILY)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # A very cheap backbone for unit tests and smoke runs: the release's layout at width 64, 2 blocks.
        _preset("dinov3_vit_test", official=False, embed_dim=64, depth=2, num_heads=2),
        _preset("dinov3_vits16", embed_dim=384, depth=12, num_heads=6),
        _preset("dinov3_vits16plus", embed_dim=384, depth=12, num_heads=6, **_SWIGLU6),
        _preset("dinov3_vitb16", embed_dim=768, depth=12, num_heads=12),
        _preset("dinov3_vitl16", embed_dim=1024, depth=24, num_heads=16),
        _preset("dinov3_vitl16plus", embed_dim=1024, depth=24, num_heads=16, **_SWIGLU6),
        _preset("dinov3_vith16plus", embed_dim=1280, depth=32, num_heads=20, **_SWIGLU6),
        # "ViT-7B": no qkv bias, SwiGLU aligned to 64, and separate CLS norms for global and local crops.
        _preset(
            "dinov3_vit7b16",
            embed_dim=4096,
            depth=40,
            num_heads=32,
            ffn_layer="swiglu64",
            ffn_ratio=3.0,
            qkv_bias=False,
            untie_global_and_local_cls_norm=True,
        ),
    )
}
OFFICIAL_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    p.name: (p.name, {}) for p in PRESETS.values() if p.official_name
}
"""Torch Hub name -> (preset, overrides): each released ViT is a preset of its own."""

RELEASED_FILES: dict[str, dict[str, str]] = {
    "dinov3_vits16": {"lvd1689m": "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"},
    "dinov3_vits16plus": {"lvd1689m": "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"},
    "dinov3_vitb16": {"lvd1689m": "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"},
    "dinov3_vitl16": {
        "lvd1689m": "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
        # Trained with an untied local-crop CLS norm (in the file: `checkpoint_geometry` reads it), and on aerial
        # images: the release normalises its inputs with mean (0.430, 0.411, 0.296), std (0.213, 0.156, 0.143).
        "sat493m": "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth",
    },
    "dinov3_vitl16plus": {"lvd1689m": "dinov3_vitl16plus_pretrain_lvd1689m-46503df0.pth"},
    "dinov3_vith16plus": {"lvd1689m": "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth"},
    "dinov3_vit7b16": {
        "lvd1689m": "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth",
        "sat493m": "dinov3_vit7b16_pretrain_sat493m-a6675841.pth",  # aerial images: the mean / std above
    },
}
"""Torch Hub name -> pretraining data set -> the released file's name (the hub's `<arch>_pretrain_<data>-<hash>`)."""
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov3/{name}/{file}"


def official_file_name(official_name: str, weights: str = "lvd1689m") -> str:
    """The released file of a backbone, e.g. `dinov3_vits16` -> `dinov3_vits16_pretrain_lvd1689m-08c60483.pth`.

    Args:
        official_name: a Torch Hub name (`dinov3_vits16`, ..., `dinov3_vit7b16`).
        weights: the pretraining data set: `lvd1689m` (every model) or `sat493m` (ViT-L and 7B).
    """
    if official_name not in RELEASED_FILES:
        raise KeyError(f"unknown official DINOv3 model {official_name!r}; known: {', '.join(RELEASED_FILES)}")
    files = RELEASED_FILES[official_name]
    if weights not in files:
        raise KeyError(f"{official_name} has no {weights!r} weights; released: {', '.join(files)}")
    return files[weights]


def official_checkpoint_url(official_name: str, weights: str = "lvd1689m") -> str:
    """Download address of a released file (the release hands out its links on request; this is the hub's URL)."""
    return OFFICIAL_URL.format(name=official_name, file=official_file_name(official_name, weights))


# --------------------------------------------------------------------------------------------------------------------
# Layers of the release that DINOv2's ViT does not have (the rest is vit.py's)
# --------------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps), computed in float32, times a learned per-channel weight (`rmsnorm`)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def norm_layer(name: NormLayer) -> Callable[[int], nn.Module]:
    """The norm module of one of the release's names, as a factory of the width."""
    if name == "rmsnorm":
        return partial(RMSNorm, eps=NORM_EPS[name])
    return partial(nn.LayerNorm, eps=NORM_EPS[name])


class LinearKMaskedBias(nn.Linear):
    """The q, k, v projection (D -> 3 D) whose bias reaches q and v only: `bias * bias_mask`, the mask 0 on the key
    third. The mask is a persistent buffer, as in the released files."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if out_features % 3:
            raise ValueError(f"out_features = {out_features} is not 3 x D")
        if bias:
            self.register_buffer("bias_mask", torch.empty(out_features), persistent=True)
            self.reset_bias_mask()
        else:
            self.bias_mask = None

    def reset_bias_mask(self) -> None:
        """Ones on the query and value parts, zeros on the key part [D, 2 D)."""
        if self.bias_mask is not None:
            o = self.out_features
            with torch.no_grad():
                self.bias_mask.fill_(1.0)
                self.bias_mask[o // 3 : 2 * o // 3] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return F.linear(x, self.weight, bias)


class SwiGLUFFN(nn.Module):
    """DINOv3's SwiGLU: w3(silu(x W1) * (x W2)), with w1 and w2 separate (DINOv2's ViT-g fuses them as `w12`)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=True)
        self.w2 = nn.Linear(dim, hidden_dim, bias=True)
        self.w3 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def dinov3_block(cfg: DinoV3ViTConfig) -> Block:
    """A DINOv3 block: the release's norm, masked-key-bias attention (RoPE given per call), MLP or SwiGLU."""
    D = cfg.embed_dim
    qkv = (LinearKMaskedBias if cfg.mask_k_bias else nn.Linear)(D, 3 * D, bias=cfg.qkv_bias)
    mlp = Mlp(D, cfg.ffn_hidden_dim) if cfg.ffn_layer == "mlp" else SwiGLUFFN(D, cfg.ffn_hidden_dim)
    return Block(
        D,
        Attention(D, cfg.num_heads, qkv=qkv),
        mlp,
        layerscale_init=cfg.layerscale_init,
        drop_path_rate=cfg.drop_path_rate,
        norm_layer=norm_layer(cfg.norm_layer),
        subset_drop_above=0.0,  # the release always runs the residual branch on a subset of the batch
    )


# --------------------------------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------------------------------

Features = dict[str, Tensor | None]
Rope = tuple[Tensor, Tensor]


class DinoV3VisionTransformer(nn.Module):
    """The DINOv3 ViT backbone; see the module docstring for the architecture.

    Attributes follow the release (`embed_dim`, `num_features`, `patch_size`, `n_blocks`, `num_heads`,
    `n_storage_tokens`) and DINOv2's model (`num_register_tokens`, the same count), so that users' code keeps
    working with either.
    """

    def __init__(self, cfg: DinoV3ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, R = cfg.embed_dim, cfg.n_storage_tokens
        self.embed_dim = self.num_features = D
        self.patch_size = cfg.patch_size
        self.n_blocks = cfg.depth
        self.num_heads = cfg.num_heads
        self.n_storage_tokens = self.num_register_tokens = R
        self.chunked_blocks = False
        self.pack_crops = False
        """Run the crop sizes of a list input through each block together (a run mechanic: `train.pack_crops`)."""

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.empty(1, 1, D))
        self.storage_tokens = nn.Parameter(torch.empty(1, R, D)) if R else None
        self.rope_embed = RopePositionEmbedding(
            D,
            num_heads=cfg.num_heads,
            base=cfg.rope_base,
            min_period=cfg.rope_min_period,
            max_period=cfg.rope_max_period,
            normalize_coords=cfg.rope_normalize_coords,
            shift_coords=cfg.rope_shift_coords,
            jitter_coords=cfg.rope_jitter_coords,
            rescale_coords=cfg.rope_rescale_coords,
            dtype=ROPE_DTYPES[cfg.rope_dtype],
        )
        self.blocks = nn.ModuleList(dinov3_block(cfg) for _ in range(cfg.depth))
        norm = norm_layer(cfg.norm_layer)
        self.norm = norm(D)  # every token, or only the patches when a CLS norm is untied
        self.cls_norm = norm(D) if cfg.untie_cls_and_patch_norms else None
        self.local_cls_norm = norm(D) if cfg.untie_global_and_local_cls_norm else None
        self.head = nn.Identity()  # kept for compatibility: forward() returns head(CLS)
        self.mask_token = nn.Parameter(torch.empty(1, D))  # the iBOT mask token, shape as released
        self.init_weights()

    def init_weights(self) -> None:
        """The release's initialisation: truncated normal 0.02 for the linear layers (zero biases), normal 0.02
        for CLS and storage tokens, a zero mask token, the convolution's uniform default for the patch embedding,
        LayerScale at its initial value, unit norms, the RoPE periods and the key-bias masks."""
        self.rope_embed.reset_parameters()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.storage_tokens is not None:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        bound = 1 / math.sqrt(self.cfg.in_chans * self.patch_size**2)  # 1 / sqrt(fan_in)
        nn.init.uniform_(self.patch_embed.proj.weight, -bound, bound)
        nn.init.uniform_(self.patch_embed.proj.bias, -bound, bound)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, LinearKMaskedBias):
                    m.reset_bias_mask()
            elif isinstance(m, nn.LayerNorm | RMSNorm | LayerScale):
                m.reset_parameters()

    # -- tokens ------------------------------------------------------------------------------------------------------

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """Images (B, C, H, W) and optional masks (B, N) -> tokens (B, 1 + R + N, D) and the patch grid (H/p, W/p)."""
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H} x {W} is not a multiple of the patch size {p}")
        x = self.patch_embed(x)  # (B, N, D), N = H/p * W/p in row-major order
        if masks is not None:  # iBOT: the mask token replaces masked patch embeddings
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        prefix = [self.cls_token.expand(B, -1, -1)]  # (B, 1, D)
        if self.storage_tokens is not None:
            prefix.append(self.storage_tokens.expand(B, -1, -1))  # (B, R, D)
        return torch.cat((*prefix, x), dim=1), (H // p, W // p)  # (B, 1 + R + N, D)

    def _ropes(self, grids: Sequence[tuple[int, int]], ropes: list[Rope] | None) -> list[Rope]:
        """The RoPE tables of each batch's grid: computed once, or drawn afresh for every block while the
        coordinate augmentations are on (training), as the release draws them."""
        if ropes is None or self.rope_embed.augments:
            ropes = [self.rope_embed(H=h, W=w) for h, w in grids]
        return ropes

    def _normed(self, x: Tensor, local_crops: bool = False) -> tuple[Tensor, Tensor]:
        """Final norms of tokens (B, 1 + R + N, D): (CLS and storage (B, 1 + R, D), patches (B, N, D))."""
        R = self.n_storage_tokens
        cls_norm = self.local_cls_norm if local_crops and self.local_cls_norm is not None else self.cls_norm
        if cls_norm is None:  # one norm for every token
            x_norm = self.norm(x)
            return x_norm[:, : R + 1], x_norm[:, R + 1 :]
        return cls_norm(x[:, : R + 1]), self.norm(x[:, R + 1 :])

    def _split(self, x: Tensor, masks: Tensor | None, local_crops: bool) -> Features:
        prefix, patches = self._normed(x, local_crops)
        return {
            "x_norm_clstoken": prefix[:, 0],  # (B, D)
            "x_storage_tokens": prefix[:, 1:],  # (B, R, D)
            "x_norm_patchtokens": patches,  # (B, N, D)
            "x_prenorm": x,  # (B, 1 + R + N, D)
            "masks": masks,  # (B, N) or None
        }

    # -- forward -----------------------------------------------------------------------------------------------------

    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> Features | list[Features]:
        """Features of a batch, or of a list of batches with different crop sizes (the multi-crop student).

        Args:
            x: images (B, C, H, W), or a list of such batches ([global crops, local crops]); H and W multiples of
                the patch size, not necessarily equal.
            masks: for a tensor input, None or boolean (B, N) with True where the patch is masked (iBOT); for a
                list input, None or a list with one entry (tensor or None) per batch.

        Returns:
            For a tensor input, a dict with `x_norm_clstoken` (B, D), `x_storage_tokens` (B, R, D),
            `x_norm_patchtokens` (B, N, D), `x_prenorm` (B, 1 + R + N, D) and `masks`; for a list input, one such
            dict per batch (as the release's `forward_features_list`). In training mode the second batch of a list
            (the local crops) has its CLS and storage tokens normalised by `local_cls_norm` when it is untied.
        """
        if isinstance(x, Tensor):
            if masks is not None and not isinstance(masks, Tensor):
                raise TypeError("masks must be a tensor (or None) when x is a tensor")
            return self._forward_list([x], [masks])[0]
        masks_list = list(masks) if masks is not None else [None] * len(x)
        if len(masks_list) != len(x):
            raise ValueError(f"got {len(x)} image batches but {len(masks_list)} masks")
        return self._forward_list(list(x), masks_list)

    def _forward_list(self, xs: list[Tensor], masks: list[Tensor | None]) -> list[Features]:
        prepared = [self.prepare_tokens_with_masks(x, m) for x, m in zip(xs, masks, strict=True)]
        hs, grids = [h for h, _ in prepared], [g for _, g in prepared]
        ropes = None
        # Block-major order, as the release: each block's weights are used once per step for all crop sizes.
        # `pack_crops` runs each block's norms and linear layers once over every crop's tokens.
        for blk in self.blocks:
            ropes = self._ropes(grids, ropes)
            if self.pack_crops:
                hs = blk.forward_packed(hs, ropes)
            else:
                hs = [blk(h, rope) for h, rope in zip(hs, ropes, strict=True)]
        return [
            self._split(h, m, local_crops=self.training and i == 1)  # the release's convention: [global, local]
            for i, (h, m) in enumerate(zip(hs, masks, strict=True))
        ]

    def forward(self, x: Tensor | Sequence[Tensor], masks: Any = None, is_training: bool = False) -> Any:
        """The normalised CLS feature (B, D); with `is_training=True`, the `forward_features` output."""
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
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple[Any, ...]:
        """Outputs of the last `n` blocks (an int) or of the blocks with the given indices, as the release.

        Args:
            x: images (B, C, H, W).
            n: how many last blocks, or which block indices (0-based).
            reshape: return patch tokens as feature maps (B, D, H/p, W/p) instead of (B, N, D).
            return_class_token: add the CLS token (B, D) to each entry.
            return_extra_tokens: add the storage tokens (B, R, D) to each entry (after the CLS token).
            norm: apply the final norm (the CLS norm to CLS and storage tokens when it is untied).

        Returns:
            One entry per requested block, in block order: the patch tokens, or a tuple (patches, CLS),
            (patches, storage) or (patches, CLS, storage).
        """
        take = range(self.n_blocks - n, self.n_blocks) if isinstance(n, int) else list(n)
        h, grid = self.prepare_tokens_with_masks(x)
        ropes, outputs = None, []
        for i, blk in enumerate(self.blocks):
            ropes = self._ropes([grid], ropes)
            h = blk(h, ropes[0])
            if i in take:
                outputs.append(h)
        if len(outputs) != len(take):
            raise ValueError(f"only {len(outputs)} of the {len(take)} requested blocks exist (depth {self.n_blocks})")
        R = self.n_storage_tokens
        if norm:
            outputs = [torch.cat(self._normed(out), dim=1) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]  # (B, D)
        extra_tokens = [out[:, 1 : R + 1] for out in outputs]  # (B, R, D)
        outputs = [out[:, R + 1 :] for out in outputs]  # (B, N, D)
        if reshape:
            B, _, H, W = x.shape
            p = self.patch_size
            outputs = [out.reshape(B, H // p, W // p, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
        extras = ([class_tokens] if return_class_token else []) + ([extra_tokens] if return_extra_tokens else [])
        if not extras:
            return tuple(outputs)
        return tuple(zip(outputs, *extras, strict=True))


# --------------------------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------------------------

_OVERRIDABLE = {f.name for f in fields(DinoV3ViTConfig)}
_NULLABLE = {f.name for f in fields(DinoV3ViTConfig) if "None" in str(f.type)}
"""Fields for which None is a value (no LayerScale, an augmentation off, periods instead of a base)."""


def get_preset(arch: str) -> Preset:
    """Returns the DINOv3 ViT preset named `arch`; raises KeyError listing the known names."""
    if arch not in PRESETS:
        raise KeyError(f"unknown DINOv3 ViT preset {arch!r}; known: {', '.join(PRESETS)}")
    return PRESETS[arch]


def backbone_config(arch: str, **overrides: Any) -> DinoV3ViTConfig:
    """The `DinoV3ViTConfig` of preset `arch` with `overrides` applied (see `build_backbone`)."""
    unknown = set(overrides) - _OVERRIDABLE
    if unknown:
        raise TypeError(f"unknown DINOv3 ViT override(s) {sorted(unknown)}; allowed: {sorted(_OVERRIDABLE)}")
    overrides = {k: v for k, v in overrides.items() if v is not None or k in _NULLABLE}
    return replace(get_preset(arch).config, **overrides)


def build_backbone(arch: str, **overrides: Any) -> DinoV3VisionTransformer:
    """Builds a DINOv3 ViT preset with a fresh initialisation.

    Args:
        arch: a preset name (`dinov3_vit_test`, `dinov3_vits16`, ..., `dinov3_vit7b16`).
        **overrides: any `DinoV3ViTConfig` field, e.g. `embed_dim`, `depth`, `num_heads`, `drop_path_rate`,
            `n_storage_tokens`, `untie_global_and_local_cls_norm`. None keeps the preset's value, except for the
            fields that may be None (`rope_rescale_coords=None` turns the rescale off, `layerscale_init=None` drops
            LayerScale, `rope_base=None` with `rope_min_period` and `rope_max_period`).

    Raises:
        TypeError: an unknown override. KeyError: an unknown preset. ValueError: an inconsistent configuration.
    """
    return DinoV3VisionTransformer(backbone_config(arch, **overrides))


def build_official_backbone(official_name: str, **overrides: Any) -> DinoV3VisionTransformer:
    """The architecture of a released DINOv3 ViT by its Torch Hub name (`dinov3_vits16`, ..., `dinov3_vit7b16`).

    Weights are not downloaded; load them with `adapter.load_official_weights` (file: `official_file_name`).
    """
    if official_name not in OFFICIAL_MODELS:
        raise KeyError(f"unknown official DINOv3 ViT {official_name!r}; known: {', '.join(OFFICIAL_MODELS)}")
    arch, release = OFFICIAL_MODELS[official_name]
    return build_backbone(arch, **{**release, **overrides})
