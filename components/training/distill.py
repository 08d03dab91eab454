"""Distillation of a frozen teacher into several students at once (Oquab et al. 2023, "Model distillation").

The paper distils its ViT-S/B/L from the frozen ViT-g with "the same training loop with a few exceptions: we use a
larger model as a frozen teacher, keep a spare EMA of the student that we use as our final model, remove the masking
and stochastic depth, and apply the iBOT loss on the two global crops". Here:

- `DistillMetaArch` is a `TrainModule`, so the pretraining engine (DeepSpeed ZeRO, guards, schedules), loop
  (metrics, progress, kNN monitoring), streaming loader and checkpoints run it unchanged. One step:

  1. The teacher (frozen: `requires_grad_(False)`, eval mode, never in an optimizer nor an EMA pair) sees the 2
     global crops ONCE. Its CLS tokens go through its DINO head and every patch token through its iBOT head (the
     DINO head when tied); targets are sharpened at the final teacher temperature and centred (Sinkhorn-Knopp or
     EMA centre), exactly as in pretraining. Every student reads the same targets: several students cost one
     teacher pass per batch.
  2. Each student sees the 2 global and the N local crops, without masks, without stochastic depth.
  3. Each student's loss is the pretraining one: DINO cross-entropy of each of its crops against the teacher's
     other global crops, iBOT cross-entropy on every patch of both global crops (no masking, so all of them), KoLeo
     on its global CLS features; weighted as in params.yaml. The step's loss is the sum over students (their
     parameters are disjoint, so each student's gradient is its own loss's). Terms are logged per student:
     `<student>.dino_loss`, `<student>.ibot_loss`, `<student>.koleo_loss`, `<student>.loss`.

  The engine keeps a spare EMA of each student (`ema_pairs`), exported as that student's final model.

- Teachers without heads (the official release has backbones only): `TeacherHeadFit` fits the teacher's DINO and
  iBOT heads on its frozen backbone with the pretraining losses, before distillation (`fit_teacher_heads`). It is
  `SSLMetaArch` with the backbone frozen and the EMA restricted to the heads: the heads learn self-distillation
  targets of the frozen features, which then serve as the distillation targets. docs/distillation.md shows it learns.

Derived configs (`distill_config`, `head_fit_config`) are pure functions of params.yaml, validated like it.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from components import exports, storage
from components.config import ConfigError, ModelConfig, PipelineConfig, validate_config
from components.log import get_logger
from components.model import DINOLoss, backbone_from_config, iBOTPatchLoss, koleo_loss, load_official_weights
from components.model import param_groups as model_param_groups
from components.model.adapter import CheckpointError, load_official_heads, normalize_heads_state
from components.training.meta_arch import SSLMetaArch, _gathered, _head, prefixed
from components.training.module import LossOutput, TrainModule

log = get_logger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# The teacher: where it comes from
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherSource:
    """A resolved teacher: its backbone geometry, local weight files and a digest of their bytes."""

    model: ModelConfig
    """Backbone geometry (arch, patch size, registers, ...); drop path 0."""
    weights: Path
    """Official-layout backbone file (local)."""
    heads: Path | None
    """`heads.pth` of a pretrain export, or None: the heads are fitted first (`fit_teacher_heads`)."""
    digest: str
    """sha256 of the backbone file (and of the heads file when there is one): the teacher's identity."""
    origin: str
    """What the user pointed at (export folder, file or s3:// URI), for provenance."""

    def describe(self) -> dict[str, Any]:
        """Provenance written into each student's model.json."""
        return {
            "arch": self.model.arch,
            "origin": self.origin,
            "sha256": self.digest,
            "heads": "exported" if self.heads is not None else "fitted",
        }


