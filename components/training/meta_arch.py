"""The DINOv2 self-supervised meta-architecture: a student, its EMA teacher, DINO + iBOT + KoLeo (Oquab et al. 2023).

One step, as in the release's `SSLMetaArch.forward_backward`:

1. The teacher (EMA of the student, eval mode, no stochastic depth) sees the 2 global crops. Its CLS tokens go
   through the DINO head, its patch tokens at the positions masked for the student through the iBOT head (the same
   head when `ibot.separate_head` is false: one head call on both). Targets are sharpened at the scheduled teacher
   temperature and centred: Sinkhorn-Knopp (3 iterations, sums over all ranks) or softmax after subtracting the EMA
   centre of the teacher's logits (`teacher_targets`, shared with distillation).
2. The student sees the 2 global crops, with the iBOT mask token at the masked patches, and the N local crops.
3. Losses: DINO cross-entropy of every student crop against every teacher global crop but itself (the local crops'
   pairs weighted by the scheduled `dino_local_loss_weight`, DINOv3's, 1 in DINOv2); iBOT cross-entropy on the
   masked patches (each image's patches weighted by 1 / its masked count, averaged over the global crops); KoLeo on
   the student's global CLS features, per rank or over groups of images across ranks (`dino.koleo_distributed`),
   summed over the 2 global crops. Each is weighted by params.yaml (`dino.loss_weight`, `ibot.loss_weight`,
   `dino.koleo_loss_weight`).
4. Gram anchoring (DINOv3), in a phase whose plan has it: the Gram teacher (a frozen copy of the backbone) sees the
   Gram crops of the global crops; the Gram loss between its patch features and the student's joins the total with
   this step's `gram_loss_weight` (`components.training.gram`). The engine refreshes it from the EMA teacher at the
   plan's steps (`snapshot_pairs`).

The same module fits heads on a frozen backbone (the `head_fit` phase of a teacher without heads): the plan freezes
both backbones, and the EMA pairs are then the heads alone. The EMA itself, devices, precision and distribution
belong to the engine; this module only says which modules form the EMA pairs (`ema_pairs`). Stochastic depth is the
backbone's own (efficient above a rate of 0.1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from components import exports
from components.config import DinoConfig, IbotConfig
from components.model import (
    DINOHead,
    DINOLoss,
    backbone_from_config,
    iBOTPatchLoss,
    koleo_loss,
    koleo_loss_distributed,
    param_groups,
)
from components.model.adapter import HeadsState, load_official_heads, load_official_weights, normalize_heads_state
from components.training.gram import gram_term
from components.training.module import LossOutput, TrainModule
from components.training.plan import PhasePlan

HEAD_NAMES = ("dino_head", "ibot_head")


def build_network(model: Any, dino: DinoConfig, ibot: IbotConfig) -> nn.ModuleDict:
    """A backbone of the `model` section's preset with its DINO head, and its iBOT head when it is separate."""
    backbone = backbone_from_config(model)
    parts: dict[str, nn.Module] = {"backbone": backbone}
    for name, section in (("dino_head", dino), ("ibot_head", ibot)):
        if name == "dino_head" or ibot.separate_head:
            parts[name] = DINOHead(
                backbone.embed_dim,
                section.head_n_prototypes,
                nlayers=section.head_nlayers,
                hidden_dim=section.head_hidden_dim,
                bottleneck_dim=section.head_bottleneck_dim,
            )
    return nn.ModuleDict(parts)


def heads_of(network: nn.ModuleDict) -> dict[str, nn.Module]:
    """`dino_head` (and `ibot_head` when separate) of a network, by their release names."""
    return {name: network[name] for name in HEAD_NAMES if name in network}


def build_losses(plan: PhasePlan) -> tuple[DINOLoss, iBOTPatchLoss]:
    """The DINO and iBOT losses of a plan (the iBOT loss predicts the DINO head's prototypes when tied)."""
    dino, ibot, momentum = plan.dino, plan.ibot, plan.teacher.center_momentum
    ibot_out = ibot.head_n_prototypes if ibot.separate_head else dino.head_n_prototypes
    return DINOLoss(dino.head_n_prototypes, center_momentum=momentum), iBOTPatchLoss(ibot_out, center_momentum=momentum)


def load_centers(found: HeadsState, dino_loss: DINOLoss, ibot_loss: iBOTPatchLoss) -> None:
    """The softmax centres a checkpoint holds (unused by Sinkhorn-Knopp), when their shapes fit."""
    for loss, key in ((dino_loss, "dino"), (ibot_loss, "ibot")):
        center = found.centers.get(key)
        if center is not None and center.shape == loss.center.shape:
            loss.center.copy_(center)


