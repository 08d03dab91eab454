"""What a training phase computes, decided once: a frozen plan, a pure function of the config and the phase's inputs.

A training stage runs one or more phases, one after the other, each resumable on its own:

    pretrain          pretrain (then gram, the Gram refinement phase, from its export when `gram.iterations` > 0)
    pretrain_highres  highres (from the pretrain export)
    distill           head_fit (a teacher without heads: its heads fitted on its frozen backbone), then distill

Each phase's plan holds every value the run derives: the networks (presets and geometry), the crops, the global
batch and how it is split over ranks, the batch-scaled learning rate, every schedule length in steps, what trains
and what stays frozen, and where the weights come from. params.yaml keys keep one meaning each: the high-resolution
phase's length is `highres.iterations` steps, not an `optim.epochs` of one-step epochs, and the students' EMA
momentum is `distill.momentum_ema`, not `teacher.momentum_teacher`. The plan is logged to MLflow and saved as
`plan.yaml` beside `config.yaml`; its fingerprint (every value except how the global batch is split over ranks and
accumulation steps) names the phase's checkpoints, so a run resumes on any number of GPUs with the same global batch.

Run mechanics (ZeRO stage, precision, device, workers, periods, compile) stay in `train` and are not part of a plan:
they change how a run goes, not what it computes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel

from components.config import (
    ConfigError,
    CropsConfig,
    DinoConfig,
    IbotConfig,
    ModelConfig,
    PipelineConfig,
    TeacherConfig,
    flatten,
    scaled_lr,
)
from components.model.schedules import TrainingSchedules, build_schedules
from components.training.data import crop_pair_index
from components.training.gram import GramPlan, GramSchedules, gram_plan

PhaseName = Literal["pretrain", "gram", "highres", "head_fit", "distill"]


@dataclass(frozen=True)
class BatchPlan:
    """The global batch and its split: images per rank per micro-batch x accumulation steps x ranks."""

    per_rank: int
    grad_accum_steps: int
    world_size: int

    @property
    def global_size(self) -> int:
        """Images per optimizer step over all ranks."""
        return self.per_rank * self.grad_accum_steps * self.world_size


@dataclass(frozen=True)
class SchedulePlan:
    """The release's schedules, every length in optimizer steps (`components.model.build_schedules`)."""

    total_steps: int
    warmup_steps: int
    """Linear learning-rate warm-up from 0."""
    base_lr: float
    """The configured rate for a global batch of 1024."""
    lr: float
    """`base_lr` scaled to the global batch (`scaling_rule`); the peak of the cosine."""
    min_lr: float
    weight_decay: float
    weight_decay_end: float
    momentum: float
    """EMA momentum at the first step (cosine to `final_momentum`)."""
    final_momentum: float
    warmup_teacher_temp: float
    teacher_temp: float
    teacher_temp_warmup_steps: int
    freeze_last_layer_steps: int
    """Steps during which the heads' prototypes (directions and norms) stay put."""
    kind: Literal["cosine", "constant"] = "cosine"
    """`optim.schedule`: DINOv2's cosines, or the DINOv3 recipe's constant values after their warm-ups."""
    weight_decay_warmup_steps: int = 0
    """`constant`: the weight decay's rise from `weight_decay` to `weight_decay_end`."""
    momentum_warmup_steps: int = 0
    """`constant`: the EMA momentum's rise from `momentum` to `final_momentum`."""
    local_weight_start: float = 1.0
    """The local crops' DINO weight (`dino.local_loss_weight`): its start, peak and end, warm-up and cosine."""
    local_weight_peak: float = 1.0
    local_weight_end: float = 1.0
    local_weight_warmup_steps: int = 0
    local_weight_cosine_steps: int | None = None


@dataclass(frozen=True)
class OptimPlan:
    """The optimizer's fixed settings."""

    clip_grad: float
    """The gradient-norm threshold of each student module, each clipped on its own."""
    betas: tuple[float, float]
    layerwise_decay: float
    patch_embed_lr_mult: float
    dino_head_wd_multiplier: float = 1.0


