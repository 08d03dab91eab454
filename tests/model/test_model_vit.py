"""Backbone tests: presets, shapes, non-square inputs, multi-crop lists, stochastic depth, and numerical parity with an
independent re-implementation of the released forward pass on random official-layout weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from components.model import PRESETS, backbone_from_config, build_backbone, build_official_backbone, get_preset
from components.model.vit import bicubic_resize_matrix, drop_add_residual_subset

# --------------------------------------------------------------------------------------------------------------------
# An independent reference: the release's forward written with plain ops on an official-layout state dict
# --------------------------------------------------------------------------------------------------------------------

DINOV2_PRESETS = [name for name, preset in PRESETS.items() if preset.family == "dinov2"]


def random_official_state_dict(
    *, dim: int, depth: int, patch: int = 14, grid: int = 37, registers: int = 0, swiglu: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random weights in the released layout (shapes written out here, not taken from our model)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.05, mean: float = 0.0) -> torch.Tensor:
        return mean + std * torch.randn(*shape, generator=g)

    sd = {
        "cls_token": rnd(1, 1, dim, std=0.5),
        "pos_embed": rnd(1, 1 + grid * grid, dim, std=0.5),
        "mask_token": rnd(1, dim, std=0.5),
        "patch_embed.proj.weight": rnd(dim, 3, patch, patch),
        "patch_embed.proj.bias": rnd(dim),
    }
    if registers:
        sd["register_tokens"] = rnd(1, registers, dim, std=0.5)
    hidden = 4 * dim
    if swiglu:
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": rnd(dim, std=0.1, mean=1.0),
            b + "norm1.bias": rnd(dim),
            b + "attn.qkv.weight": rnd(3 * dim, dim, std=0.2),
            b + "attn.qkv.bias": rnd(3 * dim),
            b + "attn.proj.weight": rnd(dim, dim, std=0.1),
            b + "attn.proj.bias": rnd(dim),
            b + "ls1.gamma": rnd(dim, std=0.1, mean=0.5),
            b + "norm2.weight": rnd(dim, std=0.1, mean=1.0),
            b + "norm2.bias": rnd(dim),
            b + "ls2.gamma": rnd(dim, std=0.1, mean=0.5),
        }
        if swiglu:
            sd |= {
                b + "mlp.w12.weight": rnd(2 * hidden, dim, std=0.1),
                b + "mlp.w12.bias": rnd(2 * hidden),
                b + "mlp.w3.weight": rnd(dim, hidden, std=0.1),
                b + "mlp.w3.bias": rnd(dim),
            }
        else:
            sd |= {
                b + "mlp.fc1.weight": rnd(hidden, dim, std=0.1),
                b + "mlp.fc1.bias": rnd(hidden),
                b + "mlp.fc2.weight": rnd(dim, hidden, std=0.1),
                b + "mlp.fc2.bias": rnd(dim),
            }
    sd |= {"norm.weight": rnd(dim, std=0.1, mean=1.0), "norm.bias": rnd(dim)}
    return sd


def reference_features(sd, x, *, heads, patch=14, registers=0, offset=0.1, antialias=False, masks=None):
    """The release's DinoVisionTransformer.forward_features, op by op (naive attention, explicit loops)."""
    B, _, w, h = x.shape  # the release's (confusing) names: w is the height
    dim = sd["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    if masks is not None:
        t = torch.where(masks.unsqueeze(-1), sd["mask_token"].unsqueeze(0), t)
    t = torch.cat((sd["cls_token"].expand(B, -1, -1), t), dim=1)
    # interpolate_pos_encoding, as released
    N = sd["pos_embed"].shape[1] - 1
    if t.shape[1] - 1 == N and w == h:
        pos = sd["pos_embed"]
    else:
        pos_embed = sd["pos_embed"].float()
        class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
        w0, h0 = w // patch, h // patch
        M = int(math.sqrt(N))
        kwargs = {}
        if offset:
            kwargs["scale_factor"] = (float(w0 + offset) / M, float(h0 + offset) / M)
        else:
            kwargs["size"] = (w0, h0)
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=antialias, **kwargs
        )
        assert (w0, h0) == patch_pos_embed.shape[-2:]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        pos = torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(t.dtype)
    t = t + pos
    if registers:
        t = torch.cat((t[:, :1], sd["register_tokens"].expand(B, -1, -1), t[:, 1:]), dim=1)
    n = t.shape[1]
    for i in range(depth):
        b = f"blocks.{i}."
        y = F.layer_norm(t, (dim,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        qkv = qkv.reshape(B, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (dim // heads) ** -0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, n, dim)
        y = F.linear(y, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        t = t + y * sd[b + "ls1.gamma"]
        y = F.layer_norm(t, (dim,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        if b + "mlp.w12.weight" in sd:
            x1, x2 = F.linear(y, sd[b + "mlp.w12.weight"], sd[b + "mlp.w12.bias"]).chunk(2, dim=-1)
            y = F.linear(F.silu(x1) * x2, sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"])
        else:
            y = F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
            y = F.linear(y, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        t = t + y * sd[b + "ls2.gamma"]
    t_norm = F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return t_norm[:, 0], t_norm[:, 1 : registers + 1], t_norm[:, registers + 1 :], t


PARITY_CASES = {
    # name: (backbone overrides, reference kwargs, input sizes (H, W))
    "no_registers": (
        {"embed_dim": 64, "depth": 2, "num_heads": 4},
        {"heads": 4},
        [(518, 518), (224, 280), (98, 98), (112, 56)],
    ),
    "registers_swiglu": (
        {"embed_dim": 48, "depth": 2, "num_heads": 3, "ffn_layer": "swiglu", "num_register_tokens": 4},
        {"heads": 3, "registers": 4, "offset": 0.0, "antialias": True},
        [(518, 518), (126, 308), (700, 210)],
    ),
}


@pytest.mark.parametrize("case", PARITY_CASES)
@torch.no_grad()
def test_parity_with_reference_forward(case):
    """Same features as the release's forward on random official-layout weights: square 518 px (the learned grid, no
    resize), smaller and larger non-square grids (resize), and iBOT masks."""
    overrides, ref_kwargs, sizes = PARITY_CASES[case]
    sd = random_official_state_dict(
        dim=overrides["embed_dim"],
        depth=overrides["depth"],
        registers=overrides.get("num_register_tokens", 0),
        swiglu=overrides.get("ffn_layer") == "swiglu",
    )
    model = build_backbone("vit_small", **overrides)
    model.load_state_dict(sd, strict=True)
    model.eval()
    torch.manual_seed(1)
    for H, W in sizes:
        x = torch.randn(1 if H * W > 100_000 else 2, 3, H, W)
        masks = torch.rand(x.shape[0], (H // 14) * (W // 14)) < 0.3 if H * W < 50_000 else None
        ours = model.forward_features(x, masks=masks)
        cls, reg, patches, prenorm = reference_features(sd, x, masks=masks, **ref_kwargs)
        torch.testing.assert_close(ours["x_norm_clstoken"], cls, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours["x_norm_regtokens"], reg, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours["x_norm_patchtokens"], patches, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours["x_prenorm"], prenorm, atol=1e-4, rtol=1e-4)
        if masks is None:
            torch.testing.assert_close(model(x), cls, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, True), (0.0, False), (0.1, True)])
def test_traceable_resize_matches_interpolate(offset, antialias):
    """The export path's resize matrices reproduce F.interpolate (scale factor with offset, or output size), up to
    float32 rounding of the sampling coordinates (PyTorch's own float32 and float64 kernels differ by as much)."""
    grid = torch.randn(1, 8, 37, 37)
    for h0, w0 in [(16, 16), (37, 37), (7, 50), (74, 20), (36, 38), (1, 2), (100, 3)]:
        if offset:
            ref = F.interpolate(
                grid, scale_factor=((h0 + offset) / 37, (w0 + offset) / 37), mode="bicubic", antialias=antialias
            )
        else:
            ref = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=antialias)
        Wh = bicubic_resize_matrix(37, h0, offset, antialias)
        Ww = bicubic_resize_matrix(37, w0, offset, antialias)
        ours = torch.einsum("hm,dmn,wn->dhw", Wh, grid[0], Ww)
        torch.testing.assert_close(ours, ref[0], atol=5e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Presets and API
# --------------------------------------------------------------------------------------------------------------------

RELEASED_PARAMS_M = {"vit_small": 22.06, "vit_base": 86.58, "vit_large": 304.37, "vit_giant2": 1136.48}


@pytest.mark.parametrize("arch", DINOV2_PRESETS)
def test_presets_build_on_meta_with_released_sizes(arch):
    with torch.device("meta"):
        model = build_backbone(arch)
    cfg = get_preset(arch).config
    assert model.pos_embed.shape == (1, 1370, cfg.embed_dim)
    assert cfg.patch_size == 14 and cfg.layerscale_init == 1e-5 and cfg.interpolate_offset == 0.1
    assert not cfg.interpolate_antialias and cfg.num_register_tokens == 0
    if arch in RELEASED_PARAMS_M:
        n = sum(p.numel() for p in model.parameters()) / 1e6
        assert n == pytest.approx(RELEASED_PARAMS_M[arch], abs=0.01)
    if arch == "vit_giant2":
        assert model.blocks[0].mlp.w12.weight.shape == (2 * 4096, 1536)
        assert model.blocks[0].mlp.w3.weight.shape == (1536, 4096)
    preset = get_preset(arch)
    assert len(preset.mean) == 3 and len(preset.std) == 3 and preset.eval_crop % preset.patch_size == 0


def test_overrides_and_errors():
    model = build_backbone("vit_test", depth=3, patch_size=16, img_size=224, drop_path_rate=0.3, layerscale_init=0.5)
    assert len(model.blocks) == 3 and model.pos_embed.shape == (1, 1 + 14 * 14, 64)
    assert model.blocks[0].ls1.gamma[0].item() == 0.5 and model.blocks[2].drop_path_rate == 0.3
    reg = build_backbone("vit_test", num_register_tokens=4)
    assert reg.register_tokens.shape == (1, 4, 64)
    assert reg.interpolate_offset == 0.0 and reg.interpolate_antialias  # the register release's resize
    explicit = build_backbone("vit_test", num_register_tokens=2, interpolate_offset=0.1, interpolate_antialias=False)
    assert explicit.interpolate_offset == 0.1 and not explicit.interpolate_antialias
    with pytest.raises(TypeError, match="bogus"):
        build_backbone("vit_test", bogus=1)
    with pytest.raises(KeyError, match="vit_huge"):
        build_backbone("vit_huge")
    with pytest.raises(ValueError, match="num_heads"):
        build_backbone("vit_test", num_heads=3)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        build_backbone("vit_test")(torch.randn(1, 3, 30, 28))
    with torch.device("meta"):
        g = build_official_backbone("dinov2_vitg14_reg")
    assert g.cfg.ffn_layer == "swiglu" and g.num_register_tokens == 4 and g.interpolate_antialias


def test_backbone_from_config():
    from components.config import ModelConfig

    model = backbone_from_config(ModelConfig(arch="vit_test", patch_size=16, img_size=224, drop_path_rate=0.2))
    assert model.patch_size == 16 and model.cfg.ffn_layer == "mlp" and model.blocks[0].drop_path_rate == 0.2
    assert model.pos_embed.shape == (1, 1 + 14 * 14, 64) and model.interpolate_offset == 0.1
    cfg = ModelConfig(
        arch="vit_test", ffn_layer="swiglu", num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True
    )
    model = backbone_from_config(cfg)
    assert model.cfg.ffn_layer == "swiglu" and model.num_register_tokens == 4 and model.interpolate_antialias


def test_non_square_shapes_and_intermediate_layers():
    model = build_backbone("vit_test", num_register_tokens=2).eval()
    x = torch.randn(3, 3, 42, 70)  # a 3 x 5 patch grid
    f = model.forward_features(x)
    assert f["x_norm_clstoken"].shape == (3, 64)
    assert f["x_norm_regtokens"].shape == (3, 2, 64)
    assert f["x_norm_patchtokens"].shape == (3, 15, 64)
    assert f["x_prenorm"].shape == (3, 18, 64)
    maps = model.get_intermediate_layers(x, n=2, reshape=True)
    assert len(maps) == 2 and maps[0].shape == (3, 64, 3, 5)
    last, cls = model.get_intermediate_layers(x, n=[1], return_class_token=True)[0]
    torch.testing.assert_close(last, f["x_norm_patchtokens"])
    torch.testing.assert_close(cls, f["x_norm_clstoken"])
    # the feature map keeps the image's row-major patch order
    torch.testing.assert_close(maps[1].flatten(2).transpose(1, 2), f["x_norm_patchtokens"])
    with pytest.raises(ValueError, match="blocks"):
        model.get_intermediate_layers(x, n=[5])


def test_forward_features_list_matches_separate_calls():
    model = build_backbone("vit_test").eval()
    crops = [torch.randn(2, 3, 28, 28), torch.randn(4, 3, 14, 14)]
    masks = [torch.tensor([[True, False, False, True], [False] * 4]), None]
    outs = model.forward_features(crops, masks)
    assert isinstance(outs, list) and len(outs) == 2
    for out, x, m in zip(outs, crops, masks, strict=True):
        ref = model.forward_features(x, m)
        for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(out[key], ref[key])
        assert out["masks"] is m
    assert model.forward_features(crops)[1]["x_norm_patchtokens"].shape == (4, 1, 64)


def test_mask_token_replaces_masked_patches():
    model = build_backbone("vit_test").eval()
    x = torch.randn(1, 3, 28, 28)
    all_masked = torch.ones(1, 4, dtype=torch.bool)
    a = model.forward_features(x, all_masked)["x_norm_clstoken"]
    b = model.forward_features(torch.randn(1, 3, 28, 28), all_masked)["x_norm_clstoken"]
    torch.testing.assert_close(a, b)  # nothing of the image is left


def test_efficient_stochastic_depth_runs_branch_on_subset():
    torch.manual_seed(0)
    x = torch.zeros(10, 3, 4)
    seen = []

    def branch(sub):
        seen.append(sub.shape[0])
        return torch.ones_like(sub)

    out = drop_add_residual_subset(x, branch, rate=0.4)
    assert seen == [6]  # int(10 * 0.6) samples go through the branch
    per_sample = out.flatten(1)
    changed = per_sample.abs().sum(1) > 0
    assert changed.sum() == 6
    torch.testing.assert_close(per_sample[changed], torch.full((6, 12), 10 / 6))


def test_training_with_drop_path_differs_and_backpropagates():
    torch.manual_seed(0)
    for rate in (0.05, 0.4):  # the per-sample path and the subset path
        model = build_backbone("vit_test", drop_path_rate=rate, layerscale_init=1.0)
        x = torch.randn(8, 3, 28, 28)
        model.train()
        out = model.forward_features(x)["x_norm_clstoken"]
        out.sum().backward()
        assert all(p.grad is not None for p in model.blocks.parameters())
        model.eval()
        with torch.no_grad():
            assert not torch.allclose(model(x), out.detach())
