"""Official DINOv2 and DINOv3 checkpoints in and out: the released backbone state-dict layouts, strictly checked.

`load_official_weights(model, path_or_state_dict)` reads the files users download (`dinov2_vits14_pretrain.pth`,
..., `dinov2_vitg14_reg4_pretrain.pth`, `dinov3_vits16_pretrain_lvd1689m-08c60483.pth`, ...) and training
checkpoints whose keys carry wrappers (`module.`, `teacher.`, `student.`, `backbone.`, chunked
`blocks.<chunk>.<i>.`); `save_official_weights(model, path)` writes ours in the released layout (`.pth` or
`.safetensors`). Each key transform is a named helper below; each family's layout is a literal key map in a section
of its own, and `LAYOUTS` at the end is the dispatch point from a model or a file to its family's section.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from components.model.convnext import ConvNeXt
from components.model.vit import DinoVisionTransformer
from components.model.vit_dinov3 import SWIGLU_ALIGN, DinoV3VisionTransformer, DinoV3ViTConfig

# Training-checkpoint wrappers stripped from the front of keys (DDP/FSDP, torch.compile, the SSL meta-arch).
WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_orig_mod.", "teacher.", "student.", "backbone.")
# Top-level entries of a training checkpoint that hold the weights, in order of preference.
CONTAINER_KEYS = ("teacher", "model", "state_dict", "module")
# Entries of a training checkpoint that are not part of the backbone.
DROP_PREFIXES = ("dino_head.", "ibot_head.", "head.")

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the backbone: missing, unexpected or mis-shaped keys (named in the message)."""


def _expand(templates: Mapping[str, str], depth: int) -> dict[str, str]:
    """A key map's `{i}` templates expanded over the blocks: official key -> our parameter name."""
    expanded: dict[str, str] = {}
    for official, ours in templates.items():
        if "{i}" in official:
            for i in range(depth):
                expanded[official.format(i=i)] = ours.format(i=i)
        else:
            expanded[official] = ours
    return expanded


