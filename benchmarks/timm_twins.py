"""timm's model of the same architecture as one of ours, for the benchmarks' same-run baselines; for DINOv3 with the
same weights, and the parity of the two.

    from timm_twins import dinov3_twin, load_into_twin, feature_parity, seeded_weights_
    ours = seeded_weights_(build_backbone("dinov3_vitl16"))      # every term of the block non-trivial
    twin = dinov3_twin("dinov3_vitl16", ours.cfg)                 # timm's vit_large_patch16_dinov3_qkvb
    dropped = load_into_twin(ours, twin)                          # our released-layout weights, timm's filter, strict
    feature_parity(ours, twin, images)                            # max |ours - timm| of CLS, storage and patches

DINOv2 presets have a timm twin by name (`TIMM_DINOV2`, random weights). A DINOv3 ViT's twin is timm's Eva model of
the release's name (`TIMM_DINOV3`) built with our config's width, depth, heads, feed-forward, norm, storage tokens
and RoPE settings, so that a width override (`dinov3_vit_test`) has a twin too. Our weights reach it the way a
released file does: `components.model.official_state_dict` (the release's key layout) through timm's own
`checkpoint_filter_fn`, loaded with `strict=True`.

What timm's port treats differently from the release (and from ours), each checked here or in the tests:
- the masked key bias: timm holds the q and v biases (`q_bias`, `v_bias`) and a zero key bias; its filter splits the
  release's `qkv.bias` and drops the key third and `bias_mask`. Its default DINOv3 models (`vit_large_patch16_dinov3`
  and the other names without `_qkvb`, the ones its pretrained tags use) have no qkv bias at all: the filter drops
  the q and v biases, exact only for a file whose biases are zero. The twins here are the `_qkvb` models whenever our
  config has a qkv bias (the 7B has none).
- RoPE periods: timm recomputes them in float32 and drops the file's `rope_embed.periods`. A release trained with
  `pos_embed_rope_dtype: bf16` (the distilled ViT-L/16 among them) holds bf16-rounded periods, which the release and
  our loader use; `feature_parity(..., release_periods=True)` measures what that difference makes.
- storage tokens are timm's `reg_token`, in the same place (after CLS); the iBOT `mask_token` and the 7B's
  `local_cls_norm` (training only) are dropped; an untied CLS norm (`cls_norm`) has no place in timm's model.
- timm recognises a DINOv3 file by its `storage_tokens`: a model without storage tokens has no twin.
- the training-time RoPE rescale: timm draws one factor per forward pass, the release one per block.
"""

from __future__ import annotations

import contextlib
import re
import sys
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from components.model.vit_dinov3 import NORM_EPS, SWIGLU_ALIGN, DinoV3VisionTransformer, DinoV3ViTConfig

TIMM_DINOV2 = {"vit_small": "vit_small_patch14_dinov2", "vit_base": "vit_base_patch14_dinov2",
               "vit_large": "vit_large_patch14_dinov2", "vit_giant2": "vit_giant_patch14_dinov2"}  # fmt: skip
"""Our DINOv2 preset -> timm's model of the same size."""
TIMM_DINOV3 = {
    "dinov3_vit_test": "vit_small_patch16_dinov3",  # built at the test preset's width
    "dinov3_vits16": "vit_small_patch16_dinov3",
    "dinov3_vits16plus": "vit_small_plus_patch16_dinov3",
    "dinov3_vitb16": "vit_base_patch16_dinov3",
    "dinov3_vitl16": "vit_large_patch16_dinov3",
    "dinov3_vith16plus": "vit_huge_plus_patch16_dinov3",
    "dinov3_vit7b16": "vit_7b_patch16_dinov3",
}
"""Our DINOv3 preset -> timm's model of the release's name (timm has no ViT-L+/16); `_qkvb` is added for a qkv bias."""
PARITY_TOLERANCE = 1e-4
"""Largest |ours - timm| of any feature, float32, for the twins to count as the same model."""


