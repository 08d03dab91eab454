"""The typed configuration tree, loaded from params.yaml and validated once at entry.

Sections follow DINOv2's own `ssl_default_config.yaml` (model, dino, ibot, teacher, optim, crops, train) plus one
section per pipeline stage. Every field carries a docstring; params.yaml repeats it as a comment. A config is frozen:
code reads it and derives values with pure functions (`scaled_lr`; a training phase's plan), never writes it.

Errors name the key and the value: `load_config` turns pydantic's report into lines such as
`params.yaml: optim.base_lr = -1: Input should be greater than 0`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = "params.yaml"


class ConfigError(ValueError):
    """A params file that cannot be used: unknown key, wrong type or invalid value."""


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are frozen, docstrings document fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True)


# --------------------------------------------------------------------------------------------------------------------
# Data and the embedded synthetic world
# --------------------------------------------------------------------------------------------------------------------


class DataConfig(Section):
    raw: str = "data/synthetic"
    """Root of the raw image layout (pool/, seeds/<set>/, eval/<task>/...): a local folder or s3://bucket/prefix."""
    extra_pool: tuple[str, ...] = ()
    """More pool sources: local folders (recursive), s3://bucket/prefix, or .tar shards (local or s3://)."""


class SyntheticConfig(Section):
    num_classes: int = Field(8, ge=2, le=64)
    """K object classes; each is a (shape, texture, colour) triple."""
    image_size: int = Field(128, ge=32, le=1024)
    """Side of the rendered images, in pixels."""
    pool_size: int = Field(1200, ge=0)
    """Uncurated pool images rendered before planting duplicates and bad files."""
    duplicate_fraction: float = Field(0.1, ge=0.0, le=0.5)
    """Share of pool images that get a planted near-duplicate (crop, re-encode, colour shift or resize)."""
    leak_per_class: int = Field(2, ge=0)
    """Near-copies of evaluation images planted in the pool per class (curation must remove them)."""
    seed_per_class: int = Field(6, ge=1)
    """Images per class in the curated seed set used for retrieval."""
    eval_train_per_class: int = Field(24, ge=1)
    """Labelled evaluation images per class, train split (kNN memory bank, probe training)."""
    eval_val_per_class: int = Field(6, ge=1)
    """Labelled evaluation images per class, val split (probe model selection)."""
    eval_test_per_class: int = Field(12, ge=1)
    """Labelled evaluation images per class, test split (reported metrics)."""
    num_places: int = Field(12, ge=2)
    """Places rendered from several viewpoints, for retrieval and place recognition."""
    views_per_place: int = Field(4, ge=2)
    """Viewpoints per place: the first is the query, the others go to the database."""
    bad_files: bool = True
    """Plant corrupt and hostile files in the pool (truncated, empty, not an image, too small, huge header)."""


