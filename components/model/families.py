"""Backbone families by name: which module builds a preset or a released backbone, for every family at once.

Each family module keeps its own presets and builder (`vit.py`: DINOv2; `vit_dinov3.py`: the DINOv3 ViTs;
`convnext.py`: the DINOv3 ConvNeXts); this
registry finds the family of a name and hands the call over, so that `build_backbone("vit_small")` and
`build_backbone("dinov3_vitl16")` read the same. A new family is one `Family` entry in `FAMILIES`.

from components.model import build_official_backbone, load_official_weights
model = load_official_weights(build_official_backbone("dinov3_vits16"), "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from components.model import convnext, vit, vit_dinov3
from components.model.vit import Preset


@dataclass(frozen=True)
class Family:
    """One model family: its presets, its released backbones, and how to build either."""

    name: str
    presets: Mapping[str, Preset]
    official_models: Mapping[str, tuple[str, dict[str, Any]]]
    """Torch Hub name -> (preset, overrides)."""
    backbone_config: Callable[..., Any]
    """(preset, **overrides) -> the family's config."""
    build_backbone: Callable[..., nn.Module]
    """(preset, **overrides) -> a freshly initialised backbone."""
    build_official_backbone: Callable[..., nn.Module]
    """(Torch Hub name, **overrides) -> the released architecture, freshly initialised."""
    checkpoint_url: Callable[[str], str]
    """Torch Hub name -> the released file's address."""
    model_keys: Mapping[str, str]
    """The family config's fields that params.yaml's `model` section sets: family field -> `ModelConfig` field."""
    pipeline_overrides: Mapping[str, Any] = field(default_factory=dict)
    """What the pipeline always sets on this family's backbones (a ConvNeXt's patch tokens on its pseudo-patch grid,
    where iBOT targets and dense features are read)."""


FAMILIES: tuple[Family, ...] = (
    Family(
        "dinov2",
        vit.PRESETS,
        vit.OFFICIAL_MODELS,
        vit.backbone_config,
        vit.build_backbone,
        vit.build_official_backbone,
        vit.official_checkpoint_url,
        {
            "patch_size": "patch_size",
            "num_register_tokens": "num_register_tokens",
            "ffn_layer": "ffn_layer",
            "img_size": "img_size",
            "drop_path_rate": "drop_path_rate",
            "layerscale_init": "layerscale_init",
            "interpolate_antialias": "interpolate_antialias",
            "interpolate_offset": "interpolate_offset",
        },
    ),
    Family(
        vit_dinov3.FAMILY,
        vit_dinov3.PRESETS,
        vit_dinov3.OFFICIAL_MODELS,
        vit_dinov3.backbone_config,
        vit_dinov3.build_backbone,
        vit_dinov3.build_official_backbone,
        vit_dinov3.official_checkpoint_url,
        {
            "patch_size": "patch_size",
            "n_storage_tokens": "num_register_tokens",
            "drop_path_rate": "drop_path_rate",
            "layerscale_init": "layerscale_init",
        },
    ),
    Family(
        convnext.FAMILY,
        convnext.PRESETS,
        convnext.OFFICIAL_MODELS,
        convnext.convnext_config,
        convnext.build_convnext,
        convnext.build_convnext,
        convnext.official_checkpoint_url,
        {"patch_size": "patch_size", "drop_path_rate": "drop_path_rate"},
        {"resize_patch_tokens": True},
    ),
)

PRESETS: dict[str, Preset] = {name: p for family in FAMILIES for name, p in family.presets.items()}
"""Every preset of every family, by name."""
OFFICIAL_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    name: entry for family in FAMILIES for name, entry in family.official_models.items()
}
"""Every released backbone by its Torch Hub name -> (preset, overrides)."""


def family_of(name: str) -> Family:
    """The family of a preset or Torch Hub name; KeyError listing the known names otherwise."""
    for family in FAMILIES:
        if name in family.presets or name in family.official_models:
            return family
    known = ", ".join(sorted({*PRESETS, *OFFICIAL_MODELS}))
    raise KeyError(f"unknown backbone {name!r}; known presets and released models: {known}")


def get_preset(arch: str) -> Preset:
    """The preset named `arch` (any family), with the preprocessing its weights expect."""
    if arch not in PRESETS:
        raise KeyError(f"unknown backbone preset {arch!r}; known: {', '.join(PRESETS)}")
    return PRESETS[arch]


