"""Which backbones to evaluate, and how to build them.

The pretrain and distill stages write each backbone as an export (`components.exports`, the one reader of its
`model.json` descriptor and weight files), e.g.
```
{"arch": "vit_tiny", "patch_size": 14, "num_register_tokens": 0, "weights": "backbone.pth", "role": "teacher"}
```
`role` is `teacher`, `student` or anything else (kept as given); an optional `name` names the model in the tables
(default: `teacher`, `student_<arch>`, or the folder name); the geometry keys and any other backbone override go to
`build_backbone`. A hand-written descriptor of the same form evaluates a model of one's own.

Besides the discovered models, the evaluate stage adds a seeded random initialisation of the teacher's preset (the
`random_init` baseline) and the user's `evaluate.extra_models`: each entry either a path to a `model.json`, or
`<arch>=<weights>` for an official checkpoint (e.g. `vit_small=/ckpt/dinov2_vits14_pretrain.pth`,
`dinov3_vitl16=/ckpt/dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth`): the file's geometry (registers, patch, a DINOv3
file's norms) is read from the file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from components import exports, storage
from components.log import get_logger

log = get_logger(__name__)

BASELINE_NAME = "random_init"


@dataclass(frozen=True)
class ModelSpec:
    """One backbone to evaluate."""

    name: str
    """Row name in every table and file name under metrics/eval/ (letters, digits, `_.-`)."""
    arch: str
    """Preset of `components.model`."""
    role: str
    """teacher, student, baseline, official, ..."""
    weights: str | None
    """Official-layout backbone file (local or s3://); None: a seeded random initialisation."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Backbone overrides for `build_backbone`."""
    descriptor: str | None = None
    """The model.json it was read from."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arch": self.arch,
            "role": self.role,
            "weights": self.weights,
            "overrides": self.overrides,
            "descriptor": self.descriptor,
        }


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def read_descriptor(path: str | Path) -> ModelSpec:
    """Reads an export's descriptor (`components.exports`) into a spec."""
    export = exports.read_export(path)
    default_name = {"teacher": "teacher", "student": f"student_{export.arch}"}.get(
        export.role, storage.basename(export.folder)
    )
    return ModelSpec(
        name=_safe_name(str(export.name or default_name)),
        arch=export.arch,
        role=export.role,
        weights=export.weights,
        overrides=export.overrides,
        descriptor=export.descriptor_uri,
    )


def discover_models(roots: Sequence[str]) -> list[ModelSpec]:
    """Every `model.json` under the given folders (recursively, sorted); a missing folder is skipped with a warning."""
    specs = []
    for root in roots:
        try:
            files = storage.list_files(root, recursive=True)
        except storage.StorageNotFoundError:
            log.warning("%s does not exist; no models from there", root)
            continue
        specs += [read_descriptor(f) for f in files if storage.basename(f) == exports.DESCRIPTOR]
    return specs


def extra_model(entry: str) -> ModelSpec:
    """A user-supplied model: a descriptor path, or `<arch>=<weights>` (an official checkpoint)."""
    if entry.endswith(".json"):
        spec = read_descriptor(entry)
        return spec if spec.role != "model" else replace(spec, role="official")
    arch, sep, weights = entry.partition("=")
    if not sep or not arch or not weights:
        raise ValueError(f"extra model {entry!r}: expected a model.json path or <arch>=<weights>")
    stem = storage.basename(weights).rsplit(".", 1)[0]
    return ModelSpec(name=_safe_name(stem), arch=arch.strip(), role="official", weights=weights.strip())


def model_from_reference(ref: str) -> ModelSpec:
    """The backbone a user names on the command line: an export folder, a `model.json`, `<arch or hub
    name>=<weights>`, or a Torch Hub name (`dinov2_vits14`, `dinov2_vitg14_reg`) whose released weights are read from
    torch's hub cache (`$TORCH_HOME/hub/checkpoints/`; nothing is downloaded).

    Raises:
        FileNotFoundError: A hub name whose weights are not in the cache (the message gives the file and its URL), or
            a folder without `model.json`.
    """
    from components.model import OFFICIAL_MODELS, official_checkpoint_url

    name, sep, weights = ref.partition("=")
    if sep and name.strip() in OFFICIAL_MODELS:
        arch, release = OFFICIAL_MODELS[name.strip()]
        return ModelSpec(name=_safe_name(name), arch=arch, role="official", weights=weights.strip(),
                         overrides=dict(release))  # fmt: skip
    if sep or ref.endswith(".json"):
        return extra_model(ref)
    if ref in OFFICIAL_MODELS:
        arch, release = OFFICIAL_MODELS[ref]
        url = official_checkpoint_url(ref)
        path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the released weights of {ref} are not in torch's hub cache; download "
                                    f"{url} there, or pass --model {ref}=<weights file>")  # fmt: skip
        return ModelSpec(name=ref, arch=arch, role="official", weights=str(path), overrides=dict(release))
    spec = read_descriptor(ref)
    return spec if spec.role != "model" else replace(spec, role="official")


def random_baseline(reference: ModelSpec | None, arch: str, overrides: Mapping[str, Any]) -> ModelSpec:
    """The seeded random-init baseline: the teacher's preset and overrides when there is a teacher.

    `overrides` are the pretraining config's; the teacher's descriptor wins on what it records (its architecture),
    while keys only the config knows (`layerscale_init`: a trained model's gammas are in its weights, a random
    init's come from this value) are kept, so the baseline is the pretraining run's own initialisation.
    """
    if reference is not None:
        arch, overrides = reference.arch, {**overrides, **reference.overrides}
    return ModelSpec(name=BASELINE_NAME, arch=arch, role="baseline", weights=None, overrides=dict(overrides))


def unique_names(specs: Sequence[ModelSpec]) -> list[ModelSpec]:
    """Renames duplicates `name`, `name_2`, ... so every model has its own files and table row."""
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        count = seen.get(spec.name, 0)
        seen[spec.name] = count + 1
        out.append(spec if count == 0 else replace(spec, name=f"{spec.name}_{count + 1}"))
    return out


def build_model(spec: ModelSpec, *, seed: int) -> nn.Module:
    """Builds the backbone (weights loaded strictly, or a random init seeded by `seed`), in eval mode, frozen."""
    from components.model import build_backbone, checkpoint_geometry, load_official_weights

    torch.manual_seed(seed)
    if spec.weights is None:
        model = build_backbone(spec.arch, **spec.overrides)
    else:  # the file's geometry (a `_reg4` release's registers, a DINOv3 file's norms), unless a descriptor says
        state = exports.read_weights(spec.weights)[0]
        model = load_official_weights(
            build_backbone(spec.arch, **{**checkpoint_geometry(state), **spec.overrides}), state
        )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def preprocessing(spec: ModelSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the preset's weights expect (ImageNet's for every DINOv2 preset)."""
    try:
        from components.model import get_preset

        preset = get_preset(spec.arch)
        return tuple(preset.mean), tuple(preset.std)
    except (ImportError, KeyError):
        from components.evaluation.features import IMAGENET_MEAN, IMAGENET_STD

        return IMAGENET_MEAN, IMAGENET_STD