class PrepareConfig(Section):
    min_side: int = Field(32, ge=1)
    """Images whose shorter side is below this are rejected (reason `too_small`)."""
    max_pixels: int = Field(40_000_000, ge=1)
    """Images whose header claims more pixels are rejected before decoding (reason `too_large`)."""
    num_workers: int = Field(2, ge=0)
    """Decoding processes (0: decode in the main process)."""
    extensions: tuple[str, ...] | None = None
    """null: every file is decoded and every format Pillow reads is an image (GIF and other multi-frame files: the
    first frame). A list narrows that to files with these suffixes (e.g. [.jpg, .png]); others are rejected as
    `excluded_suffix`."""

    @field_validator("extensions")
    @classmethod
    def _dotted_suffixes(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is None:
            return v
        bad = [e for e in v if not e.startswith(".") or len(e) < 2 or "/" in e]
        if bad or not v:
            raise ValueError(f"needs suffixes with a leading dot such as '.jpg' (null: every file), got {list(v)}")
        return tuple(e.lower() for e in v)


# --------------------------------------------------------------------------------------------------------------------
# DINOv2 sections (as in dinov2/configs/ssl_default_config.yaml; `model` plays the role of `student`)
# --------------------------------------------------------------------------------------------------------------------

Arch = Literal[
    # DINOv2 (patch 14, learned position table, registers optional)
    "vit_test", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2",
    # DINOv3 ViTs by their Torch Hub names (patch 16, axial RoPE, 4 storage tokens)
    "dinov3_vit_test", "dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vitl16plus",
    "dinov3_vith16plus", "dinov3_vit7b16",
]  # fmt: skip
"""The ViT presets of `components.model` (a test keeps this list equal to the registry's)."""
ConvNeXtArch = Literal[
    "convnext_test", "dinov3_convnext_tiny", "dinov3_convnext_small", "dinov3_convnext_base", "dinov3_convnext_large"
]
"""The DINOv3 ConvNeXt presets: students, embedding and evaluation backbones (the release distils them; no masked
pretraining)."""
AnyArch = Arch | ConvNeXtArch
PRESET_GEOMETRY: dict[str, dict[str, int]] = {
    **{name: {"patch_size": 16, "num_register_tokens": 4} for name in Arch.__args__ if name.startswith("dinov3_")},
    **{name: {"patch_size": 16, "num_register_tokens": 0} for name in ConvNeXtArch.__args__},
}
"""Presets whose patch size and register (storage) tokens differ from DINOv2's defaults (14, 0): the defaults of
those keys when a section names such a preset and leaves them out (a test keeps it equal to the presets)."""
DINOV2_ONLY = ("ffn_layer", "img_size", "interpolate_antialias", "interpolate_offset")
"""`model` keys of DINOv2's architecture (its feed-forward switch and learned position table) that DINOv3's presets
fix otherwise (each ViT its feed-forward; RoPE, no position table)."""


def _preset_geometry_defaults(data: Any) -> Any:
    """A section's raw values with `patch_size` and `num_register_tokens` defaulting (left out, or null) to its
    preset's: 16 and 4 storage tokens for DINOv3, DINOv2's 14 and 0 otherwise."""
    if not isinstance(data, dict):
        return data
    defaults = PRESET_GEOMETRY.get(data.get("arch"), {"patch_size": 14, "num_register_tokens": 0})
    return {**data, **{k: v for k, v in defaults.items() if data.get(k) is None}}


class ModelConfig(Section):
    arch: Arch = "vit_tiny"
    """Backbone preset pretrained by the pipeline (student and teacher)."""
    patch_size: int = Field(14, ge=2, le=32)
    """Side of a patch in pixels; null or left out: the preset's (14 for DINOv2, 16 for DINOv3)."""
    num_register_tokens: int = Field(0, ge=0, le=16)
    """Register tokens between the CLS token and the patch tokens (Darcet et al. 2024; DINOv3's storage tokens);
    null or left out: the preset's (0 for DINOv2, 4 for DINOv3)."""
    ffn_layer: Literal["preset", "mlp", "swiglu"] = "preset"
    """Feed-forward type; `preset` keeps the preset's (SwiGLU for vit_giant2, MLP otherwise)."""
    img_size: int = Field(518, ge=32)
    """Image side for which the position-embedding grid is learned (518 px: 37 x 37 patches of 14)."""
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    """Stochastic depth rate; above 0.1 the residual branch runs only on the kept samples."""
    layerscale_init: float = Field(1.0e-5, gt=0.0)
    """Initial LayerScale gamma."""
    interpolate_antialias: bool = False
    """Antialias when resizing the position grid (True for the released register models)."""
    interpolate_offset: float = Field(0.1, ge=0.0, le=1.0)
    """Offset added to the grid size when resizing positions (0.1 for models without registers, 0 with them)."""
    pretrained_weights: str | None = None
    """Continue pretraining from: an official-layout backbone (.pth / .safetensors, local or s3://; its registers,
    interpolation and patch size are read from the file; heads fitted first, see `adapt`), a training checkpoint of
    the release (its teacher's heads are used), or an export folder (backbone + heads, e.g. models/pretrain); null:
    random init."""
    freeze_blocks: int = Field(0, ge=0)
    """Blocks at the bottom kept frozen (with the patch embedding, position embedding and tokens) when continuing
    from `pretrained_weights`; 0 trains them all."""

    _preset_geometry = model_validator(mode="before")(_preset_geometry_defaults)

    @model_validator(mode="after")
    def _family_keys(self) -> ModelConfig:
        if self.arch.startswith("dinov3_"):
            fields = type(self).model_fields
            set_here = sorted(k for k in DINOV2_ONLY if getattr(self, k) != fields[k].default)
            if set_here:
                raise ValueError(
                    f"{', '.join(set_here)}: DINOv2 settings; {self.arch} fixes its feed-forward and has RoPE, no "
                    "position table (pick a DINOv3 preset by its Torch Hub name instead)"
                )
        return self


class WarmupCosineConfig(Section):
    """A value over training, as the DINOv3 release's `linear_warmup_cosine_decay`: linear from `start` towards
    `peak` over `warmup_epochs`, a half-cosine from `peak` to `end` over `cosine_epochs`, then `end`."""

    start: float = Field(1.0, ge=0.0)
    """Value at the first step."""
    peak: float = Field(1.0, ge=0.0)
    """Value at the end of the warm-up, where the cosine starts."""
    end: float = Field(1.0, ge=0.0)
    """Value at the end of the cosine, held after it."""
    warmup_epochs: int = Field(0, ge=0)
    """Epochs of the linear warm-up."""
    cosine_epochs: int | None = Field(None, ge=0)
    """Epochs of the cosine; null: the rest of the training."""


class DinoConfig(Section):
    loss_weight: float = Field(1.0, ge=0.0)
    """Weight of the image-level DINO loss."""
    head_n_prototypes: int = Field(65536, ge=2)
    """K, the number of prototypes of the DINO head."""
    head_bottleneck_dim: int = Field(256, ge=8)
    """Dimension of the L2-normalised bottleneck before the prototypes."""
    head_hidden_dim: int = Field(2048, ge=8)
    """Hidden width of the head's MLP."""
    head_nlayers: int = Field(3, ge=1)
    """Layers of the head's MLP."""
    koleo_loss_weight: float = Field(0.1, ge=0.0)
    """Weight of the KoLeo regulariser on the student's CLS features."""
    koleo_distributed: bool = False
    """KoLeo's nearest neighbours among a group of images across ranks (`koleo_group_size`), as DINOv3's distributed
    KoLeo; False: within each rank's batch (both releases' default)."""
    koleo_group_size: int | None = Field(None, ge=2)
    """Images per neighbour set of the distributed KoLeo, whole per-rank batches of consecutive ranks (DINOv3's
    `koleo_distributed_loss_group_size`: 16 in the 7B's high-resolution phase); null: the global batch."""
    koleo_topk: int = Field(1, ge=1)
    """Nearest neighbours of each image in the distributed KoLeo (DINOv3's `koleo_topk`); 1 without it."""
    local_loss_weight: WarmupCosineConfig = WarmupCosineConfig()
    """Weight of the local crops' DINO terms against the global crops' (DINOv3's `reweight_dino_local_loss` and
    `local_loss_weight_schedule`; 1 throughout: DINOv2's plain mean over all crop pairs), over the pretraining
    epochs; the other phases (high resolution, head fit, distillation) hold its `end`."""

    @model_validator(mode="after")
    def _koleo_options(self) -> DinoConfig:
        if not self.koleo_distributed and (self.koleo_group_size is not None or self.koleo_topk != 1):
            raise ValueError(
                f"dino.koleo_group_size = {self.koleo_group_size} and dino.koleo_topk = {self.koleo_topk} need "
                "dino.koleo_distributed = true (the per-rank KoLeo takes one neighbour within the rank's batch)"
            )
        return self


class IbotConfig(Section):
    loss_weight: float = Field(1.0, ge=0.0)
    """Weight of the patch-level iBOT loss."""
    mask_sample_probability: float = Field(0.5, ge=0.0, le=1.0)
    """Share of global crops that receive a mask."""
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    """Masking ratios of the masked crops, spread linearly over this range."""
    separate_head: bool = False
    """Give iBOT its own head; False ties it to the DINO head."""
    head_n_prototypes: int = Field(65536, ge=2)
    """Prototypes of the separate iBOT head."""
    head_bottleneck_dim: int = Field(256, ge=8)
    """Bottleneck of the separate iBOT head."""
    head_hidden_dim: int = Field(2048, ge=8)
    """Hidden width of the separate iBOT head."""
    head_nlayers: int = Field(3, ge=1)
    """Layers of the separate iBOT head."""

    @field_validator("mask_ratio_min_max")
    @classmethod
    def _ordered_ratios(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] <= v[1] < 1.0:
            raise ValueError("needs 0 <= min <= max < 1")
        return v


class TeacherConfig(Section):
    momentum_teacher: float = Field(0.992, ge=0.0, le=1.0)
    """EMA momentum of the teacher at the start of training."""
    final_momentum_teacher: float = Field(1.0, ge=0.0, le=1.0)
    """EMA momentum at the end (cosine schedule)."""
    warmup_teacher_temp: float = Field(0.04, gt=0.0)
    """Teacher softmax temperature at the start of the warm-up."""
    teacher_temp: float = Field(0.07, gt=0.0)
    """Teacher temperature after the warm-up."""
    warmup_teacher_temp_epochs: int = Field(30, ge=0)
    """Epochs of the linear temperature warm-up."""
    momentum_warmup_epochs: int = Field(0, ge=0)
    """`optim.schedule: constant`: epochs of the linear rise of the EMA momentum from momentum_teacher to
    final_momentum_teacher (0: final_momentum_teacher throughout)."""
    centering: Literal["softmax", "sinkhorn_knopp"] = "sinkhorn_knopp"
    """Centring of the teacher's outputs: EMA centre then softmax, or Sinkhorn-Knopp (3 iterations)."""
    center_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """EMA momentum of the softmax centre (unused by Sinkhorn-Knopp)."""

    @model_validator(mode="after")
    def _momentum_rises(self) -> TeacherConfig:
        if self.final_momentum_teacher < self.momentum_teacher:
            raise ValueError(
                f"final_momentum_teacher ({self.final_momentum_teacher}) is below momentum_teacher "
                f"({self.momentum_teacher})"
            )
        return self


class OptimConfig(Section):
    epochs: int = Field(100, ge=1)
    """Training length in epochs of `epoch_length` iterations."""
    epoch_length: int = Field(1250, ge=1)
    """Iterations per epoch (DINOv2's OFFICIAL_EPOCH_LENGTH); schedules are expressed in epochs."""
    base_lr: float = Field(0.004, gt=0.0)
    """Learning rate for a global batch of 1024, scaled by `scaling_rule`."""
    scaling_rule: Literal["sqrt_wrt_1024", "linear_wrt_1024", "none"] = "sqrt_wrt_1024"
    """How the base learning rate scales with the global batch size."""
    warmup_epochs: int = Field(10, ge=0)
    """Linear learning-rate warm-up."""
    min_lr: float = Field(1.0e-6, ge=0.0)
    """Final learning rate of the cosine schedule."""
    weight_decay: float = Field(0.04, ge=0.0)
    """Weight decay at the start (cosine schedule)."""
    weight_decay_end: float = Field(0.4, ge=0.0)
    """Weight decay at the end."""
    clip_grad: float = Field(3.0, ge=0.0)
    """Gradient-norm clipping threshold of each student module on its own (backbone, DINO head, iBOT head), as both
    releases clip (0 disables)."""
    freeze_last_layer_epochs: int = Field(1, ge=0)
    """Epochs during which the heads' last (prototype) layer is not updated."""
    layerwise_decay: float = Field(0.9, gt=0.0, le=1.0)
    """Layer-wise lr decay: block i gets decay^(L + 1 - i); embeddings count as layer 0."""
    patch_embed_lr_mult: float = Field(0.2, ge=0.0)
    """Learning-rate multiplier of the patch embedding."""
    adamw_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    """AdamW beta1."""
    adamw_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    """AdamW beta2."""
    dino_head_wd_multiplier: float = Field(1.0, ge=0.0)
    """Weight-decay multiplier of the DINO head's decayed weights (DINOv3's; 1.0 in every released config)."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """cosine: DINOv2's schedules (lr warm-up then cosine to min_lr; weight decay and teacher momentum cosine from
    their start to their end value); constant: the DINOv3 recipe's (each value rises linearly over its warm-up, then
    holds: lr from 0 over warmup_epochs; weight decay from weight_decay to weight_decay_end over
    weight_decay_warmup_epochs; momentum from teacher.momentum_teacher to final_momentum_teacher over
    teacher.momentum_warmup_epochs; the temperature's warm-up as in cosine). Every training phase follows it."""
    weight_decay_warmup_epochs: int = Field(0, ge=0)
    """`schedule: constant`: epochs of the linear rise of the weight decay from weight_decay to weight_decay_end
    (0: weight_decay_end throughout)."""

    @model_validator(mode="after")
    def _warmup_fits(self) -> OptimConfig:
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")
        if self.weight_decay_warmup_epochs and self.schedule != "constant":
            raise ValueError(
                f"weight_decay_warmup_epochs = {self.weight_decay_warmup_epochs} needs schedule = constant "
                "(the cosine schedule has no weight-decay warm-up)"
            )
        if self.weight_decay_warmup_epochs > self.epochs:
            raise ValueError(
                f"weight_decay_warmup_epochs ({self.weight_decay_warmup_epochs}) exceeds epochs ({self.epochs})"
            )
        return self