def backbone_config(arch: str, **overrides: Any) -> Any:
    """The config of preset `arch` with `overrides` applied (see `build_backbone`)."""
    get_preset(arch)
    return family_of(arch).backbone_config(arch, **overrides)


def build_backbone(arch: str, **overrides: Any) -> nn.Module:
    """Builds a preset of any family with a fresh initialisation.

    Args:
        arch: a preset name: DINOv2's `vit_test`, ..., `vit_giant2`, or DINOv3's `dinov3_vit_test`,
            `dinov3_vits16`, ..., `dinov3_vit7b16`.
        **overrides: fields of the family's config (`embed_dim`, `depth` and `num_heads` in every family; see
            `vit.build_backbone` and `vit_dinov3.build_backbone`); None keeps the preset's value.

    Raises:
        TypeError: an unknown override (named). KeyError: an unknown preset. ValueError: an inconsistent config.
    """
    get_preset(arch)
    return family_of(arch).build_backbone(arch, **overrides)


def build_official_backbone(official_name: str, **overrides: Any) -> nn.Module:
    """The architecture of a released backbone by its Torch Hub name (`dinov2_vits14_reg`, `dinov3_vitl16`, ...).

    Weights are not downloaded; load them with `load_official_weights` (address: `official_checkpoint_url`).
    """
    if official_name not in OFFICIAL_MODELS:
        raise KeyError(f"unknown official model {official_name!r}; known: {', '.join(OFFICIAL_MODELS)}")
    return family_of(official_name).build_official_backbone(official_name, **overrides)


def official_checkpoint_url(official_name: str) -> str:
    """Download address of a released backbone (DINOv3: its LVD-1689M weights; see `vit_dinov3.RELEASED_FILES`)."""
    if official_name not in OFFICIAL_MODELS:
        raise KeyError(f"unknown official model {official_name!r}; known: {', '.join(OFFICIAL_MODELS)}")
    return family_of(official_name).checkpoint_url(official_name)


def overrides_from_fields(arch: str, **fields: Any) -> dict[str, Any]:
    """The `build_backbone(arch, ...)` overrides that `model`-section fields (`patch_size`, `num_register_tokens`,
    `drop_path_rate`, ...) make for `arch`'s family: those the family has (`Family.model_keys`; `ffn_layer: preset`
    keeps the preset's), and what the pipeline always sets on the family."""
    family = family_of(arch)
    ours = {key: name for name, key in family.model_keys.items()}
    overrides = {ours[k]: v for k, v in fields.items() if k in ours and not (k == "ffn_layer" and v == "preset")}
    return {**overrides, **family.pipeline_overrides}


def build_from_fields(arch: str, **fields: Any) -> nn.Module:
    """Builds preset `arch` of any family from `model`-section fields (see `overrides_from_fields`)."""
    return build_backbone(arch, **overrides_from_fields(arch, **fields))


def backbone_from_config(model_cfg: Any) -> nn.Module:
    """Builds the backbone described by the project's `ModelConfig` (params.yaml `model` section), of any family."""
    fields = {k: getattr(model_cfg, k) for k in type(model_cfg).model_fields if k != "arch"}
    return build_from_fields(model_cfg.arch, **fields)


def model_geometry(arch: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The `ModelConfig` fields that a backbone's family overrides fix (`Family.model_keys`), e.g. a DINOv3 file's
    storage tokens as `num_register_tokens`; fields the `model` section does not have are left out."""
    keys = family_of(arch).model_keys
    return {keys[k]: v for k, v in overrides.items() if k in keys}


def differing_fields(backbone: nn.Module, arch: str) -> dict[str, Any]:
    """The fields of a backbone's config that differ from its preset's (JSON-ready: tuples as lists), without the
    stochastic depth rate (a training setting): what a descriptor records to rebuild the same architecture."""
    preset = asdict(get_preset(arch).config)
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in asdict(backbone.cfg).items()
        if k != "drop_path_rate" and v != preset.get(k)
    }


def config_fields(arch: str) -> tuple[str, ...]:
    """The names a `build_backbone(arch, ...)` override may take (its family config's fields)."""
    return tuple(asdict(get_preset(arch).config))
