"""Distillation of a frozen teacher into several students at once (Oquab et al. 2023, "Model distillation").

The paper distils its ViT-S/B/L from the frozen ViT-g with "the same training loop with a few exceptions: we use a
larger model as a frozen teacher, keep a spare EMA of the student that we use as our final model, remove the masking
and stochastic depth, and apply the iBOT loss on the two global crops". Here `DistillMetaArch` is a `TrainModule`,
so the pretraining engine (DeepSpeed ZeRO, guards, schedules), loop, streaming loader, checkpoints and trainer run it
unchanged. One step:

1. The teacher (frozen: `requires_grad_(False)`, eval mode, never in an optimizer nor an EMA pair) sees the 2 global
   crops ONCE (`meta_arch.teacher_targets`, as in pretraining): its CLS tokens through its DINO head, every patch
   token through its iBOT head (the DINO head when tied), targets sharpened at the final teacher temperature and
   centred. Every student reads the same targets: several students cost one teacher pass per batch.
2. Each student sees the 2 global and the N local crops, without masks, without stochastic depth.
3. Each student's loss is the pretraining one: DINO cross-entropy of each of its crops against the teacher's other
   global crops, iBOT cross-entropy on every patch of both global crops, KoLeo on its global CLS features; weighted
   as in params.yaml. The step's loss is the sum over students (their parameters are disjoint, so each student's
   gradient is its own loss's). Terms are logged per student: `<student>.dino_loss`, ..., `<student>.loss`.

The engine keeps a spare EMA of each student (`ema_pairs`), exported as that student's final model. A teacher
without heads (the release has backbones only) first goes through the `head_fit` phase (`plan.head_fit_plan`: the
pretraining meta-architecture with both backbones frozen), whose export is then this phase's teacher.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from components import exports
from components.log import get_logger
from components.model import param_groups as model_param_groups
from components.model.adapter import CheckpointError
from components.training.meta_arch import (
    SelfDistillation,
    build_network,
    heads_of,
    load_centers,
    load_network_weights,
    prefixed,
)
from components.training.module import LossOutput
from components.training.plan import PhasePlan

log = get_logger(__name__)


@dataclass
class _Targets:
    """The teacher's targets for one batch, shared by every student."""

    dino: Tensor
    """(G, B, K) centred, sharpened distributions of the teacher's global CLS tokens."""
    ibot: Tensor
    """(G B, N, K) the same for every patch token of the global crops."""


