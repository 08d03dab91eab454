"""A training run from a config: seeds, resume, engine, stream, loop, checkpoints and exports, for any `TrainModule`.

Pretraining (`components.stages.pretrain`) calls `run_training` with `SSLMetaArch`; distillation calls it with its
own module. Derived values (global batch, scaled lr, schedule lengths) come from pure functions and are returned
for logging.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.config import PipelineConfig, scaled_lr, total_iterations, validate_config
from components.log import get_logger
from components.model import schedules_from_config
from components.training.checkpoint import (
    CheckpointManager,
    LoopState,
    code_digest,
    config_fingerprint,
    loop_state_dict,
    loop_state_from,
    restore_rng,
    rng_state,
)
from components.training.data import build_loader, mix_seed, read_manifest
from components.training.engine import EngineSettings, TrainEngine, init_distributed
from components.training.knn import knn_accuracy
from components.training.loop import LoopResult, LoopSettings, train
from components.training.module import TrainModule

log = get_logger(__name__)


def cpu_threads(configured: int, num_workers: int) -> int:
    """Intra-op threads of a CPU rank: as configured, else the cores per local rank minus its data workers.

    Oversubscribed cores hurt small models badly (PyTorch's thread pool waits on busy cores: a ViT-tiny step ran
    20x slower with 2 threads than with 1 on a loaded 2-core machine), so the default never oversubscribes.
    """
    if configured:
        return configured
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 1) // local_ranks - num_workers)


def derived_values(cfg: PipelineConfig, world_size: int, inputs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The values a run derives from its config, world size and input digests (logged with the run)."""
    global_batch = cfg.train.batch_size_per_gpu * cfg.train.grad_accum_steps * world_size
    optim, teacher = cfg.optim, cfg.teacher
    return {
        "world_size": world_size,
        "global_batch_size": global_batch,
        "scaled_lr": scaled_lr(optim.base_lr, global_batch, optim.scaling_rule),
        "total_iterations": total_iterations(optim),
        "warmup_iterations": optim.warmup_epochs * optim.epoch_length,
        "teacher_temp_warmup_iterations": teacher.warmup_teacher_temp_epochs * optim.epoch_length,
        "freeze_last_layer_iterations": optim.freeze_last_layer_epochs * optim.epoch_length,
        "fingerprint": config_fingerprint(cfg, inputs),
    }


@dataclass
class TrainingRun:
    """What `run_training` returns: the loop's result, the derived values and whether it resumed."""

    result: LoopResult
    derived: dict[str, Any]
    resumed_from: Path | None
    rank: int


def _gather_rng(world_size: int) -> list[dict[str, Any]]:
    states: list[Any] = [None] * world_size
    if world_size > 1:
        torch.distributed.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    return states