def resolve_teacher(cfg: PipelineConfig, teacher_dir: str, *, download_dir: Path) -> TeacherSource:
    """The teacher of the `distill` section: `distill.teacher_weights` when set, else the `--teacher` folder.

    An export folder gives the geometry, the backbone and, when it has them, the heads. A file is an
    official-layout backbone of preset `distill.teacher_arch` (default `model.arch`) with the `model` section's other
    geometry: a released backbone (no heads), or a training checkpoint of the release, whose teacher heads are used.
    An s3:// file is downloaded into `download_dir`.

    Raises:
        FileNotFoundError: the source does not exist.
    """
    d = cfg.distill
    source = d.teacher_weights or teacher_dir
    heads: Path | None
    if exports.is_export(source):
        export = exports.read_export(source)
        model = export.model_config(cfg.model)
        weights, heads = _local(export.weights, download_dir), _local(export.heads, download_dir)
    else:
        model = cfg.model.model_copy(update={"arch": d.teacher_arch or cfg.model.arch})
        weights = _local(source, download_dir)
        heads = weights if weights.is_file() and normalize_heads_state(exports.read_weights(weights)[0]).heads else None
    if weights is None or not weights.is_file():
        raise FileNotFoundError(f"teacher backbone {weights} not found (distill.teacher_weights or --teacher)")
    digest = hashlib.sha256()
    for f in (weights, heads):
        if f is not None:
            digest.update(storage.sha256_file(f).encode())
    model = model.model_copy(update={"drop_path_rate": 0.0, "pretrained_weights": None})
    return TeacherSource(model=model, weights=weights, heads=heads, digest=digest.hexdigest(), origin=str(source))


def _local(uri: str | None, download_dir: Path) -> Path | None:
    """A local path for `uri`: itself, or its download into `download_dir` (each object downloaded once)."""
    if uri is None or not storage.is_s3(uri):
        return None if uri is None else Path(uri)
    target = download_dir / storage.basename(uri)
    if not target.is_file():
        storage.download_file(uri, target)
    return target


def check_geometry(cfg: PipelineConfig, teacher: ModelConfig) -> None:
    """Students share the teacher's patch grid: iBOT compares their patch tokens position by position.

    Raises:
        ValueError: `model.patch_size` differs from the teacher's.
    """
    if cfg.model.patch_size != teacher.patch_size:
        raise ValueError(
            f"model.patch_size = {cfg.model.patch_size} (the students') differs from the teacher's patch size "
            f"{teacher.patch_size}: the iBOT loss compares patch tokens one to one"
        )


# --------------------------------------------------------------------------------------------------------------------
# Derived configs (pure)
# --------------------------------------------------------------------------------------------------------------------


def distill_config(cfg: PipelineConfig) -> PipelineConfig:
    """The config the distillation run trains with, derived from params.yaml.

    - length `distill.epochs` epochs of `optim.epoch_length`, students' lr `distill.base_lr` (batch-scaled); the
      other optimisation values (warm-up, weight decay, last-layer freeze, layer decay) as in pretraining;
    - gradient clipping at `optim.clip_grad` x sqrt(#students): the engine clips the joint norm of all students'
      gradients, which is sqrt(#students) x a single student's norm when their norms are alike;
    - the spare EMA's momentum from `distill.momentum_ema` (cosine to `teacher.final_momentum_teacher`);
    - the final teacher temperature from the first step (the teacher is trained: no warm-up);
    - no masking (`ibot.mask_sample_probability` 0) and no stochastic depth (`model.drop_path_rate` 0).

    Raises:
        ConfigError: optim's warm-up or last-layer freeze is longer than `distill.epochs`, or the EMA momentum
            starts above its final value (checked here: the other derived configs change `optim` freely).
    """
    d = cfg.distill
    problems = [
        f"optim.{key} = {getattr(cfg.optim, key)} exceeds distill.epochs = {d.epochs}"
        for key in ("warmup_epochs", "freeze_last_layer_epochs")
        if getattr(cfg.optim, key) > d.epochs
    ]
    if d.momentum_ema > cfg.teacher.final_momentum_teacher:
        problems.append(
            f"distill.momentum_ema = {d.momentum_ema} exceeds "
            f"teacher.final_momentum_teacher = {cfg.teacher.final_momentum_teacher}"
        )
    if problems:
        raise ConfigError("params: invalid configuration for distillation:\n  " + "\n  ".join(problems))
    raw = cfg.model_dump(mode="json")
    raw["optim"].update(epochs=d.epochs, base_lr=d.base_lr, clip_grad=cfg.optim.clip_grad * math.sqrt(len(d.students)))
    raw["teacher"].update(momentum_teacher=d.momentum_ema, warmup_teacher_temp_epochs=0)
    raw["ibot"].update(mask_sample_probability=0.0)
    raw["model"].update(drop_path_rate=0.0, pretrained_weights=None)
    return validate_config(raw, source="distill_config(params)")


