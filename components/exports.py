"""Exported models, read and written in one place: the descriptor, the backbone, the heads and the digest.

An export is a folder (local, or s3:// for reading):

    model.json            the descriptor: preset and geometry, file names, role, iterations, provenance
    backbone.pth          the backbone in the official DINOv2 layout, float32 (loads into the `torch.hub` models)
    backbone.safetensors  the same tensors, with the backbone config as metadata
    heads.pth             the DINO and iBOT heads in the release's layout and the softmax centres (optional)

The training stages write exports (`write_export`); the high-resolution phase, distillation, continued pretraining,
embedding, evaluation and the report's registry read them (`read_export`, `read_weights`), and the registry's
servable models carry a backbone-only copy (`copy_backbone`). Nothing else parses a descriptor or opens a weight
file. Weight files outside an export (the release's `dinov2_vits14_pretrain.pth`, its training checkpoints) are read
by `read_weights` too.

A descriptor (format 2; format 1, without `format`, `heads_config` or `provenance`, reads the same):

    {"format": 2, "arch": "vit_small", "patch_size": 14, "num_register_tokens": 0, "ffn_layer": "mlp",
     "img_size": 518, "interpolate_offset": 0.1, "interpolate_antialias": false, "weights": "backbone.pth",
     "heads": "heads.pth", "role": "teacher", "iterations": 1250, "heads_config": {"dino": {...}, "ibot": {...}},
     "provenance": {...}}

`weights` and `heads` are relative to the folder (or absolute URIs); an optional `name` names the model in the
evaluation tables; any key of `OVERRIDE_KEYS`, or a nested `"overrides": {...}`, is passed to `build_backbone`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from components import storage
from components.config import PRESET_GEOMETRY, ModelConfig
from components.jsonio import write_json
from components.model.adapter import (
    HeadsState,
    load_official_heads,
    load_official_weights,
    official_heads_state,
    official_state_dict,
    read_state_dict,
    save_official_weights,
)
from components.model.families import (
    backbone_from_config,
    build_backbone,
    config_fields,
    differing_fields,
    family_of,
    model_geometry,
)

DESCRIPTOR = "model.json"
FORMAT = 2
"""2: heads in the release's layout (trainable prototype norms); 1: our own head layout (norms fixed to 1)."""
BACKBONE_FILES = ("backbone.pth", "backbone.safetensors")
HEADS_FILE = "heads.pth"
GEOMETRY_KEYS = (
    "patch_size", "num_register_tokens", "ffn_layer", "img_size", "interpolate_offset", "interpolate_antialias",
)  # fmt: skip
"""Descriptor keys that fix a DINOv2 backbone's geometry beside its preset (`arch`); every DINOv2 export records
them. Exports of the other families (DINOv3 ViT, ConvNeXt) record the fields of their config that differ from the
preset's under `overrides`."""
OVERRIDE_KEYS = (*GEOMETRY_KEYS, "embed_dim", "depth", "num_heads", "mlp_ratio", "layerscale_init")
"""Top-level descriptor keys passed to a DINOv2 `build_backbone` (a hand-written descriptor may set any of them)."""


class ExportError(ValueError):
    """A descriptor that cannot be read (names the file and the problem)."""