def run_training(
    cfg: PipelineConfig,
    *,
    build_module: Callable[[], TrainModule],
    curated: str,
    checkpoints: str | Path,
    out: str | Path,
    log_metrics: Callable[[dict[str, float], int], None],
    init_module: Callable[[TrainModule], None] | None = None,
    inputs: Mapping[str, str] | None = None,
    desc: str = "pretrain",
) -> TrainingRun:
    """Trains `build_module()` on the curated stream, resuming from `checkpoints` when allowed.

    Args:
        cfg: the (possibly derived) config of the run.
        build_module: builds the module on the CPU (called with the seed set identically on every rank).
        curated: folder or s3:// prefix of the curated manifest.
        checkpoints: checkpoint folder of this stage.
        out: export folder (written by the module's `export` at each checkpoint and at the end).
        log_metrics: step-metrics sink, called on every rank (log on rank 0).
        init_module: applied to a fresh module only (not on resume), e.g. loading a previous phase's export.
        inputs: digests of what the run reads besides its config and the curated set (whose digest is added here),
            e.g. the export `init_module` loads; a checkpoint resumes only with the same inputs.
        desc: progress-bar label.
    """
    settings = EngineSettings.from_config(cfg)
    rank, world = init_distributed(settings.device)
    if settings.device == "cpu":
        torch.set_num_threads(cpu_threads(cfg.train.cpu_threads, cfg.train.num_workers))
    uris, data_digest = read_manifest(curated)
    derived = derived_values(cfg, world, {"curated": data_digest, **(inputs or {})})
    manager = CheckpointManager(
        checkpoints, keep_last=cfg.train.keep_last, fingerprint=derived["fingerprint"], code=code_digest()
    )
    resume = manager.latest() if cfg.train.resume else None
    if resume is not None and (made_by := manager.meta(resume).get("code", manager.code)) != manager.code:
        # The stage runs again because its code changed (DVC tracks it): a finished run is redone, not re-exported.
        # An unfinished one is resumed, so that a fix to the code that crashed it does not cost the steps done.
        codes = (resume, made_by, manager.code)
        if int(manager.meta(resume).get("step", 0)) >= derived["total_iterations"]:
            log.info("%s finished this run with other code (%s, now %s): training afresh", *codes)
            manager.supersede()
            resume = None
        else:
            log.warning("%s was written by other code (%s, now %s): resuming with this code", *codes)
    state = CheckpointManager.load(resume) if resume is not None else None

    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    module = build_module()
    if state is None and init_module is not None:
        init_module(module)
    engine = TrainEngine(module, settings, initial_state=state)
    if state is not None:
        loop = loop_state_from(state)
        history = list(state.get("history", []))
        restore_rng(state["rng"], rank, cfg.seed, loop.step)
        log.info("resuming from %s (step %d, %d samples seen)", resume, loop.step, loop.samples_seen)
    else:
        loop, history = LoopState(), []
        torch.manual_seed(mix_seed(cfg.seed, rank, 0xD40))  # ranks draw different stochastic-depth subsets
    del state

    loader = build_loader(
        uris=uris, cfg=cfg, rank=rank, world_size=world, start_position=loop.samples_seen,
        pin_memory=settings.device == "cuda",
    )  # fmt: skip
    out = Path(out)

    def save(loop_state: LoopState) -> Path | None:
        model = engine.full_model_state()  # collective under ZeRO-3
        optimizer = engine.full_optimizer_state()  # collective under ZeRO
        rngs = _gather_rng(world)
        if rank:
            return None
        path = manager.save(
            {
                "model": model,
                "optimizer": optimizer,
                "loop": loop_state_dict(loop_state),
                "rng": rngs,
                "history": history,
                "world_size": world,
                "config": cfg.model_dump(mode="json"),
            },
            loop_state.step,
        )
        engine.module.export(model, out, iterations=loop_state.step)
        log.info("checkpoint %s; exported to %s", path, out)
        return path

    knn_eval = None
    if cfg.train.knn_eval_period:
        knn_eval = _knn_monitor(engine, cfg)
    loop_settings = LoopSettings(
        total_steps=total_iterations(cfg.optim),
        log_period=cfg.train.log_period,
        checkpoint_period=cfg.train.checkpoint_period,
        max_nonfinite_steps=cfg.train.max_nonfinite_steps,
        knn_eval_period=cfg.train.knn_eval_period,
        desc=desc,
    )
    schedules = schedules_from_config(cfg, derived["global_batch_size"])
    if loop.step >= loop_settings.total_steps:
        log.info("the checkpoint is already at the final step %d: nothing to train", loop.step)
    result = train(
        engine, iter(loader), schedules, loop, loop_settings, save_checkpoint=save, log_metrics=log_metrics,
        knn_eval=knn_eval, history=history,
    )  # fmt: skip
    if result.last_checkpoint is None and resume is not None:  # resumed at the final step: export again
        model = engine.full_model_state()  # collective; DVC removed the previous export before this run
        if rank == 0:
            result.last_checkpoint = resume
            engine.module.export(model, out, iterations=loop.step)
    return TrainingRun(result=result, derived=derived, resumed_from=resume, rank=rank)


def highres_config(cfg: PipelineConfig) -> PipelineConfig:
    """The config of the high-resolution phase (paper, appendix B.2), derived from the `highres` section.

    Compressed schedules: `highres.iterations` steps (schedules in iterations: an "epoch" of one step), lr warm-up
    over `warmup_iterations` to `highres.base_lr` (batch-scaled), weight decay held at `optim.weight_decay_end`,
    teacher momentum from `highres.momentum_teacher` to the final value, the final teacher temperature without
    warm-up, no last-layer freeze; `highres` crop sizes and batch. Validated like params.yaml.
    """
    h = cfg.highres
    raw = cfg.model_dump(mode="json")
    raw["optim"].update(
        epochs=h.iterations, epoch_length=1, warmup_epochs=h.warmup_iterations, base_lr=h.base_lr,
        weight_decay=cfg.optim.weight_decay_end, freeze_last_layer_epochs=0,
    )  # fmt: skip
    raw["teacher"].update(momentum_teacher=h.momentum_teacher, warmup_teacher_temp_epochs=0)
    raw["crops"].update(global_crops_size=h.global_crops_size, local_crops_size=h.local_crops_size)
    raw["train"].update(batch_size_per_gpu=h.batch_size_per_gpu)
    raw["model"].update(pretrained_weights=None)  # the phase starts from the pretrain export instead
    return validate_config(raw, source="highres_config(params)")


def _knn_monitor(engine: TrainEngine, cfg: PipelineConfig) -> Callable[[], dict[str, float]]:
    """kNN top-1 of the monitored backbones (the teacher when pretraining) on `train.knn_eval_root` (train -> val),
    run on every rank."""
    backbones = engine.module.monitored_backbones()  # ZeRO-3 gathers their weights through the module hooks

    def evaluate() -> dict[str, float]:
        return {
            f"{name}.knn_top1" if name else "knn_top1": knn_accuracy(
                backbone, cfg.train.knn_eval_root, image_size=cfg.crops.global_crops_size, device=engine.device
            )
            for name, backbone in backbones.items()
        }

    return evaluate
