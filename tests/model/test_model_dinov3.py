"""DINOv3 ViT backbones: features equal to the release's, RoPE / masked key bias / untied norms against their
formulas, the released key layout loaded strictly, training-time RoPE augmentations, and the ONNX round trip.

The fixture `dinov3_release_features.pt` holds outputs of the DINOv3 release (facebookresearch/dinov3), recorded by a
script kept outside this project: it built each backbone with the release's own Torch Hub builder
(`dinov3.hub.backbones.dinov3_vits16`, `dinov3_vits16plus`, `dinov3_vit7b16` with `pretrained=False`, their
arguments as released, then depth 2 and for the 7B width 80 with 2 heads substituted), loaded the weights that
`seeded_weights` below builds from the seed (the release's buffers kept), and saved, in float32 on the CPU: the
inputs (float16 values), per-key checksums of the weights, `forward_features` on a non-square batch without and with
masks, `get_intermediate_layers(x, n=2, reshape=True, return_class_token=True, return_extra_tokens=True)`, the
7B's training-mode `forward_features([global crops, local crops], [masks, None])` after `torch.manual_seed(7)` (its
RoPE rescale draws and untied local-crop CLS norm), and the release's `RopePositionEmbedding` tables of a 3 x 5 grid
for `max` / `min` normalisation and min/max periods. Only those numbers are stored, not the release's code.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from components.model import (
    OFFICIAL_MODELS,
    PRESETS,
    CheckpointError,
    DINOHead,
    DinoV3VisionTransformer,
    build_backbone,
    build_official_backbone,
    checkpoint_family,
    checkpoint_geometry,
    get_preset,
    load_official_weights,
    official_file_name,
    official_state_dict,
    save_official_weights,
)
from components.model.adapter import (
    check_official_weights,
    load_official_heads,
    normalize_heads_state,
    official_key_map,
)
from components.model.rope import RopePositionEmbedding, apply_rope
from components.model.vit_dinov3 import LinearKMaskedBias

FIXTURE = Path(__file__).with_name("dinov3_release_features.pt")
HUB = {"vits16": "dinov3_vits16", "vits16plus": "dinov3_vits16plus", "vit7b16": "dinov3_vit7b16"}
FEATURES = ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm")


@pytest.fixture(scope="module")
def release():
    return torch.load(FIXTURE, weights_only=True)


def seeded_weights(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Distinctive weights for every key of `state` (sorted order, one generator): LayerScale near 0.5, norms near 1,
    weights scaled by 1 / sqrt(fan-in), biases and tokens of a visible size; the buffers (RoPE periods, key-bias
    masks) as given. The fixture's recording script builds the release's weights with this same function."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(state):
        t = state[key]
        if key.endswith(("bias_mask", "periods")):
            out[key] = t.clone()
            continue
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if key.endswith(".gamma"):
            out[key] = 0.5 + 0.1 * noise
        elif key.endswith(".weight") and t.dim() == 1:
            out[key] = 1.0 + 0.1 * noise
        elif key.endswith(".weight"):
            out[key] = noise / math.sqrt(math.prod(t.shape[1:]))
        elif key.endswith(".bias"):
            out[key] = 0.1 * noise
        else:  # CLS, storage and mask tokens
            out[key] = 0.5 * noise
    return out


def release_model(release, name: str) -> DinoV3VisionTransformer:
    """Our backbone of the recorded release model, with the recorded weights loaded strictly."""
    rec = release[name]
    model = build_official_backbone(HUB[name], **rec["overrides"])
    state = seeded_weights(official_state_dict(model), rec["seed"])
    keys, sums = rec["checksums"]
    assert sorted(state) == keys  # the release's key layout, key for key
    ours = torch.tensor([[v.double().sum().item(), v.double().abs().sum().item()] for _, v in sorted(state.items())])
    torch.testing.assert_close(ours, sums, rtol=1e-9, atol=1e-9)  # the recorded weights, value for value
    return load_official_weights(model, state).eval()


# --------------------------------------------------------------------------------------------------------------------
# (a) The release's features
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HUB))
def test_features_equal_the_release(release, name):
    model, rec = release_model(release, name), release[name]
    out, b = rec["outputs"], rec["batch"]
    x, masks = release["inputs"]["x"].float()[:b], release["inputs"]["masks"][:b]  # a 2 x 3 patch grid
    with torch.no_grad():
        f = model.forward_features(x)
        masked = model.forward_features(x, masks)
        layers = model.get_intermediate_layers(
            x, n=2, reshape=True, return_class_token=True, return_extra_tokens=True, norm=True
        )
        (raw,) = model.get_intermediate_layers(x, n=[1], norm=False)
    for key in FEATURES:
        torch.testing.assert_close(f[key], out[f"features.{key}"], atol=1e-4, rtol=0)
    for key in ("x_norm_clstoken", "x_norm_patchtokens"):
        torch.testing.assert_close(masked[key], out[f"masked.{key}"], atol=1e-4, rtol=0)
    assert not torch.allclose(masked["x_norm_clstoken"], f["x_norm_clstoken"], atol=1e-3)  # the masks mattered
    patches, cls, extra = layers[0]
    assert patches.shape == (b, model.embed_dim, 2, 3)
    torch.testing.assert_close(patches, out["layers.0.patches"], atol=1e-4, rtol=0)
    torch.testing.assert_close(cls, out["layers.0.cls"], atol=1e-4, rtol=0)
    torch.testing.assert_close(extra, out["layers.0.extra"], atol=1e-4, rtol=0)
    last_map, last_cls, last_extra = layers[1]  # the last block's entry is the release's features
    torch.testing.assert_close(
        last_map.flatten(2).transpose(1, 2), out["features.x_norm_patchtokens"], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(last_cls, out["features.x_norm_clstoken"], atol=1e-4, rtol=0)
    torch.testing.assert_close(last_extra, out["features.x_storage_tokens"], atol=1e-4, rtol=0)
    torch.testing.assert_close(raw, out["features.x_prenorm"][:, 5:], atol=1e-4, rtol=0)


def test_7b_layout_training_list_forward_equals_the_release(release):
    """Training mode: RoPE coordinates rescaled per block and crop batch (the same draws as the release after the
    same seed) and the local crops' CLS and storage tokens through the untied `local_cls_norm`."""
    model, out = release_model(release, "vit7b16").train(), release["vit7b16"]["outputs"]
    assert model.cfg.ffn_layer == "swiglu64" and model.blocks[0].mlp.w1.weight.shape == (192, 80)  # 160 -> 192
    assert model.local_cls_norm is not None and model.blocks[0].attn.qkv.bias is None
    inputs = release["inputs"]
    crops = [inputs["global"].float(), inputs["local"].float()]  # 3 x 2 and 1 x 2 patch grids
    torch.manual_seed(7)
    with torch.no_grad():
        outs = model.forward_features(crops, [inputs["global_masks"], None])
    for i, o in enumerate(outs):
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens"):
            torch.testing.assert_close(o[key], out[f"train.{i}.{key}"], atol=1e-4, rtol=0)
    with torch.no_grad():  # the same crops in eval mode: no rescale draws, the global norm for every crop
        evaluated = model.eval().forward_features(crops, [inputs["global_masks"], None])
    assert not torch.allclose(evaluated[1]["x_norm_clstoken"], outs[1]["x_norm_clstoken"], atol=1e-3)