@torch.no_grad()
def teacher_targets(
    teacher: nn.ModuleDict,
    global_crops: Tensor,
    patch_rows: Tensor | None,
    losses: tuple[DINOLoss, iBOTPatchLoss],
    *,
    centering: str,
    temp: float,
) -> tuple[Tensor, Tensor]:
    """Centred, sharpened teacher targets of the global crops, for pretraining and distillation alike.

    Args:
        teacher: backbone and heads (eval mode).
        global_crops: (G B, 3, H, W), crop-major.
        patch_rows: indices into the (G B N) flattened patch tokens of the iBOT targets (the masked patches), or
            None for every patch (distillation).
        losses: the DINO and iBOT losses (their EMA centres are updated on the softmax path).
        centering: `sinkhorn_knopp` or `softmax` (`teacher.centering`).
        temp: the teacher temperature of this step.

    Returns:
        DINO targets (G B, K) of the CLS tokens and iBOT targets (M, K) of the selected patches, float32.
    """
    out = teacher.backbone(global_crops, is_training=True)
    cls = out["x_norm_clstoken"]  # (G B, D)
    patches = out["x_norm_patchtokens"].flatten(0, 1)  # (G B N, D)
    if patch_rows is not None:
        patches = patches.index_select(0, patch_rows)  # (M, D)
    if "ibot_head" in teacher:
        cls_logits, patch_logits = teacher.dino_head(cls), teacher.ibot_head(patches)
    else:  # one head call for both: the release's "tied" path
        cls_logits, patch_logits = teacher.dino_head(torch.cat((cls, patches))).split([len(cls), len(patches)])
    dino_loss, ibot_loss = losses
    if centering == "sinkhorn_knopp":
        dino_t = dino_loss.sinkhorn_knopp_teacher(cls_logits, temp)  # (G B, K)
        ibot_t = ibot_loss.sinkhorn_knopp_teacher(patch_logits, temp)  # (M, K), M counted over all ranks
    else:
        dino_t = dino_loss.softmax_center_teacher(cls_logits, temp)
        ibot_t = ibot_loss.softmax_center_teacher(patch_logits, temp)
        dino_loss.update_center(cls_logits)
        ibot_loss.update_center(patch_logits)
    return dino_t, ibot_t


def load_network_weights(network: nn.ModuleDict, source: str, *, heads: bool) -> HeadsState | None:
    """Loads a network's backbone (and its heads when `heads` and the source has them) from an export folder or a
    weight file (a released backbone, or a training checkpoint of the release or ours), strictly.

    Returns:
        What the heads' source held (its centres too), or None when no heads were loaded.
    """
    if exports.is_export(source):
        export = exports.read_export(source)
        state, heads_state = exports.read_weights(export.weights)[0], None
        if export.heads is not None:
            heads_state = exports.read_weights(export.heads)[0]
    else:
        state = heads_state = exports.read_weights(source)[0]
    load_official_weights(network.backbone, state)
    if heads and heads_state is not None and normalize_heads_state(heads_state).heads:
        return load_official_heads(heads_of(network), heads_state)
    return None


class SelfDistillation(TrainModule):
    """What pretraining and distillation share: a plan, the DINO and iBOT losses with their centring, and the weighted
    total of DINO + iBOT + KoLeo (`dino.loss_weight`, `ibot.loss_weight`, `dino.koleo_loss_weight`)."""

    def __init__(self, plan: PhasePlan) -> None:
        super().__init__()
        self.plan = plan
        self.dino_loss, self.ibot_loss = build_losses(plan)

    def targets(self, teacher: nn.ModuleDict, global_crops: Tensor, patch_rows: Tensor | None, temp: float):
        """`teacher_targets` with this module's losses and centring."""
        losses, centering = (self.dino_loss, self.ibot_loss), self.plan.teacher.centering
        return teacher_targets(teacher, global_crops, patch_rows, losses, centering=centering, temp=temp)

    def koleo(self, features: Tensor) -> Tensor:
        """KoLeo of one crop's CLS features (B, D): within the rank's batch, or over groups across ranks as DINOv3's
        distributed KoLeo (`dino.koleo_distributed`, `koleo_group_size`, `koleo_topk`)."""
        d = self.plan.dino
        if d.koleo_distributed:
            return koleo_loss_distributed(features, topk=d.koleo_topk, group_size=d.koleo_group_size)
        return koleo_loss(features)

    def weighted(self, dino: Tensor, ibot: Tensor, global_cls: Tensor, n_global: int) -> LossOutput:
        """The weighted total and its terms; KoLeo on each global crop's CLS features, summed over the crops."""
        d = self.plan.dino
        koleo = sum(self.koleo(c) for c in global_cls.chunk(n_global))
        loss = d.loss_weight * dino + self.plan.ibot.loss_weight * ibot + d.koleo_loss_weight * koleo
        return {"loss": loss, "dino_loss": dino.detach(), "ibot_loss": ibot.detach(), "koleo_loss": koleo.detach()}

    def sync_state(self) -> None:
        self.dino_loss.apply_center_update()
        self.ibot_loss.apply_center_update()

    def export_heads_fields(self, state: Mapping[str, Tensor]) -> dict[str, Any]:
        """What every export of this module writes beside its heads: the losses' centres from the consolidated `state`
        and the `dino` / `ibot` sections the heads were built from (`exports.write_export`'s keywords)."""
        return {
            "centers": {"dino": state.get("dino_loss.center"), "ibot": state.get("ibot_loss.center")},
            "heads_config": {
                "dino": self.plan.dino.model_dump(mode="json"),
                "ibot": self.plan.ibot.model_dump(mode="json"),
            },
        }


