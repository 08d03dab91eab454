"""DINOv2's training schedules, as pure functions of the step, and the optimizer's parameter groups.

Schedules (the release's `CosineScheduler`, step-indexed):
- learning rate: linear warm-up from 0, then cosine to `min_lr`; the base lr is scaled by sqrt(global batch / 1024)
  (`components.config.scaled_lr`);
- last-layer learning rate: the same, but 0 for the first `freeze_last_layer_epochs` (the prototypes stay put
  while the rest of the network settles);
- weight decay: cosine from 0.04 to 0.2 (or 0.4);
- teacher EMA momentum: cosine from 0.992 (or 0.994) to 1;
- teacher temperature: linear warm-up from 0.04 to 0.07, then constant.

Parameter groups: layer-wise lr decay decay^(L + 1 - layer), with the patch embedding, CLS, register and mask tokens
and position embeddings as layer 0, block i as layer i + 1 and everything after the blocks (final norm, heads) as
layer L + 1; the patch embedding's lr is further multiplied by 0.2; biases, norms, LayerScale gammas and the tokens
(position embeddings included) get no weight decay; parameters named `last_layer` follow the last-layer schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class TrainingSchedules:
    """Every per-step value of a DINOv2 run; `at(step)` gives them as a dict (to apply and to log)."""

    lr: CosineSchedule
    weight_decay: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: CosineSchedule
    freeze_last_layer_steps: int

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
        }


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
) -> TrainingSchedules:
    """The release's schedules (`dinov2/train/train.py: build_schedulers`), every length in steps; `lr` is already
    batch-scaled (a phase's plan derives these values: `components.training.plan`)."""
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
    )


# --------------------------------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------------------------------

_LAYER0 = ("cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed.")
_TOKENS = ("cls_token", "pos_embed", "register_tokens", "mask_token")


def _vit_layer_id(name: str, depth: int) -> int:
    """Layer of a backbone parameter (name relative to the backbone): 0 embeddings, i + 1 block i, L + 1 the rest."""
    if name.startswith(_LAYER0):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def _no_weight_decay(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return name.endswith(".bias") or "norm" in name or leaf == "gamma" or leaf in _TOKENS


def param_groups(
    model: nn.Module, *, layerwise_decay: float = 1.0, patch_embed_lr_mult: float = 1.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with lr and weight-decay multipliers, fused by equal settings.

    Works on a backbone, or on any module holding backbones and heads (e.g. a student with `backbone`, `dino_head`
    and `ibot_head`): each `DinoVisionTransformer` inside numbers its own layers; other parameters count as layer
    L + 1 (multiplier 1). Frozen parameters (requires_grad False) are left out.

    Args:
        model: the module whose trainable parameters are optimised.
        layerwise_decay: d in d^(L + 1 - layer) (0.9 for ViT-g in DINOv2; 1 disables).
        patch_embed_lr_mult: extra lr multiplier of the patch embedding (0.2).

    Returns:
        A list of dicts, each with `params`, `lr_multiplier`, `wd_multiplier`, `is_last_layer` and `names`, that
        `torch.optim` (and DeepSpeed) accept as param groups; `apply_schedules` sets their lr and weight decay.
    """
    owner: dict[int, tuple[int, int, str]] = {}  # param id -> (layer, depth, name inside its backbone)
    for module in model.modules():
        if isinstance(module, DinoVisionTransformer):
            for name, p in module.named_parameters():
                owner.setdefault(id(p), (_vit_layer_id(name, module.n_blocks), module.n_blocks, name))
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
        wd_mult = 0.0 if _no_weight_decay(name) else 1.0
        key = (lr_mult, wd_mult, "last_layer" in name)
        group = groups.setdefault(
            key, {"params": [], "names": [], "lr_multiplier": key[0], "wd_multiplier": key[1], "is_last_layer": key[2]}
        )
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())