@pytest.mark.parametrize("label", ["max", "min", "periods"])
def test_rope_tables_equal_the_release(release, label):
    rec = release["rope"][label]
    rope = RopePositionEmbedding(64, num_heads=2, **rec["kwargs"]).eval()
    torch.testing.assert_close(rope.periods, rec["periods"], atol=0, rtol=1e-6)
    sin, cos = rope(H=3, W=5)
    torch.testing.assert_close(sin, rec["sin"], atol=1e-6, rtol=0)
    torch.testing.assert_close(cos, rec["cos"], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# (b) RoPE, the masked key bias and the untied norms against their formulas
# --------------------------------------------------------------------------------------------------------------------


def test_rope_rotation_against_its_formula():
    """Patch (r, c) of an H x W grid: y = 2 (r + 0.5) / H - 1, x = 2 (c + 0.5) / W - 1; period j of d_h / 4 is
    100^(4 j / d_h); channel i < d_h / 2 pairs with i + d_h / 2 and turns by 2 pi y / period_i (i < d_h / 4) or
    2 pi x / period_(i - d_h / 4); the CLS and storage tokens are not turned."""
    H, W, d, heads, prefix = 3, 5, 16, 2, 5
    rope = RopePositionEmbedding(d * heads, num_heads=heads).eval()
    torch.manual_seed(0)
    q, k = torch.randn(2, heads, prefix + H * W, d), torch.randn(2, heads, prefix + H * W, d)
    q_rot, k_rot = apply_rope(q, k, rope(H=H, W=W))
    periods = [100.0 ** (4 * j / d) for j in range(d // 4)]
    torch.testing.assert_close(rope.periods, torch.tensor(periods), rtol=1e-6, atol=0)
    expected = q.clone()
    for r in range(H):
        for c in range(W):
            n = prefix + r * W + c
            y, x = 2 * (r + 0.5) / H - 1, 2 * (c + 0.5) / W - 1
            for i in range(d // 2):
                angle = 2 * math.pi * (y if i < d // 4 else x) / periods[i % (d // 4)]
                a, b = q[:, :, n, i], q[:, :, n, i + d // 2]
                expected[:, :, n, i] = a * math.cos(angle) - b * math.sin(angle)
                expected[:, :, n, i + d // 2] = a * math.sin(angle) + b * math.cos(angle)
    torch.testing.assert_close(q_rot, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(k_rot[:, :, :prefix], k[:, :, :prefix])  # prefix tokens untouched
    # RoPE makes q . k depend on the offset between the two patches only (one axis: a 1 x W grid)
    line = RopePositionEmbedding(d * heads, num_heads=heads).eval()
    sin, cos = line(H=1, W=8)
    v = torch.randn(1, 1, 1, d)
    rq, _ = apply_rope(v.expand(1, 1, 8, d), v.expand(1, 1, 8, d), (sin, cos))
    dots = (rq[0, 0] @ rq[0, 0].T).diagonal(offset=2)  # q at c, k at c + 2, for every c
    torch.testing.assert_close(dots, dots[:1].expand_as(dots), atol=1e-5, rtol=1e-5)


def test_rope_dtype_and_validation():
    rope = RopePositionEmbedding(64, num_heads=2).eval()  # float32 tables, as released
    q = torch.randn(1, 2, 7, 32, dtype=torch.bfloat16)
    q_rot, _ = apply_rope(q, q, rope(H=2, W=3))
    expected, _ = apply_rope(q.float(), q.float(), rope(H=2, W=3))
    assert q_rot.dtype == torch.bfloat16
    torch.testing.assert_close(q_rot, expected.bfloat16())  # rotated in float32, then cast back
    with pytest.raises(ValueError, match="base"):
        RopePositionEmbedding(64, num_heads=2, base=100.0, min_period=1.0, max_period=10.0)
    with pytest.raises(ValueError, match="divisible by 4"):
        RopePositionEmbedding(60, num_heads=2)
    with pytest.raises(ValueError, match="normalize_coords"):
        RopePositionEmbedding(64, num_heads=2, normalize_coords="bogus")  # type: ignore[arg-type]


def test_masked_key_bias_against_its_definition():
    torch.manual_seed(0)
    D = 8
    layer = LinearKMaskedBias(D, 3 * D)
    with torch.no_grad():
        layer.bias.normal_()
    assert "bias_mask" in layer.state_dict()  # a persistent buffer, as in the released files
    x = torch.randn(4, D)
    q_bias, v_bias = layer.bias[:D], layer.bias[2 * D :]
    expected = x @ layer.weight.T + torch.cat((q_bias, torch.zeros(D), v_bias))  # no bias on the keys
    torch.testing.assert_close(layer(x), expected)
    assert LinearKMaskedBias(D, 3 * D, bias=False).bias_mask is None  # the 7B: no bias, no mask
    model = build_backbone("dinov3_vit_test")
    assert torch.equal(model.blocks[1].attn.qkv.bias_mask, torch.cat((torch.ones(64), torch.zeros(64), torch.ones(64))))


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm, eps: float) -> torch.Tensor:
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * norm.weight + norm.bias


def test_untied_norms_against_their_formula():
    torch.manual_seed(0)
    model = build_backbone("dinov3_vit_test", untie_cls_and_patch_norms=True, untie_global_and_local_cls_norm=True)
    with torch.no_grad():
        for norm in (model.norm, model.cls_norm, model.local_cls_norm):
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
    crops, eps = [torch.randn(2, 3, 32, 48), torch.randn(3, 3, 16, 16)], 1e-5  # `layernormbf16`: eps 1e-5
    assert model.norm.eps == eps
    model.train()
    torch.manual_seed(1)
    train = model.forward_features(crops)
    model.eval()
    evaluated = model.forward_features(crops)
    for i, f in enumerate(train):
        prefix, patches = f["x_prenorm"][:, :5], f["x_prenorm"][:, 5:]
        cls_norm = model.local_cls_norm if i == 1 else model.cls_norm  # local crops: the local norm, in training
        expected = _layer_norm(prefix, cls_norm, eps)
        torch.testing.assert_close(f["x_norm_clstoken"], expected[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f["x_storage_tokens"], expected[:, 1:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f["x_norm_patchtokens"], _layer_norm(patches, model.norm, eps), atol=1e-5, rtol=1e-5)
    for f in evaluated:  # never the local norm at inference
        expected = _layer_norm(f["x_prenorm"][:, 0], model.cls_norm, eps)
        torch.testing.assert_close(f["x_norm_clstoken"], expected, atol=1e-5, rtol=1e-5)
    # get_intermediate_layers normalises CLS and storage tokens with the CLS norm, the patches with `norm`
    layers = model.get_intermediate_layers(crops[0], return_class_token=True, return_extra_tokens=True)
    patches, cls, extra = layers[0]
    torch.testing.assert_close(cls, evaluated[0]["x_norm_clstoken"])
    torch.testing.assert_close(extra, evaluated[0]["x_storage_tokens"])
    torch.testing.assert_close(patches, evaluated[0]["x_norm_patchtokens"])


def test_rmsnorm_and_norm_epsilons():
    model = build_backbone("dinov3_vit_test", norm_layer="rmsnorm")
    x = torch.randn(2, 5, 64)
    norm = model.norm
    with torch.no_grad():
        norm.weight.normal_()
    torch.testing.assert_close(norm(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight)
    assert "norm.bias" not in official_state_dict(model)
    assert build_backbone("dinov3_vit_test", norm_layer="layernorm").blocks[0].norm1.eps == 1e-6


@pytest.mark.parametrize(
    ("name", "hidden"),
    [
        ("dinov3_vits16", 1536),  # MLP 4 x 384
        ("dinov3_vits16plus", 1536),  # SwiGLU int(2/3 x 6 x 384), a multiple of 8
        ("dinov3_vitl16plus", 4096),
        ("dinov3_vith16plus", 5120),
        ("dinov3_vit7b16", 8192),  # SwiGLU int(2/3 x 3 x 4096), a multiple of 64
    ],
)
def test_released_feed_forward_widths(name, hidden):
    assert get_preset(name).config.ffn_hidden_dim == hidden


def test_swiglu_alignment():
    for ffn, hidden in (("swiglu", 160), ("swiglu32", 160), ("swiglu64", 192), ("swiglu128", 256)):
        model = build_backbone("dinov3_vit_test", embed_dim=80, ffn_layer=ffn, ffn_ratio=3.0)  # int(2/3 x 240) = 160
        assert model.blocks[0].mlp.w1.weight.shape == (hidden, 80), ffn
        assert model.blocks[0].mlp.w3.weight.shape == (80, hidden)


# --------------------------------------------------------------------------------------------------------------------
# (c) The released key layout, strictly
# --------------------------------------------------------------------------------------------------------------------


RELEASED = {  # the release's builder arguments: width, depth, heads, feed-forward, ratio, qkv bias, local CLS norm
    "dinov3_vits16": (384, 12, 6, "mlp", 4, True, False),
    "dinov3_vits16plus": (384, 12, 6, "swiglu", 6, True, False),
    "dinov3_vitb16": (768, 12, 12, "mlp", 4, True, False),
    "dinov3_vitl16": (1024, 24, 16, "mlp", 4, True, False),
    "dinov3_vitl16plus": (1024, 24, 16, "swiglu", 6, True, False),
    "dinov3_vith16plus": (1280, 32, 20, "swiglu", 6, True, False),
    "dinov3_vit7b16": (4096, 40, 32, "swiglu64", 3, False, True),
}


def expected_layout(
    dim: int, depth: int, heads: int, ffn: str, ratio: int, qkv_bias: bool, local_norm: bool, storage: int = 4
) -> dict[str, tuple[int, ...]]:
    """A DINOv3 ViT's keys and shapes in the release's layout, written out from the release (not from our model)."""
    hidden = dim * ratio
    if ffn != "mlp":
        align = 64 if ffn == "swiglu64" else 8
        hidden = -(-int(hidden * 2 / 3) // align) * align
    layout = {
        "cls_token": (1, 1, dim),
        "storage_tokens": (1, storage, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 16, 16),
        "patch_embed.proj.bias": (dim,),
        "rope_embed.periods": (dim // heads // 4,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    if local_norm:
        layout |= {"local_cls_norm.weight": (dim,), "local_cls_norm.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        layout |= {
            b + "norm1.weight": (dim,),
            b + "norm1.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim),
            b + "attn.proj.weight": (dim, dim),
            b + "attn.proj.bias": (dim,),
            b + "ls1.gamma": (dim,),
            b + "norm2.weight": (dim,),
            b + "norm2.bias": (dim,),
            b + "ls2.gamma": (dim,),
        }
        if qkv_bias:
            layout |= {b + "attn.qkv.bias": (3 * dim,), b + "attn.qkv.bias_mask": (3 * dim,)}
        if ffn == "mlp":
            layout |= {b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc1.bias": (hidden,)}
            layout |= {b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc2.bias": (dim,)}
        else:
            for w in ("w1", "w2"):
                layout |= {b + f"mlp.{w}.weight": (hidden, dim), b + f"mlp.{w}.bias": (hidden,)}
            layout |= {b + "mlp.w3.weight": (dim, hidden), b + "mlp.w3.bias": (dim,)}
    if storage == 0:
        del layout["storage_tokens"]
    return layout


def layout_of(model: DinoV3VisionTransformer) -> dict[str, tuple[int, ...]]:
    """Our model's released-layout keys and shapes (works on the meta device)."""
    ours = model.state_dict()
    return {official: tuple(ours[name].shape) for official, name in official_key_map(model).items()}


def release_state(layout: dict[str, tuple[int, ...]], heads: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights of a layout, with the release's buffers from their definitions: the key-bias mask (1 on q and
    v, 0 on k) and the RoPE periods 100^(4 j / d_h)."""
    state = {}
    for key, shape in layout.items():
        if key.endswith("bias_mask"):
            d = shape[0] // 3
            state[key] = torch.cat((torch.ones(d), torch.zeros(d), torch.ones(d)))
        elif key.endswith("periods"):
            d_h = 4 * shape[0]
            state[key] = torch.tensor([100.0 ** (4 * j / d_h) for j in range(shape[0])])
        else:
            state[key] = torch.zeros(shape)
    return seeded_weights(state, seed)


@pytest.mark.parametrize("name", [n for n in OFFICIAL_MODELS if n.startswith("dinov3_vit")])
def test_released_layouts_and_sizes(name):
    """Every released ViT at full size on the meta device: exactly the release's keys and shapes and its size."""
    with torch.device("meta"):
        model = build_official_backbone(name)
    assert layout_of(model) == expected_layout(*RELEASED[name])
    released_m = {"dinov3_vits16": 21, "dinov3_vits16plus": 29, "dinov3_vitb16": 86, "dinov3_vitl16": 300,
                  "dinov3_vith16plus": 840, "dinov3_vit7b16": 6716}  # fmt: skip  # the release's table
    if name in released_m:
        n = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(n - released_m[name]) / released_m[name] < 0.03  # 21.6M is the release's "21M"
    assert official_file_name(name).startswith(f"{name}_pretrain_lvd1689m-")


def test_a_release_layout_state_dict_loads_strictly_and_round_trips(tmp_path):
    state = release_state(expected_layout(64, 2, 2, "mlp", 4, True, False, storage=2), heads=2, seed=5)
    model = load_official_weights(build_backbone("dinov3_vit_test", n_storage_tokens=2), state)
    for key, value in official_state_dict(model).items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(1, 3, 48, 32)
    for suffix in (".pth", ".safetensors"):
        path = save_official_weights(model, tmp_path / f"dinov3{suffix}")
        again = load_official_weights(build_backbone("dinov3_vit_test", n_storage_tokens=2), path)
        with torch.no_grad():
            torch.testing.assert_close(again.eval()(x), model.eval()(x), rtol=0, atol=0)
    seven = release_state(expected_layout(80, 2, 2, "swiglu64", 3, False, True), heads=2, seed=6)
    load_official_weights(build_official_backbone("dinov3_vit7b16", embed_dim=80, num_heads=2, depth=2), seven)


@pytest.mark.parametrize(
    "overrides",
    [
        {"layerscale_init": None, "norm_layer": "rmsnorm"},
        {"qkv_bias": False, "untie_cls_and_patch_norms": True, "n_storage_tokens": 0},
        {
            "mask_k_bias": False,
            "ffn_layer": "swiglu128",
            "rope_base": None,
            "rope_min_period": 0.5,
            "rope_max_period": 9.0,
        },
    ],
)
def test_every_option_round_trips_strictly(overrides):
    torch.manual_seed(0)
    src = build_backbone("dinov3_vit_test", **overrides).eval()
    dst = load_official_weights(build_backbone("dinov3_vit_test", **overrides), official_state_dict(src)).eval()
    x = torch.randn(2, 3, 16, 48)
    with torch.no_grad():
        torch.testing.assert_close(dst.forward_features(x)["x_prenorm"], src.forward_features(x)["x_prenorm"])
    geometry = checkpoint_geometry(official_state_dict(src))  # what the file fixes, on the plain preset
    check_official_weights(build_backbone("dinov3_vit_test", **geometry), official_state_dict(src))


def test_misfits_name_the_key_and_both_shapes():
    model = build_backbone("dinov3_vit_test")
    state = official_state_dict(build_backbone("dinov3_vit_test"))
    bad = dict(state, **{"blocks.1.mlp.fc1.weight": torch.zeros(100, 64)})
    with pytest.raises(
        CheckpointError, match=r"shape mismatch for 'blocks\.1\.mlp\.fc1\.weight'.*\[100, 64\].*\[256, 64\]"
    ):
        load_official_weights(model, bad)
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.0\.attn\.qkv\.bias_mask'"):
        load_official_weights(model, {k: v for k, v in state.items() if k != "blocks.0.attn.qkv.bias_mask"})
    with pytest.raises(CheckpointError, match=r"unexpected key 'local_cls_norm\.weight'"):
        load_official_weights(model, dict(state, **{"local_cls_norm.weight": torch.ones(64)}))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'storage_tokens'.*\[1, 2, 64\].*\[1, 4, 64\]"):
        load_official_weights(model, official_state_dict(build_backbone("dinov3_vit_test", n_storage_tokens=2)))
    with pytest.raises(CheckpointError, match=r"a dinov2 checkpoint for a dinov3_vit backbone"):
        load_official_weights(model, official_state_dict(build_backbone("vit_test")))
    with pytest.raises(CheckpointError, match=r"a dinov3_vit checkpoint for a dinov2 backbone"):
        load_official_weights(build_backbone("vit_test"), state)


def test_training_checkpoints_of_the_release():
    """{"teacher": ...} (`teacher_checkpoint.pth`), a flat student + teacher model state, DDP prefixes; the heads and
    the losses' centres are dropped, the teacher wins."""
    src = build_backbone("dinov3_vit_test")
    sd = official_state_dict(src)
    heads = {"dino_head.mlp.0.weight": torch.zeros(8, 64), "ibot_head.last_layer.weight": torch.zeros(16, 8)}

    def check(checkpoint):
        dst = load_official_weights(build_backbone("dinov3_vit_test"), checkpoint)
        assert all(torch.equal(v, sd[k]) for k, v in official_state_dict(dst).items())

    check({"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, **heads}})
    flat = {f"teacher.backbone.{k}": v for k, v in sd.items()} | {f"teacher.{k}": v for k, v in heads.items()}
    flat |= {f"student.backbone.{k}": torch.zeros_like(v) for k, v in sd.items()}
    flat |= {"dino_loss.center": torch.full((1, 8), math.nan), "ibot_patch_loss.center": torch.zeros(1, 1, 16)}
    check({"model": flat})
    check({f"module.{k}": v for k, v in sd.items()})
    assert checkpoint_family({"model": flat}) == "dinov3_vit"
    assert checkpoint_family(official_state_dict(build_backbone("vit_test"))) == "dinov2"
    with pytest.raises(CheckpointError, match="not a backbone of a known family"):
        checkpoint_family({"foo.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("dinov3_vits16", {}),
        ("dinov3_vits16plus", {}),
        ("dinov3_vit7b16", {}),
        ("dinov3_vitl16", {"untie_global_and_local_cls_norm": True}),  # the SAT-493M ViT-L's file
        ("dinov3_vitb16", {"norm_layer": "rmsnorm", "n_storage_tokens": 0, "patch_size": 8}),
    ],
)
def test_geometry_comes_from_the_file(name, overrides):
    with torch.device("meta"):
        model = build_official_backbone(name, depth=1, **overrides)
        state = {k: model.state_dict()[v] for k, v in official_key_map(model).items()}  # meta tensors: shapes only
        geometry = checkpoint_geometry({"teacher": {f"backbone.{k}": v for k, v in state.items()}})
        rebuilt = build_official_backbone(name, depth=1, **geometry)
        check_official_weights(rebuilt, state)  # the file's shapes, key for key
    assert geometry["qkv_bias"] == (name != "dinov3_vit7b16")
    untied = name == "dinov3_vit7b16" or "untie_global_and_local_cls_norm" in overrides
    assert geometry["untie_global_and_local_cls_norm"] == untied
    assert geometry["patch_size"] == overrides.get("patch_size", 16)
    assert geometry["n_storage_tokens"] == overrides.get("n_storage_tokens", 4)
    assert rebuilt.cfg.ffn_hidden_dim == get_preset(name).config.ffn_hidden_dim


def test_release_heads_read_as_the_same_function():
    """DINOv3's heads have plain prototypes W: read as weight_v = W, weight_g = ||W_k||, the logits are W x; our
    format-1 exports keep g = 1; NaN centres (never set under Sinkhorn-Knopp centring) are left out."""
    torch.manual_seed(0)
    mlp = {"mlp.0.weight": torch.randn(32, 64) * 0.1, "mlp.0.bias": torch.randn(32) * 0.1}
    mlp |= {"mlp.2.weight": torch.randn(32, 32) * 0.1, "mlp.2.bias": torch.randn(32) * 0.1}
    mlp |= {"mlp.4.weight": torch.randn(16, 32) * 0.1, "mlp.4.bias": torch.randn(16) * 0.1}
    W = torch.randn(40, 16) * 0.3  # prototypes of rows with different norms
    teacher = {f"teacher.dino_head.{k}": v for k, v in mlp.items()} | {"teacher.dino_head.last_layer.weight": W}
    student = {f"student.dino_head.{k}": torch.zeros_like(v) for k, v in mlp.items()}
    checkpoint = {"model": {**teacher, **student, "dino_loss.center": torch.full((1, 40), math.nan)}}
    found = normalize_heads_state(checkpoint)
    assert found.centers == {}
    torch.testing.assert_close(found.heads["dino_head"]["last_layer.weight_g"], W.norm(dim=1, keepdim=True))
    head = DINOHead(64, 40, nlayers=3, hidden_dim=32, bottleneck_dim=16)
    load_official_heads({"dino_head": head}, checkpoint)
    x = torch.randn(5, 64)
    h = F.gelu(F.linear(x, mlp["mlp.0.weight"], mlp["mlp.0.bias"]))
    h = F.gelu(F.linear(h, mlp["mlp.2.weight"], mlp["mlp.2.bias"]))
    z = F.normalize(F.linear(h, mlp["mlp.4.weight"], mlp["mlp.4.bias"]), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(head(x), z @ W.T)  # the release's DINOHead.forward
    legacy = normalize_heads_state({"format": 1, "dino_head": {**mlp, "last_layer.weight": W}})
    assert torch.equal(legacy.heads["dino_head"]["last_layer.weight_g"], torch.ones(40, 1))


# --------------------------------------------------------------------------------------------------------------------
# (d) Training-time RoPE augmentations; shapes, API and presets
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("augmentation", ["rope_shift_coords", "rope_jitter_coords", "rope_rescale_coords"])
def test_coordinate_augmentations_only_in_training(augmentation):
    torch.manual_seed(0)
    overrides = {"rope_rescale_coords": None, augmentation: 2.0 if augmentation != "rope_shift_coords" else 0.5}
    model = build_backbone("dinov3_vit_test", layerscale_init=1.0, **overrides)
    plain = build_backbone("dinov3_vit_test", layerscale_init=1.0, rope_rescale_coords=None)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ref = plain.train()(x)  # no augmentation: training mode computes the eval function (no drop path)
        torch.testing.assert_close(model.eval()(x), ref)
        torch.testing.assert_close(model.eval()(x), ref)
        trained = model.train()(x)
        again = model.train()(x)
    assert not torch.allclose(trained, ref, atol=1e-4) and not torch.allclose(trained, again, atol=1e-4)
    sin, cos = model.rope_embed.eval()(H=2, W=3)
    torch.testing.assert_close(sin, plain.rope_embed.eval()(H=2, W=3)[0])  # the same tables at inference


def test_any_multiple_of_the_patch_and_the_api():
    model = build_backbone("dinov3_vit_test").eval()
    x = torch.randn(3, 3, 48, 80)  # a 3 x 5 patch grid, no interpolation anywhere
    f = model.forward_features(x)
    assert f["x_norm_clstoken"].shape == (3, 64) and f["x_storage_tokens"].shape == (3, 4, 64)
    assert f["x_norm_patchtokens"].shape == (3, 15, 64) and f["x_prenorm"].shape == (3, 20, 64) and f["masks"] is None
    torch.testing.assert_close(model(x), f["x_norm_clstoken"])
    assert model(x, is_training=True)["x_norm_patchtokens"].shape == (3, 15, 64)
    only = model.get_intermediate_layers(x, n=[0, 1])
    assert len(only) == 2 and only[1].shape == (3, 15, 64)
    patches, extra = model.get_intermediate_layers(x, return_extra_tokens=True)[0]
    torch.testing.assert_close(extra, f["x_storage_tokens"])
    with pytest.raises(ValueError, match="blocks"):
        model.get_intermediate_layers(x, n=[7])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 40, 48))
    assert (model.patch_size, model.n_blocks, model.num_heads, model.num_register_tokens) == (16, 2, 2, 4)
    assert model.n_storage_tokens == 4 and model.embed_dim == model.num_features == 64 and len(model.blocks) == 2


def test_list_input_masks_and_packed_crops():
    torch.manual_seed(0)
    model = build_backbone("dinov3_vit_test", layerscale_init=1.0).eval()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(4, 3, 16, 32)]
    masks = [torch.tensor([[True, False, False, True], [False] * 4]), None]
    outs = model.forward_features(crops, masks)
    for out, x, m in zip(outs, crops, masks, strict=True):
        ref = model.forward_features(x, m)
        for key in FEATURES:
            torch.testing.assert_close(out[key], ref[key])
        assert out["masks"] is m
    model.pack_crops = True
    packed = model.forward_features(crops, masks)
    for out, ref in zip(packed, outs, strict=True):
        torch.testing.assert_close(out["x_prenorm"], ref["x_prenorm"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="2 image batches but 1 masks"):
        model.forward_features(crops, masks[:1])


def test_training_with_drop_path_backpropagates():
    torch.manual_seed(0)
    model = build_backbone("dinov3_vit_test", drop_path_rate=0.3, layerscale_init=1.0).train()
    crops = [torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)]
    masks = [torch.rand(4, 4) < 0.5, None]
    outs = model.forward_features(crops, masks)
    sum(o["x_norm_clstoken"].sum() + o["x_norm_patchtokens"].sum() for o in outs).backward()
    assert all(p.grad is not None for p in model.blocks.parameters())
    assert model.blocks[0].attn.qkv.bias.grad[64:128].abs().max() == 0  # the keys' bias gets no gradient


def test_presets_builders_and_initialisation():
    dinov3 = [n for n, p in PRESETS.items() if p.family == "dinov3_vit"]
    assert set(dinov3) == {"dinov3_vit_test", *(n for n in OFFICIAL_MODELS if n.startswith("dinov3_vit"))}
    for name in dinov3:
        p = get_preset(name)
        assert p.patch_size == 16 and p.eval_crop == 224 and p.mean == (0.485, 0.456, 0.406)
    model = build_official_backbone("dinov3_vitl16", embed_dim=64, depth=3, num_heads=4)
    assert (model.embed_dim, model.n_blocks, model.num_heads, model.rope_embed.periods.shape) == (64, 3, 4, (4,))
    with pytest.raises(TypeError, match="bogus"):
        build_official_backbone("dinov3_vits16", bogus=1)
    with pytest.raises(TypeError, match="num_register_tokens"):
        build_backbone("dinov3_vit_test", num_register_tokens=4)
    with pytest.raises(KeyError, match="dinov3_vitg16"):
        build_official_backbone("dinov3_vitg16")
    with pytest.raises(KeyError, match="sat493m"):
        official_file_name("dinov3_vits16", "sat493m")
    assert official_file_name("dinov3_vitl16", "sat493m") == "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    with pytest.raises(ValueError, match="multiple of 4"):
        build_backbone("dinov3_vit_test", num_heads=32)  # a head width of 2: no room for two axes and two halves
    torch.manual_seed(0)
    big = build_backbone("dinov3_vit_test", embed_dim=256, num_heads=4)  # the release's initialisation
    assert 0.015 < big.cls_token.std() < 0.025 and big.mask_token.abs().max() == 0
    assert torch.equal(big.blocks[0].ls1.gamma, torch.full((256,), 1e-5))
    assert 0.019 < big.blocks[0].attn.qkv.weight.std() < 0.021 and big.blocks[0].mlp.fc1.bias.abs().max() == 0
    assert big.patch_embed.proj.weight.abs().max() <= 1 / math.sqrt(3 * 256)
    torch.testing.assert_close(big.rope_embed.periods, 100.0 ** (torch.arange(16) / 16))


# --------------------------------------------------------------------------------------------------------------------
# (e) ONNX
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_onnx_round_trip(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from components.model import export_onnx
    from components.model.export import output_names

    torch.manual_seed(0)
    model = build_backbone("dinov3_vit_test", layerscale_init=0.5, rope_normalize_coords="max")
    path = export_onnx(model, tmp_path / "dinov3.onnx", example_size=(32, 48))
    assert output_names(model) == ["x_norm_clstoken", "x_norm_patchtokens", "x_storage_tokens"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model.eval()
    for batch, (H, W) in ((2, (32, 48)), (1, (64, 64)), (3, (80, 48))):  # RoPE tables built in the graph
        x = torch.randn(batch, 3, H, W)
        outputs = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            ref = model.forward_features(x)
        for name, value in zip(output_names(model), outputs, strict=True):
            torch.testing.assert_close(torch.from_numpy(value), ref[name], atol=1e-4, rtol=1e-4)
