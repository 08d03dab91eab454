"""DINOv3 ConvNeXt tests: features and intermediate layers equal to the release's, the released key layout of every
preset, strict loading with errors that name the key and both shapes, geometry read back from a file, the
pseudo-patch grid, and the ONNX round trip.

The fixture `dinov3_convnext_reference.pt` was recorded from the release (facebookresearch/dinov3,
`dinov3/models/convnext.py`) by a script outside this repository: `torch.manual_seed(0)`, then
`ConvNeXt(depths=[1, 2, 1, 1], dims=[8, 16, 24, 32], layer_scale_init_value=1e-6, patch_size=16)` and
`init_weights()`; every `gamma` set to U(0.5, 1) and every other 1-d parameter (norms, biases) shifted by
N(0, 0.2^2) so that all of them matter; all parameters and the input `torch.randn(2, 3, 64, 96)` rounded to float16
values (stored as float16, exact in float32). In eval mode and float32 it saved: `forward_features(x)` (keys
`features.*`), `forward_features([x, x[:, :, :32, :64]], [None, None])[1]` (`features_list.1.*`),
`get_intermediate_layers` with the option sets named in `CASES` (`layers.<case>.<k>.patches` / `.cls`), and the
same with `model.patch_size = None` (the release's hub models; `layers.nopatch_n4_norm_reshape_cls.*`), beside the
state dict (`state_dict`, the release's own keys) and the input (`input`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from components.model.adapter import (
    CheckpointError,
    checkpoint_geometry,
    convnext_geometry,
    load_official_weights,
    official_state_dict,
)
from components.model.convnext import CONVNEXT_FILES, CONVNEXT_MODELS, ConvNeXt, build_convnext, convnext_config

FIXTURE = Path(__file__).with_name("dinov3_convnext_reference.pt")
CASES = {  # the release's get_intermediate_layers options recorded in the fixture
    "n4_norm_reshape_cls": dict(n=4, reshape=True, return_class_token=True, norm=True),
    "n2_norm_tokens": dict(n=2, reshape=False, return_class_token=False, norm=True),
    "idx02_nonorm_reshape_cls": dict(n=[0, 2], reshape=True, return_class_token=True, norm=False),
    "idx13_nonorm_tokens_cls": dict(n=[1, 3], reshape=False, return_class_token=True, norm=False),
}
HUB = [name for name in CONVNEXT_MODELS if name.startswith("dinov3_")]


def expected_layout(depths, dims, *, gamma: bool = True) -> dict[str, tuple[int, ...]]:
    """The released ConvNeXt's keys and shapes, written out from the release (not from our model)."""
    layout = {
        "downsample_layers.0.0.weight": (dims[0], 3, 4, 4),
        "downsample_layers.0.0.bias": (dims[0],),
        "downsample_layers.0.1.weight": (dims[0],),
        "downsample_layers.0.1.bias": (dims[0],),
        "norm.weight": (dims[3],),
        "norm.bias": (dims[3],),
        "norms.3.weight": (dims[3],),
        "norms.3.bias": (dims[3],),
    }
    for i in range(1, 4):
        layout |= {
            f"downsample_layers.{i}.0.weight": (dims[i - 1],),
            f"downsample_layers.{i}.0.bias": (dims[i - 1],),
            f"downsample_layers.{i}.1.weight": (dims[i], dims[i - 1], 2, 2),
            f"downsample_layers.{i}.1.bias": (dims[i],),
        }
    for i, depth in enumerate(depths):
        C = dims[i]
        for j in range(depth):
            b = f"stages.{i}.{j}."
            layout |= {
                b + "dwconv.weight": (C, 1, 7, 7),
                b + "dwconv.bias": (C,),
                b + "norm.weight": (C,),
                b + "norm.bias": (C,),
                b + "pwconv1.weight": (4 * C, C),
                b + "pwconv1.bias": (4 * C,),
                b + "pwconv2.weight": (C, 4 * C),
                b + "pwconv2.bias": (C,),
            }
            if gamma:
                layout[b + "gamma"] = (C,)
    return layout


def release_state(depths, dims, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the released layout (the final norm once, under both of its keys, as the release)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) for k, shape in expected_layout(depths, dims).items()}
    state["norms.3.weight"], state["norms.3.bias"] = state["norm.weight"], state["norm.bias"]
    return state