def head_fit_config(cfg: PipelineConfig, teacher: ModelConfig) -> PipelineConfig:
    """The config of the head-fitting phase for a teacher without heads.

    The pretraining recipe on the teacher's geometry, compressed to `distill.head_fit_iterations` steps (schedules
    in iterations: an "epoch" of one step): lr warm-up over the first tenth to `distill.head_fit_base_lr`
    (batch-scaled), no last-layer freeze, the final teacher temperature from the first step (the features are
    trained), masking as in pretraining, no stochastic depth and no kNN monitoring (the backbone is frozen).
    """
    n = cfg.distill.head_fit_iterations
    raw = cfg.model_dump(mode="json")
    raw["model"] = teacher.model_copy(update={"drop_path_rate": 0.0, "pretrained_weights": None}).model_dump(
        mode="json"
    )
    raw["optim"].update(
        epochs=n, epoch_length=1, warmup_epochs=n // 10, base_lr=cfg.distill.head_fit_base_lr,
        freeze_last_layer_epochs=0,
    )  # fmt: skip
    raw["teacher"].update(warmup_teacher_temp_epochs=0)
    raw["train"].update(knn_eval_period=0)  # the backbone is frozen: its kNN accuracy cannot move
    return validate_config(raw, source="head_fit_config(params)")


# --------------------------------------------------------------------------------------------------------------------
# Teachers without heads: fit the heads on the frozen backbone
# --------------------------------------------------------------------------------------------------------------------


class TeacherHeadFit(SSLMetaArch):
    """`SSLMetaArch` on a frozen backbone: only the DINO / iBOT heads train, and only they form the EMA pair.

    Student and teacher hold the same frozen backbone weights (loaded by `load_pretrained`); the student heads see
    the masked global crops and the local crops, the EMA heads the global crops, with the pretraining losses. The
    export (teacher backbone, unchanged, and the EMA heads) is a teacher with heads.

    Args:
        cfg: `head_fit_config(...)`: the `model` section is the teacher's geometry.
    """

    def __init__(self, cfg: PipelineConfig) -> None:
        super().__init__(cfg)
        self.student.backbone.requires_grad_(False)  # `param_groups` leaves frozen parameters out

    def _heads(self, network: nn.ModuleDict) -> list[nn.Module]:
        return [network.dino_head, *([network.ibot_head] if self.separate_ibot_head else [])]

    def ema_pairs(self) -> Sequence[tuple[nn.Module, nn.Module]]:
        # Heads only: an EMA of two equal frozen backbones would drift by rounding (m x + (1 - m) x != x in floats).
        return list(zip(self._heads(self.student), self._heads(self.teacher), strict=True))

    def checkpointed_blocks(self) -> Sequence[nn.Module]:
        return ()  # no gradient flows through the frozen blocks: nothing to recompute