@dataclass(frozen=True)
class Export:
    """An export as read from its descriptor; file URIs are resolved against its folder."""

    folder: str
    """The folder (local path or s3:// prefix) the descriptor lies in."""
    arch: str
    """Preset of `components.model`."""
    overrides: dict[str, Any]
    """Backbone overrides for `build_backbone` (the geometry, and any other `OVERRIDE_KEYS`)."""
    weights: str | None
    """The official-layout backbone file; None: the descriptor asks for a seeded random initialisation."""
    heads: str | None
    """The heads file, or None when the export has none (a backbone-only export, or an official checkpoint)."""
    role: str
    """teacher, student, ... (what the stage that wrote it exported)."""
    name: str | None = None
    """The name the descriptor gives the model, if any."""
    iterations: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    """Where the weights came from (the teacher of a student, the file a continued pretraining started from)."""
    descriptor: dict[str, Any] = field(default_factory=dict)
    """The descriptor as read."""

    @property
    def descriptor_uri(self) -> str:
        return storage.join(self.folder, DESCRIPTOR)

    def model_config(self, base: ModelConfig) -> ModelConfig:
        """`base` (the `model` section) with this export's preset and geometry (its preset's patch size and
        storage tokens unless the export overrides them)."""
        geometry = {**PRESET_GEOMETRY.get(self.arch, {}), **model_geometry(self.arch, self.overrides)}
        return base.model_copy(update={"arch": self.arch, **geometry})

    def build_backbone(self, *, seed: int | None = None) -> nn.Module:
        """The backbone with this export's weights (strictly), or a random init seeded by `seed`."""
        if seed is not None:
            torch.manual_seed(seed)
        model = build_backbone(self.arch, **self.overrides)
        if self.weights is not None:
            load_official_weights(model, read_weights(self.weights)[0])
        return model

    def load_heads(self, heads: Mapping[str, nn.Module]) -> HeadsState:
        """Loads the heads file into `heads` (`dino_head`, and `ibot_head` when separate), strictly.

        Raises:
            ExportError: the export has no heads.
            CheckpointError: they do not fit (the message names the key and both shapes).
        """
        if self.heads is None:
            raise ExportError(f"{self.folder}: the export has no heads")
        return load_official_heads(heads, read_weights(self.heads)[0])

    def digest(self) -> str:
        """sha256 over the backbone and heads files' bytes: the export's identity (short)."""
        digest = hashlib.sha256()
        for uri in (self.weights, self.heads):
            if uri is not None:
                digest.update(file_digest(uri).encode())
        return digest.hexdigest()[:16]


def is_export(uri: str | Path) -> bool:
    """True when `uri` is a folder holding a descriptor."""
    try:
        return storage.exists(storage.join(str(uri), DESCRIPTOR))
    except storage.StorageError:
        return False


def read_export(uri: str | Path) -> Export:
    """Reads an export from its folder or its descriptor file.

    Raises:
        FileNotFoundError: there is no descriptor.
        ExportError: it is not JSON, has no `arch`, or has unknown backbone overrides.
    """
    uri = str(uri)
    path = uri if storage.basename(uri) == DESCRIPTOR or uri.endswith(".json") else storage.join(uri, DESCRIPTOR)
    try:
        desc = json.loads(storage.read_bytes(path))
    except storage.StorageNotFoundError:
        raise FileNotFoundError(f"{path}: no model descriptor; not an export") from None
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: not valid JSON: {err}") from None
    if "arch" not in desc:
        raise ExportError(f"{path}: a model descriptor needs an `arch`")
    folder = storage.normalize(os.path.dirname(path)) if storage.is_s3(path) else os.path.dirname(path)
    heads = _resolve(folder, desc.get("heads"))
    if heads is not None and not storage.exists(heads):
        heads = None  # a backbone-only export: its heads are fitted when a run needs them
    return Export(
        folder=folder,
        arch=str(desc["arch"]),
        overrides=_overrides(path, desc),
        weights=_resolve(folder, desc.get("weights", BACKBONE_FILES[0])),
        heads=heads,
        role=str(desc.get("role", "model")),
        name=desc.get("name"),
        iterations=desc.get("iterations"),
        provenance=dict(desc.get("provenance") or {}),
        descriptor=desc,
    )


def _resolve(folder: str, name: str | None) -> str | None:
    if name is None or storage.is_s3(name) or os.path.isabs(name):
        return name
    return storage.join(folder, name)


def _overrides(path: str, desc: Mapping[str, Any]) -> dict[str, Any]:
    """The descriptor's backbone overrides: DINOv2's top-level geometry keys, and a nested `overrides` of any of the
    preset family's config fields (JSON lists read back as tuples)."""
    try:
        dinov2 = family_of(str(desc["arch"])).name == "dinov2"
        allowed = OVERRIDE_KEYS if dinov2 else config_fields(str(desc["arch"]))
    except KeyError as err:
        raise ExportError(f"{path}: {err.args[0]}") from None
    out = {k: desc[k] for k in OVERRIDE_KEYS if desc.get(k) is not None} if dinov2 else {}
    nested = {k: tuple(v) if isinstance(v, list) else v for k, v in (desc.get("overrides") or {}).items()}
    unknown = set(nested) - set(allowed)
    if unknown:
        raise ExportError(f"{path}: unknown backbone overrides {sorted(unknown)}; allowed: {list(allowed)}")
    return {**out, **nested}