class SSLMetaArch(SelfDistillation):
    """Student and EMA teacher (same preset), DINO head, tied or separate iBOT head, and the three losses.

    Args:
        plan: the phase's plan (`pretrain`, `highres` or `head_fit`): networks, losses, what stays frozen.
    """

    def __init__(self, plan: PhasePlan) -> None:
        super().__init__(plan)
        dino, ibot = plan.dino, plan.ibot
        self.student = build_network(plan.model, dino, ibot)
        frozen_model = plan.model.model_copy(update={"drop_path_rate": 0.0})  # the copies that never train
        self.teacher = build_network(frozen_model, dino, ibot)
        self.teacher.load_state_dict(self.student.state_dict())  # the teacher starts as a copy of the student
        self.teacher.requires_grad_(False)
        if plan.gram is not None:  # a frozen copy of the backbone, named as the release names it
            self.gram_teacher = nn.ModuleDict({"backbone": backbone_from_config(frozen_model)})
            self.gram_teacher.backbone.load_state_dict(self.teacher.backbone.state_dict())
            self.gram_teacher.requires_grad_(False)
        for name, p in self.named_parameters():
            if name.startswith(plan.frozen):
                p.requires_grad_(False)  # `param_groups` leaves frozen parameters out

    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()  # the teacher never trains: no stochastic depth, whatever the mode
        if self.plan.gram is not None:
            self.gram_teacher.eval()
        return self

    # -- the step --------------------------------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, Any], values: Mapping[str, float]) -> LossOutput:
        """The weighted DINO + iBOT + KoLeo (+ Gram) loss of one collated multi-crop batch (see the module
        docstring)."""
        global_crops = batch["collated_global_crops"]  # (G B, 3, H, W), crop-major
        local_crops = batch["collated_local_crops"]  # (L B, 3, h, w)
        masks = batch["collated_masks"]  # (G B, N) bool
        mask_indices = batch["mask_indices_list"]  # (M,) flat indices into masks
        n_global, n_local = int(batch["n_global_crops"]), int(batch["n_local_crops"])
        B = global_crops.shape[0] // n_global
        temp = float(values["teacher_temp"])
        dino_t, ibot_t = self.targets(self.teacher, global_crops, mask_indices, temp)

        if n_local:
            g_out, l_out = self.student.backbone([global_crops, local_crops], masks=[masks, None], is_training=True)
            l_cls = l_out["x_norm_clstoken"]  # (L B, D)
        else:
            g_out = self.student.backbone(global_crops, masks=masks, is_training=True)
            l_cls = global_crops.new_zeros(0, g_out["x_norm_clstoken"].shape[-1])
        g_cls = g_out["x_norm_clstoken"]  # (G B, D)
        g_masked = g_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)  # (M, D)
        if "ibot_head" in self.student:
            g_logits, l_logits = self.student.dino_head(torch.cat((g_cls, l_cls))).split([len(g_cls), len(l_cls)])
            patch_logits = self.student.ibot_head(g_masked)
        else:
            sizes = [len(g_cls), len(l_cls), len(g_masked)]
            g_logits, l_logits, patch_logits = self.student.dino_head(torch.cat((g_cls, l_cls, g_masked))).split(sizes)

        K = g_logits.shape[-1]
        local = l_logits.view(n_local, B, K) if n_local else None
        w = values.get("dino_local_loss_weight", 1.0)
        dino = self.dino_loss(g_logits.view(n_global, B, K), local, dino_t.view(n_global, B, K), local_weight=w)
        ibot = self.ibot_loss.forward_masked(patch_logits, ibot_t, batch["masks_weight"], n_images=n_global * B)
        out = self.weighted(dino, ibot, g_cls, n_global)
        if self.plan.gram is not None:
            p = self.student.backbone.patch_size
            grid = (global_crops.shape[-2] // p, global_crops.shape[-1] // p)
            gram_crops = batch["collated_gram_teacher_crops"]  # (G B, 3, H_T, W_T)
            g_patches = g_out["x_norm_patchtokens"]  # (G B, N, D), the masked crops' as the release compares
            gram = gram_term(self.plan.gram, self.gram_teacher.backbone, gram_crops, g_patches, masks, grid)
            out |= {"loss": out["loss"] + values["gram_loss_weight"] * gram, "gram_loss": gram.detach()}
        return out

    # -- hooks for the engine --------------------------------------------------------------------------------------

    def optim_param_groups(
        self, *, layerwise_decay: float, patch_embed_lr_mult: float, dino_head_wd_multiplier: float = 1.0
    ) -> list[dict[str, Any]]:
        return param_groups(
            self.student,
            layerwise_decay=layerwise_decay,
            patch_embed_lr_mult=patch_embed_lr_mult,
            dino_head_wd_multiplier=dino_head_wd_multiplier,
        )

    def clip_modules(self) -> Mapping[str, nn.Module]:
        return dict(self.student.items())  # backbone, dino_head, ibot_head: clipped each on its own

    def ema_pairs(self) -> Sequence[tuple[nn.Module, nn.Module]]:
        if "student.backbone." in self.plan.frozen:  # a head fit: the EMA of two equal frozen backbones is a no-op
            return list(zip(heads_of(self.student).values(), heads_of(self.teacher).values(), strict=True))
        return ((self.student, self.teacher),)  # frozen blocks stay equal: lerp(x, x) is x exactly

    def snapshot_pairs(self) -> Sequence[tuple[nn.Module, nn.Module]]:
        if self.plan.gram is None or not self.plan.gram.refresh_period:
            return ()
        return ((self.teacher.backbone, self.gram_teacher.backbone),)  # the Gram teacher <- the EMA teacher

    def checkpointed_blocks(self) -> Sequence[nn.Module]:
        if any(p.requires_grad for p in self.student.backbone.parameters()):
            return list(self.student.backbone.blocks)
        return ()  # no gradient flows through frozen blocks: nothing to recompute

    def multicrop_backbones(self) -> Sequence[nn.Module]:
        return [self.student.backbone]

    def compiled_blocks(self) -> Sequence[nn.Module]:
        gram = [*self.gram_teacher.backbone.blocks] if self.plan.gram is not None else []
        return [*self.student.backbone.blocks, *self.teacher.backbone.blocks, *gram]

    def monitored_backbone(self) -> nn.Module:
        return self.teacher.backbone

    # -- weights in and out ----------------------------------------------------------------------------------------

    def initial_state(self, source: str | None) -> dict[str, Tensor]:
        """The student and teacher at the start of the phase: the seeded initialisation, or `source` (an export
        folder, or a weight file: a released backbone, whose heads stay fresh, or a training checkpoint, whose
        teacher heads are used); the teacher starts as the student. The Gram teacher starts as the teacher, or from
        the plan's Gram teacher weights."""
        if source is not None:
            found = load_network_weights(self.student, source, heads=True)
            if found is not None:
                load_centers(found, self.dino_loss, self.ibot_loss)
            self.teacher.load_state_dict(self.student.state_dict())
        gram = self.plan.gram
        if gram is not None and gram.teacher_weights is not None:
            load_network_weights(self.gram_teacher, gram.teacher_weights.source, heads=False)
        elif gram is not None:
            if source is None:  # the config's checks make this unreachable from params.yaml
                raise ValueError(f"phase {self.plan.phase}: a Gram teacher needs starting weights or its own file")
            self.gram_teacher.backbone.load_state_dict(self.teacher.backbone.state_dict())
        return self.state_dict()

    def export(self, state: Mapping[str, Tensor], out_dir: Path, *, iterations: int) -> list[Path]:
        """The teacher (backbone and heads) as an export (`components.exports`)."""
        return exports.write_export(
            out_dir,
            model=self.plan.model,
            backbone_state=prefixed(state, "teacher.backbone."),
            heads={name: prefixed(state, f"teacher.{name}.") for name in heads_of(self.teacher)},
            role="teacher",
            iterations=iterations,
            **self.export_heads_fields(state),
        )


def prefixed(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of `state` under `prefix`, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
