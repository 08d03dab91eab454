"""The training engine: any `TrainModule` under DeepSpeed ZeRO. The only module of the project that imports DeepSpeed.

What it owns, so that models, losses and the loop do not:

- **Distribution.** `init_distributed` starts the process group (NCCL on GPUs, gloo on the CPU); a plain
  `python -m components pretrain` is a world of one. ZeRO stage 0-3 comes from `train.zero_stage` and the
  matching `infra/deepspeed/zero<stage>.json` template, whose `"auto"` values are filled from params.yaml.
- **Precision.** Parameters, gradients and optimizer states stay float32; on GPUs the forward runs under bfloat16
  autocast (DeepSpeed's `torch_autocast`, which also reduces the linear layers' gradients in bfloat16). Keeping the
  weights in float32 is what makes the teacher EMA exact: an update of (1 - 0.9995) x (student - teacher) would
  vanish in bfloat16 weights.
- **The EMA under every stage.** The teacher lives inside the same DeepSpeed module as the student, so ZeRO-3
  partitions it exactly like the student (same shapes, same ranks); the EMA runs on each rank's local shards
  (`ds_tensor`), with no communication. Under stages 0-2 every rank holds full, identical copies and updates them
  in place.
- **The step.** Per-step lr / weight decay / last-layer lr on the param groups (layer-wise decay, patch-embedding
  multiplier, DINO-head weight-decay multiplier and last-layer freeze are group multipliers), gradient
  accumulation, optional activation checkpointing and `torch.compile`.
- **Clipping per module, as both releases clip.** Each module the `TrainModule` names (`clip_modules`: a student's
  backbone, DINO head and iBOT head) is clipped to `optim.clip_grad` on its own, with torch's `clip_grad_norm_`
  formula; each module's norm is logged (`grad_norm.<module>`) beside the total (`grad_norm`). Stage 0 clips the
  full gradients on the device; ZeRO 1-3 clip each rank's gradient partition (DeepSpeed's local fragments), each
  module's squared norm summed over ranks first, and DeepSpeed's own global clipping stays off.
- **The numerical guard.** A non-finite loss on any rank is all-reduced before the backward pass and poisons every
  rank's gradients; a non-finite gradient norm (over all ranks) then skips the optimizer step everywhere: stage 0
  hands the flag to the fused AdamW (`found_inf`: weights, moments and step count untouched, decided on the
  device, without a host synchronisation), ZeRO 1-3 skip in DeepSpeed's own overflow check (a module with a
  non-finite norm gets NaN gradients, so the check sees it; verified after each step). The student is unchanged by
  a skipped step, so the EMA that follows keeps the teacher finite too.
- **Rank-independent state.** `full_model_state` / `full_optimizer_state` gather the training state into plain,
  per-parameter tensors on rank 0 (the same layout whatever the stage and world size); `TrainEngine(...,
  initial_state=...)` loads such a state on any number of ranks and any stage.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from components.config import TrainConfig
from components.log import get_logger
from components.runtime import resolve_device, several_ranks
from components.training.module import LossOutput, TrainModule

log = get_logger(__name__)

DEEPSPEED_CONFIG_ENV = "DINOV2_DEEPSPEED_CONFIGS"
"""Environment variable naming a folder of `zero<stage>.json` templates (default: `infra/deepspeed`)."""


def deepspeed_config_dir() -> Path | None:
    """The templates folder: `$DINOV2_DEEPSPEED_CONFIGS`, else `infra/deepspeed` of the working directory (where
    DVC runs stages) or of the checkout holding this package; None when there is none (an installed package)."""
    candidates = [
        os.environ.get(DEEPSPEED_CONFIG_ENV),
        "infra/deepspeed",
        Path(__file__).parents[2] / "infra/deepspeed",
    ]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


# --------------------------------------------------------------------------------------------------------------------
# Settings (pure)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSettings:
    """Everything the engine needs, resolved from a phase's plan and the run mechanics (see `from_plan`)."""

    zero_stage: int
    device: str
    """`cpu` or `cuda`."""
    precision: str
    """`bf16` (autocast, float32 weights) or `fp32`."""
    micro_batch_size: int
    grad_accum_steps: int
    clip_grad: float
    betas: tuple[float, float]
    layerwise_decay: float
    patch_embed_lr_mult: float
    dino_head_wd_multiplier: float = 1.0
    activation_checkpointing: bool = False
    compile: bool = False
    pack_crops: bool = False
    config_dir: Path | None = None
    """Folder of the `zero<stage>.json` templates; None: `deepspeed_config_dir()`."""

    @classmethod
    def from_plan(cls, plan: Any, train: TrainConfig, **overrides: Any) -> EngineSettings:
        """A phase's settings: its batch split and optimizer (`plan`), the run mechanics (`train`)."""
        device = resolve_device(train.device, key="train.device")
        values = {
            "zero_stage": train.zero_stage,
            "device": device,
            "precision": resolve_precision(train.precision, device),
            "micro_batch_size": plan.batch.per_rank,
            "grad_accum_steps": plan.batch.grad_accum_steps,
            "clip_grad": plan.optim.clip_grad,
            "betas": tuple(plan.optim.betas),
            "layerwise_decay": plan.optim.layerwise_decay,
            "patch_embed_lr_mult": plan.optim.patch_embed_lr_mult,
            "dino_head_wd_multiplier": plan.optim.dino_head_wd_multiplier,
            "activation_checkpointing": train.activation_checkpointing,
            "compile": train.compile,
            "pack_crops": train.pack_crops,
        }
        return cls(**{**values, **overrides})