def write_export(
    out_dir: str | Path,
    *,
    model: ModelConfig,
    backbone_state: Mapping[str, Tensor],
    heads: Mapping[str, Mapping[str, Tensor]] | None,
    centers: Mapping[str, Tensor | None] | None = None,
    role: str,
    iterations: int,
    heads_config: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Writes an export: the backbone (official layout, .pth and .safetensors), the heads and the descriptor, all
    written into a staging folder beside `out_dir` and then renamed into it, the descriptor last. A reader that finds
    the descriptor finds every file it names; a write that fails (out of space, any OS error) removes the staging
    folder and leaves the previous export as it was.

    Args:
        out_dir: the folder (created).
        model: the backbone's `model` section (preset and geometry).
        backbone_state: the backbone's state dict (our parameter names).
        heads: `dino_head` (and `ibot_head`) -> state dict, or None for a backbone-only export.
        centers: the softmax centres by head name (saved with the heads).
        role: teacher, student, ...
        iterations: optimizer steps the weights have seen.
        heads_config: the `dino` / `ibot` sections the heads were built from.
        provenance: where the weights came from.

    Returns:
        The files written.

    Raises:
        OutOfSpaceError: the disk filled up (the message names the folder, the bytes needed and free).
        StorageError: another OS error while writing.
    """
    out_dir = Path(out_dir)
    with torch.device("meta"):  # no initialisation is paid, even for ViT-g: the state's tensors are assigned
        backbone = backbone_from_config(model.model_copy(update={"drop_path_rate": 0.0}))
    backbone.load_state_dict(dict(backbone_state), strict=True, assign=True)
    if family_of(model.arch).name == "dinov2":
        geometry = {k: getattr(backbone.cfg, k) for k in GEOMETRY_KEYS}
    else:
        geometry = {"overrides": differing_fields(backbone, model.arch)}
    descriptor = {
        "format": FORMAT,
        "arch": model.arch,
        **geometry,
        "weights": BACKBONE_FILES[0],
        "heads": HEADS_FILE if heads is not None else None,
        "role": role,
        "iterations": int(iterations),
        "heads_config": dict(heads_config or {}),
        "provenance": dict(provenance or {}),
    }
    # Every file is written into a staging folder beside `out_dir` first: a disk that fills up (or any OS error)
    # leaves the previous export as it was. Then each is renamed into place (renames need no space), the descriptor
    # last, so a reader that finds the descriptor finds every file it names.
    staging = out_dir.with_name(f".{out_dir.name}.export-partial")
    shutil.rmtree(staging, ignore_errors=True)
    tensors = sum(t.numel() * t.element_size() for t in backbone_state.values())
    needed = len(BACKBONE_FILES) * tensors + sum(
        t.numel() * t.element_size() for h in (heads or {}).values() for t in h.values()
    )
    kept = f"the partial files are removed and the previous export in {out_dir} is as it was"
    names = [*BACKBONE_FILES, *([HEADS_FILE] if heads is not None else []), DESCRIPTOR]
    try:
        with storage.named_write_errors(staging, what=f"the export of iteration {iterations} to {out_dir}",
                                        needed=needed, kept=kept):  # fmt: skip
            staging.mkdir(parents=True)
            for name in BACKBONE_FILES:
                if name.endswith(".safetensors"):
                    save_official_weights(backbone, staging / name)
                else:  # through a Python file, so that an OS error (no space) reaches us as itself
                    storage.save_torch(official_state_dict(backbone, torch.float32), staging / name)
            if heads is not None:
                storage.save_torch(official_heads_state(heads, centers or {}), staging / HEADS_FILE)
            write_json(staging / DESCRIPTOR, descriptor)
            for name in names:
                with open(staging / name, "rb") as f:
                    os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.replace(staging / name, out_dir / name)
    if heads is None:
        (out_dir / HEADS_FILE).unlink(missing_ok=True)  # a heads file of an earlier export does not belong to it
    shutil.rmtree(staging, ignore_errors=True)
    return [out_dir / name for name in names]


@dataclass(frozen=True)
class WeightsSource:
    """Where a run's starting weights are: an export folder or a weight file, resolved once."""

    model: ModelConfig
    """The backbone's preset and geometry (an export's descriptor, or the `model` section for a file)."""
    weights: str
    """The official-layout backbone file (local; an s3:// source is downloaded first)."""
    heads: str | None
    """The file holding the heads (an export's heads file, or the checkpoint itself), or None: a backbone only."""
    digest: str
    """sha256 over the backbone and heads files' bytes: the weights' identity."""
    origin: str
    """What the user pointed at, for provenance."""
    is_export: bool = False
    """Whether `origin` is an export folder."""

    @property
    def location(self) -> str:
        """What a run loads the weights from: the export folder, or the (downloaded) weight file."""
        return self.origin if self.is_export else self.weights

    @property
    def kind(self) -> str:
        return "export" if self.is_export else "file"

    def describe(self) -> dict[str, Any]:
        """Provenance written into the exports made from these weights."""
        return {
            "arch": self.model.arch,
            "origin": self.origin,
            "sha256": self.digest,
            "heads": "exported" if self.heads is not None else "fitted",
        }


def resolve_source(uri: str, base: ModelConfig, *, download_dir: Path | None = None) -> WeightsSource:
    """An export folder or weight file (local or s3://) as a `WeightsSource`.

    An export gives its geometry, backbone and heads (when it has them). A file is a released backbone (no heads) or
    a training checkpoint (its teacher's heads, when it holds heads) of `base`'s preset, with the patch size,
    registers, interpolation settings and position grid the file holds (`checkpoint_geometry`: a `_reg4` release
    brings its 4 registers). S3 objects are downloaded into `download_dir`, once.

    Raises:
        FileNotFoundError: the source does not exist.
        CheckpointError: its weights do not fit the preset (the message names each key and both shapes).
    """
    from components.model.adapter import check_official_weights, checkpoint_geometry, normalize_heads_state

    exported = is_export(uri)
    if exported:
        export = read_export(uri)
        model, weights, heads = export.model_config(base), export.weights, export.heads
    else:
        model, weights, heads = base, uri, None
    weights = _local(weights, download_dir)
    if weights is None or not Path(weights).is_file():
        raise FileNotFoundError(f"{uri}: no backbone weights found ({weights})")
    heads = _local(heads, download_dir)
    state = read_weights(weights)[0]
    if not exported:  # a released file: its registers (storage tokens), interpolation, patch and grid are its own
        model = model.model_copy(update=model_geometry(model.arch, checkpoint_geometry(state)))
    with torch.device("meta"):  # the shapes only: a file that does not fit stops here, naming key and shapes
        check_official_weights(backbone_from_config(model), state)
    if heads is None and normalize_heads_state(state).heads:
        heads = weights  # a training checkpoint: backbone and heads in one file
    digest = hashlib.sha256()
    for f in dict.fromkeys((weights, heads)):
        if f is not None:
            digest.update(file_digest(f).encode())
    model = model.model_copy(update={"pretrained_weights": None})
    return WeightsSource(
        model=model, weights=weights, heads=heads, digest=digest.hexdigest(), origin=str(uri), is_export=exported
    )


def _local(uri: str | None, download_dir: Path | None) -> str | None:
    """`uri` itself, or for an s3:// object its download into `download_dir` (downloaded once)."""
    if uri is None or not storage.is_s3(uri) or download_dir is None:
        return uri
    target = Path(download_dir) / storage.basename(uri)
    if not target.is_file():
        storage.download_file(uri, target)
    return str(target)


def copy_backbone(export: Export, out_dir: str | Path) -> Path:
    """A backbone-only export in `out_dir` (created): the export's official-layout weight files (the `.pth` and the
    `.safetensors` beside it, each copied verified) and a descriptor naming them, without the heads.

    Raises:
        ExportError: The export names no weights (a random initialisation).
    """
    if export.weights is None:
        raise ExportError(f"{export.descriptor_uri}: no weights to copy (the descriptor asks for a random init)")
    out_dir = Path(out_dir)
    names = [storage.basename(export.weights)]
    if export.weights == storage.join(export.folder, names[0]) and names[0] in BACKBONE_FILES:  # the export's own
        names += [n for n in BACKBONE_FILES if n != names[0] and storage.exists(storage.join(export.folder, n))]
    for i, name in enumerate(names):
        storage.download_file(export.weights if i == 0 else storage.join(export.folder, name), out_dir / name)
    write_json(out_dir / DESCRIPTOR, {**export.descriptor, "weights": names[0], "heads": None})
    return out_dir


def read_weights(uri: str | Path) -> tuple[dict[str, Any], str]:
    """A weight file (local or s3://; `.safetensors`, or a torch file loaded with `weights_only=True`) and the
    sha256 of its bytes."""
    with storage.local_copy(str(uri)) as path:
        return read_state_dict(path), storage.sha256_file(path)


def file_digest(uri: str | Path) -> str:
    """sha256 of a file's bytes (local or s3://)."""
    with storage.local_copy(str(uri)) as path:
        return storage.sha256_file(path)


def export_digest(uri: str | Path) -> str:
    """The identity of the export at `uri` (see `Export.digest`)."""
    return read_export(uri).digest()
