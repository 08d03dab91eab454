"""The DINOv2 vision transformer (Oquab et al. 2023), interchangeable with the official release.

Architecture choices, each as released so that the official checkpoints load and give the same features:

- Patch embedding: a 14 x 14 (or 16 x 16) convolution with stride = kernel, then a flat sequence of N patch tokens.
- Tokens: [CLS] [registers ...] [patches ...]. Registers (Darcet et al. 2024, "Vision Transformers Need Registers")
  sit between the CLS token and the patch tokens and receive no position embedding.
- Position embeddings: learned for a 518 px image (37 x 37 patches of 14, plus CLS: 1370 positions) and resized
  bicubically, in float32, to the input's patch grid, square or not. The release resizes models without registers
  with `scale_factor = (grid + 0.1) / 37` (a historical offset kept for checkpoint parity) and register models to the
  output size with antialiasing. A 37 x 37 input grid uses the table as is.
- Masked image modelling (iBOT): the learned mask token replaces the patch embedding of masked patches before CLS is
  prepended and positions are added.
- Pre-norm blocks: LayerNorm (eps 1e-6) -> multi-head self-attention (bias on qkv and projection, PyTorch
  `scaled_dot_product_attention`) -> LayerScale -> residual; LayerNorm -> feed-forward (GELU MLP with ratio 4, or
  SwiGLU for ViT-g, hidden int(2/3 x 4 x dim) rounded up to a multiple of 8) -> LayerScale -> residual.
- Stochastic depth: above a drop rate of 0.1 the residual branch runs only on a random subset of (1 - rate) of the
  batch and is added back scaled by B / subset (paper, section 5: "efficient stochastic depth"); otherwise the usual
  per-sample drop path.
- A final LayerNorm; the features are the normalised CLS token, registers and patch tokens.

Module and parameter names follow the release (`blocks.{i}.attn.qkv`, `blocks.{i}.mlp.w12`, ...), so our state dict is
the official layout; `adapter.py` keeps the explicit key map and the checks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.model.rope import apply_rope

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViTConfig:
    """Hyperparameters of a DINOv2 backbone. Defaults are those of the released ViT-S/14."""

    embed_dim: int = 384
    """D, the width of every token."""
    depth: int = 12
    """L, the number of transformer blocks."""
    num_heads: int = 6
    """Attention heads; D must be a multiple (64 per head in the released models)."""
    patch_size: int = 14
    """Side p of a square patch in pixels."""
    img_size: int = 518
    """Image side for which the position table is learned: (img_size // p)^2 patch positions plus CLS."""
    ffn_layer: Literal["mlp", "swiglu"] = "mlp"
    """Feed-forward type: GELU MLP, or SwiGLU (ViT-g) whose weights are `w12` (D -> 2 x hidden) and `w3`."""
    mlp_ratio: float = 4.0
    """Feed-forward hidden width over D (before the SwiGLU 2/3 rescaling)."""
    num_register_tokens: int = 0
    """R, learned register tokens between CLS and the patches (0 or 4 in the release)."""
    layerscale_init: float = 1.0e-5
    """Initial LayerScale gamma (overwritten by a checkpoint)."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate of the blocks (training only)."""
    drop_path_uniform: bool = True
    """Same rate in every block (DINOv2's training configs); False ramps it linearly from 0 to the rate."""
    interpolate_antialias: bool = False
    """Antialias when resizing the position grid (True for the released register models)."""
    interpolate_offset: float = 0.1
    """Offset added to the target grid when resizing positions by scale factor; 0 resizes to the output size."""
    in_chans: int = 3
    """Input channels."""

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim = {self.embed_dim} is not a multiple of num_heads = {self.num_heads}")
        if self.ffn_layer not in ("mlp", "swiglu"):
            raise ValueError(f"ffn_layer = {self.ffn_layer!r}: expected 'mlp' or 'swiglu'")
        if self.img_size < self.patch_size or self.patch_size < 1:
            raise ValueError(f"img_size = {self.img_size} must be at least patch_size = {self.patch_size} >= 1")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate = {self.drop_path_rate}: expected 0 <= rate < 1")
        if self.num_register_tokens < 0 or self.depth < 1:
            raise ValueError("num_register_tokens must be >= 0 and depth >= 1")

    @property
    def grid_size(self) -> int:
        """Side of the learned position grid in patches (37 for 518 px and patch 14)."""
        return self.img_size // self.patch_size

    @property
    def ffn_hidden_dim(self) -> int:
        """Feed-forward hidden width: 4 D for the MLP; int(2/3 x 4 D) rounded up to 8 for SwiGLU (4096 at 1536)."""
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn_layer == "swiglu":
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden


# --------------------------------------------------------------------------------------------------------------------
# Presets (timm's PretrainedCfg in miniature): the architecture and the preprocessing its weights expect
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A named backbone and the preprocessing its weights expect (shared by the families: see `families.py`)."""

    name: str
    config: Any
    """The architecture: the family's frozen config (`ViTConfig` here), with `patch_size` and `img_size`."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean of `Normalize` (inputs in [0, 1])."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation of `Normalize`."""
    eval_resize: int = 256
    """Shorter side after resizing (bicubic) in the official evaluation transform."""
    eval_crop: int = 224
    """Centre crop fed to the model in the official evaluation transform (a multiple of the patch size)."""
    official_name: str | None = None
    """Torch Hub name of the released backbone with this architecture (registers: append `_reg`)."""
    family: str = "dinov2"
    """The model family (`dinov2`, `dinov3_vit`, ...): which module builds it and which adapter loads it."""

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def img_size(self) -> int:
        return self.config.img_size


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # A very cheap backbone for unit tests and smoke runs (2 blocks of width 64).
        Preset("vit_test", ViTConfig(embed_dim=64, depth=2, num_heads=2)),
        # DeiT-Ti geometry; no official DINOv2 weights. The default of the embedded demo.
        Preset("vit_tiny", ViTConfig(embed_dim=192, depth=12, num_heads=3)),
        Preset("vit_small", ViTConfig(embed_dim=384, depth=12, num_heads=6), official_name="dinov2_vits14"),
        Preset("vit_base", ViTConfig(embed_dim=768, depth=12, num_heads=12), official_name="dinov2_vitb14"),
        Preset("vit_large", ViTConfig(embed_dim=1024, depth=24, num_heads=16), official_name="dinov2_vitl14"),
        # "Close to ViT-giant, with embed-dim 1536 and 24 heads => embed-dim per head 64", SwiGLU feed-forward.
        Preset(
            "vit_giant2",
            ViTConfig(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglu"),
            official_name="dinov2_vitg14",
        ),
    )
}

