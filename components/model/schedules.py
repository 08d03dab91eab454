"""The training schedules of both releases, as pure functions of the step, and the optimizer's parameter groups.

Schedules (`optim.schedule`), every length in steps:
- `cosine`, DINOv2's (and DINOv3's ImageNet recipe's, the release's `CosineScheduler`): learning rate: linear
  warm-up from 0, then cosine to `min_lr`; weight decay: cosine from 0.04 to 0.2 (or 0.4); teacher EMA momentum:
  cosine from 0.992 (or 0.994) to 1; teacher temperature: linear warm-up from 0.04 to 0.07, then constant.
- `constant`, the DINOv3 recipe's (the release's "schedules v2", `linear_warmup_cosine_decay` with its peak equal to
  its end): each value rises linearly over its own warm-up (learning rate from 0, weight decay from its start value,
  momentum from its start value, temperature from the warm-up temperature), then holds its final value.
In both, the base lr is scaled by sqrt(global batch / 1024) (`components.config.scaled_lr`) and the last-layer
learning rate is the lr schedule with its first `freeze_last_layer_epochs` zeroed (the prototypes stay put while the
rest of the network settles). DINOv3's weight of the local crops' DINO terms follows the release's
`linear_warmup_cosine_decay` (`warmup_cosine_decay` here).

Parameter groups, as both releases' `get_params_groups_with_decay` build them: layer-wise lr decay
decay^(L + 1 - layer), with the patch embedding, CLS, register / storage and mask tokens and position embeddings as
layer 0, block i as layer i + 1 and everything after the blocks (final norms, heads) as layer L + 1; the patch
embedding's lr is further multiplied by 0.2; biases, norms and LayerScale gammas get no weight decay (the learned
tokens and the position embedding do); the DINO head's decayed weights get DINOv3's `dino_head_wd_multiplier`;
parameters named `last_layer` follow the last-layer schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from components.model.vit import DinoVisionTransformer


def cosine_schedule(
    step: int,
    *,
    base_value: float,
    final_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup_value: float = 0.0,
    freeze_steps: int = 0,
) -> float:
    """Value at `step` of: `freeze_steps` zeros, a linear warm-up, then a half-cosine from base to final.

    Matches the release's `CosineScheduler` index for index: the warm-up is `linspace(start, base, warmup_steps)`
    (its last step is `base_value`), the cosine covers the remaining n steps with value
    final + (base - final) (1 + cos(pi i / n)) / 2 at its i-th step, and any step >= `total_steps` is `final_value`.
    """
    if step >= total_steps:
        return final_value
    if step < freeze_steps:
        return 0.0
    step -= freeze_steps
    if step < warmup_steps:
        if warmup_steps == 1:
            return start_warmup_value
        return start_warmup_value + (base_value - start_warmup_value) * step / (warmup_steps - 1)
    i, n = step - warmup_steps, total_steps - warmup_steps - freeze_steps
    return final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / n))


@dataclass(frozen=True)
class CosineSchedule:
    """A `cosine_schedule` with its arguments bound: `schedule(step) -> value`."""

    base_value: float
    final_value: float
    total_steps: int
    warmup_steps: int = 0
    start_warmup_value: float = 0.0
    freeze_steps: int = 0

    def __call__(self, step: int) -> float:
        return cosine_schedule(
            step,
            base_value=self.base_value,
            final_value=self.final_value,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            start_warmup_value=self.start_warmup_value,
            freeze_steps=self.freeze_steps,
        )


def warmup_cosine_decay(
    step: int,
    *,
    start: float,
    peak: float,
    end: float,
    warmup_steps: int,
    total_steps: int,
    cosine_steps: int | None = None,
) -> float:
    """Value at `step` of the DINOv3 release's `linear_warmup_cosine_decay`, index for index.

    A linear warm-up from `start` towards `peak` over `warmup_steps` (`linspace(start, peak, warmup_steps,
    endpoint=False)`: its last step is one increment short of `peak`), a half-cosine from `peak` to `end` over
    `cosine_steps` (both ends included; None: every step after the warm-up), then `end` for the rest of
    `total_steps`. A step at or past `total_steps` is `end` (the release's arrays end there). With `peak == end` this
    is the DINOv3 recipe's constant schedule after a warm-up.

    Raises:
        ValueError: the warm-up and the cosine do not fit in `total_steps`.
    """
    n = total_steps - warmup_steps if cosine_steps is None else cosine_steps
    if warmup_steps < 0 or n < 0 or warmup_steps + n > total_steps:
        raise ValueError(f"a warm-up of {warmup_steps} and a cosine of {n} steps do not fit in {total_steps} steps")
    if step < warmup_steps:
        return step * ((peak - start) / warmup_steps) + start  # numpy's linspace, operation for operation
    i = step - warmup_steps
    if i >= n:
        return end
    if n == 1:
        return peak
    angle = math.pi if i == n - 1 else i * (math.pi / (n - 1))  # linspace(0, pi, n) sets its last point to pi
    return (peak - end) * ((math.cos(angle) + 1) / 2) + end


@dataclass(frozen=True)
class WarmupCosineSchedule:
    """A `warmup_cosine_decay` with its arguments bound: `schedule(step) -> value`."""

    start: float
    peak: float
    end: float
    warmup_steps: int
    total_steps: int
    cosine_steps: int | None = None

    def __post_init__(self) -> None:
        warmup_cosine_decay(0, **self._kwargs())  # fails now, not at the step where it would not fit

    def _kwargs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("start", "peak", "end", "warmup_steps", "total_steps", "cosine_steps")}

    def __call__(self, step: int) -> float:
        return warmup_cosine_decay(step, **self._kwargs())


def constant_after_warmup(value: float, *, start: float, warmup_steps: int, total_steps: int) -> WarmupCosineSchedule:
    """The DINOv3 recipe's schedule of one value: linear from `start` over `warmup_steps`, then `value`."""
    return WarmupCosineSchedule(start, value, value, warmup_steps, total_steps)


Schedule = CosineSchedule | WarmupCosineSchedule


@dataclass(frozen=True)
class TrainingSchedules:
    """Every per-step value of a run; `at(step)` gives them as a dict (to apply and to log)."""

    lr: Schedule
    weight_decay: Schedule
    momentum: Schedule
    teacher_temp: Schedule
    freeze_last_layer_steps: int
    dino_local_loss_weight: Schedule = WarmupCosineSchedule(1.0, 1.0, 1.0, 0, 0)
    """The weight of the local crops' DINO terms (DINOv3's `reweight_dino_local_loss`; 1: DINOv2's plain mean)."""

    def last_layer_lr(self, step: int) -> float:
        """The lr of the prototypes: 0 during the freeze, the lr schedule after (the release zeroes its first steps)."""
        return 0.0 if step < self.freeze_last_layer_steps else self.lr(step)

    def at(self, step: int) -> dict[str, float]:
        return {
            "lr": self.lr(step),
            "last_layer_lr": self.last_layer_lr(step),
            "weight_decay": self.weight_decay(step),
            "momentum": self.momentum(step),
            "teacher_temp": self.teacher_temp(step),
            "dino_local_loss_weight": self.dino_local_loss_weight(step),
        }


ScheduleKind = Literal["cosine", "constant"]


def build_schedules(
    *,
    lr: float,
    min_lr: float,
    total_steps: int,
    warmup_steps: int,
    weight_decay: float,
    weight_decay_end: float,
    momentum: float,
    final_momentum: float,
    teacher_temp: float,
    warmup_teacher_temp: float,
    teacher_temp_warmup_steps: int,
    freeze_last_layer_steps: int,
    kind: ScheduleKind = "cosine",
    weight_decay_warmup_steps: int = 0,
    momentum_warmup_steps: int = 0,
    local_weight_start: float = 1.0,
    local_weight_peak: float = 1.0,
    local_weight_end: float = 1.0,
    local_weight_warmup_steps: int = 0,
    local_weight_cosine_steps: int | None = None,
) -> TrainingSchedules:
    """A run's schedules, every length in steps; `lr` is already batch-scaled (a phase's plan derives these values:
    `components.training.plan`).

    `kind="cosine"` is the DINOv2 release's `build_schedulers` (`min_lr`, the cosines of weight decay and momentum;
    the `*_warmup_steps` of weight decay and momentum must be 0). `kind="constant"` is the DINOv3 recipe's
    (`build_schedulers_v2` with each peak equal to its end): lr from 0 over `warmup_steps` then `lr` (`min_lr`
    unused); weight decay from `weight_decay` over `weight_decay_warmup_steps` then `weight_decay_end`; momentum from
    `momentum` over `momentum_warmup_steps` then `final_momentum`; temperature from `warmup_teacher_temp` over
    `teacher_temp_warmup_steps` then `teacher_temp`. The local-crop DINO weight follows `warmup_cosine_decay` with
    the `local_weight_*` values in both.
    """
    local = WarmupCosineSchedule(
        local_weight_start, local_weight_peak, local_weight_end, local_weight_warmup_steps, total_steps,
        local_weight_cosine_steps,
    )  # fmt: skip
    if kind == "constant":
        return TrainingSchedules(
            lr=constant_after_warmup(lr, start=0.0, warmup_steps=warmup_steps, total_steps=total_steps),
            weight_decay=constant_after_warmup(
                weight_decay_end, start=weight_decay, warmup_steps=weight_decay_warmup_steps, total_steps=total_steps
            ),
            momentum=constant_after_warmup(
                final_momentum, start=momentum, warmup_steps=momentum_warmup_steps, total_steps=total_steps
            ),
            teacher_temp=constant_after_warmup(
                teacher_temp, start=warmup_teacher_temp, warmup_steps=teacher_temp_warmup_steps, total_steps=total_steps
            ),
            freeze_last_layer_steps=freeze_last_layer_steps,
            dino_local_loss_weight=local,
        )
    if kind != "cosine":
        raise ValueError(f"unknown schedule kind {kind!r}: expected 'cosine' or 'constant'")
    if weight_decay_warmup_steps or momentum_warmup_steps:
        raise ValueError("the cosine schedules have no weight-decay or momentum warm-up (the constant ones do)")
    return TrainingSchedules(
        lr=CosineSchedule(lr, min_lr, total_steps, warmup_steps=warmup_steps),
        weight_decay=CosineSchedule(weight_decay, weight_decay_end, total_steps),
        momentum=CosineSchedule(momentum, final_momentum, total_steps),
        # The temperature schedule ends with its warm-up and then holds `teacher_temp`.
        teacher_temp=CosineSchedule(
            teacher_temp,
            teacher_temp,
            teacher_temp_warmup_steps,
            warmup_steps=teacher_temp_warmup_steps,
            start_warmup_value=warmup_teacher_temp,
        ),
        freeze_last_layer_steps=freeze_last_layer_steps,
        dino_local_loss_weight=local,
    )


# --------------------------------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------------------------------

_LAYER0 = ("cls_token", "pos_embed", "register_tokens", "storage_tokens", "mask_token", "patch_embed.")


def _vit_layer_id(name: str, depth: int) -> int:
    """Layer of a backbone parameter (name relative to the backbone): 0 embeddings, i + 1 block i, L + 1 the rest."""
    if name.startswith(_LAYER0):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def no_weight_decay(name: str) -> bool:
    """Whether a parameter is left out of weight decay, by name, as both releases decide it: biases, norms (every
    name holding `norm`) and LayerScale gammas; the learned tokens and the position embedding are decayed."""
    return name.endswith("bias") or "norm" in name or "gamma" in name


def _is_vit(module: nn.Module) -> bool:
    """A ViT backbone whose layers are numbered (the DINOv2 `DinoVisionTransformer`, or any module with a patch
    embedding and a list of blocks, as the DINOv3 ViTs); ConvNeXt backbones are not numbered, as in the release."""
    return isinstance(module, DinoVisionTransformer) or (
        isinstance(getattr(module, "blocks", None), nn.ModuleList) and hasattr(module, "patch_embed")
    )


def param_groups(
    model: nn.Module,
    *,
    layerwise_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    dino_head_wd_multiplier: float = 1.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with lr and weight-decay multipliers, fused by equal settings.

    Works on a backbone, or on any module holding backbones and heads (e.g. a student with `backbone`, `dino_head`
    and `ibot_head`): each ViT backbone inside numbers its own layers; other parameters count as layer L + 1
    (multiplier 1). Frozen parameters (requires_grad False) are left out.

    Args:
        model: the module whose trainable parameters are optimised.
        layerwise_decay: d in d^(L + 1 - layer) (0.9 for ViT-g in DINOv2; 1 disables).
        patch_embed_lr_mult: extra lr multiplier of the patch embedding (0.2).
        dino_head_wd_multiplier: weight-decay multiplier of the decayed parameters of the DINO head (DINOv3's
            `optim.dino_head_wd_multiplier`, 1.0 in every released config). The release tests for `dino_head` in
            names taken relative to each student module, which a head's own names never hold; here names are taken
            from `model`, so the multiplier applies to the head it names.

    Returns:
        A list of dicts, each with `params`, `lr_multiplier`, `wd_multiplier`, `is_last_layer` and `names`, that
        `torch.optim` (and DeepSpeed) accept as param groups; `apply_schedules` sets their lr and weight decay.
    """
    owner: dict[int, tuple[int, int, str]] = {}  # param id -> (layer, depth, name inside its backbone)
    for module in model.modules():
        if _is_vit(module):
            depth = len(module.blocks)
            for name, p in module.named_parameters():
                owner.setdefault(id(p), (_vit_layer_id(name, depth), depth, name))
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult = 1.0
        if id(p) in owner:
            layer, depth, inner = owner[id(p)]
            lr_mult = layerwise_decay ** (depth + 1 - layer)
            if inner.startswith("patch_embed."):
                lr_mult *= patch_embed_lr_mult
        wd_mult = dino_head_wd_multiplier if "dino_head" in name else 1.0
        if no_weight_decay(name):
            wd_mult = 0.0
        key = (lr_mult, wd_mult, "last_layer" in name)
        group = groups.setdefault(
            key, {"params": [], "names": [], "lr_multiplier": key[0], "wd_multiplier": key[1], "is_last_layer": key[2]}
        )
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())