@dataclass(frozen=True)
class CropSizesPlan:
    """Mixed crop sizes (DINOv3's high-resolution adaptation): each step's global and local crop sides are one of
    `pairs`, drawn with the probabilities `ratios` as a pure function of the seed and the step
    (`components.training.data.crop_pair_index`), so that every rank draws the same pair and a resumed run the same
    pairs again. The iBOT masks and the patch grid follow the drawn global side."""

    pairs: tuple[tuple[int, int], ...]
    """(global, local) crop sides, px."""
    ratios: tuple[float, ...]
    """The probability of each pair per step (summing to 1)."""
    gram_teacher_crops_sizes: tuple[int, ...] | None = None
    """With Gram anchoring: the Gram teacher's crop side of each pair (its global side times the phase's teacher
    resolution, as the release's `gram_teacher_crops_size` list)."""

    def pair_at(self, seed: int, step: int) -> int:
        """The index of the pair that step `step` (0-based, of its phase) uses."""
        return crop_pair_index(seed, step, self.ratios)


@dataclass(frozen=True)
class MixedCropSchedules:
    """A phase's schedules with the crop sides of each step (`global_crops_size`, `local_crops_size`), logged with
    the other values."""

    base: Any
    """The phase's schedules (anything with `at(step) -> dict`)."""
    seed: int
    crop_sizes: CropSizesPlan

    def at(self, step: int) -> dict[str, float]:
        global_size, local_size = self.crop_sizes.pairs[self.crop_sizes.pair_at(self.seed, step)]
        return {**self.base.at(step), "global_crops_size": float(global_size), "local_crops_size": float(local_size)}


@dataclass(frozen=True)
class WeightsPlan:
    """Where a phase's weights come from, and their identity (part of the fingerprint)."""

    kind: Literal["random", "file", "export", "phase"]
    """A seeded random init; a weight file (a released backbone or training checkpoint); an export folder; or the
    export of an earlier phase of the same stage (`source` names the phase)."""
    source: str | None = None
    digest: str | None = None
    """sha256 of the files (`file`, `export`), the earlier phase's fingerprint (`phase`), None for `random`."""