@pytest.fixture(scope="module")
def reference():
    fixture = torch.load(FIXTURE, weights_only=True)
    state = {k: v.float() for k, v in fixture["state_dict"].items()}
    return state, fixture["input"].float(), fixture["outputs"]


def _loaded(state, **overrides) -> ConvNeXt:
    return load_official_weights(
        build_convnext("convnext_test", **checkpoint_geometry(state), **overrides), state
    ).eval()


# -- fidelity to the release -------------------------------------------------------------------------------------------


def test_features_match_release(reference):
    state, x, out = reference
    model = _loaded(state)
    with torch.no_grad():
        f = model.forward_features(x)
        listed = model.forward_features([x, x[:, :, :32, :64]], [None, None])
    assert set(f) == {"x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
        torch.testing.assert_close(f[key], out[f"features.{key}"], atol=1e-4, rtol=1e-4)
    assert f["x_norm_patchtokens"].shape == (2, 2 * 3, 32)  # the stride-32 grid of a 64 x 96 input
    for key in ("x_norm_clstoken", "x_norm_patchtokens"):
        torch.testing.assert_close(listed[1][key], out[f"features_list.1.{key}"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(listed[0][key], f[key])
    with torch.no_grad():
        torch.testing.assert_close(model(x), f["x_norm_clstoken"])  # forward: the pooled feature


@pytest.mark.parametrize("case", list(CASES))
def test_intermediate_layers_match_release(reference, case):
    state, x, out = reference
    model, kwargs = _loaded(state), CASES[case]
    with torch.no_grad():
        got = model.get_intermediate_layers(x, **kwargs)
    assert len(got) == (kwargs["n"] if isinstance(kwargs["n"], int) else len(kwargs["n"]))
    for k, entry in enumerate(got):
        patches, cls = entry if kwargs["return_class_token"] else (entry, None)
        torch.testing.assert_close(patches, out[f"layers.{case}.{k}.patches"], atol=1e-4, rtol=1e-4)
        if cls is not None:
            torch.testing.assert_close(cls, out[f"layers.{case}.{k}.cls"], atol=1e-4, rtol=1e-4)


def test_intermediate_layers_without_pseudo_patch_match_release_hub(reference):
    """patch_size None (the release's hub builds): each stage's map on its own grid (stride 4 ... 32)."""
    state, x, out = reference
    model = _loaded(state, patch_size=None)
    with torch.no_grad():
        got = model.get_intermediate_layers(x, n=4, reshape=True, return_class_token=True)
    for k, (patches, cls) in enumerate(got):
        assert patches.shape[-2:] == (64 // 2 ** (k + 2), 96 // 2 ** (k + 2))
        torch.testing.assert_close(patches, out[f"layers.nopatch_n4_norm_reshape_cls.{k}.patches"], atol=1e-4, rtol=0)
        torch.testing.assert_close(cls, out[f"layers.nopatch_n4_norm_reshape_cls.{k}.cls"], atol=1e-4, rtol=0)


# -- the released layout, strict loading -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONVNEXT_MODELS))
def test_every_preset_has_the_released_layout(name):
    """Every preset at full size, on the meta device: exactly the released keys and shapes; geometry read back."""
    cfg = CONVNEXT_MODELS[name]
    with torch.device("meta"):
        model = build_convnext(name)
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_layout(cfg.depths, cfg.dims)
    assert checkpoint_geometry(state) == {"depths": cfg.depths, "dims": cfg.dims}


def test_release_presets_and_files():
    """The release's sizes (`convnext_sizes` in dinov3/models/convnext.py) and file names (hub/backbones.py)."""
    assert {n: (c.depths, c.dims) for n, c in CONVNEXT_MODELS.items() if n in HUB} == {
        "dinov3_convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
        "dinov3_convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
        "dinov3_convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
        "dinov3_convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    }
    assert CONVNEXT_FILES["dinov3_convnext_tiny"] == "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth"
    assert set(CONVNEXT_FILES) == set(HUB)
    assert all(CONVNEXT_MODELS[n].patch_size == 16 and CONVNEXT_MODELS[n].layer_scale_init == 1e-6 for n in HUB)


def test_training_checkpoint_loads_strictly(tmp_path):
    """A release-layout state dict inside the wrappers of a distillation run's eval checkpoint (`{"teacher": ...}`
    holding the student EMA's `backbone.` and heads) and of DDP (`module.`) loads, from memory and from files."""
    depths, dims = (2, 1, 3, 1), (8, 16, 24, 32)
    state = release_state(depths, dims)
    wrapped = {"teacher": {f"module.backbone.{k}": v for k, v in state.items()}}
    wrapped["teacher"] |= {
        "module.dino_head.mlp.0.weight": torch.zeros(4, 32),
        "module.ibot_head.mlp.0.bias": torch.zeros(4),
    }
    model = load_official_weights(build_convnext("convnext_test", **checkpoint_geometry(wrapped)), wrapped)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert model.norms[3] is model.norm  # one module under both keys, as released
    saved = official_state_dict(model)
    assert {k: tuple(v.shape) for k, v in saved.items()} == expected_layout(depths, dims)
    torch.save(saved, tmp_path / "convnext.pth")
    save_file(saved, str(tmp_path / "convnext.safetensors"))  # one copy per key: no shared storage
    for path in (tmp_path / "convnext.pth", tmp_path / "convnext.safetensors"):
        again = load_official_weights(build_convnext("convnext_test", depths=depths, dims=dims), path)
        for k, v in again.state_dict().items():
            torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_mis_fit_names_key_and_both_shapes():
    depths, dims = (1, 1, 1, 1), (16, 32, 48, 64)
    model = build_convnext("convnext_test")
    wrong = release_state(depths, dims)
    wrong["stages.2.0.pwconv1.weight"] = torch.zeros(100, 48)
    with pytest.raises(
        CheckpointError, match=r"'stages\.2\.0\.pwconv1\.weight'.*checkpoint \[100, 48\], model \[192, 48\]"
    ):
        load_official_weights(model, wrong)
    missing = release_state(depths, dims)
    del missing["stages.3.0.gamma"]
    missing["stages.3.1.dwconv.weight"] = torch.zeros(64, 1, 7, 7)
    with pytest.raises(CheckpointError) as err:
        load_official_weights(model, missing)
    assert "missing key 'stages.3.0.gamma' (expected shape [64])" in str(err.value)
    assert "unexpected key 'stages.3.1.dwconv.weight' (shape [64, 1, 7, 7])" in str(err.value)
    wider = release_state(depths, (16, 32, 48, 96))
    with pytest.raises(CheckpointError, match=r"'norm\.weight'.*checkpoint \[96\], model \[64\]"):
        load_official_weights(model, wider)


def test_final_norm_under_either_key():
    """A file holding the final norm once (a writer that drops shared tensors) loads; two different ones do not."""
    depths, dims = (1, 1, 1, 1), (16, 32, 48, 64)
    state = release_state(depths, dims)
    once = {k: v for k, v in state.items() if not k.startswith("norms.")}
    model = load_official_weights(build_convnext("convnext_test"), once)
    torch.testing.assert_close(model.norms[3].weight, state["norm.weight"], rtol=0, atol=0)
    differ = dict(state, **{"norms.3.bias": state["norm.bias"] + 1})
    with pytest.raises(CheckpointError, match=r"'norm\.bias' and 'norms\.3\.bias' differ"):
        load_official_weights(build_convnext("convnext_test"), differ)


def test_geometry_without_layerscale_and_not_a_convnext():
    state = {k: v for k, v in release_state((2, 1, 1, 3), (8, 16, 24, 32)).items() if not k.endswith("gamma")}
    geometry = checkpoint_geometry(state)
    assert geometry == {"depths": (2, 1, 1, 3), "dims": (8, 16, 24, 32), "layer_scale_init": 0.0}
    model = load_official_weights(build_convnext("convnext_test", **geometry), state)
    assert all(blk.gamma is None for blk in model.blocks)
    with pytest.raises(CheckpointError, match="not a backbone of a known family"):
        checkpoint_geometry({"cls_token": torch.zeros(1, 1, 8)})
    with pytest.raises(CheckpointError, match="not a ConvNeXt checkpoint"):
        convnext_geometry({"cls_token": torch.zeros(1, 1, 8)})


# -- builders, options, outputs ----------------------------------------------------------------------------------------


def test_builder_overrides_and_errors():
    cfg = convnext_config("dinov3_convnext_base", depths=[1, 2, 3, 4], drop_path_rate=0.3, patch_size=None)
    assert cfg.depths == (1, 2, 3, 4) and cfg.dims == (128, 256, 512, 1024) and cfg.patch_size is None
    with pytest.raises(TypeError, match="'num_heads'"):
        build_convnext("convnext_test", num_heads=4)
    with pytest.raises(KeyError, match="dinov3_convnext_huge"):
        build_convnext("dinov3_convnext_huge")
    with pytest.raises(ValueError, match=r"depths = \[1, 1, 1\]"):
        build_convnext("convnext_test", depths=(1, 1, 1))
    with pytest.raises(ValueError, match="resize_patch_tokens"):
        build_convnext("convnext_test", patch_size=None, resize_patch_tokens=True)
    model = build_convnext("convnext_test", depths=(2, 1, 1, 2), drop_path_rate=0.25, layer_scale_init=0.5)
    rates = [blk.drop_path_rate for blk in model.blocks]  # linear from 0 over every block, as released
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.25])
    assert (model.embed_dim, model.num_features, model.embed_dims) == (64, 64, (16, 32, 48, 64))
    assert (model.n_blocks, model.num_register_tokens, model.n_storage_tokens, model.patch_size) == (4, 0, 0, 16)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        model.train()  # stochastic depth drops whole residual branches of some samples
        assert not torch.allclose(model(x), model.eval()(x))


def test_pseudo_patch_grid_and_masks():
    """`resize_patch_tokens`: patch tokens on the H/16 x W/16 grid, equal to the last intermediate layer (same
    resize, same norm); masks are returned as given; list inputs give one dict per batch."""
    torch.manual_seed(0)
    model = build_convnext("convnext_test", resize_patch_tokens=True, layer_scale_init=0.5).eval()
    x = torch.randn(2, 3, 64, 96)
    masks = torch.rand(2, 4 * 6) < 0.5
    with torch.no_grad():
        f = model.forward_features(x, masks)
        ((patches, cls),) = model.get_intermediate_layers(x, n=1, return_class_token=True)
        plain = build_convnext("convnext_test", layer_scale_init=0.5)
        plain.load_state_dict(model.state_dict())
        g = plain.eval().forward_features(x)
    assert f["x_norm_patchtokens"].shape == (2, 4 * 6, 64) and f["x_prenorm"].shape == (2, 4 * 6, 64)
    torch.testing.assert_close(f["x_norm_patchtokens"], patches)
    torch.testing.assert_close(f["x_norm_clstoken"], cls)
    torch.testing.assert_close(g["x_norm_clstoken"], cls)  # pooled before the resize
    assert g["x_norm_patchtokens"].shape == (2, 2 * 3, 64)
    assert f["masks"] is masks
    listed = model.forward_features([x, x[:, :, :32, :32]], masks=[masks, None])
    assert listed[0]["masks"] is masks and listed[1]["x_norm_patchtokens"].shape == (2, 2 * 2, 64)
    assert model([x], is_training=True)[0]["x_storage_tokens"].shape == (2, 0, 64)
    with pytest.raises(ValueError, match="stride 32"):
        model.forward_features(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match="only 1 of the requested stages"):
        model.get_intermediate_layers(x, n=[3, 4])


@pytest.mark.slow  # about 10 s, the exporter's tracing
def test_onnx_round_trip(tmp_path):
    """A ConvNeXt exports with dynamic batch and size (here with the antialiased resize to the pseudo-patch grid
    inside the graph) and onnxruntime gives the PyTorch features."""
    ort = pytest.importorskip("onnxruntime")
    from components.model.export import export_onnx, output_names

    torch.manual_seed(0)
    model = build_convnext("convnext_test", resize_patch_tokens=True, layer_scale_init=0.5)
    path = export_onnx(model, tmp_path / "convnext_test.onnx", example_size=(64, 96))
    assert output_names(model) == ["x_norm_clstoken", "x_norm_patchtokens"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model.eval()
    for batch, (H, W) in [(2, (64, 96)), (1, (128, 64)), (3, (96, 96))]:
        x = torch.randn(batch, 3, H, W)
        cls, patches = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            ref = model.forward_features(x)
        assert patches.shape == (batch, (H // 16) * (W // 16), 64)
        torch.testing.assert_close(torch.from_numpy(cls), ref["x_norm_clstoken"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(patches), ref["x_norm_patchtokens"], atol=1e-4, rtol=1e-4)
