"""The pluggable piece of training: what is trained and what the loss is.

The engine, the loop and the checkpoints work on any `TrainModule`: pretraining's `SSLMetaArch` (a student and its
EMA teacher), or distillation's meta-architecture (a frozen teacher, several students and their EMA copies). A
`TrainModule` is a plain `nn.Module`: it never moves itself to a device, never calls DeepSpeed and never touches
`torch.distributed` except through the losses' own reductions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

LossOutput = dict[str, Tensor]
"""What `TrainModule.forward` returns: `loss`, the scalar to back-propagate (weighted and summed), and any number
of detached 0-d terms to log (`dino_loss`, `ibot_loss`, ...). A plain dict, so that ZeRO-3's module hooks see the
tensors inside it."""


class TrainModule(nn.Module):
    """Base class of what the engine trains. Subclasses implement `forward` and override the hooks they need.

    `forward(batch, values)` takes a collated batch (already on the device) and this step's schedule values
    (`teacher_temp`, ...) and returns a `LossOutput` dict. The engine calls it through DeepSpeed, so under ZeRO-3 every
    submodule's parameters are gathered for its own forward, frozen ones included.
    """

    def forward(self, batch: Mapping[str, Any], values: Mapping[str, float]) -> LossOutput:  # pragma: no cover
        raise NotImplementedError

    def optim_param_groups(
        self, *, layerwise_decay: float, patch_embed_lr_mult: float, dino_head_wd_multiplier: float = 1.0
    ) -> list[dict[str, Any]]:
        """Trainable parameter groups with `lr_multiplier`, `wd_multiplier` and `is_last_layer` (see
        `components.model.param_groups`). Parameters outside every group are never updated by the optimizer."""
        raise NotImplementedError

    def clip_modules(self) -> Mapping[str, nn.Module]:
        """The modules whose gradients are clipped each on its own to `optim.clip_grad`, by the name their norm is
        logged under (`grad_norm.<name>`): both releases clip each student module (backbone, DINO head, iBOT head)
        separately. Every trained parameter belongs to exactly one; modules without trained parameters are skipped."""
        raise NotImplementedError

    def ema_pairs(self) -> Sequence[tuple[nn.Module, nn.Module]]:
        """(source, target) modules of identical structure: after each applied optimizer step the engine sets
        target <- m target + (1 - m) source with this step's `momentum`. Default: none."""
        return ()

    def snapshot_pairs(self) -> Sequence[tuple[nn.Module, nn.Module]]:
        """(source, target) modules of identical structure: after the EMA of a step whose schedule values hold
        `snapshot` = 1, the engine copies target <- source (the Gram teacher refreshed from the EMA teacher). Default:
        none."""
        return ()

    def checkpointed_blocks(self) -> Sequence[nn.Module]:
        """Modules whose activations are recomputed in the backward pass when activation checkpointing is on."""
        return ()

    def multicrop_backbones(self) -> Sequence[nn.Module]:
        """Backbones that see several crop sizes per step (packed with `train.pack_crops`)."""
        return ()

    def compiled_blocks(self) -> Sequence[nn.Module]:
        """Modules compiled in place (`nn.Module.compile`) when `train.compile` is on."""
        return ()

    def monitored_backbone(self) -> nn.Module:
        """The backbone the periodic kNN evaluation watches (images -> CLS features)."""
        raise NotImplementedError

    def monitored_backbones(self) -> Mapping[str, nn.Module]:
        """Every backbone the periodic kNN evaluation watches, by metric prefix: `""` logs `knn_top1`, a name logs
        `<name>.knn_top1` (distillation watches each student). Default: `monitored_backbone()`, unprefixed."""
        return {"": self.monitored_backbone()}

    def initial_state(self, source: str | None) -> dict[str, Tensor]:
        """The module's state at the start of a phase: its seeded initialisation with the weights of `source` (an
        export folder or a weight file; None: none) loaded where they belong. The trainer hands this state, or a
        checkpoint's on resume, to the engine: weights enter a run one way."""
        raise NotImplementedError

    def sync_state(self) -> None:
        """Completes any deferred update of buffers (e.g. a pending centre reduction) before a checkpoint."""

    def export(self, state: Mapping[str, Tensor], out_dir: Path, *, iterations: int) -> list[Path]:
        """Writes the deliverable weights from a full CPU state dict of this module (rank 0 only)."""
        raise NotImplementedError