# -- DINOv2 ViT --------------------------------------------------------------------------------------------------------
# The released backbone layout: official key -> our parameter name; `{i}` is a block index. Our modules carry the
# release's names, so the map is the identity; it stays literal so that renaming a module in vit.py fails loudly
# here and in the round-trip test instead of silently breaking users' checkpoints.
KEY_MAP: dict[str, str] = {
    "cls_token": "cls_token",  # [1, 1, D]
    "pos_embed": "pos_embed",  # [1, 1 + 37 * 37, D]
    "mask_token": "mask_token",  # [1, D]
    "patch_embed.proj.weight": "patch_embed.proj.weight",  # [D, 3, p, p]
    "patch_embed.proj.bias": "patch_embed.proj.bias",
    "blocks.{i}.norm1.weight": "blocks.{i}.norm1.weight",
    "blocks.{i}.norm1.bias": "blocks.{i}.norm1.bias",
    "blocks.{i}.attn.qkv.weight": "blocks.{i}.attn.qkv.weight",  # [3 D, D]
    "blocks.{i}.attn.qkv.bias": "blocks.{i}.attn.qkv.bias",
    "blocks.{i}.attn.proj.weight": "blocks.{i}.attn.proj.weight",
    "blocks.{i}.attn.proj.bias": "blocks.{i}.attn.proj.bias",
    "blocks.{i}.ls1.gamma": "blocks.{i}.ls1.gamma",  # [D]
    "blocks.{i}.norm2.weight": "blocks.{i}.norm2.weight",
    "blocks.{i}.norm2.bias": "blocks.{i}.norm2.bias",
    "blocks.{i}.ls2.gamma": "blocks.{i}.ls2.gamma",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
MLP_KEY_MAP: dict[str, str] = {  # ViT-S/B/L
    "blocks.{i}.mlp.fc1.weight": "blocks.{i}.mlp.fc1.weight",  # [4 D, D]
    "blocks.{i}.mlp.fc1.bias": "blocks.{i}.mlp.fc1.bias",
    "blocks.{i}.mlp.fc2.weight": "blocks.{i}.mlp.fc2.weight",  # [D, 4 D]
    "blocks.{i}.mlp.fc2.bias": "blocks.{i}.mlp.fc2.bias",
}
SWIGLU_KEY_MAP: dict[str, str] = {  # ViT-g
    "blocks.{i}.mlp.w12.weight": "blocks.{i}.mlp.w12.weight",  # [2 hidden, D]
    "blocks.{i}.mlp.w12.bias": "blocks.{i}.mlp.w12.bias",
    "blocks.{i}.mlp.w3.weight": "blocks.{i}.mlp.w3.weight",  # [D, hidden]
    "blocks.{i}.mlp.w3.bias": "blocks.{i}.mlp.w3.bias",
}
REGISTER_KEY_MAP: dict[str, str] = {"register_tokens": "register_tokens"}  # [1, R, D], register models only


def dinov2_key_map(model: DinoVisionTransformer) -> dict[str, str]:
    """The DINOv2 key map of this backbone expanded over its blocks: official key -> our parameter name."""
    templates = {**KEY_MAP, **(SWIGLU_KEY_MAP if model.cfg.ffn_layer == "swiglu" else MLP_KEY_MAP)}
    if model.num_register_tokens:
        templates.update(REGISTER_KEY_MAP)
    return _expand(templates, model.n_blocks)


def dinov2_geometry(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The geometry a released DINOv2 backbone's weights fix, as `vit.build_backbone` overrides: patch size,
    registers (with the release's interpolation settings of its register models: offset 0, antialiased), the position
    grid's image side and the feed-forward type. The width and depth are the preset's: a file of another size does
    not fit it."""
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    registers = int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0
    grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    geometry = {
        "patch_size": patch,
        "num_register_tokens": registers,
        "img_size": grid * patch,
        "ffn_layer": "swiglu" if "blocks.0.mlp.w12.weight" in state else "mlp",
    }
    if registers:
        geometry.update(interpolate_offset=0.0, interpolate_antialias=True)
    return geometry


# -- DINOv3 ViT --------------------------------------------------------------------------------------------------------
# The released layout (dinov3/models/vision_transformer.py): official key -> our parameter or buffer name. Our modules
# carry the release's names, so the map is the identity; literal for the same reason as `KEY_MAP`. The two buffers
# (`rope_embed.periods`, `bias_mask`) are in the released files and load strictly like the parameters.
DINOV3_KEY_MAP: dict[str, str] = {
    "cls_token": "cls_token",  # [1, 1, D]
    "mask_token": "mask_token",  # [1, D]
    "patch_embed.proj.weight": "patch_embed.proj.weight",  # [D, 3, 16, 16]
    "patch_embed.proj.bias": "patch_embed.proj.bias",
    "rope_embed.periods": "rope_embed.periods",  # [D / heads / 4], the RoPE periods (a buffer)
    "blocks.{i}.norm1.weight": "blocks.{i}.norm1.weight",
    "blocks.{i}.norm1.bias": "blocks.{i}.norm1.bias",
    "blocks.{i}.attn.qkv.weight": "blocks.{i}.attn.qkv.weight",  # [3 D, D]
    "blocks.{i}.attn.proj.weight": "blocks.{i}.attn.proj.weight",
    "blocks.{i}.attn.proj.bias": "blocks.{i}.attn.proj.bias",
    "blocks.{i}.ls1.gamma": "blocks.{i}.ls1.gamma",  # [D]
    "blocks.{i}.norm2.weight": "blocks.{i}.norm2.weight",
    "blocks.{i}.norm2.bias": "blocks.{i}.norm2.bias",
    "blocks.{i}.ls2.gamma": "blocks.{i}.ls2.gamma",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
DINOV3_QKV_BIAS_KEY_MAP: dict[str, str] = {  # every release but the 7B
    "blocks.{i}.attn.qkv.bias": "blocks.{i}.attn.qkv.bias",  # [3 D]
}
DINOV3_K_MASK_KEY_MAP: dict[str, str] = {  # the masked key bias (`mask_k_bias`, with a qkv bias)
    "blocks.{i}.attn.qkv.bias_mask": "blocks.{i}.attn.qkv.bias_mask",  # [3 D]: 1, 0 on [D, 2 D), 1 (a buffer)
}
DINOV3_SWIGLU_KEY_MAP: dict[str, str] = {  # S+, L+, H+, 7B: w1 and w2 unfused
    "blocks.{i}.mlp.w1.weight": "blocks.{i}.mlp.w1.weight",  # [hidden, D]
    "blocks.{i}.mlp.w1.bias": "blocks.{i}.mlp.w1.bias",
    "blocks.{i}.mlp.w2.weight": "blocks.{i}.mlp.w2.weight",  # [hidden, D]
    "blocks.{i}.mlp.w2.bias": "blocks.{i}.mlp.w2.bias",
    "blocks.{i}.mlp.w3.weight": "blocks.{i}.mlp.w3.weight",  # [D, hidden]
    "blocks.{i}.mlp.w3.bias": "blocks.{i}.mlp.w3.bias",
}
DINOV3_STORAGE_KEY_MAP: dict[str, str] = {"storage_tokens": "storage_tokens"}  # [1, R, D]
DINOV3_CLS_NORM_KEY_MAP: dict[str, str] = {  # `untie_cls_and_patch_norms`
    "cls_norm.weight": "cls_norm.weight",
    "cls_norm.bias": "cls_norm.bias",
}
DINOV3_LOCAL_CLS_NORM_KEY_MAP: dict[str, str] = {  # `untie_global_and_local_cls_norm` (7B, SAT-493M ViT-L)
    "local_cls_norm.weight": "local_cls_norm.weight",
    "local_cls_norm.bias": "local_cls_norm.bias",
}
_NORM_BIAS = re.compile(r"(^|\.)(norm\d?|cls_norm|local_cls_norm)\.bias$")


def _without_norm_biases(templates: Mapping[str, str]) -> dict[str, str]:
    """The key map of an `rmsnorm` model: its norms have a weight and no bias."""
    return {k: v for k, v in templates.items() if not _NORM_BIAS.search(k)}


def _without_layerscale(templates: Mapping[str, str]) -> dict[str, str]:
    """The key map of a model without LayerScale (`layerscale_init` None): no `ls1.gamma` / `ls2.gamma`."""
    return {k: v for k, v in templates.items() if not k.endswith(".gamma")}


def dinov3_key_map(model: DinoV3VisionTransformer) -> dict[str, str]:
    """The DINOv3 key map of this backbone expanded over its blocks: official key -> our parameter or buffer name."""
    cfg: DinoV3ViTConfig = model.cfg
    templates = {**DINOV3_KEY_MAP, **(MLP_KEY_MAP if cfg.ffn_layer == "mlp" else DINOV3_SWIGLU_KEY_MAP)}
    if cfg.qkv_bias:
        templates.update(DINOV3_QKV_BIAS_KEY_MAP)
        if cfg.mask_k_bias:
            templates.update(DINOV3_K_MASK_KEY_MAP)
    if cfg.n_storage_tokens:
        templates.update(DINOV3_STORAGE_KEY_MAP)
    if cfg.untie_cls_and_patch_norms:
        templates.update(DINOV3_CLS_NORM_KEY_MAP)
    if cfg.untie_global_and_local_cls_norm:
        templates.update(DINOV3_LOCAL_CLS_NORM_KEY_MAP)
    if cfg.norm_layer == "rmsnorm":
        templates = _without_norm_biases(templates)
    if not cfg.layerscale_init:
        templates = _without_layerscale(templates)
    return _expand(templates, model.n_blocks)


def _ratio_for(width: int, dim: int) -> float:
    """The smallest float ratio r with int(dim * r) == width (`width / dim` can round down by one ulp)."""
    ratio = width / dim
    while int(dim * ratio) < width:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _dinov3_ffn_geometry(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """`ffn_layer` and `ffn_ratio` giving the file's feed-forward width. A SwiGLU file fixes its hidden width, not
    which alignment variant produced it: `swiglu` (multiple of 8) with the ratio of that width is the same model."""
    if "blocks.0.mlp.fc1.weight" in state:
        hidden, dim = state["blocks.0.mlp.fc1.weight"].shape
        return {"ffn_layer": "mlp", "ffn_ratio": _ratio_for(int(hidden), int(dim))}
    hidden, dim = (int(n) for n in state["blocks.0.mlp.w1.weight"].shape)
    if hidden % SWIGLU_ALIGN["swiglu"]:
        raise CheckpointError(f"'blocks.0.mlp.w1.weight' has a hidden width of {hidden}, not a multiple of 8")
    return {"ffn_layer": "swiglu", "ffn_ratio": _ratio_for(hidden * 3 // 2, dim)}


def dinov3_geometry(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The geometry a DINOv3 ViT file fixes, as `vit_dinov3.build_backbone` overrides: patch size, storage tokens,
    feed-forward type and width, qkv bias and its key mask, untied CLS norms (the 7B's and the SAT-493M ViT-L's
    local-crop norm), RMSNorm (norms without bias) and LayerScale's absence. The width, depth and heads are the
    preset's (a file of another size does not fit it); the LayerNorm epsilon is not in a file (the preset's: 1e-5 as
    released)."""
    geometry: dict[str, Any] = {
        "patch_size": int(state["patch_embed.proj.weight"].shape[-1]),
        "n_storage_tokens": int(state["storage_tokens"].shape[1]) if "storage_tokens" in state else 0,
        **_dinov3_ffn_geometry(state),
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "untie_cls_and_patch_norms": "cls_norm.weight" in state,
        "untie_global_and_local_cls_norm": "local_cls_norm.weight" in state,
    }
    if geometry["qkv_bias"]:  # without a bias, the mask leaves no trace in a file
        geometry["mask_k_bias"] = "blocks.0.attn.qkv.bias_mask" in state
    if "norm.bias" not in state:
        geometry["norm_layer"] = "rmsnorm"
    if "blocks.0.ls1.gamma" not in state:
        geometry["layerscale_init"] = None
    return geometry


# -- key transforms, in the order they apply ---------------------------------------------------------------------------


def _unwrap_container(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """{"teacher": {...}} or {"model": {...}} -> the inner state dict (the teacher first, as the release evaluates)."""
    for key in CONTAINER_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            return _unwrap_container(checkpoint[key])
    return checkpoint


def _prefer_teacher(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """A flat dict holding both `student.` and `teacher.` networks -> the teacher's entries (the released one)."""
    roots = {k.removeprefix("module.").split(".", 1)[0] for k in state}
    if {"student", "teacher"} <= roots:
        return {k: v for k, v in state.items() if k.removeprefix("module.").startswith("teacher.")}
    return state


def _strip_wrappers(key: str) -> str:
    """`module.teacher.backbone.blocks.0...` -> `blocks.0...`."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _unchunk_blocks(key: str) -> str:
    """`blocks.<chunk>.<i>.rest` (the release's FSDP block chunks keep global indices) -> `blocks.<i>.rest`."""
    return _CHUNKED_BLOCK.sub(r"blocks.\1.", key)


def normalize_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """A released or training checkpoint -> a state dict in the released backbone layout.

    Unwraps containers, keeps the teacher when both networks are present, strips wrapper prefixes, drops the heads
    and un-chunks block keys. Two keys that map to the same name are an error naming both.
    """
    state = _prefer_teacher(_unwrap_container(checkpoint))
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for raw_key, value in state.items():
        key = _strip_wrappers(raw_key)
        if key.startswith(DROP_PREFIXES):
            continue
        key = _unchunk_blocks(key)
        if key in out:
            raise CheckpointError(f"checkpoint keys {origin[key]!r} and {raw_key!r} both map to {key!r}")
        if not isinstance(value, Tensor):
            raise CheckpointError(f"checkpoint key {raw_key!r} holds a {type(value).__name__}, not a tensor")
        out[key], origin[key] = value, raw_key
    return out


# -- load / save -------------------------------------------------------------------------------------------------------


def _layout_of_model(model: nn.Module) -> Layout:
    """The layout of a backbone, unwrapped from DDP (`.module`) or `torch.compile` (`._orig_mod`) wrappers."""
    inner: nn.Module | None = model
    while inner is not None:
        for layout in LAYOUTS:
            if isinstance(inner, layout.model_type):
                return layout
        inner = getattr(inner, "_orig_mod", None) or getattr(inner, "module", None)
    known = ", ".join(layout.model_type.__name__ for layout in LAYOUTS)
    raise TypeError(f"expected a backbone ({known}), got {type(model).__name__}")


def _unwrap_model(model: nn.Module) -> nn.Module:
    """The backbone inside DDP (`.module`) or `torch.compile` (`._orig_mod`) wrappers."""
    model_type = _layout_of_model(model).model_type
    while not isinstance(model, model_type):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def checkpoint_family(checkpoint: Mapping[str, Any]) -> str:
    """The family (`dinov2`, `dinov3_vit`, ...) of a checkpoint in any of the accepted forms, from the keys only its
    family's files hold; `CheckpointError` naming a few of its keys when none matches."""
    state = normalize_state_dict(checkpoint)
    return _layout_of_state(state).family


def _layout_of_state(state: Mapping[str, Tensor]) -> Layout:
    for layout in LAYOUTS:
        if layout.marker in state:
            return layout
    markers = ", ".join(f"{layout.marker!r} ({layout.family})" for layout in LAYOUTS)
    raise CheckpointError(f"not a backbone of a known family: none of {markers} among its keys {sorted(state)[:8]}")


def official_key_map(model: nn.Module) -> dict[str, str]:
    """The key map of this backbone (of any family) expanded over its blocks: official key -> our name."""
    return _layout_of_model(model).key_map(_unwrap_model(model))


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Reads a `.safetensors` file, or a torch file (loaded with `weights_only=True`, on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _fit_problems(backbone: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """What keeps a released-layout state dict from loading into `backbone`, one line per key."""
    layout = _layout_of_model(backbone)
    key_map, ours = layout.key_map(backbone), backbone.state_dict()
    if set(key_map.values()) != set(ours):  # an internal invariant: the key map covers the model exactly
        raise RuntimeError(f"key map out of sync with the model: {sorted(set(ours) ^ set(key_map.values()))}")
    problems = []
    found = next((other.family for other in LAYOUTS if other.marker in state), None)
    if found is not None and found != layout.family:
        problems.append(f"a {found} checkpoint for a {layout.family} backbone ({type(backbone).__name__})")
    problems += [
        f"missing key {k!r} (expected shape {list(ours[key_map[k]].shape)})" for k in key_map if k not in state
    ]
    problems += [f"unexpected key {k!r} (shape {list(v.shape)})" for k, v in state.items() if k not in key_map]
    for official, name in key_map.items():
        if official in state and state[official].shape != ours[name].shape:
            problems.append(
                f"shape mismatch for {official!r}: checkpoint {list(state[official].shape)}, "
                f"model {list(ours[name].shape)}"
            )
    return problems


def check_official_weights(model: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Raises `CheckpointError` when `checkpoint` would not load into `model` (which may live on the meta device:
    nothing is loaded), naming each key and both shapes."""
    backbone = _unwrap_model(model)
    problems = _fit_problems(backbone, _layout_of_model(backbone).complete(normalize_state_dict(checkpoint)))
    if problems:
        raise CheckpointError("checkpoint does not fit the backbone:\n  " + "\n  ".join(problems))


def checkpoint_geometry(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The geometry a released backbone's weights fix, as `build_backbone` overrides of its family's preset (see
    `dinov2_geometry`, `dinov3_geometry`); `checkpoint_family` says which family."""
    state = normalize_state_dict(checkpoint)
    return _layout_of_state(state).geometry(state)


def load_official_weights(model: nn.Module, path_or_state_dict: str | Path | Mapping[str, Any]) -> nn.Module:
    """Loads released (or training) backbone weights of the model's family into `model`, strictly.

    Args:
        model: a backbone of the checkpoint's architecture (see `build_official_backbone`), possibly wrapped by DDP
            or `torch.compile`: a DINOv2 `DinoVisionTransformer` or a DINOv3 `DinoV3VisionTransformer`.
        path_or_state_dict: a `.pth` / `.safetensors` file or an in-memory checkpoint.

    Returns:
        The backbone, with its parameters (and the DINOv3 buffers) overwritten (dtype and device kept).

    Raises:
        CheckpointError: a key is missing or unexpected, or a tensor's shape differs; the message names the keys and
            both shapes (and the checkpoint's family when it is another one).
    """
    backbone = _unwrap_model(model)
    raw = read_state_dict(path_or_state_dict) if isinstance(path_or_state_dict, str | Path) else path_or_state_dict
    state = _layout_of_model(backbone).complete(normalize_state_dict(raw))
    problems = _fit_problems(backbone, state)
    if problems:
        raise CheckpointError("checkpoint does not fit the backbone:\n  " + "\n  ".join(problems))
    key_map = official_key_map(backbone)
    backbone.load_state_dict({key_map[k]: v for k, v in state.items()}, strict=True)
    return backbone


def official_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Our backbone's weights as a released-layout state dict of its family (CPU, contiguous; `dtype` None keeps the
    model's). Buffers keep their dtype (the DINOv3 RoPE periods and key-bias masks)."""
    backbone = _unwrap_model(model)
    ours = backbone.state_dict()
    params = {name for name, _ in backbone.named_parameters()}
    out = {}
    for official, name in official_key_map(backbone).items():
        t = ours[name].detach().to("cpu")
        out[official] = (t.to(dtype) if dtype is not None and name in params else t).contiguous().clone()
    return out


def save_official_weights(model: nn.Module, path: str | Path, dtype: torch.dtype | None = torch.float32) -> Path:
    """Writes the backbone in its family's released layout: `.safetensors` (with the config as metadata) or a torch
    file.

    Args:
        model: the backbone (possibly wrapped).
        path: destination; the suffix picks the format (`.safetensors`, else `torch.save`).
        dtype: dtype of the saved parameters (float32 as released; None keeps the model's).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = official_state_dict(model, dtype)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        layout = _layout_of_model(model)
        config = json.dumps(asdict(_unwrap_model(model).cfg))
        save_file(state, str(path), metadata={"format": "pt", layout.metadata_key: config})
    else:
        torch.save(state, path)
    return path


# -- heads -------------------------------------------------------------------------------------------------------------
# The DINOv2 release's head layout (`dino_head.py`): the MLP's linear layers at `mlp.{j}` (j = 0, 2, 4: GELUs
# between them), and the prototypes of `weight_norm(nn.Linear(bottleneck, K, bias=False))`. Our `DINOHead` carries
# these names, so the map is the identity; it stays literal for the same reason as `KEY_MAP`. DINOv3's head has the
# same MLP and plain prototypes (below).
HEAD_KEY_MAP: dict[str, str] = {
    "mlp.{j}.weight": "mlp.{j}.weight",  # [hidden, D] ... [bottleneck, hidden]
    "mlp.{j}.bias": "mlp.{j}.bias",
    "last_layer.weight_g": "last_layer.weight_g",  # [K, 1], the prototypes' norms (trained)
    "last_layer.weight_v": "last_layer.weight_v",  # [K, bottleneck], their directions
}
HEAD_NAMES = ("dino_head", "ibot_head")
"""A head's key prefix in the release's `SSLMetaArch` (the iBOT head exists only when it is separate)."""
CENTER_KEYS = {"dino": "dino_loss.center", "ibot": "ibot_patch_loss.center"}
"""The release's names of the DINO and iBOT losses' softmax centres (a training checkpoint holds them beside the
networks; the iBOT centre exists whether its head is tied or not)."""
# Other spellings, renamed to the DINOv2 release's: PyTorch's newer `parametrizations.weight_norm` (as a re-saved
# release head holds them), and a one-layer MLP, which both releases build as a bare `nn.Linear` (`mlp.weight`).
PARAMETRIZED_PROTOTYPES = {
    "last_layer.parametrizations.weight.original0": "last_layer.weight_g",
    "last_layer.parametrizations.weight.original1": "last_layer.weight_v",
}
SINGLE_LAYER_MLP = {"mlp.weight": "mlp.0.weight", "mlp.bias": "mlp.0.bias"}
# Plain prototypes W (K, bottleneck), read into our weight-normed layer as weight_v = W and weight_g: the DINOv3
# release's head (`dinov3/layers/dino_head.py`: a plain `nn.Linear`, no weight norm) with g = the row norms ||W_k||,
# so that g v / ||v|| = W, the same function; our exports before heads format 2, whose prototypes had their norm fixed
# to 1, with g = 1 (the same function as they computed).
PLAIN_PROTOTYPES = "last_layer.weight"
LEGACY_HEADS_FORMAT = 1


@dataclass(frozen=True)
class HeadsState:
    """A checkpoint's DINO / iBOT heads in the release's layout, and the softmax centres it holds (or None)."""

    heads: dict[str, dict[str, Tensor]]
    """`dino_head` (and `ibot_head` when separate) -> that head's state dict (`mlp.0.weight`, ...)."""
    centers: dict[str, Tensor]
    """`dino` / `ibot` -> that loss's softmax centre (1, K), when the checkpoint has one."""


def _legacy_heads_as_flat(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Our exports before format 2 ({"format": 1, "dino_head": {...}, "ibot_head": ..., "dino_center": ...})."""
    flat: dict[str, Any] = {}
    for name in HEAD_NAMES:
        flat |= {f"{name}.{k}": v for k, v in (checkpoint.get(name) or {}).items()}
    for name, key in CENTER_KEYS.items():
        center = checkpoint.get(f"{name}_center")
        if center is not None:
            flat[key] = center
    return flat


def _rename_prototypes(key: str, value: Tensor, *, unit_norm: bool) -> dict[str, Tensor]:
    """One head key -> the DINOv2 release's spelling; plain prototypes W become weight_v = W and weight_g, the row
    norms of W (DINOv3), or 1 (`unit_norm`: our format-1 exports)."""
    if key == PLAIN_PROTOTYPES:
        norms = torch.ones(value.shape[0], 1, dtype=value.dtype) if unit_norm else value.norm(dim=1, keepdim=True)
        return {"last_layer.weight_g": norms, "last_layer.weight_v": value}  # (K, 1), (K, bottleneck)
    return {PARAMETRIZED_PROTOTYPES.get(key, SINGLE_LAYER_MLP.get(key, key)): value}


def normalize_heads_state(checkpoint: Mapping[str, Any]) -> HeadsState:
    """A heads file or a training checkpoint -> its heads in the release's layout, and its centres.

    Accepts our exports (`heads.pth`, formats 1 and 2), the releases' `teacher_checkpoint.pth` ({"teacher": ...})
    and their training checkpoints ({"model": {"student.dino_head...", "teacher.dino_head...", "dino_loss.center",
    ...}}), with any of the wrapper prefixes of `WRAPPER_PREFIXES`; the teacher's heads win over the student's.
    DINOv3's plain prototypes are read as the same function (see `PLAIN_PROTOTYPES`); a centre that holds NaN is
    left out (DINOv3 fills its centres with NaN and, centring by Sinkhorn-Knopp, never sets them).
    """
    legacy = isinstance(checkpoint.get("format"), int) and isinstance(checkpoint.get("dino_head"), Mapping)
    if legacy:
        checkpoint = _legacy_heads_as_flat(checkpoint)
    inner = _unwrap_container(checkpoint)
    centers = {}
    for name, key in CENTER_KEYS.items():
        found = [v for k, v in inner.items() if _strip_wrappers(k) == key and isinstance(v, Tensor)]
        if found and not found[0].isnan().any():
            centers[name] = found[0]
    heads: dict[str, dict[str, Tensor]] = {}
    for raw_key, value in _prefer_teacher(inner).items():
        key = _strip_wrappers(raw_key)
        name, _, rest = key.partition(".")
        if name not in HEAD_NAMES or not isinstance(value, Tensor):
            continue
        for k, v in _rename_prototypes(rest, value, unit_norm=legacy).items():
            if k in heads.setdefault(name, {}):
                raise CheckpointError(f"checkpoint key {raw_key!r} repeats {name}.{k}")
            heads[name][k] = v
    return HeadsState(heads=heads, centers=centers)


def head_key_map(head: nn.Module) -> dict[str, str]:
    """The head key map expanded over the MLP's linear layers: official key -> our parameter name."""
    linear = [j for j, m in enumerate(head.mlp) if isinstance(m, nn.Linear)]
    expanded: dict[str, str] = {}
    for official, ours in HEAD_KEY_MAP.items():
        if "{j}" not in official:
            expanded[official] = ours
            continue
        for j in linear:
            if not official.endswith(".bias") or head.mlp[j].bias is not None:
                expanded[official.format(j=j)] = ours.format(j=j)
    return expanded


def _head_problems(name: str, state: Mapping[str, Tensor], head: nn.Module) -> list[str]:
    """What keeps `state` from loading into `head`, one line per key (prefixed with the head's name)."""
    key_map, ours = head_key_map(head), head.state_dict()
    if set(key_map.values()) != set(ours):  # an internal invariant: the key map covers the head exactly
        raise RuntimeError(f"HEAD_KEY_MAP out of sync with the head: {sorted(set(ours) ^ set(key_map.values()))}")
    problems = [
        f"missing key '{name}.{k}' (expected shape {list(ours[key_map[k]].shape)})" for k in key_map if k not in state
    ]
    problems += [f"unexpected key '{name}.{k}' (shape {list(v.shape)})" for k, v in state.items() if k not in key_map]
    problems += [
        f"shape mismatch for '{name}.{k}': checkpoint {list(state[k].shape)}, model {list(ours[v].shape)}"
        for k, v in key_map.items()
        if k in state and state[k].shape != ours[v].shape
    ]
    return problems


def load_official_heads(heads: Mapping[str, nn.Module], source: str | Path | Mapping[str, Any]) -> HeadsState:
    """Loads a checkpoint's heads (see `normalize_heads_state`) into `heads`, strictly.

    Args:
        heads: `dino_head` (and `ibot_head` when separate) -> the `DINOHead` modules to overwrite.
        source: a heads file, a training checkpoint file, or either in memory.

    Returns:
        What was read (the centres are the caller's to apply).

    Raises:
        CheckpointError: a head is missing or extra (a tied head against a separate one: `ibot.separate_head`), or a
            key is missing, unexpected or mis-shaped; the message names each.
    """
    raw = read_state_dict(source) if isinstance(source, str | Path) else source
    found = normalize_heads_state(raw)
    problems = [
        f"{name}: in the checkpoint, not in the model (the checkpoint's iBOT head is separate; ibot.separate_head is "
        "false)"
        if name == "ibot_head"
        else f"{name}: in the checkpoint, not in the model"
        for name in found.heads
        if name not in heads
    ]
    for name, head in heads.items():
        if name not in found.heads:
            tied = " (the checkpoint's iBOT head is tied to the DINO head; ibot.separate_head is true)"
            problems.append(f"{name}: not in the checkpoint" + (tied if name == "ibot_head" else ""))
        else:
            problems += _head_problems(name, found.heads[name], head)
    if problems:
        raise CheckpointError("checkpoint heads do not fit the model:\n  " + "\n  ".join(problems))
    for name, head in heads.items():
        key_map = head_key_map(head)
        head.load_state_dict({key_map[k]: v for k, v in found.heads[name].items()}, strict=True)
    return found


def official_heads_state(heads: Mapping[str, Mapping[str, Tensor]], centers: Mapping[str, Tensor | None]) -> dict:
    """Heads (name -> state dict) and centres in the release's flat layout: `dino_head.mlp.0.weight`, ...,
    `dino_loss.center`; what `normalize_heads_state` reads back and the release's `SSLMetaArch` loads."""
    out: dict[str, Tensor] = {}
    for name, state in heads.items():
        out |= {f"{name}.{k}": v.detach().to("cpu").contiguous() for k, v in state.items()}
    for name, center in centers.items():
        if center is not None:
            out[CENTER_KEYS[name]] = center.detach().to("cpu").contiguous()
    return out


# -- families: the dispatch point --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """One family's released backbone layout: what the loaders above dispatch to."""

    family: str
    """The family's name, as in `families.py`."""
    model_type: type[nn.Module]
    """Our backbone class of the family."""
    marker: str
    """A key that this family's files hold and no other family's (after `normalize_state_dict`)."""
    key_map: Callable[[Any], dict[str, str]]
    """Backbone -> official key -> our name, expanded over its blocks."""
    geometry: Callable[[Mapping[str, Tensor]], dict[str, Any]]
    """Normalised state dict -> the overrides of the family's builder that the file fixes."""
    metadata_key: str
    """Name of the config entry in the metadata of a `.safetensors` file we write."""
    complete: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] = dict
    """Normalised state dict -> the same with any key the family's files may leave out filled in (ConvNeXt's final
    norm, stored under two names)."""


# ======================================================================================================================
# DINOv3 ConvNeXt backbones (`dinov3_convnext_tiny`, `_small`, `_base`, `_large`): the released layout, strictly
# ======================================================================================================================
# Official key -> our parameter name; `{i}` is a stage (the downsample layers before stages 1-3 are `{i}` = 1, 2, 3;
# `downsample_layers.0` is the stem) and `{j}` a block of stage i. Our modules carry the release's names, so the map
# is the identity; it stays literal for the same reason as `KEY_MAP`.
CONVNEXT_STEM_KEY_MAP: dict[str, str] = {
    "downsample_layers.0.0.weight": "downsample_layers.0.0.weight",  # [C0, 3, 4, 4], stride 4
    "downsample_layers.0.0.bias": "downsample_layers.0.0.bias",
    "downsample_layers.0.1.weight": "downsample_layers.0.1.weight",  # [C0], channels-first LayerNorm
    "downsample_layers.0.1.bias": "downsample_layers.0.1.bias",
}
CONVNEXT_DOWNSAMPLE_KEY_MAP: dict[str, str] = {  # i = 1, 2, 3
    "downsample_layers.{i}.0.weight": "downsample_layers.{i}.0.weight",  # [C_{i-1}], channels-first LayerNorm
    "downsample_layers.{i}.0.bias": "downsample_layers.{i}.0.bias",
    "downsample_layers.{i}.1.weight": "downsample_layers.{i}.1.weight",  # [C_i, C_{i-1}, 2, 2], stride 2
    "downsample_layers.{i}.1.bias": "downsample_layers.{i}.1.bias",
}
CONVNEXT_BLOCK_KEY_MAP: dict[str, str] = {  # i = 0..3, j < depths[i]
    "stages.{i}.{j}.dwconv.weight": "stages.{i}.{j}.dwconv.weight",  # [C_i, 1, 7, 7], depthwise
    "stages.{i}.{j}.dwconv.bias": "stages.{i}.{j}.dwconv.bias",
    "stages.{i}.{j}.norm.weight": "stages.{i}.{j}.norm.weight",  # [C_i], channels-last LayerNorm
    "stages.{i}.{j}.norm.bias": "stages.{i}.{j}.norm.bias",
    "stages.{i}.{j}.pwconv1.weight": "stages.{i}.{j}.pwconv1.weight",  # [4 C_i, C_i]
    "stages.{i}.{j}.pwconv1.bias": "stages.{i}.{j}.pwconv1.bias",
    "stages.{i}.{j}.pwconv2.weight": "stages.{i}.{j}.pwconv2.weight",  # [C_i, 4 C_i]
    "stages.{i}.{j}.pwconv2.bias": "stages.{i}.{j}.pwconv2.bias",
}
CONVNEXT_GAMMA_KEY_MAP: dict[str, str] = {"stages.{i}.{j}.gamma": "stages.{i}.{j}.gamma"}  # [C_i], LayerScale > 0
CONVNEXT_NORM_KEY_MAP: dict[str, str] = {
    "norm.weight": "norm.weight",  # [C3], the final LayerNorm
    "norm.bias": "norm.bias",
    "norms.3.weight": "norms.3.weight",  # the same tensors again: the release's `norms[3]` is `norm`
    "norms.3.bias": "norms.3.bias",
}
CONVNEXT_SHARED_NORM = {"norm.weight": "norms.3.weight", "norm.bias": "norms.3.bias"}
"""The final norm's two spellings in the released layout (one module, so one tensor under two keys)."""


def convnext_key_map(model: ConvNeXt) -> dict[str, str]:
    """The ConvNeXt key map expanded over its stages and blocks: official key -> our parameter name."""
    expanded = {**CONVNEXT_STEM_KEY_MAP, **CONVNEXT_NORM_KEY_MAP}
    for i in range(1, len(model.cfg.depths)):
        expanded |= {k.format(i=i): v.format(i=i) for k, v in CONVNEXT_DOWNSAMPLE_KEY_MAP.items()}
    block_map = {**CONVNEXT_BLOCK_KEY_MAP, **(CONVNEXT_GAMMA_KEY_MAP if model.cfg.layer_scale_init > 0 else {})}
    for i, depth in enumerate(model.cfg.depths):
        for j in range(depth):
            expanded |= {k.format(i=i, j=j): v.format(i=i, j=j) for k, v in block_map.items()}
    return expanded


def _complete_shared_norm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The final norm under both of its released keys: a file holding one spelling (a writer that drops shared
    tensors, as safetensors' `save_model`) gets the other; a file holding two different tensors is an error."""
    out = dict(state)
    for key, alias in CONVNEXT_SHARED_NORM.items():
        if key in out and alias in out:
            if out[key].shape == out[alias].shape and not torch.equal(out[key], out[alias]):
                raise CheckpointError(f"checkpoint keys {key!r} and {alias!r} differ; the release holds one tensor")
        elif key in out or alias in out:
            out.setdefault(key, out.get(alias))  # type: ignore[arg-type]
            out.setdefault(alias, out[key])
    return out


_CONVNEXT_DWCONV = re.compile(r"^stages\.(\d+)\.(\d+)\.dwconv\.weight$")


def convnext_geometry(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The architecture a normalised ConvNeXt state dict fixes, as `build_convnext` overrides: `depths` and `dims`
    (blocks and channels of each stage), and `layer_scale_init` 0 when its blocks have no LayerScale.

    Raises:
        CheckpointError: the checkpoint holds no ConvNeXt stages, or a stage without blocks.
    """
    blocks: dict[int, dict[int, int]] = {}  # stage -> block -> channels
    for key, value in state.items():
        match = _CONVNEXT_DWCONV.match(key)
        if match:
            blocks.setdefault(int(match[1]), {})[int(match[2])] = int(value.shape[0])
    if not blocks:
        raise CheckpointError("not a ConvNeXt checkpoint: no key 'stages.<i>.<j>.dwconv.weight'")
    stages = sorted(blocks)
    if stages != list(range(len(stages))):
        raise CheckpointError(f"ConvNeXt checkpoint with stages {stages}: expected 0..{len(stages) - 1}")
    geometry: dict[str, Any] = {
        "depths": tuple(max(blocks[i]) + 1 for i in stages),
        "dims": tuple(blocks[i][0] for i in stages),
    }
    if not any(key.endswith(".gamma") for key in state if key.startswith("stages.")):
        geometry["layer_scale_init"] = 0.0
    return geometry


LAYOUTS: tuple[Layout, ...] = (
    Layout("dinov2", DinoVisionTransformer, "pos_embed", dinov2_key_map, dinov2_geometry, "dinov2_config"),
    Layout(
        "dinov3_vit", DinoV3VisionTransformer, "rope_embed.periods", dinov3_key_map, dinov3_geometry, "dinov3_config"
    ),
    Layout(
        "dinov3_convnext",
        ConvNeXt,
        "downsample_layers.0.0.weight",
        convnext_key_map,
        convnext_geometry,
        "convnext_config",
        complete=_complete_shared_norm,
    ),
)
"""Every family's layout (a new family: its key map section above, and one entry here)."""
