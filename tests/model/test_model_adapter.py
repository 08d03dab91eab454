"""Checkpoint adapter tests: the released layout for every preset, round trips through .pth and .safetensors, strict
errors that name the key, and training-checkpoint wrappers (prefixes, chunked blocks)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from components.model import (
    PRESETS,
    CheckpointError,
    build_backbone,
    load_official_weights,
    official_state_dict,
    save_official_weights,
)
from components.model.adapter import normalize_state_dict

DINOV2_PRESETS = [name for name, preset in PRESETS.items() if preset.family == "dinov2"]


def expected_layout(dim: int, depth: int, *, registers: int = 0, swiglu: bool = False) -> dict[str, tuple]:
    """The released backbone's keys and shapes, written out from the release (not from our model)."""
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * dim
    layout = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1370, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    if registers:
        layout["register_tokens"] = (1, registers, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        layout |= {
            b + "norm1.weight": (dim,),
            b + "norm1.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim),
            b + "attn.qkv.bias": (3 * dim,),
            b + "attn.proj.weight": (dim, dim),
            b + "attn.proj.bias": (dim,),
            b + "ls1.gamma": (dim,),
            b + "norm2.weight": (dim,),
            b + "norm2.bias": (dim,),
            b + "ls2.gamma": (dim,),
        }
        if swiglu:
            layout |= {
                b + "mlp.w12.weight": (2 * hidden, dim),
                b + "mlp.w12.bias": (2 * hidden,),
                b + "mlp.w3.weight": (dim, hidden),
                b + "mlp.w3.bias": (dim,),
            }
        else:
            layout |= {
                b + "mlp.fc1.weight": (hidden, dim),
                b + "mlp.fc1.bias": (hidden,),
                b + "mlp.fc2.weight": (dim, hidden),
                b + "mlp.fc2.bias": (dim,),
            }
    return layout


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("arch", DINOV2_PRESETS)
def test_full_depth_layout_matches_release(arch):
    """Every preset at full depth, on the meta device (no memory): exactly the released keys and shapes."""
    cfg = PRESETS[arch].config
    with torch.device("meta"):
        model = build_backbone(arch)
        reg = build_backbone(arch, num_register_tokens=4)
    swiglu = cfg.ffn_layer == "swiglu"
    assert shapes(model.state_dict()) == expected_layout(cfg.embed_dim, cfg.depth, swiglu=swiglu)
    assert shapes(reg.state_dict()) == expected_layout(cfg.embed_dim, cfg.depth, registers=4, swiglu=swiglu)


# The per-block layout is the same at any depth (full depth: the meta-device test above); ViT-L/g at one block.
REDUCED_DEPTH = {"vit_large": 1, "vit_giant2": 1}


def uninitialised_backbone(arch, **overrides):
    """A backbone with allocated but unset weights (cheap): whatever a load leaves in it came from the file."""
    with torch.device("meta"):
        model = build_backbone(arch, **overrides)
    return model.to_empty(device="cpu")


@pytest.mark.parametrize("arch", DINOV2_PRESETS)
def test_round_trip_through_official_files(arch, tmp_path):
    depth = REDUCED_DEPTH.get(arch, 2)
    torch.manual_seed(0)
    src = build_backbone(arch, depth=depth)
    with torch.no_grad():  # LayerScale, norms, biases and the mask token start constant: make them distinctive
        for p in src.parameters():
            if p.dim() <= 1 or p.shape[0] == 1:
                p.add_(torch.randn_like(p) * 0.01)
    sd = official_state_dict(src)
    cfg = src.cfg
    assert shapes(sd) == expected_layout(cfg.embed_dim, cfg.depth, swiglu=cfg.ffn_layer == "swiglu")

    for suffix in (".pth", ".safetensors"):
        path = save_official_weights(src, tmp_path / f"{arch}{suffix}")
        on_disk = load_file(path) if suffix == ".safetensors" else torch.load(path, weights_only=True)
        assert shapes(on_disk) == shapes(sd)
        if suffix == ".pth":
            assert list(on_disk) == list(sd)  # the release's key order (safetensors sorts its keys)
        del on_disk
        dst = load_official_weights(uninitialised_backbone(arch, depth=depth), path)
        for key, value in dst.state_dict().items():
            assert torch.equal(value, sd[key]), key
    x = torch.randn(1, 3, 28, 42)
    src.eval(), dst.eval()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_registers_round_trip_in_memory():
    src = build_backbone("vit_test", num_register_tokens=4)
    sd = official_state_dict(src)
    assert sd["register_tokens"].shape == (1, 4, 64)
    dst = load_official_weights(build_backbone("vit_test", num_register_tokens=4), sd)
    assert torch.equal(dst.register_tokens, src.register_tokens)


def test_strict_errors_name_the_key():
    sd = official_state_dict(build_backbone("vit_test"))
    model = build_backbone("vit_test")

    bad_shape = dict(sd, **{"blocks.1.attn.qkv.weight": torch.zeros(10, 64)})
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'blocks\.1\.attn\.qkv\.weight'.*\[10, 64\]"):
        load_official_weights(model, bad_shape)

    missing = {k: v for k, v in sd.items() if k != "blocks.0.ls2.gamma"}
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.0\.ls2\.gamma'"):
        load_official_weights(model, missing)

    extra = dict(sd, **{"blocks.0.attn.bogus": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected key 'blocks\.0\.attn\.bogus'"):
        load_official_weights(model, extra)

    # a register checkpoint into a model without registers, and a ViT-S grid into a 224-px grid
    with pytest.raises(CheckpointError, match="unexpected key 'register_tokens'"):
        load_official_weights(model, official_state_dict(build_backbone("vit_test", num_register_tokens=4)))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'pos_embed'.*\[1, 1370, 64\].*\[1, 257, 64\]"):
        load_official_weights(build_backbone("vit_test", img_size=224), sd)
    # the SwiGLU layout into an MLP model
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.0\.mlp\.fc1\.weight'"):
        load_official_weights(model, official_state_dict(build_backbone("vit_test", ffn_layer="swiglu")))
    with pytest.raises(FileNotFoundError):
        load_official_weights(model, "/nonexistent/dinov2_vits14_pretrain.pth")


def test_training_checkpoint_wrappers_are_accepted():
    src = build_backbone("vit_test")
    sd = official_state_dict(src)

    def check(checkpoint):
        dst = load_official_weights(build_backbone("vit_test"), checkpoint)
        assert all(torch.equal(v, sd[k]) for k, v in dst.state_dict().items())

    check({f"module.{k}": v for k, v in sd.items()})  # DDP
    check({f"backbone.{k}": v for k, v in sd.items()})
    head = {"dino_head.mlp.0.weight": torch.zeros(8, 64), "ibot_head.last_layer.weight": torch.zeros(4, 8)}
    check({"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, **head}})  # the release's teacher_checkpoint
    check({**{f"teacher.backbone.{k}": v for k, v in sd.items()}, **{f"teacher.{k}": v for k, v in head.items()}})
    flat_both = {f"module.teacher.backbone.{k}": v for k, v in sd.items()}
    flat_both |= {f"module.student.backbone.{k}": torch.zeros_like(v) for k, v in sd.items()}
    check(flat_both)  # the teacher wins over the student
    # FSDP block chunks keep global block indices: blocks.<chunk>.<i>.
    check({(k.replace("blocks.1.", "blocks.1.1.").replace("blocks.0.", "blocks.0.0.")): v for k, v in sd.items()})
    check({"model": {f"_orig_mod.{k}": v for k, v in sd.items()}})  # torch.compile'd model saved as {"model": ...}


def test_duplicate_keys_after_normalisation_are_an_error():
    sd = official_state_dict(build_backbone("vit_test"))
    with pytest.raises(CheckpointError, match="both map to 'norm.weight'"):
        normalize_state_dict({"norm.weight": sd["norm.weight"], "module.norm.weight": sd["norm.weight"]})


def test_wrapped_models_and_dtype():
    model = build_backbone("vit_test").to(torch.bfloat16)
    sd = official_state_dict(build_backbone("vit_test"))
    load_official_weights(model, sd)
    assert model.cls_token.dtype == torch.bfloat16
    torch.testing.assert_close(model.cls_token.float(), sd["cls_token"], atol=1e-2, rtol=1e-2)

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    wrapped = Wrapper(build_backbone("vit_test"))
    load_official_weights(wrapped, sd)
    assert torch.equal(wrapped.module.pos_embed, sd["pos_embed"])
    assert official_state_dict(wrapped)["pos_embed"].dtype == torch.float32
