"""The DINOv3 backbone benchmark's baseline is timm's DINOv3 model holding our weights: the twins give the same
features in float32, for each of the release's layouts (MLP, SwiGLU S+, the 7B's at a small width), on a
non-square input; and what timm's port treats differently from the release shows where the tests say it does."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from components.model import backbone_config, build_backbone

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {  # preset -> overrides: every layout at a width that runs in a blink
    "dinov3_vit_test": {},
    "dinov3_vitl16": {"embed_dim": 64, "depth": 3, "num_heads": 4},  # the MLP layout, head width 16
    "dinov3_vits16plus": {"embed_dim": 64, "depth": 2, "num_heads": 2},  # SwiGLU aligned to 8
    "dinov3_vit7b16": {"embed_dim": 128, "depth": 2, "num_heads": 2},  # no qkv bias, SwiGLU aligned to 64, local norm
}


@pytest.fixture(scope="module")
def twins():
    """benchmarks/timm_twins.py, imported as the benchmarks import it (their folder on the path)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("timm_twins")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(seed))  # 4 x 3 patches: not square


@pytest.mark.parametrize("arch", list(LAYOUTS))
def test_timms_dinov3_with_our_weights_gives_our_features(twins, arch):
    ours = twins.seeded_weights_(build_backbone(arch, **LAYOUTS[arch]))
    twin = twins.dinov3_twin(arch, ours.cfg)
    dropped = twins.load_into_twin(ours, twin)
    parity = twins.feature_parity(ours, twin, _images())
    assert parity["max_abs"] <= twins.PARITY_TOLERANCE, parity
    # What timm has no place for: the key-bias mask (its key bias is a zero buffer), the iBOT mask token, the RoPE
    # periods (recomputed), the 7B's local-crop CLS norm (training only).
    masked = ["blocks.{i}.attn.qkv.bias_mask"] if ours.cfg.qkv_bias else []
    local = ["local_cls_norm.bias", "local_cls_norm.weight"] if ours.cfg.untie_global_and_local_cls_norm else []
    assert dropped == sorted([*masked, *local, "mask_token", "rope_embed.periods"])


def test_the_checks_see_every_term_the_twins_share(twins):
    """A change of one bias of ours reaches the features beyond the tolerance: the parity is not trivially met."""
    ours = twins.seeded_weights_(build_backbone("dinov3_vit_test"))
    twin = twins.dinov3_twin("dinov3_vit_test", ours.cfg)
    twins.load_into_twin(ours, twin)
    D = ours.embed_dim
    with torch.no_grad():
        ours.blocks[1].attn.qkv.bias[2 * D :] += 0.05  # the value bias of the last block
    assert twins.feature_parity(ours, twin, _images())["max_abs"] > 10 * twins.PARITY_TOLERANCE
    with torch.no_grad():
        ours.blocks[1].attn.qkv.bias[D : 2 * D] += 1.0  # the key bias: masked in ours, dropped by timm's filter
        ours.blocks[1].attn.qkv.bias[2 * D :] -= 0.05
    assert twins.feature_parity(ours, twin, _images())["max_abs"] <= twins.PARITY_TOLERANCE


def test_timms_default_dinov3_models_drop_the_q_and_v_biases(twins):
    """timm's `vit_*_patch16_dinov3` (no `_qkvb`) has no qkv bias: a file's q and v biases are lost on the way."""
    import timm

    ours = twins.seeded_weights_(build_backbone("dinov3_vit_test"))
    bias_free = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, embed_dim=64, depth=2,
                                  num_heads=2)  # fmt: skip
    bias_free.load_state_dict(twins.to_timm_state(ours, bias_free), strict=True)  # loads, silently without them
    assert twins.feature_parity(ours, bias_free, _images())["max_abs"] > 10 * twins.PARITY_TOLERANCE
    with torch.no_grad():
        for block in ours.blocks:
            block.attn.qkv.bias.zero_()  # the released distilled models' (timm's reason for that default)
    bias_free.load_state_dict(twins.to_timm_state(ours, bias_free), strict=True)
    assert twins.feature_parity(ours, bias_free, _images())["max_abs"] <= twins.PARITY_TOLERANCE


def test_timm_recomputes_the_rope_periods_a_file_holds(twins):
    """Periods rounded to bf16 (a file trained with bf16 RoPE) change our features, never timm's."""
    ours = twins.seeded_weights_(build_backbone("dinov3_vitl16", embed_dim=128, depth=2, num_heads=2))
    twin = twins.dinov3_twin("dinov3_vitl16", ours.cfg)
    twins.load_into_twin(ours, twin)
    periods = ours.rope_embed.periods.clone()
    release = twins.feature_parity(ours, twin, _images(), release_periods=True)
    assert release["max_abs"] > 0 and torch.equal(ours.rope_embed.periods, periods)  # restored afterwards
    assert release["patch_max_abs"] > 0 and twins.feature_parity(ours, twin, _images())["max_abs"] == pytest.approx(
        0, abs=twins.PARITY_TOLERANCE
    )


@pytest.mark.parametrize(
    ("arch", "overrides", "error", "needle"),
    [
        ("dinov3_vitl16plus", {}, KeyError, "timm has no DINOv3 model like 'dinov3_vitl16plus'"),
        ("dinov3_vit_test", {"n_storage_tokens": 0}, ValueError, "n_storage_tokens = 0"),
        ("dinov3_vit_test", {"untie_cls_and_patch_norms": True}, ValueError, "untie_cls_and_patch_norms = True"),
        ("dinov3_vit_test", {"norm_layer": "rmsnorm"}, ValueError, "norm_layer = 'rmsnorm'"),
    ],
)
def test_a_layout_timm_cannot_express_is_named(twins, arch, overrides, error, needle):
    with pytest.raises(error, match=needle):
        twins.dinov3_twin(arch, backbone_config(arch, **overrides))
