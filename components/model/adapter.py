"""Official DINOv2 checkpoints in and out: the released backbone state-dict layout, strictly checked.

`load_official_weights(model, path_or_state_dict)` reads the files users download (`dinov2_vits14_pretrain.pth`,
..., `dinov2_vitg14_reg4_pretrain.pth`) and training checkpoints whose keys carry wrappers (`module.`, `teacher.`,
`backbone.`, chunked `blocks.<chunk>.<i>.`); `save_official_weights(model, path)` writes ours in the released layout
(`.pth` or `.safetensors`). Each key transform is a named helper below; the layout itself is the literal `KEY_MAP`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from components.model.vit import DinoVisionTransformer

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

# Training-checkpoint wrappers stripped from the front of keys (DDP/FSDP, torch.compile, the SSL meta-arch).
WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_orig_mod.", "teacher.", "student.", "backbone.")
# Top-level entries of a training checkpoint that hold the weights, in order of preference.
CONTAINER_KEYS = ("teacher", "model", "state_dict", "module")
# Entries of a training checkpoint that are not part of the backbone.
DROP_PREFIXES = ("dino_head.", "ibot_head.", "head.")

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the backbone: missing, unexpected or mis-shaped keys (named in the message)."""


def official_key_map(model: DinoVisionTransformer) -> dict[str, str]:
    """The key map of this backbone expanded over its blocks: official key -> our parameter name."""
    templates = {**KEY_MAP, **(SWIGLU_KEY_MAP if model.cfg.ffn_layer == "swiglu" else MLP_KEY_MAP)}
    if model.num_register_tokens:
        templates.update(REGISTER_KEY_MAP)
    expanded: dict[str, str] = {}
    for official, ours in templates.items():
        if "{i}" in official:
            for i in range(model.n_blocks):
                expanded[official.format(i=i)] = ours.format(i=i)
        else:
            expanded[official] = ours
    return expanded


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


def _unwrap_model(model: nn.Module) -> DinoVisionTransformer:
    """The backbone inside DDP (`.module`) or `torch.compile` (`._orig_mod`) wrappers."""
    while not isinstance(model, DinoVisionTransformer):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"expected a DinoVisionTransformer, got {type(model).__name__}")
        model = inner
    return model


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Reads a `.safetensors` file, or a torch file (loaded with `weights_only=True`, on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_official_weights(
    model: nn.Module, path_or_state_dict: str | Path | Mapping[str, Any]
) -> DinoVisionTransformer:
    """Loads released (or training) DINOv2 backbone weights into `model`, strictly.

    Args:
        model: a backbone of the checkpoint's architecture (see `build_official_backbone`), possibly wrapped by DDP
            or `torch.compile`.
        path_or_state_dict: a `.pth` / `.safetensors` file or an in-memory checkpoint.

    Returns:
        The backbone, with its parameters overwritten (dtype and device kept).

    Raises:
        CheckpointError: a key is missing or unexpected, or a tensor's shape differs; the message names the keys.
    """
    backbone = _unwrap_model(model)
    raw = read_state_dict(path_or_state_dict) if isinstance(path_or_state_dict, str | Path) else path_or_state_dict
    state = normalize_state_dict(raw)
    key_map = official_key_map(backbone)
    ours = backbone.state_dict()
    if set(key_map.values()) != set(ours):  # an internal invariant: the key map covers the model exactly
        raise RuntimeError(f"KEY_MAP out of sync with the model: {sorted(set(ours) ^ set(key_map.values()))}")

    problems = [f"missing key {k!r} (expected shape {list(ours[key_map[k]].shape)})" for k in key_map if k not in state]
    problems += [f"unexpected key {k!r} (shape {list(v.shape)})" for k, v in state.items() if k not in key_map]
    for official, name in key_map.items():
        if official in state and state[official].shape != ours[name].shape:
            problems.append(
                f"shape mismatch for {official!r}: checkpoint {list(state[official].shape)}, "
                f"model {list(ours[name].shape)}"
            )
    if problems:
        raise CheckpointError("checkpoint does not fit the backbone:\n  " + "\n  ".join(problems))
    backbone.load_state_dict({key_map[k]: v for k, v in state.items()}, strict=True)
    return backbone


def official_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Our backbone's weights as a released-layout state dict (CPU, contiguous; `dtype` None keeps the model's)."""
    backbone = _unwrap_model(model)
    ours = backbone.state_dict()
    out = {}
    for official, name in official_key_map(backbone).items():
        t = ours[name].detach().to("cpu")
        out[official] = (t.to(dtype) if dtype is not None else t).contiguous().clone()
    return out


def save_official_weights(model: nn.Module, path: str | Path, dtype: torch.dtype | None = torch.float32) -> Path:
    """Writes the backbone in the released layout: `.safetensors` (with the config as metadata) or a torch file.

    Args:
        model: the backbone (possibly wrapped).
        path: destination; the suffix picks the format (`.safetensors`, else `torch.save`).
        dtype: dtype of the saved tensors (float32 as released; None keeps the model's).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = official_state_dict(model, dtype)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        config = json.dumps(asdict(_unwrap_model(model).cfg))
        save_file(state, str(path), metadata={"format": "pt", "dinov2_config": config})
    else:
        torch.save(state, path)
    return path
