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

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from components import storage
from components.config import ModelConfig, PipelineConfig
from components.model import (
    DINOHead,
    DINOLoss,
    DinoVisionTransformer,
    backbone_from_config,
    iBOTPatchLoss,
    koleo_loss,
    load_official_weights,
    param_groups,
    save_official_weights,
)
from components.training.module import LossOutput, TrainModule

HEADS_FORMAT = 1


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


def export_digest(export_dir: str | Path) -> str:
    """sha256 of an export's backbone and heads files (those its model.json names), the export's identity."""
    export_dir = Path(export_dir)
    try:
        descriptor = json.loads((export_dir / "model.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{export_dir}: no model.json; not an export of the pretrain stage") from None
    digest = hashlib.sha256()
    for key in ("weights", "heads"):
        if descriptor.get(key):
            digest.update(storage.sha256_file(export_dir / descriptor[key]).encode())
    return digest.hexdigest()[:16]


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
        if cfg.model.pretrained_weights:
            self.load_pretrained(cfg.model.pretrained_weights)
        self.teacher.requires_grad_(False)
        ibot_out = ibot.head_n_prototypes if ibot.separate_head else dino.head_n_prototypes
        self.dino_loss = DINOLoss(dino.head_n_prototypes, center_momentum=cfg.teacher.center_momentum)
        self.ibot_loss = iBOTPatchLoss(ibot_out, center_momentum=cfg.teacher.center_momentum)

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

    def load_pretrained(self, source: str) -> None:
        """`model.pretrained_weights`: an export folder of this stage (backbone and heads, with its `model.json`), or
        an official-layout backbone file (`.pth` / `.safetensors`, local or s3://; the heads then start fresh)."""
        if Path(source, "model.json").is_file():
            self.load_pretrained_export(source)
            return
        with storage.local_copy(source) as path:
            load_official_weights(self.student.backbone, path)
        self.teacher.load_state_dict(self.student.state_dict())

    def load_pretrained_export(self, export_dir: str | Path) -> None:
        """Starts student and teacher from an export of this stage (teacher backbone + heads), e.g. for the
        high-resolution phase or to continue pretraining. Shapes must match; the error names the first that does not.
        """
        export_dir = Path(export_dir)
        descriptor = json.loads((export_dir / "model.json").read_text())
        load_official_weights(self.student.backbone, export_dir / descriptor["weights"])
        heads = torch.load(export_dir / descriptor["heads"], map_location="cpu", weights_only=True)
        self.student.dino_head.load_state_dict(heads["dino_head"])
        if self.separate_ibot_head:
            if heads.get("ibot_head") is None:
                raise ValueError(f"{export_dir}: exported with a tied iBOT head, but ibot.separate_head is true")
            self.student.ibot_head.load_state_dict(heads["ibot_head"])
        self.teacher.load_state_dict(self.student.state_dict())

    def export(self, state: Mapping[str, Tensor], out_dir: Path, *, iterations: int) -> list[Path]:
        """Writes the teacher backbone in the official layout (`backbone.pth`, `backbone.safetensors`), the teacher's
        heads (`heads.pth`) and the descriptor `model.json`, each file written aside and renamed."""
        backbone, written = export_backbone(self.cfg.model, state, "teacher.backbone.", out_dir)
        heads = {
            "format": HEADS_FORMAT,
            "dino_head": prefixed(state, "teacher.dino_head."),
            "ibot_head": prefixed(state, "teacher.ibot_head.") if self.separate_ibot_head else None,
            "separate_ibot_head": self.separate_ibot_head,
            "dino_center": state.get("dino_loss.center"),
            "ibot_center": state.get("ibot_loss.center"),
            "config": {"dino": self.cfg.dino.model_dump(mode="json"), "ibot": self.cfg.ibot.model_dump(mode="json")},
        }
        written.append(atomic_torch_save(heads, out_dir / "heads.pth"))
        descriptor = model_descriptor(self.cfg.model.arch, backbone, iterations=iterations)
        written.append(atomic_json(descriptor, out_dir / "model.json"))
        return written


# --------------------------------------------------------------------------------------------------------------------
# Export helpers (shared with distillation: one backbone per student, each with its heads and descriptor)
# --------------------------------------------------------------------------------------------------------------------


def export_backbone(
    model_cfg: ModelConfig, state: Mapping[str, Tensor], prefix: str, out_dir: Path
) -> tuple[DinoVisionTransformer, list[Path]]:
    """Writes `state[prefix...]` as `backbone.pth` and `backbone.safetensors` (official layout) in `out_dir`.

    The backbone is built on the meta device and takes the state's tensors (no initialisation is paid, even for
    ViT-g); it is returned for `model_descriptor`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        backbone = backbone_from_config(model_cfg.model_copy(update={"drop_path_rate": 0.0}))
    backbone.load_state_dict(prefixed(state, prefix), strict=True, assign=True)
    written = []
    for name in ("backbone.pth", "backbone.safetensors"):
        with storage.atomic_path(out_dir / name) as tmp:
            save_official_weights(backbone, tmp)
        written.append(out_dir / name)
    return backbone, written


def model_descriptor(arch: str, backbone: DinoVisionTransformer, *, iterations: int, role: str = "teacher") -> dict:
    """The `model.json` every consumer of an export reads (evaluation, distillation, the high-resolution phase)."""
    c = backbone.cfg
    return {
        "arch": arch,
        "patch_size": c.patch_size,
        "num_register_tokens": c.num_register_tokens,
        "ffn_layer": c.ffn_layer,
        "img_size": c.img_size,
        "interpolate_offset": c.interpolate_offset,
        "interpolate_antialias": c.interpolate_antialias,
        "weights": "backbone.pth",
        "heads": "heads.pth",
        "role": role,
        "iterations": int(iterations),
    }


def prefixed(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def atomic_torch_save(obj: Any, path: Path) -> Path:
    with storage.atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def atomic_json(obj: Any, path: Path) -> Path:
    with storage.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
    return path
