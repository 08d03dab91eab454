"""The DINOv2 self-supervised meta-architecture: a student, its EMA teacher, DINO + iBOT + KoLeo (Oquab et al. 2023).

One step, as in the release's `SSLMetaArch.forward_backward`:

1. The teacher (EMA of the student, eval mode, no stochastic depth) sees the 2 global crops. Its CLS tokens go
   through the DINO head, its patch tokens at the positions masked for the student through the iBOT head (the same
   head when `ibot.separate_head` is false: one head call on both). Targets are sharpened at the scheduled teacher
   temperature and centred: Sinkhorn-Knopp (3 iterations, sums over all ranks) or softmax after subtracting the EMA
   centre of the teacher's logits.
2. The student sees the 2 global crops, with the iBOT mask token at the masked patches, and the N local crops.
3. Losses: DINO cross-entropy of every student crop against every teacher global crop but itself; iBOT
   cross-entropy on the masked patches (each image's patches weighted by 1 / its masked count, averaged over the
   global crops); KoLeo on the student's global CLS features, summed over the 2 global crops. Each is weighted by
   params.yaml (`dino.loss_weight`, `ibot.loss_weight`, `dino.koleo_loss_weight`).

The EMA itself, devices, precision and distribution belong to the engine; this module only says which modules
form the EMA pair (`ema_pairs`). Stochastic depth is the backbone's own (efficient above a rate of 0.1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from components import exports
from components.config import PipelineConfig
from components.model import (
    DINOHead,
    DINOLoss,
    backbone_from_config,
    iBOTPatchLoss,
    koleo_loss,
    load_official_weights,
    param_groups,
)
from components.model.adapter import load_official_heads, normalize_heads_state
from components.training.module import LossOutput, TrainModule


def _head(in_dim: int, section: Any) -> DINOHead:
    return DINOHead(
        in_dim,
        section.head_n_prototypes,
        nlayers=section.head_nlayers,
        hidden_dim=section.head_hidden_dim,
        bottleneck_dim=section.head_bottleneck_dim,
    )


def _gathered(features: Tensor) -> Tensor:
    """All ranks' rows, differentiable (the backward sums each rank's gradient back to its own rows)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(features.contiguous()))