# The Torch Hub names of the released backbones -> (preset, overrides). Register models were trained with 4 registers,
# no position offset and antialiased resizing; the others with offset 0.1 and no antialiasing.
_REGISTER_RELEASE = {"num_register_tokens": 4, "interpolate_offset": 0.0, "interpolate_antialias": True}
OFFICIAL_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    **{p.official_name: (p.name, {}) for p in PRESETS.values() if p.official_name},
    **{f"{p.official_name}_reg": (p.name, dict(_REGISTER_RELEASE)) for p in PRESETS.values() if p.official_name},
}
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov2/{base}/{base}{suffix}_pretrain.pth"


def get_preset(arch: str) -> Preset:
    """Returns the preset named `arch`; raises KeyError listing the known names."""
    if arch not in PRESETS:
        raise KeyError(f"unknown backbone preset {arch!r}; known: {', '.join(PRESETS)}")
    return PRESETS[arch]


def official_checkpoint_url(official_name: str) -> str:
    """Download address of a released backbone, e.g. `dinov2_vitg14_reg` -> .../dinov2_vitg14_reg4_pretrain.pth."""
    if official_name not in OFFICIAL_MODELS:
        raise KeyError(f"unknown official model {official_name!r}; known: {', '.join(OFFICIAL_MODELS)}")
    base = official_name.removesuffix("_reg")
    return OFFICIAL_URL.format(base=base, suffix="_reg4" if official_name.endswith("_reg") else "")


# --------------------------------------------------------------------------------------------------------------------
# Position-embedding resize
# --------------------------------------------------------------------------------------------------------------------