def fit_teacher_heads(
    cfg: PipelineConfig,
    teacher: TeacherSource,
    *,
    curated: str,
    workdir: Path,
    log_metrics: Callable[[dict[str, float], int], None],
) -> tuple[Path, list[dict[str, float]]]:
    """Fits DINO and iBOT heads on the frozen teacher backbone (resumable; a finished fit is only re-exported).

    Args:
        cfg: the params.yaml config (`head_fit_config` derives the phase's).
        teacher: a teacher without heads.
        curated: the curated manifest's folder.
        workdir: checkpoints go to `workdir`, the fitted teacher (backbone + heads + model.json) to
            `workdir/export`.
        log_metrics: step-metrics sink (called on every rank).

    Returns:
        The export folder and the phase's logged rows (dino_loss, ibot_loss, ... per logged step).
    """
    from components.training.run import run_training

    fit_cfg = head_fit_config(cfg, teacher.model)
    export = workdir / "export"
    log.info(
        "teacher %s has no heads: fitting DINO / iBOT heads on its frozen backbone for %d iterations",
        teacher.origin, fit_cfg.optim.epochs,
    )  # fmt: skip
    run = run_training(
        fit_cfg, build_module=lambda: TeacherHeadFit(fit_cfg), curated=curated, checkpoints=workdir, out=export,
        log_metrics=log_metrics, init_module=lambda m: m.load_pretrained(str(teacher.weights)),
        desc="distill: teacher heads",
    )  # fmt: skip
    history = run.result.history
    if history:
        first, last = history[0], history[-1]
        log.info(
            "teacher heads fitted: dino_loss %.4f -> %.4f, ibot_loss %.4f -> %.4f (steps %d -> %d)",
            first["dino_loss"], last["dino_loss"], first["ibot_loss"], last["ibot_loss"], first["step"], last["step"],
        )  # fmt: skip
    del run
    gc.collect()  # the phase's engine and module before the students' are built on the device
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0 writes the export: the other ranks read it after this
    return export, history


# --------------------------------------------------------------------------------------------------------------------
# The distillation meta-architecture
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Targets:
    """The teacher's targets for one batch, shared by every student."""

    dino: Tensor
    """(G, B, K) centred, sharpened distributions of the teacher's global CLS tokens."""
    ibot: Tensor
    """(G B, N, K) the same for every patch token of the global crops."""