def timm_name(arch: str, cfg: DinoV3ViTConfig) -> str:
    """timm's model name for our DINOv3 preset `arch` with config `cfg`: the `_qkvb` variant with a qkv bias."""
    if arch not in TIMM_DINOV3:
        raise KeyError(f"timm has no DINOv3 model like {arch!r}; twins exist for: {', '.join(TIMM_DINOV3)}")
    return TIMM_DINOV3[arch] + ("_qkvb" if cfg.qkv_bias else "")


def _unsupported(cfg: DinoV3ViTConfig) -> list[str]:
    """The settings of `cfg` that timm's Eva cannot express, each with its value."""
    found = []
    if not cfg.n_storage_tokens:
        found.append("n_storage_tokens = 0 (timm's filter recognises DINOv3 files by their storage tokens)")
    if cfg.qkv_bias and not cfg.mask_k_bias:
        found.append("mask_k_bias = False (timm's key bias is always zero)")
    if cfg.norm_layer == "rmsnorm":
        found.append("norm_layer = 'rmsnorm'")
    if cfg.untie_cls_and_patch_norms:
        found.append("untie_cls_and_patch_norms = True")
    if cfg.rope_base is None:
        found.append("rope_base = None (timm's Eva passes only a base)")
    if cfg.rope_normalize_coords != "separate":
        found.append(f"rope_normalize_coords = {cfg.rope_normalize_coords!r}")
    if cfg.rope_dtype != "fp32":
        found.append(f"rope_dtype = {cfg.rope_dtype!r} (timm computes RoPE in float32)")
    return found


def dinov3_twin(arch: str, cfg: DinoV3ViTConfig, *, img_size: int | None = None) -> nn.Module:
    """timm's DINOv3 model with the architecture of our preset `arch` at config `cfg` (freshly initialised).

    Raises:
        KeyError: no timm model of that layout. ValueError: a setting of `cfg` that timm cannot express (named).
    """
    import timm
    from timm.layers import LayerNorm

    name = timm_name(arch, cfg)
    unsupported = _unsupported(cfg)
    if unsupported:
        raise ValueError(f"{arch}: timm's DINOv3 model cannot express {'; '.join(unsupported)}")
    D, hidden = cfg.embed_dim, cfg.ffn_hidden_dim
    mlp_ratio = hidden / D if int(D * (hidden / D)) == hidden else (hidden + 0.5) / D  # timm: int(D x ratio)
    return timm.create_model(
        name,
        pretrained=False,
        num_classes=0,
        img_size=img_size or cfg.img_size,
        embed_dim=D,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=mlp_ratio,
        swiglu_mlp=cfg.ffn_layer != "mlp",
        swiglu_align_to=SWIGLU_ALIGN.get(cfg.ffn_layer, 0),
        qkv_bias=cfg.qkv_bias,
        init_values=cfg.layerscale_init,
        num_reg_tokens=cfg.n_storage_tokens,
        norm_layer=partial(LayerNorm, eps=NORM_EPS[cfg.norm_layer]),
        rope_temperature=cfg.rope_base,
        rope_shift_coords=cfg.rope_shift_coords,
        rope_jitter_coords=cfg.rope_jitter_coords,
        rope_rescale_coords=cfg.rope_rescale_coords,
        drop_path_rate=cfg.drop_path_rate,
    )


def dinov2_twin(arch: str, *, img_size: int, **kwargs: Any) -> nn.Module:
    """timm's DINOv2 ViT of the size of our preset `arch` (random weights), at the benchmark's image size."""
    import timm

    if arch not in TIMM_DINOV2:
        raise KeyError(f"timm has no DINOv2 model like {arch!r}; twins exist for: {', '.join(TIMM_DINOV2)}")
    return timm.create_model(TIMM_DINOV2[arch], pretrained=False, img_size=img_size, **kwargs)