def resolve_precision(precision: str, device: str) -> str:
    """`auto` -> bf16 on GPUs, fp32 on the CPU (CPU bf16 autocast is slower than fp32 on most CPUs)."""
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return precision


_BUILT_IN_TEMPLATE: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 10**9,
    "wall_clock_breakdown": False,
}


def deepspeed_config(settings: EngineSettings, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: `infra/deepspeed/zero<stage>.json` with its `"auto"` values filled in.

    Raises:
        ValueError: the template's ZeRO stage is not the requested one, it sets its own `gradient_clipping`, or a
            value is left `"auto"`.
    """
    folder = settings.config_dir or deepspeed_config_dir()
    path = (folder or Path("<built-in>")) / f"zero{settings.zero_stage}.json"
    if path.is_file():
        template = json.loads(path.read_text())
    else:  # the templates only tune performance (buckets, overlap); the math does not depend on them
        log.warning("%s not found: DeepSpeed's defaults for ZeRO stage %d", path, settings.zero_stage)
        template = {**_BUILT_IN_TEMPLATE, "zero_optimization": {"stage": settings.zero_stage}}
    filled = {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.grad_accum_steps,
        "train_batch_size": settings.micro_batch_size * settings.grad_accum_steps * world_size,
        # `TrainEngine` clips each module on its own under every stage; DeepSpeed's global clipping stays off.
        "gradient_clipping": 0.0,
    }
    config = {k: filled.get(k, v) if v == "auto" else v for k, v in template.items()}
    config["torch_autocast"] = {"enabled": settings.precision == "bf16", "dtype": "bfloat16"}
    if config.get("gradient_clipping", 0.0) not in (0, 0.0):
        raise ValueError(
            f'{path}: gradient_clipping = {config["gradient_clipping"]}: leave it "auto" (the engine clips each '
            "module to optim.clip_grad; DeepSpeed's global clipping would clip again)"
        )
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage != settings.zero_stage:
        raise ValueError(f"{path}: zero_optimization.stage = {stage}, expected {settings.zero_stage}")
    left = [k for k, v in config.items() if v == "auto"]
    if left:
        raise ValueError(f"{path}: no value for {left}")
    return config


# --------------------------------------------------------------------------------------------------------------------
# Distribution
# --------------------------------------------------------------------------------------------------------------------


def _deepspeed(device: str) -> Any:
    """Imports DeepSpeed for `device`, quietly.

    On the CPU, DeepSpeed would JIT-compile a shared-memory all-reduce kernel (about 2 minutes, a C++ compiler
    needed) that only its inference path uses; training all-reduces through gloo, so the kernel is marked
    unavailable. `DINOV2_DS_SHM_COMM=1` keeps DeepSpeed's default.
    """
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    if device == "cpu" and os.environ.get("DINOV2_DS_SHM_COMM") != "1":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ds_logger.setLevel(logging.WARNING)
    return deepspeed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str) -> tuple[int, int]:
    """Starts the process group once per process and returns (rank, world size).

    Under torchrun or the DeepSpeed launcher the environment names the rank and the rendezvous; a plain process
    becomes a world of one on a free local port.
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _deepspeed(device).init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean over ranks (in place), identity on one process."""
    if several_ranks():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def all_reduce_max(t: Tensor) -> Tensor:
    if several_ranks():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


# --------------------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StepOutput:
    """One optimizer step, as device tensors (reading them as Python values synchronises with the device, which the
    loop does on logging and checkpoint steps only): this rank's mean loss terms over the micro-batches, the total
    gradient norm before clipping (inf on a skipped step), whether the guard skipped the step, and each clipping
    module's gradient norm before clipping (over all ranks)."""

    terms: dict[str, Tensor]
    grad_norm_t: Tensor
    skipped_t: Tensor
    module_norms_t: dict[str, Tensor] = field(default_factory=dict)

    @property
    def grad_norm(self) -> float:
        return float(self.grad_norm_t)

    @property
    def skipped(self) -> bool:
        return bool(self.skipped_t)

    @property
    def module_norms(self) -> dict[str, float]:
        """Each module's gradient norm before clipping (one host synchronisation)."""
        if not self.module_norms_t:
            return {}
        values = torch.stack(list(self.module_norms_t.values())).float().cpu().tolist()
        return dict(zip(self.module_norms_t, values, strict=True))


def clip_sets(
    modules: Mapping[str, nn.Module], trained: Sequence[nn.Parameter], names: Sequence[str]
) -> dict[str, list[nn.Parameter]]:
    """The trained parameters of each clipping module, in `trained` order; modules without any are left out.

    Raises:
        ValueError: a trained parameter belongs to no clipping module, or to two.
    """
    owner: dict[int, str] = {}
    for module_name, module in modules.items():
        for p in module.parameters():
            if id(p) in owner:
                raise ValueError(f"a parameter belongs to clipping modules {owner[id(p)]!r} and {module_name!r}")
            owner[id(p)] = module_name
    sets: dict[str, list[nn.Parameter]] = {name: [] for name in modules}
    orphans = [name for name, p in zip(names, trained, strict=True) if id(p) not in owner]
    if orphans:
        raise ValueError(f"trained parameters in no clipping module (clip_modules): {orphans[:5]}")
    for p in trained:
        sets[owner[id(p)]].append(p)
    return {name: params for name, params in sets.items() if params}


def clip_factor(norm: Tensor, max_norm: float) -> Tensor:
    """torch's `clip_grad_norm_` factor, min(1, c / (norm + 1e-6)), on the device; NaN for a non-finite norm, so that
    the clipped gradients stay non-finite and every optimizer's overflow check sees them."""
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    return torch.where(torch.isfinite(norm), factor, torch.nan)


def _checkpoint_activations(block: nn.Module) -> None:
    """Recomputes `block`'s activations in the backward pass (state-dict keys unchanged; RNG replayed)."""
    forward = block.forward

    @functools.wraps(forward)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    block.forward = wrapped


class TrainEngine:
    """Wraps a `TrainModule` in a DeepSpeed engine and runs guarded optimizer steps.

    Args:
        module: what is trained (plain torch, on the CPU).
        settings: see `EngineSettings.from_plan`.
        initial_state: a state from `full_model_state` / `full_optimizer_state` (as saved by `checkpoint`), loaded
            on any number of ranks: `{"model": ..., "optimizer": ...}`; None starts fresh.
    """

    def __init__(
        self, module: TrainModule, settings: EngineSettings, *, initial_state: Mapping[str, Any] | None = None
    ) -> None:
        self.settings = settings
        self.rank, self.world_size = init_distributed(settings.device)
        deepspeed = _deepspeed(settings.device)
        if initial_state is not None:
            module.load_state_dict(initial_state["model"], strict=True)  # before ZeRO copies or partitions it
        if settings.activation_checkpointing:
            for block in module.checkpointed_blocks():
                _checkpoint_activations(block)
        if settings.compile:
            for block in module.compiled_blocks():
                block.compile()
        for backbone in module.multicrop_backbones():
            backbone.pack_crops = settings.pack_crops
        groups = module.optim_param_groups(
            layerwise_decay=settings.layerwise_decay,
            patch_embed_lr_mult=settings.patch_embed_lr_mult,
            dino_head_wd_multiplier=settings.dino_head_wd_multiplier,
        )
        self.group_meta = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
        torch_groups = [{"params": g["params"], "lr": 0.0, "weight_decay": 0.0} for g in groups]
        # Fused AdamW (one kernel per device and dtype, on GPUs and CPUs alike) reads a device flag to skip a step, so
        # the guard decides without a host synchronisation (`found_inf`, as torch's GradScaler uses it).
        optimizer = torch.optim.AdamW(torch_groups, lr=0.0, betas=settings.betas, fused=True)
        self._adamw = optimizer
        self.trained = [p for g in groups for p in g["params"]]
        names = {id(p): n for n, p in module.named_parameters()}
        self.trained_names = [names[id(p)] for p in self.trained]
        self.clip_sets = clip_sets(module.clip_modules(), self.trained, self.trained_names)
        module.to(settings.device)
        ds_config = deepspeed_config(settings, self.world_size)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        self.module: TrainModule = self.ds.module
        self.stage = settings.zero_stage
        self._ema = [(list(s.parameters()), list(t.parameters())) for s, t in self.module.ema_pairs()]
        self._snapshots = [(list(s.parameters()), list(t.parameters())) for s, t in self.module.snapshot_pairs()]
        self._check_ema_shards()
        self._loss_nonfinite = torch.zeros((), device=self.device)
        if initial_state is not None and initial_state.get("optimizer"):
            self.load_optimizer_state(initial_state["optimizer"])
        log.info(
            "engine: ZeRO %d, %s, %s, %d rank(s), micro-batch %d x %d accumulation, %d param groups",
            self.stage, settings.precision, settings.device, self.world_size, settings.micro_batch_size,
            settings.grad_accum_steps, len(groups),
        )  # fmt: skip

    # -- properties ------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return (
            torch.device(self.settings.device, torch.cuda.current_device())
            if self.settings.device == "cuda"
            else torch.device("cpu")
        )

    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step over all ranks."""
        return self.settings.micro_batch_size * self.settings.grad_accum_steps * self.world_size

    # -- the step --------------------------------------------------------------------------------------------------

    def to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def _forward_backward(self, batch: Mapping[str, Any], values: Mapping[str, float]) -> LossOutput:
        out: LossOutput = self.ds(self.to_device(batch), values)
        loss = out["loss"]
        # Every rank learns whether any rank's loss is non-finite before the backward pass; if so, all of them
        # back-propagate NaN, so the gradient check below sees it on every rank and the step is skipped everywhere.
        bad = all_reduce_max((~torch.isfinite(loss.detach())).float())
        self._loss_nonfinite = torch.maximum(self._loss_nonfinite, bad)
        self.ds.backward(loss * torch.where(bad > 0, torch.nan, 1.0))
        return {k: v.detach() for k, v in out.items()}

    def train_step(self, micro_batches: Sequence[Mapping[str, Any]], values: Mapping[str, float]) -> StepOutput:
        """One optimizer step over `grad_accum_steps` micro-batches, guarded; then the EMA with `values["momentum"]`.

        No host synchronisation on one rank with ZeRO 0: the clipping factor and the skip are decided on the device.

        Args:
            micro_batches: collated batches (on the CPU), one per accumulation step.
            values: this step's schedule values: lr, last_layer_lr, weight_decay, momentum, teacher_temp (and
                `snapshot`, 1 on the steps after which the module's snapshot pairs are copied).
        """
        if len(micro_batches) != self.settings.grad_accum_steps:
            raise ValueError(f"got {len(micro_batches)} micro-batches, expected {self.settings.grad_accum_steps}")
        self.apply_schedules(values)
        sums: dict[str, Tensor] = {}
        for i, batch in enumerate(micro_batches):
            out = self._forward_backward(batch, values)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.float()
            if i < len(micro_batches) - 1:
                self.ds.step()  # DeepSpeed counts micro-steps; it updates only at the accumulation boundary
        grad_norm, skipped, module_norms = self._guarded_step()
        self.ema_update(values["momentum"])  # a skipped step left the student as it was: the EMA stays finite
        if values.get("snapshot"):
            self.snapshot_update()
        terms = {k: v / len(micro_batches) for k, v in sums.items()}
        return StepOutput(terms=terms, grad_norm_t=grad_norm, skipped_t=skipped, module_norms_t=module_norms)

    def _guarded_step(self) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Clipping and the optimizer step, skipped on every rank when any rank's loss or a gradient norm is
        non-finite.

        Returns:
            The total gradient norm before clipping (inf on a skipped step), the skip flag and each module's norm
            before clipping, as device tensors.
        """
        loss_bad = self._loss_nonfinite.clone()
        self._loss_nonfinite.zero_()
        module_norms = self.clip_gradients()
        norms = list(module_norms.values())
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else loss_bad * 0  # the total, over all modules
        if self.stage == 0:
            # Gradients are full and already averaged over ranks; the flag is reduced anyway, for certainty.
            bad = torch.maximum(all_reduce_max((~torch.isfinite(norm)).float()), loss_bad)
            self._adamw.found_inf = bad  # the fused step leaves weights, moments and step count as they are
            try:
                self.ds.step()
            finally:
                self._adamw.found_inf = None
            skipped = bad > 0
            return torch.where(skipped, torch.inf, norm), skipped, module_norms
        self.ds.step()
        skipped = bool(getattr(self.ds.optimizer, "overflow", False))  # DeepSpeed's own check (it synchronises)
        if (bool(loss_bad) or not bool(torch.isfinite(norm))) and not skipped:  # an invariant of the guard
            raise RuntimeError("a non-finite loss or gradient norm reached a ZeRO step that DeepSpeed did not skip")
        return (torch.full_like(norm, torch.inf) if skipped else norm), torch.tensor(skipped), module_norms

    def clip_gradients(self) -> dict[str, Tensor]:
        """Clips each module's gradient to `clip_grad` on its own (after a step's last backward, before the
        optimizer step): g <- g min(1, c / (||g|| + 1e-6)), ||g|| over the module's parameters on all ranks.

        Stage 0 scales the full gradients on the device (no host synchronisation). ZeRO 1-3 scale each rank's
        partition of the averaged gradients: each module's squared norm is summed over the rank's fragments, then
        over ranks, so the factor is the one of the full gradient.

        Returns:
            Each module's gradient norm before clipping (0-d float32 device tensors), by module name.
        """
        clip = self.settings.clip_grad
        if self.stage == 0:
            norms: dict[str, Tensor] = {}
            for name, params in self.clip_sets.items():
                grads = [p.grad for p in params if p.grad is not None]
                norms[name] = (
                    torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
                    if grads
                    else torch.zeros((), device=self.device)
                )
                if clip and grads:
                    torch._foreach_mul_(grads, clip_factor(norms[name], clip))
            return norms
        fragments = {name: [self._local_grad(p) for p in params] for name, params in self.clip_sets.items()}
        squares = torch.zeros(len(fragments), device=self.device)
        for i, frags in enumerate(fragments.values()):
            present = [g for g in frags if g is not None and g.numel()]
            if present:
                squares[i] = torch.stack(torch._foreach_norm(present)).float().square().sum()
        if several_ranks():
            dist.all_reduce(squares)  # each module's squared norm over every rank's partition
        module_norms = squares.sqrt()  # (M,)
        if clip:
            factors = clip_factor(module_norms, clip)
            for i, (name, frags) in enumerate(fragments.items()):
                for p, g in zip(self.clip_sets[name], frags, strict=True):
                    if g is not None:
                        self._set_local_grad(p, g * factors[i].to(g.dtype))
        return dict(zip(fragments, module_norms.unbind(0), strict=True))

    def _local_grad(self, p: nn.Parameter) -> Tensor | None:
        """This rank's part of `p`'s reduced gradient under ZeRO 1-3 (None: no part of `p` on this rank)."""
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad

            return safe_get_local_grad(p)
        mapping = getattr(p, "_hp_mapping", None)  # ZeRO 1/2: the fragment of the flat partition this rank owns
        return None if mapping is None else mapping.get_lp_grad_fragment(p._index_in_param_group)

    def _set_local_grad(self, p: nn.Parameter, value: Tensor) -> None:
        if self.stage == 3:
            from deepspeed.utils import safe_set_local_grad

            safe_set_local_grad(p, value)
        else:
            self._local_grad(p).copy_(value)

    def apply_schedules(self, values: Mapping[str, float]) -> None:
        """Sets each group's lr and weight decay: base value x the group's multiplier (the last layer follows
        `last_layer_lr`, 0 while frozen, as the release freezes it)."""
        for group, (lr_mult, wd_mult, is_last) in zip(self.optimizer.param_groups, self.group_meta, strict=True):
            group["lr"] = (values["last_layer_lr"] if is_last else values["lr"]) * lr_mult
            group["weight_decay"] = values["weight_decay"] * wd_mult

    @torch.no_grad()
    def ema_update(self, momentum: float) -> None:
        """target <- target + (1 - m) (source - target) for every EMA pair (one `_foreach_lerp_` per pair); on local
        shards under ZeRO-3.

        ZeRO-3 keeps its persistent parameters (those under `stage3_param_persistence_threshold`: biases, norms,
        LayerScale gammas) gathered whole, refreshed from the shards only after each optimizer step, which comes
        before this update. Their whole copies get the same update as their shards (the same arithmetic, so the two
        stay bit-equal); otherwise the teacher's forward would read them one step late.
        """
        for src, tgt in self._ema:
            sources, targets = self._local_pairs(src, tgt)
            torch._foreach_lerp_(targets, sources, 1.0 - momentum)

    @torch.no_grad()
    def snapshot_update(self) -> None:
        """target <- source for every snapshot pair (`TrainModule.snapshot_pairs`), on local shards under ZeRO-3 as
        the EMA."""
        for src, tgt in self._snapshots:
            sources, targets = self._local_pairs(src, tgt)
            torch._foreach_copy_(targets, sources)

    def _local_pairs(self, src: list[Tensor], tgt: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The tensors this rank updates for a pair of parameter lists: the parameters, or under ZeRO-3 their local
        shards and the whole copies of persistent parameters (see `ema_update`)."""
        if self.stage == 3:
            pairs = [(s.ds_tensor, t.ds_tensor) for s, t in zip(src, tgt, strict=True)]
            pairs += [(s.data, t.data) for s, t in zip(src, tgt, strict=True) if getattr(t, "ds_persist", False)]
        else:
            pairs = list(zip(src, tgt, strict=True))
        return [s for s, _ in pairs], [t for _, t in pairs]

    def _check_ema_shards(self) -> None:
        for src, tgt in self._ema + self._snapshots:
            if len(src) != len(tgt):
                raise ValueError(f"EMA pair with {len(src)} source and {len(tgt)} target parameters")
            for s, t in zip(src, tgt, strict=True):
                a, b = (s.ds_tensor, t.ds_tensor) if self.stage == 3 else (s, t)
                if a.shape != b.shape:
                    raise ValueError(f"EMA pair shards differ: {tuple(a.shape)} vs {tuple(b.shape)}")

    def gathered(self, module: nn.Module) -> Any:
        """A context in which `module`'s parameters are whole on every rank (ZeRO-3 gathers them; collective)."""
        if self.stage != 3:
            import contextlib

            return contextlib.nullcontext()
        return _deepspeed(self.settings.device).zero.GatheredParameters(list(module.parameters()), modifier_rank=None)

    # -- rank-independent state ------------------------------------------------------------------------------------

    def full_model_state(self) -> dict[str, Tensor]:
        """The module's full state dict on the CPU, on rank 0 ({} elsewhere). Collective under ZeRO-3."""
        self.module.sync_state()
        if self.stage != 3:
            if self.rank:
                return {}
            return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        GatheredParameters = _deepspeed(self.settings.device).zero.GatheredParameters

        params = dict(self.module.named_parameters())
        out: dict[str, Tensor] = {}
        for key, value in self.module.state_dict(keep_vars=True).items():
            if key in params:
                with GatheredParameters([params[key]], modifier_rank=None):
                    if self.rank == 0:
                        out[key] = params[key].detach().to("cpu", copy=True)
            elif self.rank == 0:
                out[key] = value.detach().to("cpu", copy=True)
        return out

    def full_optimizer_state(self) -> dict[str, Any]:
        """AdamW's state per trained parameter name, full-size, on rank 0 ({} elsewhere). Collective under ZeRO."""
        exp_avg: dict[str, Tensor] = {}
        exp_avg_sq: dict[str, Tensor] = {}
        if self.stage == 0:
            steps = []
            for name, p in zip(self.trained_names, self.trained, strict=True):
                st = self.optimizer.state.get(p, {})
                if st:
                    exp_avg[name], exp_avg_sq[name] = st["exp_avg"].cpu().clone(), st["exp_avg_sq"].cpu().clone()
                    steps.append(float(st["step"]))
            step = max(steps, default=0.0)
        else:
            from deepspeed.utils import safe_get_full_optimizer_state

            self._prime_zero_optimizer_state()
            for name, p in zip(self.trained_names, self.trained, strict=True):
                avg, sq = safe_get_full_optimizer_state(p, "exp_avg"), safe_get_full_optimizer_state(p, "exp_avg_sq")
                if self.rank == 0:
                    exp_avg[name], exp_avg_sq[name] = avg.float().cpu().clone(), sq.float().cpu().clone()
            step = max((float(st["step"]) for st in self.optimizer.optimizer.state.values() if st), default=0.0)
        if self.rank:
            return {}
        return {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "betas": list(self.settings.betas)}

    def load_optimizer_state(self, state: Mapping[str, Any]) -> None:
        """Loads a `full_optimizer_state` (from any stage and world size); parameters it lacks start fresh."""
        unknown = set(state["exp_avg"]) - set(self.trained_names)
        if unknown:
            raise ValueError(f"optimizer state holds parameters this module does not train: {sorted(unknown)[:5]}")
        step = float(state["step"])
        if self.stage == 0:
            sd = self.optimizer.state_dict()
            for index, name in enumerate(self.trained_names):
                if name in state["exp_avg"]:
                    sd["state"][index] = {
                        "step": torch.tensor(step),
                        "exp_avg": state["exp_avg"][name].clone(),  # never alias (and later update) the caller's
                        "exp_avg_sq": state["exp_avg_sq"][name].clone(),
                    }
            self.optimizer.load_state_dict(sd)  # moves and casts to each parameter
            return
        from deepspeed.utils import safe_set_full_optimizer_state

        self._prime_zero_optimizer_state()
        for name, p in zip(self.trained_names, self.trained, strict=True):
            if name in state["exp_avg"]:
                safe_set_full_optimizer_state(p, state["exp_avg"][name].to(self.device), "exp_avg")
                safe_set_full_optimizer_state(p, state["exp_avg_sq"][name].to(self.device), "exp_avg_sq")
        for st in self.optimizer.optimizer.state.values():
            st["step"].fill_(step)

    def _prime_zero_optimizer_state(self) -> None:
        """Creates AdamW's (lazily built) state on ZeRO's flat partitions and links DeepSpeed's per-parameter views
        of it, as the first `step()` would, so that state can be read or written before any step."""
        inner = self.optimizer.optimizer
        # ZeRO-3 hands its flat fp32 partitions to the optimizer only inside step(); ZeRO 1/2 keep them in the groups.
        flats = getattr(self.optimizer, "fp32_partitioned_groups_flat", None)
        if flats is None:
            flats = [p for group in inner.param_groups for p in group["params"]]
        fused = bool(inner.defaults.get("fused"))
        for p in flats:
            if not inner.state.get(p):
                step = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
                inner.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO 1/2 link their fragments lazily; ZeRO-3 reads the state directly
            # DeepSpeed links every group after stepping the first one only, so the other groups' views stay empty
            # (it steps groups one at a time): link again now that every group has its state.
            self.optimizer._hp_optimizer_states_linked = False
            link()