class DistillMetaArch(TrainModule):
    """A frozen teacher and several students, each with its heads and a spare EMA copy (see the module docstring).

    Args:
        cfg: `distill_config(...)`: students from `distill.students` with the `model` section's geometry, heads and
            losses from the `dino` / `ibot` / `teacher` sections.
        teacher: the teacher's backbone geometry (`TeacherSource.model`); its weights come from `load_teacher`.
        teacher_info: provenance written into each student's model.json.
    """

    def __init__(self, cfg: PipelineConfig, teacher: ModelConfig, teacher_info: Mapping[str, Any] | None = None):
        super().__init__()
        check_geometry(cfg, teacher)
        self.cfg = cfg
        dino, ibot = cfg.dino, cfg.ibot
        self.separate_ibot_head = ibot.separate_head
        self.dino_weight, self.ibot_weight = dino.loss_weight, ibot.loss_weight
        self.koleo_weight = dino.koleo_loss_weight
        self.koleo_distributed = dino.koleo_distributed
        self.centering = cfg.teacher.centering
        self.teacher_model = teacher
        self.teacher_info = dict(teacher_info or {})
        self.student_models = {
            arch: cfg.model.model_copy(update={"arch": arch, "drop_path_rate": 0.0, "pretrained_weights": None})
            for arch in cfg.distill.students
        }  # no stochastic depth for the students (paper)
        self.teacher = self._network(teacher)
        self.teacher.requires_grad_(False)
        self.students = nn.ModuleDict({name: self._network(m) for name, m in self.student_models.items()})
        self.students_ema = copy.deepcopy(self.students)  # the spare EMA, exported as each student's final model
        self.students_ema.requires_grad_(False)
        ibot_out = ibot.head_n_prototypes if ibot.separate_head else dino.head_n_prototypes
        self.dino_loss = DINOLoss(dino.head_n_prototypes, center_momentum=cfg.teacher.center_momentum)
        self.ibot_loss = iBOTPatchLoss(ibot_out, center_momentum=cfg.teacher.center_momentum)
        self.teacher_calls = 0
        """Teacher forwards so far in this process (what the once-per-batch test reads)."""

    def _network(self, model: ModelConfig) -> nn.ModuleDict:
        backbone = backbone_from_config(model)
        parts: dict[str, nn.Module] = {"backbone": backbone, "dino_head": _head(backbone.embed_dim, self.cfg.dino)}
        if self.separate_ibot_head:
            parts["ibot_head"] = _head(backbone.embed_dim, self.cfg.ibot)
        return nn.ModuleDict(parts)

    def train(self, mode: bool = True) -> DistillMetaArch:
        super().train(mode)
        self.teacher.eval()  # frozen: eval mode whatever the mode
        self.students_ema.eval()
        return self

    # -- weights in ------------------------------------------------------------------------------------------------

    def load_teacher(self, backbone: Path, heads: Path) -> None:
        """Loads the teacher's backbone (official layout) and its heads (an export's heads file, or a training
        checkpoint of the release), strictly.

        Raises:
            CheckpointError: the heads were saved tied while `ibot.separate_head` is true (or the reverse), or their
                shapes differ from the `dino` / `ibot` sections (students' heads predict the teacher's prototypes).
        """
        load_official_weights(self.teacher.backbone, exports.read_weights(backbone)[0])
        heads_to_load = {name: self.teacher[name] for name in ("dino_head", "ibot_head") if name in self.teacher}
        try:
            found = load_official_heads(heads_to_load, exports.read_weights(heads)[0])
        except CheckpointError as err:
            raise CheckpointError(
                f"{heads}: the teacher's heads must fit the dino / ibot sections (students' heads predict the "
                f"teacher's prototypes): {err}"
            ) from None
        for loss, key in ((self.dino_loss, "dino"), (self.ibot_loss, "ibot")):
            center = found.centers.get(key)
            if center is not None and center.shape == loss.center.shape:
                loss.center.copy_(center)  # the teacher's softmax centre (unused by Sinkhorn-Knopp)

    # -- the step --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_targets(self, global_crops: Tensor, n_global: int, temp: float) -> _Targets:
        """One teacher pass over the global crops: DINO targets (G, B, K) and iBOT targets (G B, N, K)."""
        self.teacher_calls += 1
        out = self.teacher.backbone(global_crops, is_training=True)
        cls = out["x_norm_clstoken"]  # (G B, D)
        patches = out["x_norm_patchtokens"]  # (G B, N, D)
        GB, N, D = patches.shape
        flat = patches.reshape(GB * N, D)  # (G B N, D): every patch is an iBOT target (no masking)
        if self.separate_ibot_head:
            cls_logits, patch_logits = self.teacher.dino_head(cls), self.teacher.ibot_head(flat)
        else:  # one head call for both, as pretraining's tied path
            cls_logits, patch_logits = self.teacher.dino_head(torch.cat((cls, flat))).split([GB, GB * N])
        if self.centering == "sinkhorn_knopp":
            dino_t = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, temp)  # (G B, K)
            ibot_t = self.ibot_loss.sinkhorn_knopp_teacher(patch_logits, temp)  # (G B N, K)
        else:
            dino_t = self.dino_loss.softmax_center_teacher(cls_logits, temp)
            ibot_t = self.ibot_loss.softmax_center_teacher(patch_logits, temp)
            self.dino_loss.update_center(cls_logits)
            self.ibot_loss.update_center(patch_logits)
        return _Targets(dino=dino_t.view(n_global, -1, dino_t.shape[-1]), ibot=ibot_t.view(GB, N, -1))

    def student_loss(
        self, student: nn.ModuleDict, global_crops: Tensor, local_crops: Tensor, n_local: int, targets: _Targets
    ) -> LossOutput:
        """One student's weighted DINO + iBOT + KoLeo loss against the shared teacher targets."""
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
        if self.separate_ibot_head:
            g_logits, l_logits = student.dino_head(torch.cat((g_cls, l_cls))).split([GB, len(l_cls)])
            patch_logits = student.ibot_head(flat)
        else:
            sizes = [GB, len(l_cls), GB * N]
            g_logits, l_logits, patch_logits = student.dino_head(torch.cat((g_cls, l_cls, flat))).split(sizes)
        B, K = GB // n_global, g_logits.shape[-1]
        local = l_logits.view(n_local, B, K) if n_local else None
        dino = self.dino_loss(g_logits.view(n_global, B, K), local, targets.dino)
        every_patch = torch.ones(GB, N, dtype=torch.bool, device=patches.device)  # iBOT on both global crops
        ibot = self.ibot_loss(patch_logits.view(GB, N, -1), targets.ibot, every_patch)
        koleo = sum(koleo_loss(_gathered(c) if self.koleo_distributed else c) for c in g_cls.chunk(n_global))
        loss = self.dino_weight * dino + self.ibot_weight * ibot + self.koleo_weight * koleo
        return {"loss": loss, "dino_loss": dino, "ibot_loss": ibot, "koleo_loss": koleo}

    def forward(self, batch: Mapping[str, Any], values: Mapping[str, float]) -> LossOutput:
        """The summed loss of every student on one collated multi-crop batch, one teacher pass for all of them."""
        global_crops = batch["collated_global_crops"]  # (G B, 3, H, W), crop-major
        local_crops = batch["collated_local_crops"]  # (L B, 3, h, w)
        n_global, n_local = int(batch["n_global_crops"]), int(batch["n_local_crops"])
        targets = self.teacher_targets(global_crops, n_global, float(values["teacher_temp"]))
        out: LossOutput = {}
        total = global_crops.new_zeros(())
        for name, student in self.students.items():
            terms = self.student_loss(student, global_crops, local_crops, n_local, targets)
            total = total + terms["loss"]
            out.update({f"{name}.{k}": v.detach() for k, v in terms.items()})
        out["loss"] = total
        return out

    # -- hooks for the engine --------------------------------------------------------------------------------------

    def optim_param_groups(self, *, layerwise_decay: float, patch_embed_lr_mult: float) -> list[dict[str, Any]]:
        """The model core's groups of each student (layer-wise decay counted within each student's backbone)."""
        return [
            group
            for student in self.students.values()
            for group in model_param_groups(
                student, layerwise_decay=layerwise_decay, patch_embed_lr_mult=patch_embed_lr_mult
            )
        ]

    def ema_pairs(self) -> Sequence[tuple[nn.Module, nn.Module]]:
        return [(self.students[name], self.students_ema[name]) for name in self.students]

    def checkpointed_blocks(self) -> Sequence[nn.Module]:
        return [blk for s in self.students.values() for blk in s.backbone.blocks]

    def compiled_blocks(self) -> Sequence[nn.Module]:
        return [*self.checkpointed_blocks(), *self.teacher.backbone.blocks]

    def monitored_backbone(self) -> nn.Module:
        return next(iter(self.students_ema.values())).backbone

    def monitored_backbones(self) -> Mapping[str, nn.Module]:
        return {name: ema.backbone for name, ema in self.students_ema.items()}

    def sync_state(self) -> None:
        self.dino_loss.apply_center_update()
        self.ibot_loss.apply_center_update()

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
                heads={
                    head: prefixed(state, f"{prefix}{head}.") for head in self.students_ema[name] if head != "backbone"
                },
                centers={"dino": state.get("dino_loss.center"), "ibot": state.get("ibot_loss.center")},
                role="student",
                iterations=iterations,
                heads_config={
                    "dino": self.cfg.dino.model_dump(mode="json"),
                    "ibot": self.cfg.ibot.model_dump(mode="json"),
                },
                provenance={"teacher": self.teacher_info},
            )
        return written