class DistillMetaArch(SelfDistillation):
    """A frozen teacher and several students, each with its heads and a spare EMA copy (see the module docstring).

    Args:
        plan: the `distill` phase's plan: students (`plan.students`, geometry of `plan.model`), the teacher's
            backbone (`plan.teacher_model`), heads and losses.
        teacher_info: provenance written into each student's model.json.
    """

    def __init__(self, plan: PhasePlan, teacher_info: Mapping[str, Any] | None = None) -> None:
        if plan.teacher_model is None:
            raise ValueError("a distill plan names its teacher's backbone (plan.teacher_model)")
        super().__init__(plan)
        dino, ibot = plan.dino, plan.ibot
        self.teacher_info = dict(teacher_info or {})
        self.student_models = {arch: plan.model.model_copy(update={"arch": arch}) for arch in plan.students}
        self.teacher = build_network(plan.teacher_model, dino, ibot)
        self.teacher.requires_grad_(False)
        self.students = nn.ModuleDict({name: build_network(m, dino, ibot) for name, m in self.student_models.items()})
        self.students_ema = copy.deepcopy(self.students)  # the spare EMA, exported as each student's final model
        self.students_ema.requires_grad_(False)
        self.teacher_calls = 0
        """Teacher forwards so far in this process (what the once-per-batch test reads)."""

    def train(self, mode: bool = True) -> DistillMetaArch:
        super().train(mode)
        self.teacher.eval()  # frozen: eval mode whatever the mode
        self.students_ema.eval()
        return self

    # -- weights in ------------------------------------------------------------------------------------------------

    def initial_state(self, source: str | None) -> dict[str, Tensor]:
        """The teacher's backbone and heads from `source` (an export with heads, or a training checkpoint), strictly;
        the students at their seeded initialisation.

        Raises:
            CheckpointError: the source has no heads, or they do not fit the `dino` / `ibot` sections (students'
                heads predict the teacher's prototypes, so head sizes must match); the message names the keys.
        """
        if source is None:
            raise CheckpointError("distillation needs the teacher's weights")
        try:
            found = load_network_weights(self.teacher, source, heads=True)
        except CheckpointError as err:
            raise CheckpointError(
                f"{source}: the teacher's heads must fit the dino / ibot sections (students' heads predict the "
                f"teacher's prototypes): {err}"
            ) from None
        if found is None:
            raise CheckpointError(f"{source}: the teacher has no heads (they are fitted first: the head_fit phase)")
        load_centers(found, self.dino_loss, self.ibot_loss)
        return self.state_dict()

    # -- the step --------------------------------------------------------------------------------------------------

    def teacher_pass(self, global_crops: Tensor, n_global: int, temp: float) -> _Targets:
        """One teacher pass over the global crops: DINO targets (G, B, K) and iBOT targets (G B, N, K)."""
        self.teacher_calls += 1
        dino_t, ibot_t = self.targets(self.teacher, global_crops, None, temp)
        GB = global_crops.shape[0]
        return _Targets(dino=dino_t.view(n_global, -1, dino_t.shape[-1]), ibot=ibot_t.view(GB, -1, ibot_t.shape[-1]))

    def student_loss(
        self,
        student: nn.ModuleDict,
        global_crops: Tensor,
        local_crops: Tensor,
        n_local: int,
        targets: _Targets,
        local_weight: float = 1.0,
    ) -> LossOutput:
        """One student's weighted DINO + iBOT + KoLeo loss against the shared teacher targets (`local_weight`: the
        local crops' DINO weight, DINOv3's)."""
        n_global = targets.dino.shape[0]
        if n_local:
            g_out, l_out = student.backbone([global_crops, local_crops], is_training=True)  # no masks
            l_cls = l_out["x_norm_clstoken"]  # (L B, D)
        else:
            g_out = student.backbone(global_crops, is_training=True)
            l_cls = global_crops.new_zeros(0, g_out["x_norm_clstoken"].shape[-1])
        g_cls = g_out["x_norm_clstoken"]  # (G B, D)
        patches = g_out["x_norm_patchtokens"]  # (G B, N, D)
        GB, N, D = patches.shape
        flat = patches.reshape(GB * N, D)
        if "ibot_head" in student:
            g_logits, l_logits = student.dino_head(torch.cat((g_cls, l_cls))).split([GB, len(l_cls)])
            patch_logits = student.ibot_head(flat)
        else:
            sizes = [GB, len(l_cls), GB * N]
            g_logits, l_logits, patch_logits = student.dino_head(torch.cat((g_cls, l_cls, flat))).split(sizes)
        B, K = GB // n_global, g_logits.shape[-1]
        local = l_logits.view(n_local, B, K) if n_local else None
        dino = self.dino_loss(g_logits.view(n_global, B, K), local, targets.dino, local_weight=local_weight)
        every_patch = torch.ones(GB, N, dtype=torch.bool, device=patches.device)  # iBOT on both global crops
        ibot = self.ibot_loss(patch_logits.view(GB, N, -1), targets.ibot, every_patch)
        return self.weighted(dino, ibot, g_cls, n_global)

    def forward(self, batch: Mapping[str, Any], values: Mapping[str, float]) -> LossOutput:
        """The summed loss of every student on one collated multi-crop batch, one teacher pass for all of them."""
        global_crops = batch["collated_global_crops"]  # (G B, 3, H, W), crop-major
        local_crops = batch["collated_local_crops"]  # (L B, 3, h, w)
        n_global, n_local = int(batch["n_global_crops"]), int(batch["n_local_crops"])
        targets = self.teacher_pass(global_crops, n_global, float(values["teacher_temp"]))
        out: LossOutput = {}
        total = global_crops.new_zeros(())
        local_weight = values.get("dino_local_loss_weight", 1.0)
        for name, student in self.students.items():
            terms = self.student_loss(student, global_crops, local_crops, n_local, targets, local_weight)
            total = total + terms["loss"]
            out.update({f"{name}.{k}": v.detach() for k, v in terms.items()})
        out["loss"] = total
        return out

    # -- hooks for the engine --------------------------------------------------------------------------------------

    def optim_param_groups(
        self, *, layerwise_decay: float, patch_embed_lr_mult: float, dino_head_wd_multiplier: float = 1.0
    ) -> list[dict[str, Any]]:
        """The model core's groups of each student (layer-wise decay counted within each student's backbone)."""
        return [
            group
            for student in self.students.values()
            for group in model_param_groups(
                student,
                layerwise_decay=layerwise_decay,
                patch_embed_lr_mult=patch_embed_lr_mult,
                dino_head_wd_multiplier=dino_head_wd_multiplier,
            )
        ]

    def clip_modules(self) -> Mapping[str, nn.Module]:
        """Each student's modules, clipped each on its own (`<student>.backbone`, `<student>.dino_head`, ...)."""
        return {f"{name}.{part}": module for name, student in self.students.items() for part, module in student.items()}

    def ema_pairs(self) -> Sequence[tuple[nn.Module, nn.Module]]:
        return [(self.students[name], self.students_ema[name]) for name in self.students]

    def checkpointed_blocks(self) -> Sequence[nn.Module]:
        return [blk for s in self.students.values() for blk in s.backbone.blocks]

    def multicrop_backbones(self) -> Sequence[nn.Module]:
        return [s.backbone for s in self.students.values()]

    def compiled_blocks(self) -> Sequence[nn.Module]:
        return [*self.checkpointed_blocks(), *self.teacher.backbone.blocks]

    def monitored_backbone(self) -> nn.Module:
        return next(iter(self.students_ema.values())).backbone

    def monitored_backbones(self) -> Mapping[str, nn.Module]:
        return {name: ema.backbone for name, ema in self.students_ema.items()}

    # -- weights out -----------------------------------------------------------------------------------------------

    def export(self, state: Mapping[str, Tensor], out_dir: Path, *, iterations: int) -> list[Path]:
        """One export per student, `<out>/<preset>/`, from its spare EMA (role `student`, with the teacher's
        provenance)."""
        written: list[Path] = []
        for name, model in self.student_models.items():
            prefix = f"students_ema.{name}."
            written += exports.write_export(
                out_dir / name,
                model=model,
                backbone_state=prefixed(state, f"{prefix}backbone."),
                heads={head: prefixed(state, f"{prefix}{head}.") for head in heads_of(self.students_ema[name])},
                role="student",
                iterations=iterations,
                provenance={"teacher": self.teacher_info},
                **self.export_heads_fields(state),
            )
        return written