class SSLMetaArch(TrainModule):
    """Student and EMA teacher (same preset), DINO head, tied or separate iBOT head, and the three losses.

    Args:
        cfg: the validated config; reads the `model`, `dino`, `ibot` and `teacher` sections.
    """

    def __init__(self, cfg: PipelineConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dino, ibot = cfg.dino, cfg.ibot
        self.separate_ibot_head = ibot.separate_head
        self.dino_weight, self.ibot_weight, self.koleo_weight = (
            dino.loss_weight,
            ibot.loss_weight,
            dino.koleo_loss_weight,
        )
        self.koleo_distributed = dino.koleo_distributed
        self.centering = cfg.teacher.centering
        self.student = self._network(cfg.model.drop_path_rate)
        self.teacher = self._network(0.0)
        self.teacher.load_state_dict(self.student.state_dict())  # the teacher starts as a copy of the student
        self.teacher.requires_grad_(False)
        ibot_out = ibot.head_n_prototypes if ibot.separate_head else dino.head_n_prototypes
        self.dino_loss = DINOLoss(dino.head_n_prototypes, center_momentum=cfg.teacher.center_momentum)
        self.ibot_loss = iBOTPatchLoss(ibot_out, center_momentum=cfg.teacher.center_momentum)
        if cfg.model.pretrained_weights:
            self.load_pretrained(cfg.model.pretrained_weights)

    def _network(self, drop_path_rate: float) -> nn.ModuleDict:
        backbone = backbone_from_config(self.cfg.model.model_copy(update={"drop_path_rate": drop_path_rate}))
        parts: dict[str, nn.Module] = {"backbone": backbone, "dino_head": _head(backbone.embed_dim, self.cfg.dino)}
        if self.separate_ibot_head:
            parts["ibot_head"] = _head(backbone.embed_dim, self.cfg.ibot)
        return nn.ModuleDict(parts)

    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()  # the teacher never trains: no stochastic depth, whatever the mode
        return self

    # -- the step --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_targets(
        self, global_crops: Tensor, mask_indices: Tensor, n_global: int, temp: float
    ) -> tuple[Tensor, Tensor]:
        """Centred, sharpened teacher targets: DINO (G, B, K) for the global crops, iBOT (M, K) for masked patches."""
        out = self.teacher.backbone(global_crops, is_training=True)
        cls = out["x_norm_clstoken"]  # (G B, D)
        masked = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)  # (M, D)
        if self.separate_ibot_head:
            cls_logits, patch_logits = self.teacher.dino_head(cls), self.teacher.ibot_head(masked)
        else:  # one head call for both: the release's "tied" path
            cls_logits, patch_logits = self.teacher.dino_head(torch.cat((cls, masked))).split([len(cls), len(masked)])
        if self.centering == "sinkhorn_knopp":
            dino_t = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, temp)  # (G B, K)
            ibot_t = self.ibot_loss.sinkhorn_knopp_teacher(patch_logits, temp)  # (M, K), M counted over all ranks
        else:
            dino_t = self.dino_loss.softmax_center_teacher(cls_logits, temp)
            ibot_t = self.ibot_loss.softmax_center_teacher(patch_logits, temp)
            self.dino_loss.update_center(cls_logits)
            self.ibot_loss.update_center(patch_logits)
        return dino_t.view(n_global, -1, dino_t.shape[-1]), ibot_t  # (G, B, K), (M, K)

    def forward(self, batch: Mapping[str, Any], values: Mapping[str, float]) -> LossOutput:
        """The weighted DINO + iBOT + KoLeo loss of one collated multi-crop batch (see the module docstring)."""
        global_crops = batch["collated_global_crops"]  # (G B, 3, H, W), crop-major
        local_crops = batch["collated_local_crops"]  # (L B, 3, h, w)
        masks = batch["collated_masks"]  # (G B, N) bool
        mask_indices = batch["mask_indices_list"]  # (M,) flat indices into masks
        n_global, n_local = int(batch["n_global_crops"]), int(batch["n_local_crops"])
        B = global_crops.shape[0] // n_global
        dino_t, ibot_t = self.teacher_targets(global_crops, mask_indices, n_global, float(values["teacher_temp"]))

        if n_local:
            g_out, l_out = self.student.backbone([global_crops, local_crops], masks=[masks, None], is_training=True)
            l_cls = l_out["x_norm_clstoken"]  # (L B, D)
        else:
            g_out = self.student.backbone(global_crops, masks=masks, is_training=True)
            l_cls = global_crops.new_zeros(0, g_out["x_norm_clstoken"].shape[-1])
        g_cls = g_out["x_norm_clstoken"]  # (G B, D)
        g_masked = g_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)  # (M, D)
        if self.separate_ibot_head:
            g_logits, l_logits = self.student.dino_head(torch.cat((g_cls, l_cls))).split([len(g_cls), len(l_cls)])
            patch_logits = self.student.ibot_head(g_masked)
        else:
            sizes = [len(g_cls), len(l_cls), len(g_masked)]
            g_logits, l_logits, patch_logits = self.student.dino_head(torch.cat((g_cls, l_cls, g_masked))).split(sizes)

        K = g_logits.shape[-1]
        dino = self.dino_loss(g_logits.view(n_global, B, K), l_logits.view(n_local, B, K) if n_local else None, dino_t)
        ibot = self.ibot_loss.forward_masked(patch_logits, ibot_t, batch["masks_weight"], n_images=n_global * B)
        koleo = sum(koleo_loss(_gathered(c) if self.koleo_distributed else c) for c in g_cls.chunk(n_global))
        loss = self.dino_weight * dino + self.ibot_weight * ibot + self.koleo_weight * koleo
        return {"loss": loss, "dino_loss": dino.detach(), "ibot_loss": ibot.detach(), "koleo_loss": koleo.detach()}

    # -- hooks for the engine --------------------------------------------------------------------------------------

    def optim_param_groups(self, *, layerwise_decay: float, patch_embed_lr_mult: float) -> list[dict[str, Any]]:
        return param_groups(self.student, layerwise_decay=layerwise_decay, patch_embed_lr_mult=patch_embed_lr_mult)

    def ema_pairs(self) -> Sequence[tuple[nn.Module, nn.Module]]:
        return ((self.student, self.teacher),)

    def checkpointed_blocks(self) -> Sequence[nn.Module]:
        return list(self.student.backbone.blocks)

    def compiled_blocks(self) -> Sequence[nn.Module]:
        return [*self.student.backbone.blocks, *self.teacher.backbone.blocks]

    def monitored_backbone(self) -> nn.Module:
        return self.teacher.backbone

    def sync_state(self) -> None:
        self.dino_loss.apply_center_update()
        self.ibot_loss.apply_center_update()

    # -- weights in and out ----------------------------------------------------------------------------------------

    def heads(self, network: nn.ModuleDict) -> dict[str, nn.Module]:
        """`dino_head` (and `ibot_head` when separate) of the student or the teacher, by their release names."""
        return {name: network[name] for name in ("dino_head", "ibot_head") if name in network}

    def load_pretrained(self, source: str) -> None:
        """`model.pretrained_weights`: an export folder (backbone, and heads when it has them), or a weight file in
        the official layout (`.pth` / `.safetensors`, local or s3://): a released backbone, whose heads start fresh,
        or a training checkpoint of the release, whose teacher heads are used. The teacher starts as the student."""
        if exports.is_export(source):
            export = exports.read_export(source)
            state, heads_state = exports.read_weights(export.weights)[0], None
            if export.heads is not None:
                heads_state = exports.read_weights(export.heads)[0]
        else:
            state = heads_state = exports.read_weights(source)[0]
        load_official_weights(self.student.backbone, state)
        if heads_state is not None and normalize_heads_state(heads_state).heads:
            found = load_official_heads(self.heads(self.student), heads_state)
            for loss, key in ((self.dino_loss, "dino"), (self.ibot_loss, "ibot")):
                center = found.centers.get(key)
                if center is not None and center.shape == loss.center.shape:
                    loss.center.copy_(center)  # the softmax centre (unused by Sinkhorn-Knopp)
        self.teacher.load_state_dict(self.student.state_dict())

    def export(self, state: Mapping[str, Tensor], out_dir: Path, *, iterations: int) -> list[Path]:
        """The teacher (backbone and heads) as an export (`components.exports`)."""
        return exports.write_export(
            out_dir,
            model=self.cfg.model,
            backbone_state=prefixed(state, "teacher.backbone."),
            heads={name: prefixed(state, f"teacher.{name}.") for name in self.heads(self.teacher)},
            centers={"dino": state.get("dino_loss.center"), "ibot": state.get("ibot_loss.center")},
            role="teacher",
            iterations=iterations,
            heads_config={"dino": self.cfg.dino.model_dump(mode="json"), "ibot": self.cfg.ibot.model_dump(mode="json")},
        )


def prefixed(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of `state` under `prefix`, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