def to_timm_state(ours: DinoV3VisionTransformer, twin: nn.Module) -> dict[str, Tensor]:
    """Our weights in the release's layout (`official_state_dict`), converted by timm's own checkpoint filter."""
    from timm.models.eva import checkpoint_filter_fn

    from components.model import official_state_dict

    with contextlib.redirect_stdout(sys.stderr):  # the filter prints when it drops the biases of a bias-free model
        return checkpoint_filter_fn(official_state_dict(ours), twin)


def dropped_keys(ours: DinoV3VisionTransformer, twin: nn.Module) -> list[str]:
    """The release-layout keys that timm's filter leaves out (block indices as `{i}`): what timm's model lacks."""
    from timm.models.eva import checkpoint_filter_fn

    from components.model import official_state_dict

    state = official_state_dict(ours)
    anchor = {"storage_tokens": state["storage_tokens"]}  # how the filter recognises a DINOv3 file
    dropped = set()
    with contextlib.redirect_stdout(sys.stderr):
        for key, value in state.items():
            if key != "storage_tokens" and len(checkpoint_filter_fn({**anchor, key: value}, twin)) < 2:
                dropped.add(re.sub(r"^blocks\.\d+\.", "blocks.{i}.", key))
    return sorted(dropped)


def load_into_twin(ours: DinoV3VisionTransformer, twin: nn.Module) -> list[str]:
    """Loads our weights into timm's twin strictly (through timm's filter); returns the keys the filter drops."""
    twin.load_state_dict(to_timm_state(ours, twin), strict=True)
    return dropped_keys(ours, twin)


@torch.no_grad()
def seeded_weights_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Draws every parameter from a seeded generator at the scale of a trained model, in place.

    A fresh initialisation has LayerScale gammas of 1e-5 and zero biases, under which the blocks hardly change the
    tokens and a parity check would pass whatever they compute. Here the gammas are about 0.1, the norms' weights
    about 1, every bias, token and weight non-zero (N(0, 0.02) added), so that each term reaches the features.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator).to(p)
        if name.endswith("gamma"):  # LayerScale
            p.copy_(0.1 + 0.02 * noise)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.add_(0.02 * noise)
    return model


def _max_abs(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def feature_parity(
    ours: DinoV3VisionTransformer,
    twin: nn.Module,
    images: Tensor,
    *,
    autocast_dtype: torch.dtype | None = None,
    release_periods: bool = False,
) -> dict[str, float]:
    """Max |ours - timm| of the CLS, storage and patch features of `images` (both models in eval mode).

    Args:
        ours: our DINOv3 backbone.
        twin: timm's model holding the same weights (`load_into_twin`).
        images: (B, 3, H, W), H and W multiples of the patch.
        autocast_dtype: run both under autocast to this dtype (the benchmark's bf16), else as they are.
        release_periods: our RoPE periods rounded to bfloat16 for this comparison, as a file trained with
            `pos_embed_rope_dtype: bf16` holds them (timm recomputes its own in float32).

    Returns:
        `cls_max_abs`, `storage_max_abs`, `patch_max_abs` and `max_abs`, the largest of the three.
    """
    modes = ours.training, twin.training
    ours.eval(), twin.eval()
    periods = ours.rope_embed.periods
    saved = periods.clone()
    if release_periods:
        periods.copy_(periods.to(torch.bfloat16).to(periods.dtype))
    autocast = torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    try:
        with autocast:
            a = ours.forward_features(images)
            b = twin.forward_features(images)  # (B, 1 + R + N, D), every token after timm's final norm
    finally:
        periods.copy_(saved)
        ours.train(modes[0]), twin.train(modes[1])
    R = ours.n_storage_tokens
    out = {
        "cls_max_abs": _max_abs(a["x_norm_clstoken"], b[:, 0]),
        "storage_max_abs": _max_abs(a["x_storage_tokens"], b[:, 1 : R + 1]),
        "patch_max_abs": _max_abs(a["x_norm_patchtokens"], b[:, R + 1 :]),
    }
    return {**out, "max_abs": max(out.values())}