@dataclass(frozen=True)
class PhasePlan:
    """Everything one training phase computes (see the module docstring)."""

    stage: str
    phase: PhaseName
    seed: int
    model: ModelConfig
    """The trained network's backbone (the students' geometry for `distill`, the teacher's for `head_fit`)."""
    dino: DinoConfig
    ibot: IbotConfig
    teacher: TeacherConfig
    """Centring of the targets (the momentum and temperatures are in `schedule`)."""
    crops: CropsConfig
    batch: BatchPlan
    schedule: SchedulePlan
    optim: OptimPlan
    weights: WeightsPlan
    frozen: tuple[str, ...] = ()
    """Parameter-name prefixes of the trained module that never train (e.g. `student.backbone.` for `head_fit`)."""
    students: tuple[str, ...] = ()
    """`distill`: the student presets (geometry of `model`)."""
    teacher_model: ModelConfig | None = None
    """`distill`: the frozen teacher's backbone."""
    gram: GramPlan | None = None
    """Gram anchoring in this phase (`components.training.gram`), or None."""
    crop_sizes: CropSizesPlan | None = None
    """Mixed crop sizes drawn per step, `crops` (and `gram.teacher_crops_size`) then holding the first pair's; None:
    every step at `crops`'s sizes."""

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data (what plan.yaml and MLflow hold), with the global batch spelled out."""
        out = {k: _plain(v) for k, v in asdict(self).items()}
        for key in ("model", "dino", "ibot", "teacher", "crops", "teacher_model"):
            value = getattr(self, key)
            out[key] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        out["batch"]["global_size"] = self.batch.global_size
        if self.gram is None:
            del out["gram"]  # plans without Gram keep their fingerprints
        if self.crop_sizes is None:
            del out["crop_sizes"]  # and plans of one crop size theirs
        # The teacher's centring only: its momentum and temperatures are the schedule's (one value, one place).
        out["teacher"] = {k: out["teacher"][k] for k in ("centering", "center_momentum")}
        return out

    def schedules(self) -> TrainingSchedules | GramSchedules:
        """The per-step schedules of this phase (with the Gram loss weight and refreshes when it has Gram)."""
        values = asdict(self.schedule)
        del values["base_lr"]  # `lr` is the scaled one
        schedules = build_schedules(**values)
        if self.crop_sizes is not None:
            schedules = MixedCropSchedules(schedules, self.seed, self.crop_sizes)
        return schedules if self.gram is None else GramSchedules(schedules, self.gram)

    def crop_pairs(self) -> tuple[tuple[CropsConfig, int | None], ...]:
        """The augmentation settings of each crop-size pair (`crops` with that pair's sides) and the Gram teacher's
        crop side with Gram (None without), in the order of `crop_sizes.pairs`; one pair, `crops`, when the phase
        does not mix sizes."""
        gram_side = self.gram.teacher_crops_size if self.gram is not None else None
        if self.crop_sizes is None:
            return ((self.crops, gram_side),)
        pairs = self.crop_sizes.pairs
        gram_sides = self.crop_sizes.gram_teacher_crops_sizes or (None,) * len(pairs)
        return tuple(
            (self.crops.model_copy(update={"global_crops_size": g, "local_crops_size": loc}), t)
            for (g, loc), t in zip(pairs, gram_sides, strict=True)
        )

    def fingerprint_items(self) -> dict[str, Any]:
        """What a checkpoint of this phase depends on: the plan without the split of its global batch."""
        items = flatten(self.to_dict())
        for key in ("batch.per_rank", "batch.grad_accum_steps", "batch.world_size", "weights.source"):
            del items[key]
        items.pop("gram.teacher_weights.source", None)  # a location; its digest is the identity
        return items


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def fingerprint(items: dict[str, Any], inputs: dict[str, str] | None = None) -> str:
    """A short hash of a plan's fingerprint items and the digests of what the run reads (the curated set, ...)."""
    blob = json.dumps({"plan": items, "inputs": dict(inputs or {})}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------------
# The phases
# --------------------------------------------------------------------------------------------------------------------


def _batch(cfg: PipelineConfig, world_size: int, per_rank: int | None = None) -> BatchPlan:
    batch = BatchPlan(per_rank or cfg.train.batch_size_per_gpu, cfg.train.grad_accum_steps, world_size)
    group, images = cfg.dino.koleo_group_size, world_size * batch.per_rank  # KoLeo sees each micro-batch
    if cfg.dino.koleo_distributed and group is not None and (group % batch.per_rank or images % group):
        raise ConfigError(
            f"dino.koleo_group_size = {group}: a KoLeo group must hold whole ranks' batches of {batch.per_rank} "
            f"images and divide the {world_size} ranks' {images} images"
        )
    return batch


def _optim(cfg: PipelineConfig) -> OptimPlan:
    o = cfg.optim
    return OptimPlan(
        clip_grad=o.clip_grad,
        betas=(o.adamw_beta1, o.adamw_beta2),
        layerwise_decay=o.layerwise_decay,
        patch_embed_lr_mult=o.patch_embed_lr_mult,
        dino_head_wd_multiplier=o.dino_head_wd_multiplier,
    )


def _held_local_weight(cfg: PipelineConfig) -> dict[str, Any]:
    """The local-crop DINO weight held at the end of its pretraining schedule (the phases after pretraining)."""
    end = cfg.dino.local_loss_weight.end
    return {"local_weight_start": end, "local_weight_peak": end, "local_weight_end": end,
            "local_weight_warmup_steps": 0, "local_weight_cosine_steps": None}  # fmt: skip


def _schedule(cfg: PipelineConfig, batch: BatchPlan, **values: Any) -> SchedulePlan:
    """The pretraining recipe in steps (`optim`, `teacher` and `dino.local_loss_weight` epochs times
    `optim.epoch_length`), then `values`."""
    o, t, n, w = cfg.optim, cfg.teacher, cfg.optim.epoch_length, cfg.dino.local_loss_weight
    base = {
        "total_steps": o.epochs * n,
        "warmup_steps": o.warmup_epochs * n,
        "base_lr": o.base_lr,
        "min_lr": o.min_lr,
        "weight_decay": o.weight_decay,
        "weight_decay_end": o.weight_decay_end,
        "momentum": t.momentum_teacher,
        "final_momentum": t.final_momentum_teacher,
        "warmup_teacher_temp": t.warmup_teacher_temp,
        "teacher_temp": t.teacher_temp,
        "teacher_temp_warmup_steps": t.warmup_teacher_temp_epochs * n,
        "freeze_last_layer_steps": o.freeze_last_layer_epochs * n,
        "kind": o.schedule,
        "weight_decay_warmup_steps": o.weight_decay_warmup_epochs * n,
        "momentum_warmup_steps": t.momentum_warmup_epochs * n,
        "local_weight_start": w.start,
        "local_weight_peak": w.peak,
        "local_weight_end": w.end,
        "local_weight_warmup_steps": w.warmup_epochs * n,
        "local_weight_cosine_steps": None if w.cosine_epochs is None else w.cosine_epochs * n,
    } | values
    base["lr"] = scaled_lr(base["base_lr"], batch.global_size, o.scaling_rule)
    return SchedulePlan(**base)


def frozen_blocks(n: int) -> tuple[str, ...]:
    """Parameter prefixes of the student's embeddings, tokens and first `n` blocks (none for n = 0)."""
    if not n:
        return ()
    # DINOv2's position table and registers, DINOv3's storage tokens; the mask token trains (iBOT's input)
    stem = ("patch_embed.", "cls_token", "pos_embed", "register_tokens", "storage_tokens")
    return tuple(f"student.backbone.{p}" for p in (*stem, *(f"blocks.{i}." for i in range(n))))


def _gram(
    cfg: PipelineConfig, crops_size: int, teacher: WeightsPlan | None, on: bool, highres: bool = False
) -> GramPlan | None:
    """The phase's Gram anchoring when `on` (and `gram.enabled`); `teacher`: the `gram.teacher_weights` file."""
    if not on:
        return None
    return gram_plan(cfg.gram, global_crops_size=crops_size, teacher_weights=teacher, highres=highres)


def pretrain_plan(
    cfg: PipelineConfig,
    *,
    world_size: int,
    weights: WeightsPlan | None = None,
    model: ModelConfig | None = None,
    gram_teacher: WeightsPlan | None = None,
) -> PhasePlan:
    """The DINOv2 recipe as params.yaml states it: `optim` / `teacher` epochs of `optim.epoch_length` steps.

    Continuing from pretrained weights, `model` is the `model` section with the weights' geometry (registers,
    interpolation, patch size) and `model.freeze_blocks` bottom blocks stay frozen. With `gram.enabled` and no Gram
    refinement phase (`gram.iterations` 0), Gram anchors this phase (`gram_teacher`: `gram.teacher_weights`
    resolved, else the starting model).
    """
    batch = _batch(cfg, world_size)
    model = (model or cfg.model).model_copy(update={"pretrained_weights": None})
    gram = _gram(cfg, cfg.crops.global_crops_size, gram_teacher, cfg.gram.enabled and not cfg.gram.iterations)
    return PhasePlan(
        stage="pretrain", phase="pretrain", seed=cfg.seed, model=model,
        dino=cfg.dino, ibot=cfg.ibot, teacher=cfg.teacher, crops=cfg.crops, batch=batch,
        schedule=_schedule(cfg, batch), optim=_optim(cfg), weights=weights or WeightsPlan("random"),
        frozen=frozen_blocks(model.freeze_blocks), gram=gram,
    )  # fmt: skip


def gram_phase_plan(
    cfg: PipelineConfig,
    *,
    world_size: int,
    weights: WeightsPlan,
    model: ModelConfig | None = None,
    gram_teacher: WeightsPlan | None = None,
) -> PhasePlan:
    """The Gram refinement phase (DINOv3, section 4.2) after the main phase, from its export, with the release's
    constant schedules: `gram.iterations` steps at the `crops` sizes, lr warm-up over `gram.warmup_iterations` to
    `gram.base_lr` (batch-scaled) and held there, weight decay held at `optim.weight_decay_end`, EMA momentum held at
    `gram.momentum_teacher`, the final teacher temperature, no prototype freeze, the main phase's frozen blocks;
    Gram on from the first step, its teacher the main phase's final EMA teacher (or `gram_teacher`)."""
    g, t = cfg.gram, cfg.teacher
    batch = _batch(cfg, world_size)
    lr = scaled_lr(g.base_lr, batch.global_size, cfg.optim.scaling_rule)
    schedule = _schedule(
        cfg, batch, total_steps=g.iterations, warmup_steps=g.warmup_iterations, base_lr=g.base_lr, min_lr=lr,
        weight_decay=cfg.optim.weight_decay_end, momentum=g.momentum_teacher, final_momentum=g.momentum_teacher,
        warmup_teacher_temp=t.teacher_temp, teacher_temp_warmup_steps=0, freeze_last_layer_steps=0,
    )  # fmt: skip
    model = (model or cfg.model).model_copy(update={"pretrained_weights": None})
    return PhasePlan(
        stage="pretrain", phase="gram", seed=cfg.seed, model=model, dino=cfg.dino, ibot=cfg.ibot, teacher=t,
        crops=cfg.crops, batch=batch, schedule=schedule, optim=_optim(cfg), weights=weights,
        frozen=frozen_blocks(model.freeze_blocks), gram=_gram(cfg, cfg.crops.global_crops_size, gram_teacher, True),
    )  # fmt: skip


def highres_plan(
    cfg: PipelineConfig, *, world_size: int, weights: WeightsPlan, gram_teacher: WeightsPlan | None = None
) -> PhasePlan:
    """The high-resolution phase (paper, appendix B.2) from the pretrain export: `highres.iterations` steps at the
    `highres` crop sizes (one pair, or DINOv3's mixed sizes: `highres.crop_sizes` drawn per step with
    `highres.crop_size_ratios`, the Gram teacher's crops scaled with each, `CropSizesPlan`) and batch, lr warm-up
    over `highres.warmup_iterations` to `highres.base_lr` (batch-scaled), weight decay held at
    `optim.weight_decay_end`, EMA momentum from `highres.momentum_teacher` (cosine to the final momentum; held at
    `teacher.final_momentum_teacher` with the constant schedule), the final teacher temperature and local-crop weight
    throughout, no prototype freeze; Gram-anchored with `gram.enabled` (as DINOv3's high-resolution adaptation:
    `gram.highres_*`, no refresh), to the starting export or `gram_teacher`."""
    h, t = cfg.highres, cfg.teacher
    batch = _batch(cfg, world_size, per_rank=h.batch_size_per_gpu)
    pairs = h.crop_pairs()
    (global_size, local_size), gram_on = pairs[0], cfg.gram.enabled
    crops = cfg.crops.model_copy(update={"global_crops_size": global_size, "local_crops_size": local_size})
    crop_sizes = None
    if len(pairs) > 1:  # one pair in `crop_sizes` is the single-size phase, fingerprint included
        gram_sides = [_gram(cfg, g, None, gram_on, highres=True) for g, _ in pairs]
        crop_sizes = CropSizesPlan(
            pairs=pairs,
            ratios=h.crop_pair_ratios(),
            gram_teacher_crops_sizes=tuple(g.teacher_crops_size for g in gram_sides) if gram_on else None,
        )
    schedule = _schedule(
        cfg, batch, total_steps=h.iterations, warmup_steps=h.warmup_iterations, base_lr=h.base_lr,
        weight_decay=cfg.optim.weight_decay_end, momentum=h.momentum_teacher, warmup_teacher_temp=t.teacher_temp,
        teacher_temp_warmup_steps=0, freeze_last_layer_steps=0, weight_decay_warmup_steps=0,
        momentum_warmup_steps=0, **_held_local_weight(cfg),
    )  # fmt: skip
    return PhasePlan(
        stage="pretrain_highres", phase="highres", seed=cfg.seed,
        model=cfg.model.model_copy(update={"pretrained_weights": None}), dino=cfg.dino, ibot=cfg.ibot,
        teacher=t, crops=crops, batch=batch, schedule=schedule, optim=_optim(cfg), weights=weights,
        gram=_gram(cfg, global_size, gram_teacher, gram_on, highres=True), crop_sizes=crop_sizes,
    )  # fmt: skip


def head_fit_plan(
    cfg: PipelineConfig, *, stage: str, world_size: int, model: ModelConfig, weights: WeightsPlan
) -> PhasePlan:
    """Heads fitted on a frozen backbone with the pretraining losses: the stage's head-fit length
    (`distill.head_fit_iterations` for distillation, `adapt.head_fit_iterations` for continued pretraining), lr
    warm-up over the first tenth to its `head_fit_base_lr` (batch-scaled), the final teacher temperature from the
    first step (the features are trained), no prototype freeze, no weight-decay or momentum warm-up, the local-crop
    weight at its end, masking as in pretraining."""
    section = cfg.distill if stage == "distill" else cfg.adapt
    t, n = cfg.teacher, section.head_fit_iterations
    batch = _batch(cfg, world_size)
    schedule = _schedule(
        cfg, batch, total_steps=n, warmup_steps=n // 10, base_lr=section.head_fit_base_lr,
        warmup_teacher_temp=t.teacher_temp, teacher_temp_warmup_steps=0, freeze_last_layer_steps=0,
        weight_decay_warmup_steps=0, momentum_warmup_steps=0, **_held_local_weight(cfg),
    )  # fmt: skip
    model = model.model_copy(update={"drop_path_rate": 0.0, "pretrained_weights": None, "freeze_blocks": 0})
    return PhasePlan(
        stage=stage, phase="head_fit", seed=cfg.seed, model=model, dino=cfg.dino,
        ibot=cfg.ibot, teacher=t, crops=cfg.crops, batch=batch, schedule=schedule, optim=_optim(cfg),
        weights=weights, frozen=("student.backbone.", "teacher.backbone."),
    )  # fmt: skip


def distill_plan(cfg: PipelineConfig, *, world_size: int, teacher: ModelConfig, weights: WeightsPlan) -> PhasePlan:
    """Distillation (paper, section 5): `distill.epochs` epochs of `optim.epoch_length` steps at `distill.base_lr`,
    the students' spare EMA from `distill.momentum_ema`, the final teacher temperature and local-crop weight
    throughout (the teacher is trained), no masking and no stochastic depth; each student's modules are clipped to
    `optim.clip_grad` on their own, as the release clips each student's."""
    d, t, n = cfg.distill, cfg.teacher, cfg.optim.epoch_length
    batch = _batch(cfg, world_size)
    schedule = _schedule(
        cfg, batch, total_steps=d.epochs * n, base_lr=d.base_lr, momentum=d.momentum_ema,
        warmup_teacher_temp=t.teacher_temp, teacher_temp_warmup_steps=0, **_held_local_weight(cfg),
    )  # fmt: skip
    return PhasePlan(
        stage="distill", phase="distill", seed=cfg.seed,
        model=cfg.model.model_copy(update={"drop_path_rate": 0.0, "pretrained_weights": None}), dino=cfg.dino,
        ibot=cfg.ibot.model_copy(update={"mask_sample_probability": 0.0}), teacher=t, crops=cfg.crops, batch=batch,
        schedule=schedule, optim=_optim(cfg),
        weights=weights, students=tuple(d.students),
        teacher_model=teacher.model_copy(update={"drop_path_rate": 0.0, "pretrained_weights": None}),
    )  # fmt: skip