class CropsConfig(Section):
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    """Area range of the 2 global crops, as a share of the image."""
    local_crops_number: int = Field(8, ge=0)
    """N, the number of local crops."""
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    """Area range of the local crops."""
    global_crops_size: int = Field(224, ge=16)
    """Side of the global crops in pixels."""
    local_crops_size: int = Field(98, ge=8)
    """Side of the local crops in pixels (98 for patch 14, 96 for patch 16)."""
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    """Colour jitter strengths: brightness, contrast, saturation (factors in [1 - x, 1 + x]) and hue (in [0, 0.5])."""
    color_jitter_prob: float = Field(0.8, ge=0.0, le=1.0)
    """Probability of the colour jitter, per crop."""
    grayscale_prob: float = Field(0.2, ge=0.0, le=1.0)
    """Probability of turning a crop grey."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Range of the Gaussian blur's sigma in pixels (kernel 9)."""
    solarize_prob: float = Field(0.2, ge=0.0, le=1.0)
    """Probability of solarising the second global crop."""

    @field_validator("global_crops_scale", "local_crops_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError("needs 0 < min <= max <= 1")
        return v

    @field_validator("color_jitter")
    @classmethod
    def _jitter(cls, v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        if min(v) < 0.0 or v[3] > 0.5:
            raise ValueError("needs brightness, contrast, saturation >= 0 and 0 <= hue <= 0.5")
        return v

    @field_validator("blur_sigma")
    @classmethod
    def _sigma(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1]:
            raise ValueError("needs 0 < min <= max")
        return v


class TrainConfig(Section):
    batch_size_per_gpu: int = Field(64, ge=1)
    """Images per rank per optimizer step (before gradient accumulation)."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute precision: auto is bf16 on GPUs and fp32 on the CPU."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass to save memory."""
    num_workers: int = Field(2, ge=0)
    """Data-loading processes per rank."""
    checkpoint_period: int = Field(500, ge=1)
    """Iterations between checkpoints."""
    keep_last: int = Field(3, ge=1)
    """Checkpoints kept; older ones are deleted once a newer one is complete."""
    prune_to_fit: bool = False
    """When a checkpoint does not fit on its disk, delete this run's older checkpoints first (oldest first, never the
    newest) until it does; false: the save fails, naming the bytes needed and free, with the newest one intact."""
    max_nonfinite_steps: int = Field(5, ge=1)
    """Consecutive non-finite steps (skipped) after which the run stops with an error."""
    nproc_per_node: int = Field(1, ge=1)
    """Processes per node; above 1 the stage relaunches itself under torchrun."""
    log_period: int = Field(10, ge=1)
    """Iterations between metric logs."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto picks CUDA when a GPU is visible, else the CPU."""
    cpu_threads: int = Field(0, ge=0)
    """Intra-op threads per rank on the CPU; 0: the cores left per rank after its data workers (at least 1)."""
    resume: bool = True
    """Continue from the newest complete checkpoint of the same configuration when one exists."""
    checkpoint_mirror: str | None = None
    """An `s3://` prefix (or a folder) that every checkpoint is copied to once written, and each phase's export at its
    end, as `<mirror>/<stage>/<phase>/...`; a restart resumes from the newest checkpoint, local or mirrored, so a
    multi-node run needs no shared filesystem (`components.training.mirror`). null: none."""
    compile: bool = False
    """torch.compile each transformer block (ZeRO stage 0-2 only)."""
    pack_crops: bool = False
    """Run the student's global and local crops through each block together: one pass of its norms and linear layers
    over every crop's tokens, attention per crop size (the same numbers up to float rounding)."""
    knn_eval_period: int = Field(0, ge=0)
    """Iterations between kNN evaluations of the teacher (0: off)."""
    knn_eval_root: str | None = None
    """Labelled folder `<root>/{train,val}/<class>/*` for the periodic kNN evaluation."""

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.compile and self.zero_stage == 3:
            raise ValueError("compile = true needs zero_stage 0, 1 or 2 (ZeRO-3 gathers parameters in hooks)")
        if self.knn_eval_period and not self.knn_eval_root:
            raise ValueError(f"knn_eval_period = {self.knn_eval_period} needs knn_eval_root")
        if self.checkpoint_mirror is not None:
            from components.storage import is_s3, split_s3

            if not self.checkpoint_mirror.strip():
                raise ValueError("checkpoint_mirror = '': an s3:// prefix or a folder, or null")
            if is_s3(self.checkpoint_mirror):
                try:
                    split_s3(self.checkpoint_mirror)
                except ValueError as err:
                    raise ValueError(f"checkpoint_mirror = {self.checkpoint_mirror!r}: {err}") from None
        return self


class HighresConfig(Section):
    """The high-resolution phase (paper, appendix B.2). The paper gives no schedule beyond "a short period at the end
    of pretraining" at 518 px; the defaults here are this project's choice."""

    iterations: int = Field(10000, ge=1)
    """Length of the high-resolution adaptation phase (paper, appendix B.2: a short final phase at 518 px)."""
    global_crops_size: int | None = Field(518, ge=16)
    """Global crop side during the adaptation (518 px: the full 37 x 37 position grid); null with `crop_sizes`."""
    local_crops_size: int | None = Field(98, ge=8)
    """Local crop side during the adaptation; null with `crop_sizes`."""
    crop_sizes: tuple[tuple[int, int], ...] | None = None
    """Mixed crop sizes (DINOv3's high-resolution adaptation): [global, local] side pairs, one drawn per step for
    every image of the step on every rank, in place of `global_crops_size` and `local_crops_size` (then null); the
    release's 7B: [[512, 112], [768, 112], [768, 168], [768, 224], [768, 336]]. null: that one pair."""
    crop_size_ratios: tuple[float, ...] | None = None
    """The probability of each `crop_sizes` pair per step, summing to 1 (the release's
    `global_local_crop_pairs_ratios`: [0.3, 0.3, 0.3, 0.05, 0.05] for the 7B); null: equal shares."""
    batch_size_per_gpu: int = Field(16, ge=1)
    """Images per rank per step (smaller than pretraining: 5x the tokens per global crop)."""
    base_lr: float = Field(4.0e-4, gt=0.0)
    """Learning rate for a global batch of 1024 (scaled like optim.base_lr); lower than pretraining."""
    warmup_iterations: int = Field(1000, ge=0)
    """Linear lr warm-up, in iterations (the compressed schedule)."""
    momentum_teacher: float = Field(0.994, ge=0.0, le=1.0)
    """Teacher EMA momentum at the start of the phase (cosine to teacher.final_momentum_teacher)."""

    @model_validator(mode="after")
    def _warmup_fits(self) -> HighresConfig:
        if self.warmup_iterations > self.iterations:
            raise ValueError(f"warmup_iterations ({self.warmup_iterations}) exceeds iterations ({self.iterations})")
        return self

    @field_validator("crop_sizes")
    @classmethod
    def _pairs(cls, v: tuple[tuple[int, int], ...] | None) -> tuple[tuple[int, int], ...] | None:
        if v is not None and (not v or any(g < 16 or loc < 8 for g, loc in v)):
            raise ValueError("needs one or more [global, local] pairs, global sides of at least 16 px, local of 8")
        return v

    @field_validator("crop_size_ratios")
    @classmethod
    def _ratios(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and (not v or min(v) <= 0.0 or not math.isclose(sum(v), 1.0, abs_tol=1e-6)):
            raise ValueError(f"needs one probability > 0 per pair, summing to 1 (sum {sum(v):.6g})")
        return v

    def crop_pairs(self) -> tuple[tuple[int, int], ...]:
        """The (global, local) crop sides of the phase: `crop_sizes`, or the one pair of `global_crops_size` and
        `local_crops_size`."""
        return self.crop_sizes or ((self.global_crops_size, self.local_crops_size),)

    def crop_pair_ratios(self) -> tuple[float, ...]:
        """The probability of each of `crop_pairs()` per step: `crop_size_ratios`, or equal shares."""
        pairs = self.crop_pairs()
        return self.crop_size_ratios or tuple(1.0 / len(pairs) for _ in pairs)


class GramConfig(Section):
    """Gram anchoring (Simeoni et al. 2025, DINOv3, section 4.2): the patch features' Gram matrix of the student's
    global crops pulled towards a frozen Gram teacher's (docs/gram.md). Off by default."""

    enabled: bool = False
    """Add the Gram loss to the step of the pretraining phases: the Gram refinement phase when `iterations` > 0, else
    the main phase itself (continued pretraining: anchored to its starting model); the high-resolution phase too."""
    iterations: int = Field(0, ge=0)
    """Steps of the Gram refinement phase run after the pretrain stage's main phase (which then runs without Gram),
    from its final state with its final EMA teacher as the Gram teacher; the phase's export is the stage's. 0: none."""
    base_lr: float = Field(4.0e-4, gt=0.0)
    """Refinement phase: learning rate for a global batch of 1024 (scaled like optim.base_lr), held constant after
    its warm-up as in the release (its 7B: 1.2e-4, i.e. its `schedules.lr.peak` 3e-5 times its factor 4)."""
    warmup_iterations: int = Field(0, ge=0)
    """Refinement phase: linear lr warm-up, in iterations."""
    momentum_teacher: float = Field(0.999, ge=0.0, le=1.0)
    """Refinement phase: teacher EMA momentum, held constant (the release's 7B: 0.999)."""
    loss_weight: float = Field(1.0, ge=0.0)
    """Weight of the Gram loss (after its ramp)."""
    loss_weight_start: float = Field(0.0, ge=0.0)
    """Weight at a phase's first step when `loss_weight_ramp_iterations` > 0."""
    loss_weight_ramp_iterations: int = Field(0, ge=0)
    """Steps over which the weight goes from `loss_weight_start` to `loss_weight` along a half cosine (the release's
    schedule: 1000 for the 7B's Gram phase); 0: `loss_weight` from the first step."""
    teacher_weights: str | None = None
    """The Gram teacher at a phase's start: an official-layout backbone file or export folder of the `model` geometry
    (local or s3://); null: the phase's starting model (the released weights in continued pretraining, the main
    phase's final EMA teacher in the refinement phase, the pretrain export in the high-resolution phase)."""
    refresh_period: int = Field(0, ge=0)
    """The Gram teacher is replaced by the EMA teacher every this many steps of a phase (10000 for the 7B); 0: never."""
    refresh_first: int | None = Field(None, ge=1)
    """Steps of a phase after which the first refresh happens; null: `refresh_period`."""
    max_refreshes: int | None = Field(None, ge=1)
    """Most refreshes in a phase (3 for the 7B); null: no limit."""
    teacher_resolution: float = Field(2.0, ge=1.0)
    """Side of the Gram teacher's crops as a multiple of the global crops' (the release: 512 px for 256 px crops;
    1.5 in its high-resolution phase): the same region at a higher resolution; its patch features are resized
    (bicubic) to the student's grid. 1: the student's crops as they are."""
    teacher_no_distortions: bool = True
    """The Gram teacher's crops skip the colour, blur and solarisation distortions (the release's 7B setting)."""
    highres_loss_weight: float | None = Field(None, ge=0.0)
    """The high-resolution phase's weight, constant (the release: 1.5); null: `loss_weight` with its ramp. That phase
    never refreshes its Gram teacher (as the release's)."""
    highres_teacher_resolution: float | None = Field(None, ge=1.0)
    """The high-resolution phase's `teacher_resolution` (the release: 1.5); null: `teacher_resolution`."""
    tokens: Literal["all", "masked", "unmasked"] = "all"
    """The student's global-crop patch tokens compared: all of them, or those masked (unmasked) for iBOT."""
    img_level: bool = True
    """One Gram matrix per image (true, the release's 7B) or one over the local batch's patches (needed for
    `tokens` masked / unmasked)."""
    remove_neg: bool = False
    """Clip negative similarities to 0 in both Gram matrices."""


# --------------------------------------------------------------------------------------------------------------------
# Stage sections
# --------------------------------------------------------------------------------------------------------------------


class EmbedConfig(Section):
    arch: AnyArch = "vit_tiny"
    """Backbone preset that embeds images for curation (DINOv2, DINOv3 ViT or ConvNeXt)."""
    weights: str | None = None
    """Official-layout backbone file (local or s3://); null: the preset at a seeded random init (smoke runs only)."""
    patch_size: int = Field(14, ge=2, le=32)
    """Patch size of the embedding backbone (default: the preset's, 14 for DINOv2, 16 for DINOv3)."""
    num_register_tokens: int = Field(0, ge=0, le=16)
    """Register tokens of the embedding backbone (4 for the released *_reg models; DINOv3's storage tokens: 4 by
    default)."""
    image_size: int = Field(224, ge=16)
    """Side of the square the backbone sees, px (224: the released models' resolution)."""
    full_frame: bool = True
    """Resize the whole image to image_size x image_size (aspect not kept), so that nothing of it is cut away (a
    copy's borders count); false: the release's shorter-side resize and centre crop."""
    batch_size: int = Field(64, ge=1)
    """Images per forward pass."""
    num_workers: int = Field(2, ge=0)
    """Data-loading processes."""
    shard_size: int = Field(4096, ge=1)
    """Embeddings per .npy shard; finished shards are skipped when the stage resumes."""
    features: Literal["cls", "cls_mean", "cls_grid"] = "cls_grid"
    """The image's vector: cls: the CLS token; cls_mean: CLS and the mean patch token (2 D wide); cls_grid: CLS and
    the mean patch token of each quadrant (5 D wide: keeps the layout, which copies share and look-alike images do
    not). Blocks are L2-normalised, the grid's four together to norm 1, then the whole vector."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the backbone runs: auto is the rank's GPU when CUDA is available, else the CPU."""
    amp: bool = True
    """On a GPU, run the forward pass under bf16 autocast (features are stored as float16 anyway)."""

    _preset_geometry = model_validator(mode="before")(_preset_geometry_defaults)

    @model_validator(mode="after")
    def _image_fits_patches(self) -> EmbedConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) is not a multiple of patch_size ({self.patch_size})")
        return self


class CurateConfig(Section):
    dedup_k: int = Field(64, ge=1)
    """Neighbours searched per pool image for self-deduplication."""
    dedup_threshold: float | None = Field(None, ge=-1.0, le=1.0)
    """Cosine similarity at or above which two pool images are copies without verification; null: calibrated on the
    pool (the lowest threshold whose precision on planted copies reaches dedup_precision); a number overrides it."""
    eval_threshold: float | None = Field(None, ge=-1.0, le=1.0)
    """The same for a pool image and an evaluation image (leakage); null: calibrated on planted copies of
    evaluation images against the pool."""
    dedup_precision: float = Field(0.98, gt=0.0, le=1.0)
    """Precision target of calibration, for self-deduplication and leakage alike; the calibration gate fails when
    the decision rule's precision on planted copies is below it."""
    candidate_recall: float = Field(0.95, gt=0.0, le=1.0)
    """Calibrated candidate threshold: the highest similarity that keeps this share of the planted copies as
    candidates for verification."""
    candidate_threshold: float | None = Field(None, ge=-1.0, le=1.0)
    """Fixed candidate threshold for verification (both comparisons); null: calibrated from candidate_recall."""
    verify: Literal["auto", "on", "off"] = "auto"
    """Local-feature verification (OpenCV ORB, ratio test, RANSAC): auto: pairs at or above the accept threshold
    are copies, pairs between the candidate and accept thresholds are verified; on: every candidate pair is
    verified (no copy without geometric evidence); off: the accept threshold alone."""
    verify_k: int = Field(8, ge=1)
    """Most candidate pairs verified per image (its most similar neighbours between the two thresholds)."""
    verify_max_pairs: int = Field(500_000, ge=1)
    """Budget of verified pairs per comparison; beyond it the least similar candidates are kept (not removed) and
    the report counts them."""
    verify_workers: int = Field(0, ge=0)
    """Verification threads (0: every usable core)."""
    calibration_images: int = Field(200, ge=0)
    """Images sampled (from the pool, and from the evaluation sets) to plant calibration copies of; 0 turns
    calibration off and needs fixed dedup_threshold and eval_threshold."""
    max_images: int | None = Field(None, ge=1)
    """Cap on the curated set's size, seeds included (mode hkmeans: its target T); null keeps the whole selection."""
    mode: Literal["retrieval", "hkmeans", "dedup"] = "retrieval"
    """retrieval: seed-based (DINOv2 A.4); hkmeans: balanced hierarchical k-means (Vo et al. 2024); dedup: survivors."""
    whiten: bool = False
    """PCA-whiten the embeddings (fitted on the pool) before any search, as copy-detection descriptors are."""
    include_seeds: bool = True
    """Put the seed images themselves into the curated set (LVD-142M holds its curated sources)."""
    retrieval: Literal["sample", "cluster", "both"] = "both"
    """Retrieval methods applied to every seed set."""
    sample_k: int = Field(4, ge=1)
    """Sample-based retrieval: nearest pool images per seed image (4 for large seed sets, 32 for small ones)."""
    sample_k_per_set: dict[str, int] = {}
    """Per-seed-set override of sample_k, keyed by the seed set's name (the folder under seeds/)."""
    sample_min_similarity: float = Field(-1.0, ge=-1.0, le=1.0)
    """Sample-based neighbours below this cosine similarity are not retrieved."""
    num_clusters: int = Field(100_000, ge=1)
    """Cluster-based retrieval: k-means clusters of the deduplicated pool (clipped to its size)."""
    cluster_min_seeds: int = Field(3, ge=1)
    """t: a cluster is retrieved from when it holds at least this many seed images of a seed set."""
    cluster_take: int = Field(10_000, ge=1)
    """n: most pool images taken (at random) from one retrieved cluster."""
    max_per_seed_set: int | None = Field(None, ge=1)
    """Per-source cap: most pool images one seed set may bring in; null: no cap."""
    kmeans_iters: int = Field(20, ge=1)
    """Lloyd iterations of every k-means (cluster-based retrieval, hierarchical k-means)."""
    hkmeans_levels: tuple[int, ...] = (10_000_000, 500_000, 50_000, 20_000)
    """Clusters per level of hierarchical k-means, finest first (Vo et al.'s web-scale setting)."""
    hkmeans_resampling_steps: int = Field(10, ge=0)
    """Resampling rounds per level (each centroid recomputed from its nearest points)."""
    source_share_bounds: dict[str, tuple[float, float]] = {}
    """Gate: [min, max] share of the curated set per `source` (e.g. pool, seeds/<set>); a missing source has share 0."""
    index: Literal["auto", "flat", "ivf_flat", "ivf_pq", "ivf_gemm"] = "auto"
    """Similarity index: flat (exact), ivf_flat, ivf_pq (faiss 4-bit fast-scan PQ + exact re-ranking), ivf_gemm (cells
    scanned by bfloat16 matrix products, candidates re-scored exactly; components/curation/cells.py), auto by pool
    size."""
    exact_max: int = Field(50_000, ge=1)
    """index auto: exact search up to this many database vectors, ivf_gemm above."""
    nlist: int | None = Field(None, ge=1)
    """IVF inverted lists (cells); null: about 4 sqrt(N), 2 sqrt(N) for ivf_gemm."""
    nprobe: int = Field(16, ge=1)
    """IVF lists (cells) scanned per query, its nearest."""
    refine_factor: int = Field(2, ge=1)
    """ivf_pq, ivf_gemm: candidates per wanted neighbour that are re-ranked with exact similarities."""
    nproc_per_node: int = Field(1, ge=1)
    """Processes per node; above 1 (and no launcher around the stage) the stage relaunches itself under torchrun
    with this many ranks, each indexing its share of the pool shards (components/curation/sharded.py)."""
    shard_size: int = Field(1_048_576, ge=1)
    """Pool images per shard: each shard is indexed on its own (all sharing one trained quantizer) by the rank that
    owns it, and is the unit that a rerun resumes. Fixed here, not by the number of ranks, so that any number of
    ranks gives the same curated set."""

    @field_validator("sample_k_per_set")
    @classmethod
    def _positive_k(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {name: k for name, k in v.items() if k < 1}
        if bad:
            raise ValueError(f"every k must be at least 1, got {bad}")
        return v

    @field_validator("hkmeans_levels")
    @classmethod
    def _decreasing_levels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(k < 1 for k in v) or any(a <= b for a, b in zip(v, v[1:], strict=False)):
            raise ValueError("needs at least one level, every count >= 1, strictly decreasing (finest first)")
        return v

    @field_validator("source_share_bounds")
    @classmethod
    def _share_bounds(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for source, (low, high) in v.items():
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"{source}: needs 0 <= min <= max <= 1, got [{low}, {high}]")
        return v

    @model_validator(mode="after")
    def _hkmeans_target(self) -> CurateConfig:
        if self.mode == "hkmeans" and self.max_images is None:
            raise ValueError("mode hkmeans samples max_images images: set curate.max_images")
        return self

    @model_validator(mode="after")
    def _thresholds_known(self) -> CurateConfig:
        if self.calibration_images == 0 and (self.dedup_threshold is None or self.eval_threshold is None):
            raise ValueError("calibration_images 0 turns calibration off: set dedup_threshold and eval_threshold")
        if self.calibration_images == 0 and self.verify != "off" and self.candidate_threshold is None:
            raise ValueError("calibration_images 0 with verify on/auto needs a fixed candidate_threshold")
        return self


class AdaptConfig(Section):
    """Continued pretraining from `model.pretrained_weights` (infra/recipes/adapt_*.yaml, docs/adapt.md)."""

    head_fit_iterations: int = Field(200, ge=1)
    """Steps fitting DINO / iBOT heads on the frozen backbone first, when the weights have none (the release's
    backbones); the whole model then trains from the fitted state."""
    head_fit_base_lr: float = Field(0.004, gt=0.0)
    """Learning rate of that head fit for a global batch of 1024 (scaled like optim.base_lr)."""
    knn_stop_drop: float | None = Field(None, gt=0.0)
    """Stop early when the teacher's kNN top-1 on `train.knn_eval_root` falls this far below the starting model's
    (e.g. 0.02); null never stops. Needs train.knn_eval_period."""


class PipelineSection(Section):
    """Which models the stages after pretraining read."""

    pretrained_model: str = Field("models/pretrain_highres", min_length=1)
    """The pretrained export distill, evaluate and report use: models/pretrain_highres (after the high-resolution
    phase, as the paper) or models/pretrain (the phase switched off: DVC then never needs pretrain_highres)."""


class DistillConfig(Section):
    """Distillation of a frozen teacher into smaller students (Oquab et al. 2023, "Model distillation": the training
    loop of pretraining with a frozen teacher, a spare EMA of each student as the final model, no masking, no
    stochastic depth, the iBOT loss on both global crops). Defaults are the paper's students; docs/distillation.md."""

    students: tuple[AnyArch, ...] = ("vit_small", "vit_base", "vit_large")
    """Student presets trained together, sharing each batch's teacher forward: DINOv2 or DINOv3 ViTs and DINOv3
    ConvNeXts in one run; geometry (patch size, registers) from the `model` section (the teacher's patch grid)."""
    teacher_weights: str | None = None
    """Teacher: an official-layout backbone file (.pth / .safetensors, local or s3://; no heads) or a local export
    folder with a model.json; null: the stage's --teacher folder (the pretrain export)."""
    teacher_arch: Arch | None = None
    """Preset of a `teacher_weights` file (its other geometry from the `model` section); null: model.arch."""
    epochs: int = Field(100, ge=1)
    """Distillation length in epochs of `optim.epoch_length` iterations."""
    base_lr: float = Field(0.004, gt=0.0)
    """Students' learning rate for a global batch of 1024 (scaled like optim.base_lr)."""
    momentum_ema: float = Field(0.992, ge=0.0, le=1.0)
    """Momentum of each student's spare EMA at the start (cosine to teacher.final_momentum_teacher)."""
    head_fit_iterations: int = Field(1000, ge=1)
    """Teachers without heads: iterations of the phase that fits DINO and iBOT heads on the frozen teacher backbone
    (the pretraining losses, heads only) before distillation."""
    head_fit_base_lr: float = Field(0.004, gt=0.0)
    """Learning rate of that head-fitting phase for a global batch of 1024 (scaled like optim.base_lr)."""

    @field_validator("students")
    @classmethod
    def _distinct_students(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError("needs at least one student preset, each at most once")
        return v

    @model_validator(mode="after")
    def _arch_needs_weights(self) -> DistillConfig:
        if self.teacher_arch is not None and self.teacher_weights is None:
            raise ValueError("teacher_arch is set but teacher_weights is null (the --teacher export names its arch)")
        return self


EvalTask = Literal["knn", "linear", "logreg", "retrieval", "segmentation", "depth", "robustness"]
Corruption = Literal[
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "snow",
    "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
]  # fmt: skip
ALL_EVAL_TASKS: tuple[EvalTask, ...] = ("knn", "linear", "logreg", "retrieval", "segmentation", "depth", "robustness")
ALL_CORRUPTIONS: tuple[Corruption, ...] = Corruption.__args__  # type: ignore[attr-defined]
PAPER_LINEAR_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
BenchmarkName = Literal[
    "imagenet1k", "cifar10", "cifar100", "pets", "food101", "imagefolder", "imagenet_c", "imagenet_a", "imagenet_r",
    "imagenet_sketch", "roxford5k", "rparis6k", "amstertime", "pitts30k", "ade20k", "voc2012", "cityscapes",
    "nyu_depth_v2", "kitti",
]  # fmt: skip
"""The registry's names (components/evaluation/benchmarks: `BENCHMARKS`; a test keeps the two equal)."""


class BenchmarkSource(Section):
    """Where a benchmark's data is, as its publisher ships it."""

    root: str = Field(min_length=1)
    """The benchmark's folder: a local path or an s3:// prefix."""
    train_root: str | None = None
    """ImageNet-1k's root for the robustness benchmarks (imagenet_c, _a, _r, _sketch): its classifier is scored."""


class EvaluateConfig(Section):
    """Frozen-feature benchmarks (docs/evaluation.md). Defaults are the paper's protocols; params.yaml lightens them."""

    tasks: tuple[EvalTask, ...] = ALL_EVAL_TASKS
    """Benchmarks to run: knn, linear, logreg, retrieval, segmentation, depth, robustness."""
    image_size: int = Field(224, ge=14, le=1024)
    """Classification/retrieval crop side in px (resize to side x 256/224, centre crop); rounded to the patch size."""
    dense_image_size: int | None = Field(None, ge=14, le=2048)
    """Side of the square segmentation and depth inputs in px; null: `image_size`."""
    batch_size: int = Field(64, ge=1)
    """Images per forward pass of the backbone."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the backbones run; auto: CUDA when available (bf16 autocast), else the CPU (fp32)."""
    num_workers: int = Field(2, ge=0, le=64)
    """Processes that render the corrupted images (0: in the stage's own process)."""
    random_baseline: bool = True
    """Also evaluate a seeded random initialisation of the teacher's preset (the `random_init` row)."""
    extra_models: tuple[str, ...] = ()
    """More backbones: paths to model.json descriptors, or `<arch>=<weights>` for official checkpoints."""
    knn_k: tuple[int, ...] = (10, 20, 100, 200)
    """k values of the kNN classifier (clipped to the memory-bank size); the headline is k = 20."""
    knn_temperature: float = Field(0.07, gt=0.0)
    """Temperature of the similarity-weighted kNN vote."""
    knn_few_shot: tuple[int, ...] = ()
    """Few-shot kNN: train images kept per class (each value one experiment)."""
    knn_few_shot_tries: int = Field(5, ge=1, le=100)
    """Random draws per few-shot setting, averaged."""
    linear_lrs: tuple[float, ...] = PAPER_LINEAR_LRS
    """Learning-rate grid of the linear probes (scaled by batch / 256), all trained together."""
    linear_n_blocks: tuple[int, ...] = (1, 4)
    """Feature variants: CLS tokens of the last n blocks."""
    linear_avgpool: tuple[bool, ...] = (False, True)
    """Feature variants: with and/or without the average-pooled patch tokens."""
    linear_epochs: int = Field(100, ge=1, le=10000)
    """Passes over the cached train features."""
    linear_batch_size: int = Field(128, ge=1)
    """Mini-batch of the linear probes."""
    logreg_num_c: int = Field(45, ge=1, le=200)
    """Values of the regularisation C swept over 10^[-6, 5] by the logistic regression."""
    logreg_max_iter: int = Field(1000, ge=1)
    """L-BFGS iterations per logistic-regression fit."""
    retrieval_ks: tuple[int, ...] = (1, 5, 10)
    """k of Recall@k."""
    retrieval_scales: tuple[float, ...] = (1.0,)
    """Image scales whose features are averaged for retrieval (DINO's multi-scale: 1, 0.707, 0.5)."""
    retrieval_positive_distance: float | None = Field(None, gt=0.0)
    """With eval/retrieval/positions.csv: database images within this distance are positives (25 m in Pitts30k)."""
    segmentation_variants: tuple[Literal["linear", "ms", "mask2former"], ...] = ("linear", "ms")
    """Segmentation protocols: `linear` (last block), `ms` (the paper's +ms: last 4 blocks, multi-scale, flip) and
    `mask2former` (ViT-Adapter + Mask2Former trained on the frozen backbone, the paper's headline; results
    `segmentation_m2f`; the `m2f_*` keys)."""
    segmentation_ms_scales: tuple[float, ...] = (1.0, 1.32, 1.73, 2.28, 3.0)
    """Test-time scales of the +ms variant."""
    segmentation_epochs: int = Field(20, ge=1, le=10000)
    """Passes over the cached train features for the segmentation heads."""
    segmentation_lr: float = Field(1e-3, gt=0.0)
    """AdamW learning rate of the segmentation heads."""
    m2f_crop_size: int = Field(896, ge=56, le=2048)
    """Mask2Former: training crop and sliding-window side in px (rounded down to the patch size); test images are
    resized to this shorter side. At least 56: the adapter's 1/32 level then has 2 x 2 positions to normalise."""
    m2f_scale_range: tuple[float, float] = (0.5, 2.0)
    """Mask2Former: each training image is rescaled to a shorter side of crop x U(low, high) before the crop."""
    m2f_stride: int | None = Field(None, ge=1)
    """Mask2Former: sliding-window stride in px; null: 2/3 of the crop."""
    m2f_iterations: int = Field(40000, ge=1)
    """Mask2Former: optimizer steps."""
    m2f_batch_size: int = Field(16, ge=2)
    """Mask2Former: crops per step (at least 2: the adapter's BatchNorms); also windows per inference batch."""
    m2f_lr: float = Field(1e-4, gt=0.0)
    """Mask2Former: AdamW peak learning rate (poly decay of power 0.9 after the warm-up)."""
    m2f_weight_decay: float = Field(0.05, ge=0.0)
    """Mask2Former: AdamW weight decay (not on biases, norms and embeddings)."""
    m2f_warmup_iterations: int = Field(1500, ge=0)
    """Mask2Former: linear warm-up steps (below m2f_iterations)."""
    m2f_num_queries: int = Field(100, ge=1, le=1000)
    """Mask2Former: object queries N."""
    m2f_hidden_dim: int = Field(256, ge=32, le=2048)
    """Mask2Former: width of the pixel decoder, queries and mask embeddings (a multiple of 32; FFNs 8x and 4x)."""
    m2f_decoder_layers: int = Field(9, ge=1, le=64)
    """Mask2Former: masked-attention decoder layers (round-robin over the 1/32, 1/16, 1/8 features)."""
    m2f_encoder_layers: int = Field(6, ge=0, le=64)
    """Mask2Former: deformable-attention encoder layers of the pixel decoder."""
    m2f_num_points: int = Field(12544, ge=16)
    """Mask2Former: points per mask at which the matching costs and the mask losses are computed (112 x 112)."""
    m2f_adapter_inplanes: int = Field(64, ge=4, le=512)
    """ViT-Adapter: width of the spatial prior module's stem (its 1/8, 1/16, 1/32 stages have 2x, 4x, 4x)."""
    m2f_activation_checkpointing: bool = True
    """ViT-Adapter: recompute the frozen blocks' activations in the backward pass (ViT-g/14 at 896 px on one GPU)."""
    depth_heads: tuple[Literal["linear", "linear4", "dpt"], ...] = ("linear", "linear4", "dpt")
    """Depth heads: DINOv2's linear head on the last 1 or 4 blocks (256 bins), and the DPT decoder."""
    depth_bins: int = Field(256, ge=2, le=4096)
    """Depth bins of the linear heads (uniform on [depth_min, depth_max])."""
    depth_min: float = Field(1e-3, gt=0.0)
    """Smallest valid and predicted depth in metres (eval/depth/meta.json's min_depth wins)."""
    depth_max: float | None = Field(None, gt=0.0)
    """Depth cap in metres (10 for NYU, 80 for KITTI); null: meta.json's max_depth, else the train maps' maximum."""
    depth_epochs: int = Field(20, ge=1, le=10000)
    """Passes over the cached train features for the depth heads."""
    depth_lr: float = Field(1e-3, gt=0.0)
    """AdamW learning rate of the depth heads."""
    dpt_features: int = Field(256, ge=8, le=1024)
    """Channels of the DPT decoder's fusion stages."""
    head_batch_size: int = Field(16, ge=2)
    """Mini-batch of the segmentation and depth heads."""
    corruptions: tuple[Corruption, ...] = ALL_CORRUPTIONS
    """ImageNet-C corruptions applied to the classification test images."""
    corruption_severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    """Severities (1 to 5) of each corruption."""
    robustness_images_per_class: int | None = Field(None, ge=1)
    """Test images per class that are corrupted; null: the whole test split."""
    robustness_classifier: Literal["linear", "knn"] = "linear"
    """Classifier of the corrupted images: the selected linear probe (the paper's) or kNN at the headline k."""
    robustness_baseline: str = "random_init"
    """mCE normaliser: the name of an evaluated model, or a JSON file {corruption: [error at each severity]}."""
    num_figure_samples: int = Field(4, ge=0, le=32)
    """Images per figure (PCA of patch features, retrieval, segmentation, depth) saved for the report."""
    benchmarks: dict[BenchmarkName, str | BenchmarkSource] = Field(default_factory=dict)
    """The paper's benchmarks run for every model beside the tasks above, read from their publishers' layouts:
    name -> root (local or s3://), or {root, train_root}; results `<name>-<result>` (docs/evaluation.md)."""

    @field_validator("knn_k", "knn_few_shot", "linear_n_blocks", "retrieval_ks")
    @classmethod
    def _positive_ints(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(k < 1 for k in v) or len(set(v)) != len(v):
            raise ValueError("needs distinct values >= 1")
        return v

    @field_validator("linear_lrs", "retrieval_scales", "segmentation_ms_scales")
    @classmethod
    def _positive_floats(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0.0 < x < math.inf for x in v):
            raise ValueError("needs at least one value, all > 0")
        return v

    @field_validator("corruption_severities")
    @classmethod
    def _severities(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(s not in (1, 2, 3, 4, 5) for s in v) or len(set(v)) != len(v):
            raise ValueError("needs distinct severities from 1 to 5")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> EvaluateConfig:
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"evaluate.tasks lists a task twice: {list(self.tasks)}")
        for key in ("knn_k", "linear_n_blocks", "linear_avgpool", "retrieval_ks", "corruptions"):
            if not getattr(self, key):
                raise ValueError(f"evaluate.{key} is empty")
        if "segmentation" in self.tasks and not self.segmentation_variants:
            raise ValueError("evaluate.segmentation_variants is empty while segmentation is a task")
        if "depth" in self.tasks and not self.depth_heads:
            raise ValueError("evaluate.depth_heads is empty while depth is a task")
        if "robustness" in self.tasks and self.robustness_classifier == "linear" and "linear" not in self.tasks:
            raise ValueError("evaluate.robustness_classifier = 'linear' needs 'linear' in evaluate.tasks")
        low, high = self.m2f_scale_range
        if not 0.0 < low <= high:
            raise ValueError(f"evaluate.m2f_scale_range = {list(self.m2f_scale_range)}: expected 0 < low <= high")
        if self.m2f_hidden_dim % 32:
            raise ValueError(f"evaluate.m2f_hidden_dim = {self.m2f_hidden_dim} is not a multiple of 32 (GroupNorm)")
        if self.m2f_warmup_iterations >= self.m2f_iterations:
            raise ValueError(f"evaluate.m2f_warmup_iterations = {self.m2f_warmup_iterations} must be below "
                             f"m2f_iterations = {self.m2f_iterations}")  # fmt: skip
        if self.depth_max is not None and self.depth_max <= self.depth_min:
            raise ValueError(f"evaluate.depth_max = {self.depth_max} must exceed depth_min = {self.depth_min}")
        return self


class ReportConfig(Section):
    """Comparison table, figures, quality gate and Model Registry entry (docs/evaluation.md, "Report")."""

    gate_metric: str = "knn.top1"
    """Metric that ranks the models and that the quality gate reads, as `<task>.<metric>` (e.g. linear.top1)."""
    gate_min: float = 0.0
    """The gate passes when the best candidate's `gate_metric` reaches this (or stays below it for an error)."""
    require_beats_baseline: bool = True
    """The gate also requires the best candidate to beat `baseline_model` on every task's headline metric."""
    baseline_model: str = "random_init"
    """Model the candidates must beat (the random-init row by default)."""
    candidate_roles: tuple[str, ...] = ("teacher", "student")
    """Roles (from model.json) that may be registered; baselines and official checkpoints are compared only."""
    registered_model: str = Field("dinov2-backbone", min_length=1)
    """MLflow Model Registry name under which the best backbone is registered."""
    champion_alias: str = "champion"
    """Registry alias moved to the new version only when the gate passes."""
    fail_on_gate: bool = False
    """A failed quality gate fails the stage (and the pipeline); false: reported, registered, alias not moved."""
    figures: bool = True
    """Render the figures (PCA of patch features, retrieval, segmentation, depth, robustness)."""

    @field_validator("gate_metric")
    @classmethod
    def _task_metric(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9_]+(-[a-z0-9_]+)?\.[A-Za-z0-9_@]+", v):
            raise ValueError("expected <task>.<metric>, e.g. knn.top1, depth_linear.rmse, ade20k-segmentation_ms.miou")
        return v

    @field_validator("champion_alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        # MLflow refuses `latest` and version-like aliases (v1, V2, ...).
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", v) or v.lower() == "latest" or re.fullmatch(r"[vV]\d+", v):
            raise ValueError("an alias is letters, digits, '_' or '-', not 'latest' nor v<digits>")
        return v


class TrackingConfig(Section):
    experiment: str = "dinov2"
    """MLflow experiment of every run (the tracking URI comes from MLFLOW_TRACKING_URI, else ./mlflow.db)."""


# --------------------------------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------------------------------


class PipelineConfig(Section):
    seed: int = Field(0, ge=0)
    """Seed of everything random: the synthetic world, initialisation, crops, masks, data order."""
    data: DataConfig = DataConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    prepare: PrepareConfig = PrepareConfig()
    embed: EmbedConfig = EmbedConfig()
    curate: CurateConfig = CurateConfig()
    model: ModelConfig = ModelConfig()
    dino: DinoConfig = DinoConfig()
    ibot: IbotConfig = IbotConfig()
    teacher: TeacherConfig = TeacherConfig()
    optim: OptimConfig = OptimConfig()
    crops: CropsConfig = CropsConfig()
    train: TrainConfig = TrainConfig()
    highres: HighresConfig = HighresConfig()
    gram: GramConfig = GramConfig()
    adapt: AdaptConfig = AdaptConfig()
    pipeline: PipelineSection = PipelineSection()
    distill: DistillConfig = DistillConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        crops, patch = self.crops, self.model.patch_size
        for key, size in (("global_crops_size", crops.global_crops_size), ("local_crops_size", crops.local_crops_size)):
            if size % patch:
                raise ValueError(f"crops.{key} = {size} is not a multiple of model.patch_size = {patch}")
        if self.teacher.warmup_teacher_temp_epochs > self.optim.epochs:
            raise ValueError(
                f"teacher.warmup_teacher_temp_epochs = {self.teacher.warmup_teacher_temp_epochs} exceeds "
                f"optim.epochs = {self.optim.epochs}"
            )
        if self.optim.freeze_last_layer_epochs > self.optim.epochs:
            raise ValueError(
                f"optim.freeze_last_layer_epochs = {self.optim.freeze_last_layer_epochs} exceeds "
                f"optim.epochs = {self.optim.epochs}"
            )
        w = self.dino.local_loss_weight
        if w.warmup_epochs + (w.cosine_epochs or 0) > self.optim.epochs:
            raise ValueError(
                f"dino.local_loss_weight.warmup_epochs + cosine_epochs = {w.warmup_epochs + (w.cosine_epochs or 0)} "
                f"exceeds optim.epochs = {self.optim.epochs}"
            )
        self._warmups_fit(self.optim.epochs, "optim.epochs")
        return self

    def _warmups_fit(self, epochs: int, key: str) -> None:
        """The constant schedule's weight-decay and momentum warm-ups fit in `epochs` (named `key`)."""
        momentum_warmup = self.teacher.momentum_warmup_epochs
        if momentum_warmup and self.optim.schedule != "constant":
            raise ValueError(
                f"teacher.momentum_warmup_epochs = {momentum_warmup} needs optim.schedule = constant "
                "(the cosine schedule has no momentum warm-up)"
            )
        spans = {
            "teacher.momentum_warmup_epochs": momentum_warmup,
            "optim.weight_decay_warmup_epochs": self.optim.weight_decay_warmup_epochs,
        }
        for name, span in spans.items():
            if span > epochs:
                raise ValueError(f"{name} = {span} exceeds {key} = {epochs}")

    @model_validator(mode="after")
    def _highres_fits(self) -> PipelineConfig:
        highres, patch = self.highres, self.model.patch_size
        single = {"global_crops_size": highres.global_crops_size, "local_crops_size": highres.local_crops_size}
        if highres.crop_sizes is not None:
            if set_too := [f"highres.{k} = {v}" for k, v in single.items() if v is not None]:
                raise ValueError(
                    f"highres.crop_sizes replaces {' and '.join(set_too)}: set {'them' if len(set_too) > 1 else 'it'} "
                    "to null"
                )
            ratios = highres.crop_size_ratios
            if ratios is not None and len(ratios) != len(highres.crop_sizes):
                raise ValueError(
                    f"highres.crop_size_ratios = {list(ratios)} has {len(ratios)} ratios for the "
                    f"{len(highres.crop_sizes)} pairs of highres.crop_sizes"
                )
            for i, (global_size, local_size) in enumerate(highres.crop_sizes):
                for what, size in (("global", global_size), ("local", local_size)):
                    if size % patch:
                        raise ValueError(
                            f"highres.crop_sizes[{i}] = [{global_size}, {local_size}]: the {what} side {size} is not "
                            f"a multiple of model.patch_size = {patch}"
                        )
        else:
            if missing := [f"highres.{k}" for k, v in single.items() if v is None]:
                raise ValueError(f"{' and '.join(missing)} null needs highres.crop_sizes (the mixed crop sizes)")
            if highres.crop_size_ratios is not None:
                raise ValueError(
                    f"highres.crop_size_ratios = {list(highres.crop_size_ratios)} needs highres.crop_sizes (one "
                    "ratio per pair)"
                )
            for key, size in single.items():
                if size % patch:
                    raise ValueError(f"highres.{key} = {size} is not a multiple of model.patch_size = {patch}")
        if self.highres.momentum_teacher > self.teacher.final_momentum_teacher:
            raise ValueError(
                f"highres.momentum_teacher = {highres.momentum_teacher} exceeds "
                f"teacher.final_momentum_teacher = {self.teacher.final_momentum_teacher}"
            )
        return self

    @model_validator(mode="after")
    def _gram_fits(self) -> PipelineConfig:
        """Gram anchoring needs a teacher from the first step, crops on the patch grid and selectable tokens."""
        g = self.gram
        if not g.enabled:
            return self
        if not g.iterations and not (self.model.pretrained_weights or g.teacher_weights):
            raise ValueError(
                "gram.enabled with gram.iterations = 0 anchors the main phase from its first step, which needs a Gram "
                "teacher: set model.pretrained_weights (continued pretraining), gram.teacher_weights, or "
                "gram.iterations > 0 (a refinement phase after the main phase)"
            )
        if g.tokens != "all" and g.img_level:
            raise ValueError(f"gram.tokens = {g.tokens!r} needs gram.img_level = false (one matrix over the patches)")
        if g.tokens == "masked" and not self.ibot.mask_sample_probability:
            raise ValueError("gram.tokens = 'masked' needs ibot.mask_sample_probability > 0 (no patch is masked)")
        if g.refresh_first is not None and not g.refresh_period:
            raise ValueError(f"gram.refresh_first = {g.refresh_first} needs gram.refresh_period > 0")
        if g.warmup_iterations > g.iterations:
            raise ValueError(f"gram.warmup_iterations = {g.warmup_iterations} exceeds gram.iterations = {g.iterations}")
        highres = ("highres_teacher_resolution", g.highres_teacher_resolution) if g.highres_teacher_resolution else (
            "teacher_resolution", g.teacher_resolution)  # fmt: skip
        highres_sizes = (
            [(f"highres.crop_sizes[{i}]", pair[0]) for i, pair in enumerate(self.highres.crop_sizes)]
            if self.highres.crop_sizes
            else [("highres.global_crops_size", self.highres.global_crops_size)]
        )
        for (key, res), where, size in (
            (("teacher_resolution", g.teacher_resolution), "crops.global_crops_size", self.crops.global_crops_size),
            *((highres, where, size) for where, size in highres_sizes),
        ):
            side = gram_crops_size(res, size)
            if side % self.model.patch_size:
                raise ValueError(
                    f"gram.{key} = {res} makes the Gram teacher's crops {side} px for the global crops of {size} px "
                    f"({where}): not a multiple of model.patch_size = {self.model.patch_size}"
                )
        return self

    @model_validator(mode="after")
    def _adapt_fits(self) -> PipelineConfig:
        """Frozen blocks and the kNN early stop need what they act on."""
        if self.model.freeze_blocks and not self.model.pretrained_weights:
            raise ValueError(
                f"model.freeze_blocks = {self.model.freeze_blocks} needs model.pretrained_weights "
                "(frozen random blocks would never learn)"
            )
        if self.adapt.knn_stop_drop is not None and not self.train.knn_eval_period:
            raise ValueError(f"adapt.knn_stop_drop = {self.adapt.knn_stop_drop} needs train.knn_eval_period")
        return self

    @model_validator(mode="after")
    def _distill_fits(self) -> PipelineConfig:
        """Distillation runs `distill.epochs` epochs with the `optim` warm-up and prototype freeze."""
        d = self.distill
        for key in ("warmup_epochs", "freeze_last_layer_epochs"):
            if getattr(self.optim, key) > d.epochs:
                raise ValueError(f"optim.{key} = {getattr(self.optim, key)} exceeds distill.epochs = {d.epochs}")
        self._warmups_fit(d.epochs, "distill.epochs")
        if d.momentum_ema > self.teacher.final_momentum_teacher:
            raise ValueError(
                f"distill.momentum_ema = {d.momentum_ema} exceeds "
                f"teacher.final_momentum_teacher = {self.teacher.final_momentum_teacher}"
            )
        return self


# --------------------------------------------------------------------------------------------------------------------
# Loading, overrides, derived values
# --------------------------------------------------------------------------------------------------------------------


def _format_errors(err: ValidationError, source: str, raw: dict[str, Any]) -> str:
    lines = [f"{source}: invalid configuration ({err.error_count()} problem(s)):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (value {e['input']!r})")
        elif e["type"] == "value_error" and not e["loc"]:
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            value = _lookup(raw, e["loc"])
            lines.append(f"  {key} = {value!r}: {e['msg']}")
    return "\n".join(lines)


def _lookup(tree: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        found = part in tree if isinstance(tree, dict) else isinstance(part, int) and 0 <= part < len(tree)
        if not isinstance(tree, dict | list | tuple) or not found:
            return "<missing>"
        tree = tree[part]
    return tree


def parse_override(item: str) -> tuple[str, Any]:
    """Parses `key.path=value` (the value read as YAML, as `dvc exp run -S` does)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, value = item.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Returns a copy of `raw` with dotted-key overrides set; unknown keys are caught by validation later."""
    tree = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: {part} is not a section")
            node = child
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return tree


def validate_config(raw: dict[str, Any], source: str = DEFAULT_PARAMS) -> PipelineConfig:
    """Validates a raw mapping; raises ConfigError naming every bad key and value."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, raw)) from None


def _read_yaml(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def read_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Reads params.yaml as a plain mapping (an empty file is an empty mapping)."""
    return _read_yaml(path, "params file")


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe (infra/recipes/*.yaml): a flat mapping of dotted params.yaml keys to values, the overrides `--set`
    takes, kept in a file (the paper's protocol for one benchmark, for example)."""
    raw = _read_yaml(path, "recipe")
    if not isinstance(raw, dict) or any(not isinstance(k, str) or isinstance(v, dict) for k, v in raw.items()):
        raise ConfigError(f"{path}: a recipe maps dotted keys to values (evaluate.m2f_lr: 1.0e-4), one per line")
    return raw


def load_config(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Loads and validates params.yaml, with optional dotted-key overrides applied first."""
    raw = read_params(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return validate_config(raw, source=str(path))


def save_resolved(cfg: PipelineConfig, path: str | Path) -> Path:
    """Writes the full resolved config (defaults filled in) as YAML beside a run's outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def flatten(tree: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flattens a config (or a section) to dotted keys, for MLflow params."""
    items = tree.model_dump(mode="json") if isinstance(tree, BaseModel) else tree
    flat: dict[str, Any] = {}
    for key, value in items.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """The learning rate for a global batch, scaled from a batch of 1024 as DINOv2 does."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch / 1024.0)
    if rule == "linear_wrt_1024":
        return base_lr * global_batch / 1024.0
    return base_lr


def gram_crops_size(teacher_resolution: float, global_crops_size: int) -> int:
    """Side of the Gram teacher's crops for global crops of `global_crops_size` px (`gram.teacher_resolution`)."""
    return round(teacher_resolution * global_crops_size)


class SectionView:
    """A read-only view of a config through which a reader reaches only the sections it declares.

    Reading another section raises `ConfigError` naming the reader, the section and the declared ones, so that
    what a stage declares (dvc.yaml's `params`, which decide when DVC re-runs it) is what it reads. A dotted
    declaration (`data.raw`) lets the reader reach that one key of the section. `tracking` is readable by every
    stage: where runs are logged changes no output. Everything else (`model_dump`, the declared values) is the
    config's own.
    """

    UNDECLARED_READABLE = ("tracking",)

    def __init__(self, cfg: BaseModel, sections: tuple[str, ...], reader: str, prefix: str = "") -> None:
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "_sections", tuple(sections))
        object.__setattr__(self, "_reader", reader)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._cfg, name)
        if name not in type(self._cfg).model_fields:
            return value  # methods (`model_dump`, ...) and other attributes
        key = f"{self._prefix}{name}"
        if key in self._sections or (not self._prefix and name in self.UNDECLARED_READABLE):
            return value
        keys = tuple(s for s in self._sections if s.startswith(f"{key}."))
        if keys:  # a section read in part: its declared keys only
            return SectionView(value, keys, self._reader, prefix=f"{key}.")
        raise ConfigError(
            f"{self._reader} reads params {'key' if self._prefix else 'section'} {key!r}, which it does not declare "
            f"(it declares {', '.join(self._sections)}): declare it in components/stages/specs.py and dvc.yaml"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a config is frozen")


def restrict_sections(cfg: PipelineConfig, sections: tuple[str, ...], *, reader: str) -> PipelineConfig:
    """`cfg` seen through a `SectionView` that lets `reader` read only `sections` (and `data.raw`-style keys)."""
    return SectionView(cfg, sections, reader)  # type: ignore[return-value]
