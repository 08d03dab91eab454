"""Gram anchoring in training (Simeoni et al. 2025, DINOv3, section 4.2): its plan, its schedules and its teacher.

The Gram teacher is a frozen copy of the backbone. It sees each global crop's region at `gram.teacher_resolution`
times the student's resolution (the collate's `collated_gram_teacher_crops`); its patch features are resized
(bicubic, no antialiasing, as the release) to the student's patch grid, and `components.model.gram_loss` compares the
Gram matrices of the two sets of features (`gram.tokens`: all of the student's global-crop patch tokens, or the
masked / unmasked ones). The weighted loss joins the step's total as `gram_loss`.

Where the Gram teacher comes from, decided by the plan (`GramPlan`):

- at a phase's start: the phase's starting model (the released weights in continued pretraining, the main phase's
  final EMA teacher in the Gram refinement phase, the pretrain export in the high-resolution phase), or a weight file
  or export (`gram.teacher_weights`);
- during the phase: replaced by the EMA teacher after step `refresh_first`, then every `refresh_period` steps, up to
  `max_refreshes` times (`GramPlan.refreshes_done`, a pure function of the step; the engine copies the weights after
  the EMA update of a step whose schedule values hold `snapshot`);
- on resume: the checkpoint's (the Gram teacher is part of the trained module's state).

The weight follows the release's `linear_warmup_cosine_decay` as the DINOv3 recipes use it: a half cosine from
`loss_weight_start` to `loss_weight` over `loss_weight_ramp_iterations` steps, then constant (`gram_weight`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.config import GramConfig, gram_crops_size
from components.model import gram_loss

RESIZE_MODE = "bicubic"
"""How the Gram teacher's patch features are resized to the student's grid (the release's default)."""


def gram_weight(step: int, *, start: float, end: float, ramp_steps: int) -> float:
    """The Gram loss weight at `step`: a half cosine from `start` (step 0) to `end` (step `ramp_steps` - 1), then
    `end`; the release's `linear_warmup_cosine_decay(start, start, end, 0, ...)` index for index."""
    if step >= ramp_steps:
        return end
    if ramp_steps == 1:
        return start
    return end + (start - end) * (1.0 + math.cos(math.pi * step / (ramp_steps - 1))) / 2.0


def gram_refreshes(steps_done: int, *, first: int | None, period: int, max_refreshes: int | None) -> int:
    """How many times the Gram teacher was replaced by the EMA teacher once `steps_done` steps of a phase are done:
    after step `first` (default `period`), then every `period` steps, at most `max_refreshes` times (the release's
    `it_first_update`, `update_frequency`, `max_updates`, counted from the phase's start). `period` 0: never."""
    if not period:
        return 0
    first = period if first is None else first
    if steps_done < first:
        return 0
    done = (steps_done - first) // period + 1
    return done if max_refreshes is None else min(done, max_refreshes)


@dataclass(frozen=True)
class GramPlan:
    """What Gram anchoring computes in one phase (part of the phase's plan and fingerprint)."""

    loss_weight: float
    loss_weight_start: float
    loss_weight_ramp_steps: int
    teacher_crops_size: int
    """Side of the Gram teacher's crops, px."""
    teacher_no_distortions: bool
    tokens: Literal["all", "masked", "unmasked"]
    img_level: bool
    remove_neg: bool
    refresh_period: int
    refresh_first: int | None
    max_refreshes: int | None
    teacher_weights: Any = None
    """The Gram teacher at the phase's start: a `WeightsPlan` (file or export), or None for the phase's starting
    model."""

    def weight(self, step: int) -> float:
        """The loss weight at `step` (`gram_weight`)."""
        start, ramp = self.loss_weight_start, self.loss_weight_ramp_steps
        return gram_weight(step, start=start, end=self.loss_weight, ramp_steps=ramp)

    def refreshes_done(self, steps_done: int) -> int:
        """Refreshes done once `steps_done` steps are (`gram_refreshes`): a resumed run knows where it stands."""
        return gram_refreshes(
            steps_done, first=self.refresh_first, period=self.refresh_period, max_refreshes=self.max_refreshes
        )

    def refresh_after(self, step: int) -> bool:
        """Whether the Gram teacher is replaced by the EMA teacher after step `step` (0-based)."""
        return self.refreshes_done(step + 1) > self.refreshes_done(step)


def gram_plan(
    gram: GramConfig, *, global_crops_size: int, teacher_weights: Any = None, highres: bool = False
) -> GramPlan:
    """The `gram` section for a phase whose global crops are `global_crops_size` px; `highres`: the high-resolution
    phase's settings (`gram.highres_*`: a constant weight, its resolution, no refresh)."""
    weight = gram.highres_loss_weight if highres else None
    resolution = (gram.highres_teacher_resolution if highres else None) or gram.teacher_resolution
    return GramPlan(
        loss_weight=gram.loss_weight if weight is None else weight,
        loss_weight_start=gram.loss_weight_start,
        loss_weight_ramp_steps=gram.loss_weight_ramp_iterations if weight is None else 0,
        teacher_crops_size=gram_crops_size(resolution, global_crops_size),
        teacher_no_distortions=gram.teacher_no_distortions,
        tokens=gram.tokens,
        img_level=gram.img_level,
        remove_neg=gram.remove_neg,
        refresh_period=0 if highres else gram.refresh_period,
        refresh_first=gram.refresh_first,
        max_refreshes=gram.max_refreshes,
        teacher_weights=teacher_weights,
    )


@dataclass(frozen=True)
class GramSchedules:
    """A phase's schedules with Gram's: `gram_loss_weight`, and `snapshot` (1 after a step that refreshes the Gram
    teacher, 0 otherwise; the engine reads it)."""

    base: Any
    """The phase's `TrainingSchedules` (anything with `at(step) -> dict`)."""
    gram: GramPlan

    def at(self, step: int) -> dict[str, float]:
        return {
            **self.base.at(step),
            "gram_loss_weight": self.gram.weight(step),
            "snapshot": float(self.gram.refresh_after(step)),
        }


@torch.no_grad()
def gram_targets(teacher: nn.Module, crops: Tensor, grid: tuple[int, int]) -> Tensor:
    """The Gram teacher's patch features of its crops on the student's patch grid.

    Args:
        teacher: the Gram teacher's backbone (eval mode).
        crops: (G B, 3, H_T, W_T) the Gram teacher's crops, crop-major like the global crops.
        grid: (h, w), the student's patch grid of a global crop.

    Returns:
        (G B, h w, D) float32 features.
    """
    patches = teacher(crops, is_training=True)["x_norm_patchtokens"].float()  # (G B, h_T w_T, D)
    p = teacher.patch_size
    h_t, w_t = crops.shape[-2] // p, crops.shape[-1] // p
    if (h_t, w_t) == tuple(grid):
        return patches
    maps = patches.transpose(1, 2).unflatten(-1, (h_t, w_t))  # (G B, D, h_T, w_T)
    maps = F.interpolate(maps, size=tuple(grid), mode=RESIZE_MODE, align_corners=False, antialias=False)
    return maps.flatten(-2).transpose(1, 2)  # (G B, h w, D)


def gram_term(
    plan: GramPlan, teacher: nn.Module, crops: Tensor, student_patches: Tensor, masks: Tensor, grid: tuple[int, int]
) -> Tensor:
    """The unweighted Gram loss of one step.

    Args:
        plan: the phase's `GramPlan`.
        teacher: the Gram teacher's backbone.
        crops: (G B, 3, H_T, W_T) its crops.
        student_patches: (G B, N, D) the student's normalised patch tokens of the (masked) global crops.
        masks: (G B, N) the iBOT masks, True where the student's patch was masked.
        grid: the student's patch grid (h, w), h w = N.

    Returns:
        A scalar (0 when `tokens` selects no patch in this batch).
    """
    target = gram_targets(teacher, crops, grid)  # (G B, N, D)
    student = student_patches
    if plan.tokens != "all":
        keep = masks if plan.tokens == "masked" else ~masks
        student, target = student[keep], target[keep]  # (P, D): one matrix over the selected patches
        if not len(student):
            return student.sum() * 0.0  # no such patch in this batch; keeps the graph
    return gram_loss(student, target, img_level=plan.img_level, remove_neg=plan.remove_neg)