def _cubic_kernel(d: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel with parameter a, as in PyTorch's bicubic (a = -0.75; -0.5 when antialiased)."""
    d = d.abs()
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


def bicubic_resize_matrix(
    n_in: int, n_out: Any, offset: float, antialias: bool, device: torch.device | None = None
) -> Tensor:
    """The (n_out, n_in) matrix W such that W @ v is `F.interpolate(v, mode="bicubic")` along one axis.

    Reproduces PyTorch's CPU kernels (scale factor `(n_out + offset) / n_in` when `offset` is not 0, output size
    otherwise; border taps clamped, or renormalised when antialiased) with tensor ops only, so that an exported graph
    resizes for any input size. `n_out` may be a symbolic size under `torch.export`.
    """
    i = torch.arange(n_out, dtype=torch.float32, device=device)  # output positions
    j = torch.arange(n_in, dtype=torch.float32, device=device)  # input positions
    n_out_t = i.new_ones(()) * n_out  # n_out as a 0-d tensor, so that no Python branch depends on it
    # Input pixels per output pixel, rounded as PyTorch does: float(1 / double(scale factor)), or float(in / out).
    scale = (n_in / (n_out_t.double() + offset)).float() if offset else n_in / n_out_t
    if not antialias:
        real = scale * (i + 0.5) - 0.5  # source coordinate of each output pixel (align_corners=False)
        taps = real.floor()[:, None] + torch.arange(-1, 3, dtype=torch.float32, device=device)  # (n_out, 4)
        weights = _cubic_kernel(real[:, None] - taps, a=-0.75)  # (n_out, 4)
        cols = taps.clamp(0, n_in - 1)  # border taps repeat the edge value
        return ((cols[:, :, None] == j) * weights[:, :, None]).sum(1)  # (n_out, n_in)
    # Antialiased (PIL-style) filter: support widened by the scale when shrinking, taps renormalised at the borders.
    support = torch.where(scale >= 1, 2.0 * scale, torch.full_like(scale, 2.0))
    invscale = torch.where(scale >= 1, 1.0 / scale, torch.ones_like(scale))
    center = scale * (i + 0.5)
    lo = (center - support + 0.5).floor().clamp(min=0)[:, None]
    hi = (center + support + 0.5).floor().clamp(max=n_in)[:, None]
    weights = _cubic_kernel((j - center[:, None] + 0.5) * invscale, a=-0.5)  # (n_out, n_in)
    weights = torch.where((j >= lo) & (j < hi), weights, torch.zeros_like(weights))
    weights = weights / weights.sum(1, keepdim=True)
    # PyTorch skips an antialiased axis whose size does not change; so do we.
    eye = (i[:, None] == j).float()
    return torch.where(n_out_t == n_in, eye, weights)


def _exporting() -> bool:
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


# --------------------------------------------------------------------------------------------------------------------
# Layers, in forward order
# --------------------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Image to patch tokens: a p x p convolution with stride p."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), N = H/p * W/p in row-major order


class Attention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention` (flash / memory-efficient kernels on GPU).

    DINOv2 uses it as is. DINOv3 passes its own q, k, v projection (no bias, or a bias whose key part is masked) and
    a RoPE table to `forward`, which rotates the queries and keys of the patch tokens (`rope.apply_rope`).
    """

    def __init__(self, dim: int, num_heads: int, qkv: nn.Linear | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = qkv if qkv is not None else nn.Linear(dim, dim * 3, bias=True)  # D -> 3 D
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return self.proj(self.attend(self.qkv(x), rope))

    def attend(self, qkv: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """softmax(q k^T / sqrt(head_dim)) v of projected tokens (B, N, 3 D) -> (B, N, D), heads concatenated."""
        B, N, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        qkv = qkv.view(B, N, 3, self.num_heads, C // self.num_heads)  # (B, N, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, head_dim)
        if rope is not None:
            q, k = apply_rope(q, k, rope)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return x.transpose(1, 2).reshape(B, N, C)  # (B, N, D)


class Mlp(nn.Module):
    """The ViT feed-forward: Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020) of ViT-g: w3(silu(x W1) * (x W2)), with W1 and W2 fused as `w12`."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=True)
        self.w3 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)  # 2 x (..., hidden): gate and value, in the release's order
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (Touvron et al. 2021, CaiT), initialised small."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.init_value = float(init_value)
        self.gamma = nn.Parameter(torch.full((dim,), self.init_value))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Per-sample stochastic depth: zero a residual branch for a random `rate` of the samples, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
    return x * mask / keep


def drop_add_residual_subset(x: Tensor, residual: Callable[[Tensor], Tensor], rate: float) -> Tensor:
    """Efficient stochastic depth (paper, section 5): x + branch computed only on the kept samples.

    A random subset of max(int(B (1 - rate)), 1) samples goes through the branch; its output is added back with
    `index_add`, scaled by B / subset so that the expectation matches the full residual. Saves compute and memory
    in proportion to the rate, which pays off above a rate of 0.1.
    """
    B = x.shape[0]
    subset = max(int(B * (1.0 - rate)), 1)
    keep = torch.randperm(B, device=x.device)[:subset]  # (subset,) sample indices
    branch = residual(x[keep])  # (subset, N, D)
    out = torch.index_add(x.flatten(1), 0, keep, branch.flatten(1).to(x.dtype), alpha=B / subset)  # (B, N * D)
    return out.view_as(x)


LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)
"""DINOv2's norm layer (a factory of the width)."""


class Block(nn.Module):
    """Pre-norm transformer block: x + LS1(Attn(N1(x))), then x + LS2(FFN(N2(x))).

    Built from its attention and feed-forward (`dinov2_block` for DINOv2's; DINOv3 builds its own). `rope`, when
    given, goes to the attention. Stochastic depth runs the residual branch on a subset of the batch above
    `subset_drop_above` (DINOv2: 0.1; DINOv3: any rate) and drops it per sample below.
    """

    def __init__(
        self,
        dim: int,
        attn: Attention,
        mlp: nn.Module,
        *,
        layerscale_init: float | None,
        drop_path_rate: float,
        norm_layer: Callable[[int], nn.Module] = LAYER_NORM,
        subset_drop_above: float = 0.1,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path_rate = drop_path_rate
        self.subset_drop_above = subset_drop_above

    def _attn_branch(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), rope=rope))

    def _ffn_branch(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        rate = self.drop_path_rate if self.training else 0.0
        if rate > self.subset_drop_above:  # the subset overhead is only repaid above 0.1 (DINOv2's threshold)
            x = drop_add_residual_subset(x, lambda t: self._attn_branch(t, rope), rate)
            return drop_add_residual_subset(x, self._ffn_branch, rate)
        x = x + drop_path(self._attn_branch(x, rope), rate, self.training)
        return x + drop_path(self._ffn_branch(x), rate, self.training)

    # -- several token batches at once (the multi-crop student) ------------------------------------------------------

    def forward_packed(
        self, xs: Sequence[Tensor], ropes: Sequence[tuple[Tensor, Tensor] | None] | None = None
    ) -> list[Tensor]:
        """`forward` on several batches of different token counts (global and local crops) in one pass.

        The norms, linear layers and LayerScales run once over the rows of every batch (larger matrix products, half
        the kernel launches for two crop sizes), attention once per batch (with that batch's RoPE table, if any).
        Stochastic-depth subsets are drawn per batch in the order `forward` on each batch draws them, so both
        compute the same thing up to float rounding.
        """
        ropes = list(ropes) if ropes is not None else [None] * len(xs)
        rate = self.drop_path_rate if self.training else 0.0
        if 0.0 < rate <= self.subset_drop_above:  # per-sample masks: kept as `forward` draws them
            return [self(x, r) for x, r in zip(xs, ropes, strict=True)]
        if rate == 0.0:
            xs = [x + a for x, a in zip(xs, self._attn_branches(xs, ropes), strict=True)]
            return [x + f for x, f in zip(xs, self._ffn_branches(xs), strict=True)]
        subsets = [max(int(x.shape[0] * (1.0 - rate)), 1) for x in xs]
        keeps = [
            (torch.randperm(x.shape[0], device=x.device)[:n], torch.randperm(x.shape[0], device=x.device)[:n])
            for x, n in zip(xs, subsets, strict=True)
        ]  # (attention, FFN) subsets of each batch, drawn batch after batch as `forward` draws them
        branches = ((lambda subsets: self._attn_branches(subsets, ropes), 0), (self._ffn_branches, 1))
        for branch, which in branches:
            outs = branch([x[k[which]] for x, k in zip(xs, keeps, strict=True)])
            xs = [
                torch.index_add(x.flatten(1), 0, k[which], o.flatten(1).to(x.dtype), alpha=x.shape[0] / n).view_as(x)
                for x, k, o, n in zip(xs, keeps, outs, subsets, strict=True)
            ]
        return xs

    def _attn_branches(self, xs: Sequence[Tensor], ropes: Sequence[tuple[Tensor, Tensor] | None]) -> list[Tensor]:
        """LS1(Attn(N1(x))) of each batch: qkv and proj over all rows at once, attention per batch."""
        shapes, rows = [x.shape for x in xs], [x.shape[0] * x.shape[1] for x in xs]
        D = shapes[0][-1]
        qkv = self.attn.qkv(self.norm1(torch.cat([x.reshape(-1, D) for x in xs])))  # (sum B N, 3 D)
        outs = [
            self.attn.attend(part.view(B, N, 3 * D), rope).reshape(B * N, D)  # (B N, D)
            for (B, N, _), part, rope in zip(shapes, qkv.split(rows), ropes, strict=True)
        ]
        out = self.ls1(self.attn.proj(torch.cat(outs)))  # (sum B N, D)
        return [o.view(shape) for o, shape in zip(out.split(rows), shapes, strict=True)]

    def _ffn_branches(self, xs: Sequence[Tensor]) -> list[Tensor]:
        """LS2(FFN(LN2(x))) of each batch, over all rows at once."""
        shapes, rows = [x.shape for x in xs], [x.shape[0] * x.shape[1] for x in xs]
        out = self._ffn_branch(torch.cat([x.reshape(-1, shapes[0][-1]) for x in xs]))  # (sum B N, D)
        return [o.view(shape) for o, shape in zip(out.split(rows), shapes, strict=True)]


def dinov2_block(cfg: ViTConfig, drop_path_rate: float) -> Block:
    """A DINOv2 block: LayerNorm (eps 1e-6), biased qkv, GELU MLP or fused SwiGLU, LayerScale."""
    D = cfg.embed_dim
    mlp = (SwiGLUFFN if cfg.ffn_layer == "swiglu" else Mlp)(D, cfg.ffn_hidden_dim)
    return Block(
        D, Attention(D, cfg.num_heads), mlp, layerscale_init=cfg.layerscale_init, drop_path_rate=drop_path_rate
    )


# --------------------------------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------------------------------


class DinoVisionTransformer(nn.Module):
    """The DINOv2 ViT backbone; see the module docstring for the architecture.

    Attributes follow the release (`embed_dim`, `num_features`, `patch_size`, `n_blocks`, `num_heads`,
    `num_register_tokens`, `interpolate_offset`, `interpolate_antialias`) so that users' code keeps working.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, R = cfg.embed_dim, cfg.num_register_tokens
        self.embed_dim = self.num_features = D
        self.patch_size = cfg.patch_size
        self.n_blocks = cfg.depth
        self.num_heads = cfg.num_heads
        self.num_register_tokens = R
        self.interpolate_offset = cfg.interpolate_offset
        self.interpolate_antialias = cfg.interpolate_antialias
        self.chunked_blocks = False
        self.pack_crops = False
        """Run the crop sizes of a list input through each block together (a run mechanic: `train.pack_crops`)."""

        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size**2 + 1, D))  # CLS + grid^2 positions
        self.register_tokens = nn.Parameter(torch.zeros(1, R, D)) if R else None
        self.mask_token = nn.Parameter(torch.zeros(1, D))  # the iBOT mask token, shape as released
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        if cfg.drop_path_uniform:
            rates = [cfg.drop_path_rate] * cfg.depth
        else:
            rates = [r.item() for r in torch.linspace(0, cfg.drop_path_rate, cfg.depth)]
        self.blocks = nn.ModuleList(dinov2_block(cfg, rates[i]) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Identity()  # kept for compatibility: forward() returns head(CLS)
        self.init_weights()

    def init_weights(self) -> None:
        """The release's initialisation: timm ViT (truncated normal 0.02 for linears and positions)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- tokens ------------------------------------------------------------------------------------------------------

    def interpolate_pos_encoding(self, x: Tensor, h: int, w: int) -> Tensor:
        """Position embeddings (1, 1 + N, D) for an (h, w) pixel input, cast to x's dtype.

        Bicubic in float32, as released: scale factor (grid + offset) / 37 when the offset is not 0 (kept for
        checkpoint parity), output size otherwise; the learned 37 x 37 table is used as is for a 37 x 37 grid.
        """
        M = self.cfg.grid_size
        h0, w0 = h // self.patch_size, w // self.patch_size
        exporting = _exporting()
        if not exporting and (h0, w0) == (M, M):
            return self.pos_embed.to(x.dtype)
        pos = self.pos_embed.float()
        cls_pos, grid = pos[:, :1], pos[0, 1:].reshape(M, M, -1).permute(2, 0, 1)  # (1, 1, D), (D, M, M)
        if exporting:
            grid = self._resize_grid_traceable(grid, h0, w0)
        else:
            if self.interpolate_offset:
                size, scale = None, ((h0 + self.interpolate_offset) / M, (w0 + self.interpolate_offset) / M)
            else:
                size, scale = (h0, w0), None
            grid = F.interpolate(
                grid[None], size=size, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias
            )[0]  # (D, h0, w0)
        grid = grid.flatten(1).transpose(0, 1)[None]  # (1, h0 * w0, D), row-major like the patch tokens
        return torch.cat((cls_pos, grid), dim=1).to(x.dtype)

    def _resize_grid_traceable(self, grid: Tensor, h0: Any, w0: Any) -> Tensor:
        """The same resize as separable matrices built from the (symbolic) output size, for ONNX / torch.export."""
        M, dev = self.cfg.grid_size, grid.device
        offset, antialias = self.interpolate_offset, self.interpolate_antialias
        with torch.autocast(dev.type, enabled=False):
            Wh = bicubic_resize_matrix(M, h0, offset, antialias, dev)  # (h0, M)
            Ww = bicubic_resize_matrix(M, w0, offset, antialias, dev)  # (w0, M)
            # The release skips the resize for a square 37 x 37 grid: select identities there, without a branch.
            same = (Wh.new_ones(()) * h0 == M) & (Ww.new_ones(()) * w0 == M)
            Wh = torch.where(same, bicubic_resize_matrix(M, h0, 0.0, False, dev), Wh)  # identity when h0 = M
            Ww = torch.where(same, bicubic_resize_matrix(M, w0, 0.0, False, dev), Ww)
            return torch.einsum("hm,dmn,wn->dhw", Wh, grid, Ww)  # (D, h0, w0)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W) and optional masks (B, N) -> tokens (B, 1 + R + N, D)."""
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input {H} x {W} is not a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(x)  # (B, N, D)
        if masks is not None:  # iBOT: the mask token replaces masked patch embeddings, before positions are added
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1 + N, D)
        x = x + self.interpolate_pos_encoding(x, H, W)
        if self.register_tokens is not None:  # registers between CLS and patches, without positions
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)  # (B, 1 + R + N, D)
        return x

    def _split(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        x_norm = self.norm(x)
        R = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],  # (B, D)
            "x_norm_regtokens": x_norm[:, 1 : R + 1],  # (B, R, D)
            "x_norm_patchtokens": x_norm[:, R + 1 :],  # (B, N, D)
            "x_prenorm": x,  # (B, 1 + R + N, D)
            "masks": masks,  # (B, N) or None
        }

    # -- forward -----------------------------------------------------------------------------------------------------

    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> dict[str, Tensor | None] | list[dict[str, Tensor | None]]:
        """Features of a batch, or of a list of batches with different crop sizes (the multi-crop student).

        Args:
            x: images (B, C, H, W), or a list of such batches (e.g. [global crops, local crops]); H and W multiples
                of the patch size, not necessarily equal.
            masks: for a tensor input, None or boolean (B, N) with True where the patch is masked (iBOT); for a
                list input, None or a list with one entry (tensor or None) per batch.

        Returns:
            For a tensor input, a dict with `x_norm_clstoken` (B, D), `x_norm_regtokens` (B, R, D),
            `x_norm_patchtokens` (B, N, D), `x_prenorm` (B, 1 + R + N, D) and `masks`; for a list input, one such
            dict per batch (as the release's `forward_features_list`).
        """
        if isinstance(x, Tensor):
            if masks is not None and not isinstance(masks, Tensor):
                raise TypeError("masks must be a tensor (or None) when x is a tensor")
            h = self.prepare_tokens_with_masks(x, masks)
            for blk in self.blocks:
                h = blk(h)
            return self._split(h, masks)
        masks_list = list(masks) if masks is not None else [None] * len(x)
        if len(masks_list) != len(x):
            raise ValueError(f"got {len(x)} image batches but {len(masks_list)} masks")
        hs = [self.prepare_tokens_with_masks(xi, mi) for xi, mi in zip(x, masks_list, strict=True)]
        # Block-major order, as the release: each block's weights are used once per step for all crop sizes
        # (what ZeRO-3 / FSDP gather). The release concatenates the crops into one xFormers block-diagonal
        # attention; `pack_crops` runs each block's norms and linear layers once over every crop's tokens
        # (`Block.forward_packed`), otherwise the crop sizes go through each block one after the other. Both
        # compute the same thing.
        for blk in self.blocks:
            hs = blk.forward_packed(hs) if self.pack_crops else [blk(h) for h in hs]
        return [self._split(h, m) for h, m in zip(hs, masks_list, strict=True)]

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
        norm: bool = True,
    ) -> tuple[Tensor, ...] | tuple[tuple[Tensor, Tensor], ...]:
        """Outputs of the last `n` blocks (an int) or of the blocks with the given indices, as the release.

        Args:
            x: images (B, C, H, W).
            n: how many last blocks, or which block indices (0-based).
            reshape: return patch tokens as feature maps (B, D, H/p, W/p) instead of (B, N, D).
            return_class_token: return (patch tokens, CLS (B, D)) pairs.
            norm: apply the final LayerNorm to each output.

        Returns:
            A tuple with one entry per requested block, in block order.
        """
        take = range(self.n_blocks - n, self.n_blocks) if isinstance(n, int) else list(n)
        h = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            h = blk(h)
            if i in take:
                outputs.append(h)
        if len(outputs) != len(take):
            raise ValueError(f"only {len(outputs)} of the {len(take)} requested blocks exist (depth {self.n_blocks})")
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]  # (B, D)
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]  # (B, N, D)
        if reshape:
            B, _, H, W = x.shape
            p = self.patch_size
            outputs = [out.reshape(B, H // p, W // p, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens, strict=True))
        return tuple(outputs)


# --------------------------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------------------------

_OVERRIDABLE = {f.name for f in fields(ViTConfig)}


def backbone_config(arch: str, **overrides: Any) -> ViTConfig:
    """The `ViTConfig` of preset `arch` with `overrides` applied (see `build_backbone`)."""
    unknown = set(overrides) - _OVERRIDABLE
    if unknown:
        raise TypeError(f"unknown backbone override(s) {sorted(unknown)}; allowed: {sorted(_OVERRIDABLE)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("num_register_tokens"):
        # Registers imply the release's register-model resize unless the caller says otherwise.
        overrides.setdefault("interpolate_offset", _REGISTER_RELEASE["interpolate_offset"])
        overrides.setdefault("interpolate_antialias", _REGISTER_RELEASE["interpolate_antialias"])
    return replace(get_preset(arch).config, **overrides)


def build_backbone(arch: str, **overrides: Any) -> DinoVisionTransformer:
    """Builds a preset backbone with a fresh initialisation.

    Args:
        arch: a preset name (`vit_test`, `vit_tiny`, `vit_small`, `vit_base`, `vit_large`, `vit_giant2`).
        **overrides: any `ViTConfig` field: `embed_dim`, `depth`, `num_heads`, `ffn_layer` ("mlp" or "swiglu"),
            `num_register_tokens`, `img_size`, `patch_size`, `interpolate_antialias`, `interpolate_offset`,
            `drop_path_rate`, `layerscale_init`, `drop_path_uniform`, `mlp_ratio`. None means the preset's value.
            With registers and no explicit `interpolate_offset` / `interpolate_antialias`, the register release's
            0.0 / True are used, so `build_backbone("vit_large", num_register_tokens=4)` matches
            `dinov2_vitl14_reg`.

    Raises:
        TypeError: an unknown override. KeyError: an unknown preset. ValueError: an inconsistent configuration.
    """
    return DinoVisionTransformer(backbone_config(arch, **overrides))


def build_official_backbone(official_name: str, **overrides: Any) -> DinoVisionTransformer:
    """The architecture of a released backbone by its Torch Hub name (`dinov2_vits14`, ..., `dinov2_vitg14_reg`).

    Weights are not downloaded; load them with `load_official_weights` (URL: `official_checkpoint_url`).
    """
    if official_name not in OFFICIAL_MODELS:
        raise KeyError(f"unknown official model {official_name!r}; known: {', '.join(OFFICIAL_MODELS)}")
    arch, release = OFFICIAL_MODELS[official_name]
    return build_backbone(arch, **{**release, **overrides})


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (for logs)."""
    return sum(p.numel() for p in model.parameters())
