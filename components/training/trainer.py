"""The trainer: one phase of a training stage, from its plan, resumable on any number of ranks.

    trainer = Trainer(phase, train=cfg.train, curated="data/curated", log_metrics=sink)
    trainer.resume_or_init()   # the newest checkpoint of this plan, or the phase's starting weights
    result = trainer.fit()     # the loop to the plan's last step: checkpoints and exports along the way
    trainer.export()           # again, for a run that resumed at its last step (DVC removed the old export)

A stage runs its phases one after the other (a headless teacher's head fit, then distillation: `run_phase` for each),
each a `Trainer` with its own checkpoints: a phase that finished is only re-exported, and the next reads its export.

Checkpoints live in `<checkpoints>/<phase>/<fingerprint>/step_<N>/` (`components.training.layout`), the fingerprint
being the plan's (without the split of its global batch), the digests of what the phase reads (the curated set, the
weights it starts from) and nothing else: a run resumes with another number of ranks or accumulation steps as long as
the global batch is the same. Checkpoints of another configuration are kept, and one line names the plan keys that
changed. With `train.checkpoint_mirror`, each checkpoint is also copied to S3 and a restart agrees on the one to
resume from, local or mirrored, before any rank loads it (`components.training.mirror`): no shared filesystem needed.

Weights enter a phase one way: the module's `initial_state` (its seeded initialisation with the phase's starting
weights loaded) on a fresh start, or the checkpoint's state on resume, handed to the engine.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from components.config import TrainConfig
from components.log import get_logger
from components.runtime import cpu_threads, several_ranks
from components.storage import StorageError
from components.training.checkpoint import (
    CheckpointManager,
    LoopState,
    code_digest,
    loop_state_dict,
    loop_state_from,
    restore_rng,
    rng_state,
)
from components.training.curve import CurveFile
from components.training.data import build_loader, mix_seed, read_manifest
from components.training.engine import EngineSettings, TrainEngine, init_distributed
from components.training.knn import knn_accuracy
from components.training.layout import CheckpointLayout, mirror_layout, step_name
from components.training.loop import LoopResult, LoopSettings, train
from components.training.mirror import CheckpointMirror, pull_export, push_export, resume_point
from components.training.module import TrainModule
from components.training.plan import PhasePlan, fingerprint

log = get_logger(__name__)


@dataclass(frozen=True)
class Phase:
    """One phase of a stage: its plan, how to build its module, where its weights come from and where it writes."""

    plan: PhasePlan
    build: Callable[[PhasePlan], TrainModule]
    checkpoints: CheckpointLayout
    """The stage's checkpoints (this phase's are under `checkpoints.phase(plan.phase)`)."""
    out: Path
    """The export folder (written at each checkpoint and at the end)."""
    source: str | None = None
    """The starting weights (an export folder or a weight file); None: the seeded initialisation."""
    inputs: Mapping[str, str] = field(default_factory=dict)
    """Digests of what the phase reads besides its plan (the curated set's is added by the trainer)."""
    knn_stop_drop: float | None = None
    """Stop when the monitored kNN top-1 falls this far below the starting model's (`adapt.knn_stop_drop`)."""


@dataclass
class PhaseResult:
    """What a finished phase hands back to its stage."""

    plan: PhasePlan
    result: LoopResult
    fingerprint: str
    resumed_from: Path | None
    rank: int


class Trainer:
    """Runs one `Phase`: `resume_or_init`, then `fit`; `save` and `export` are called by the loop and the stage.

    Args:
        phase: what to train.
        train: the run mechanics (`train` section: device, ZeRO stage, workers, periods, resume, kNN monitor).
        curated: folder or s3:// prefix of the curated manifest.
        log_metrics: step-metrics sink, called on every rank (log on rank 0).
        curve: the step-metrics CSV, written as the run goes (rank 0), or None.
    """

    def __init__(
        self,
        phase: Phase,
        *,
        train: TrainConfig,
        curated: str,
        log_metrics: Callable[[dict[str, float], int], None],
        curve: Path | None = None,
    ) -> None:
        self.phase, self.plan, self.train_cfg = phase, phase.plan, train
        self.curated, self.log_metrics, self.curve_path = curated, log_metrics, curve
        self.engine: TrainEngine | None = None
        self.history: list[dict[str, float]] = []
        self.loop = LoopState()
        self.resumed_from: Path | None = None
        self.mirror: CheckpointMirror | None = None

    # -- start -------------------------------------------------------------------------------------------------------

    def resume_or_init(self) -> None:
        """Finds this plan's newest checkpoint (or none), builds the module and the engine from its state or from the
        phase's starting weights, restores the generators and positions the data stream."""
        settings = EngineSettings.from_plan(self.plan, self.train_cfg)
        self.rank, self.world = init_distributed(settings.device)
        if settings.device == "cpu":
            torch.set_num_threads(cpu_threads(self.train_cfg.cpu_threads, self.train_cfg.num_workers))
        uris, data_digest = read_manifest(self.curated)
        self.fingerprint = fingerprint(self.plan.fingerprint_items(), {"curated": data_digest, **self.phase.inputs})
        layout, phase = self.phase.checkpoints, self.plan.phase
        self.manager = CheckpointManager(
            layout.run(phase, self.fingerprint), keep_last=self.train_cfg.keep_last,
            fingerprint=self.fingerprint, code=code_digest(), prune_to_fit=self.train_cfg.prune_to_fit,
        )  # fmt: skip
        self.mirror = phase_mirror(self.train_cfg, self.plan, self.fingerprint)
        if self.mirror is not None and self.rank == 0:
            self.mirror.check_reachable()
        note_other_configurations(Path(layout.phase(phase)), self.fingerprint, self.plan.fingerprint_items())
        state = self._resume_state()
        torch.manual_seed(self.plan.seed)  # identical initialisation on every rank
        module = self.phase.build(self.plan)
        initial = state or {"model": module.initial_state(self.phase.source)}
        self.engine = TrainEngine(module, settings, initial_state=initial)
        if self.engine.global_batch_size != self.plan.batch.global_size:  # the plan was built for this world
            raise RuntimeError(
                f"the plan's global batch {self.plan.batch.global_size} is not the engine's "
                f"{self.engine.global_batch_size} ({self.world} ranks)"
            )
        if state is not None:
            self.loop, self.history = loop_state_from(state), list(state.get("history", []))
            restore_rng(state["rng"], self.rank, self.plan.seed, self.loop.step)
            log.info(
                "resuming from %s (step %d, %d samples seen)", self.resumed_from, self.loop.step, self.loop.samples_seen
            )
        else:
            torch.manual_seed(mix_seed(self.plan.seed, self.rank, 0xD40))  # ranks draw different drop-path subsets
        del state, initial
        self.loader = build_loader(
            uris=uris, plan=self.plan, rank=self.rank, world_size=self.world, start_position=self.loop.samples_seen,
            num_workers=self.train_cfg.num_workers, pin_memory=settings.device == "cuda",
        )  # fmt: skip

    def _resume_state(self) -> dict[str, Any] | None:
        """The newest intact checkpoint's state (damaged ones are named and set aside: `load_latest`), unless resuming
        is off or it finished the run with other code. With a mirror, every rank loads the checkpoint rank 0 chose."""
        if not self.train_cfg.resume:
            found = None
        elif self.mirror is None:
            found = self.manager.load_latest()
        else:
            step = self._agree_on_checkpoint()
            found = None if step is None else self.manager.load_latest(upto=step)
        resume, state = found if found is not None else (None, None)
        if (
            resume is not None
            and (made_by := self.manager.meta(resume).get("code", self.manager.code)) != self.manager.code
        ):
            # The stage runs again because its code changed (DVC tracks it): a finished run is redone, not re-exported.
            # An unfinished one is resumed, so that a fix to the code that crashed it does not cost the steps done.
            codes = (resume, made_by, self.manager.code)
            if int(self.manager.meta(resume).get("step", 0)) >= self.plan.schedule.total_steps:
                log.info("%s finished this run with other code (%s, now %s): training afresh", *codes)
                self.manager.supersede()
                resume = state = None
            else:
                log.warning("%s was written by other code (%s, now %s): resuming with this code", *codes)
        self.resumed_from = resume
        return state

    def _agree_on_checkpoint(self) -> int | None:
        """The step every rank resumes from, with a mirror (collective): rank 0 decides (`mirror.resume_point`), then
        the first process of each node pulls that checkpoint into the node's folder unless it is there intact."""
        step = resume_point(self.manager, self.mirror) if self.rank == 0 else None
        if self.world > 1:
            box = [step]
            torch.distributed.broadcast_object_list(box, src=0)
            step = box[0]
        if step is not None and self.rank != 0 and local_rank() == 0:
            path = Path(self.manager.root) / step_name(step)
            if self.manager.check(path) is not None:
                self.mirror.pull(step, self.manager)
        if self.world > 1:
            torch.distributed.barrier()  # every node's folder holds the checkpoint
        return step

    # -- the run -----------------------------------------------------------------------------------------------------

    def fit(self) -> LoopResult:
        """Trains from the current step to the plan's last one (nothing when a checkpoint is already there)."""
        if self.engine is None:
            raise RuntimeError("resume_or_init() first")
        settings = LoopSettings(
            total_steps=self.plan.schedule.total_steps,
            log_period=self.train_cfg.log_period,
            checkpoint_period=self.train_cfg.checkpoint_period,
            max_nonfinite_steps=self.train_cfg.max_nonfinite_steps,
            desc=f"{self.plan.stage}: {self.plan.phase}",
        )
        if self.loop.step >= settings.total_steps:
            log.info("the checkpoint is already at the final step %d: nothing to train", self.loop.step)
        curve = CurveFile(self.curve_path, self.history) if self.curve_path and self.rank == 0 else None
        if curve is not None:
            curve.rewrite()  # the rows its checkpoint holds (none on a fresh start)
        monitors = self._monitors()
        if self.loop.step == 0 and monitors:  # the starting model's figures, the reference of an early stop
            self.loop.start_metrics = {k: v for _, m in monitors for k, v in m().items()}
            self.log_metrics(self.loop.start_metrics, 0)
        result = train(
            self.engine, iter(self.loader), self.plan.schedules(), self.loop, settings, save_checkpoint=self.save,
            log_metrics=self.log_metrics, monitors=monitors, stop=self._early_stop(), history=self.history,
            on_row=curve.append if curve is not None else None,
        )  # fmt: skip
        if result.last_checkpoint is None and self.resumed_from is not None:  # resumed at the final step
            self.export()
            result.last_checkpoint = self.resumed_from if self.rank == 0 else None
        if self.mirror is not None and self.rank == 0:
            uri = mirror_layout(self.train_cfg.checkpoint_mirror, self.plan.stage).export(self.plan.phase)
            push_export(self.phase.out, uri)
            log.info("export %s copied to %s", self.phase.out, uri)
        return result

    def save(self, loop_state: LoopState) -> Path | None:
        """Writes a checkpoint of the whole training state and exports the module (collective; rank 0 writes)."""
        engine = self.engine
        model = engine.full_model_state()  # collective under ZeRO-3
        optimizer = engine.full_optimizer_state()  # collective under ZeRO
        rngs = gathered_rng_states(self.world)
        if self.rank:
            return None
        state = {
            "model": model, "optimizer": optimizer, "loop": loop_state_dict(loop_state), "rng": rngs,
            "history": self.history, "world_size": self.world, "plan": self.plan.to_dict(),
        }  # fmt: skip
        path = self.manager.save(state, loop_state.step, plan=self.plan.fingerprint_items())
        engine.module.export(model, self.phase.out, iterations=loop_state.step)
        log.info("checkpoint %s; exported to %s", path, self.phase.out)
        if self.mirror is not None:
            try:
                self.mirror.push(path)
            except StorageError as err:  # the local checkpoint is intact; the next one, or a restart, tries again
                log.error("checkpoint %s was not copied to the mirror (%s); training goes on", path, err)
        return path

    def export(self) -> None:
        """Exports the module's current weights to the phase's folder (collective; rank 0 writes)."""
        model = self.engine.full_model_state()
        if self.rank == 0:
            self.engine.module.export(model, self.phase.out, iterations=self.loop.step)

    def close(self) -> None:
        """Frees the engine before the next phase builds its own on the device."""
        self.engine = self.loader = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- helpers -----------------------------------------------------------------------------------------------------

    def _backbone_trains(self) -> bool:
        return not any(prefix.endswith("backbone.") for prefix in self.plan.frozen)

    def _monitors(self) -> list[tuple[int, Callable[[], dict[str, float]]]]:
        """The kNN accuracy every `train.knn_eval_period` steps, and, for a pretraining phase that starts from
        pretrained weights, the teacher backbone's relative change from them (every kNN or checkpoint period: it reads
        every weight). Distillation's students start from scratch: no drift to measure."""
        if not self._backbone_trains():
            return []  # a head fit: the backbone cannot move
        monitors = []
        if self.train_cfg.knn_eval_period:
            monitors.append((self.train_cfg.knn_eval_period, self._knn_monitor()))
        continues = self.plan.phase in ("pretrain", "gram", "highres")  # the same network goes on from its weights
        if continues and self.plan.weights.kind != "random" and self.phase.source is not None:
            period = self.train_cfg.knn_eval_period or self.train_cfg.checkpoint_period
            monitors.append((period, self._drift_monitor()))
        return monitors

    def _knn_monitor(self) -> Callable[[], dict[str, float]]:
        """kNN top-1 of the monitored backbones on `train.knn_eval_root` (train -> val), on every rank."""
        backbones = self.engine.module.monitored_backbones()  # ZeRO-3 gathers their weights through module hooks
        root, size, device = self.train_cfg.knn_eval_root, self.plan.crops.global_crops_size, self.engine.device

        def evaluate() -> dict[str, float]:
            return {
                f"{name}.knn_top1" if name else "knn_top1": knn_accuracy(b, root, image_size=size, device=device)
                for name, b in backbones.items()
            }

        return evaluate

    def _drift_monitor(self) -> Callable[[], dict[str, float]]:
        """`drift.total` and `drift.block_<i>`: ||w - w0|| / ||w0|| of the monitored backbone against the weights
        the phase started from (what it forgets moves these first), on every rank."""
        reference = starting_backbone(self.phase.source, self.plan.model)
        backbone = self.engine.module.monitored_backbone()

        def drift() -> dict[str, float]:
            sums: dict[str, list[float]] = {}
            with self.engine.gathered(backbone):
                for name, p in backbone.named_parameters():
                    group = "block_{:02d}".format(int(name.split(".")[1])) if name.startswith("blocks.") else "stem"
                    ref = reference[name]
                    moved = float((p.detach().float().cpu() - ref).square().sum())
                    acc = sums.setdefault(group, [0.0, 0.0])
                    acc[0], acc[1] = acc[0] + moved, acc[1] + float(ref.square().sum())
            out = {f"drift.{g}": (m / max(r, 1e-30)) ** 0.5 for g, (m, r) in sums.items()}
            total_moved, total_ref = sum(m for m, _ in sums.values()), sum(r for _, r in sums.values())
            out["drift.total"] = (total_moved / max(total_ref, 1e-30)) ** 0.5
            return out

        return drift

    def _early_stop(self) -> Callable[[dict[str, float]], str | None] | None:
        """With `knn_stop_drop`: a reason to stop once the kNN top-1 falls that far below the starting model's."""
        drop, start = self.phase.knn_stop_drop, self.loop.start_metrics.get("knn_top1")
        if drop is None or start is None:
            return None

        def stop(row: dict[str, float]) -> str | None:
            value = row.get("knn_top1")
            if value is not None and value < start - drop:
                return f"teacher kNN top-1 {value:.4f} fell below the start's {start:.4f} by more than {drop}"
            return None

        return stop


def phase_mirror(train: TrainConfig, plan: PhasePlan, fingerprint: str) -> CheckpointMirror | None:
    """The mirror of a phase's checkpoints, `<train.checkpoint_mirror>/<stage>/<phase>/<fingerprint>`; None without
    a mirror."""
    if train.checkpoint_mirror is None:
        return None
    root = mirror_layout(train.checkpoint_mirror, plan.stage).run(plan.phase, fingerprint)
    return CheckpointMirror(root, keep_last=train.keep_last)


def share_export(phase: Phase, train: TrainConfig) -> None:
    """With a mirror, on several ranks (collective): the phase's export, written by rank 0 on its node and copied to
    the mirror at the phase's end, copied from there into the same folder of every other node that lacks it, since
    the stage's next phase reads it on every rank. Nothing to do on one node's shared folder (the digests agree)."""
    from components import exports

    if train.checkpoint_mirror is None or not several_ranks():
        return
    rank = torch.distributed.get_rank()
    box = [exports.export_digest(phase.out) if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    if rank != 0 and local_rank() == 0:
        have = exports.export_digest(phase.out) if exports.is_export(phase.out) else None
        if have != box[0]:
            uri = mirror_layout(train.checkpoint_mirror, phase.plan.stage).export(phase.plan.phase)
            pull_export(uri, phase.out)
            log.info("export %s pulled from %s", phase.out, uri)
    torch.distributed.barrier()


def local_rank() -> int:
    """This process's rank on its node (the launcher's `LOCAL_RANK`; 0 for a plain process)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def starting_backbone(source: str, model: Any) -> dict[str, Tensor]:
    """The backbone weights a phase starts from (an export folder or a weight file), by our parameter names, on the
    CPU in float32."""
    from components import exports
    from components.model import backbone_from_config, load_official_weights

    path = exports.read_export(source).weights if exports.is_export(source) else source
    with torch.device("cpu"):
        backbone = backbone_from_config(model.model_copy(update={"drop_path_rate": 0.0}))
    load_official_weights(backbone, exports.read_weights(path)[0])
    return {k: v.detach().float() for k, v in backbone.named_parameters()}


def gathered_rng_states(world_size: int) -> list[dict[str, Any]]:
    """Every rank's generator states, on every rank (collective)."""
    states: list[Any] = [None] * world_size
    if world_size > 1:
        torch.distributed.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    return states


def note_other_configurations(root: Path, current: str, items: Mapping[str, Any]) -> None:
    """Logs one line when `root` holds checkpoints of another configuration: which plan keys differ (they are kept)."""
    if not root.is_dir():
        return
    complete = {
        d: CheckpointManager(d, keep_last=1, fingerprint=d.name).complete() for d in root.iterdir() if d.is_dir()
    }
    others = {d: found for d, found in complete.items() if found and d.name != current}
    if not others:
        return
    newest = max(others, key=lambda d: d.stat().st_mtime)
    latest = others[newest][-1][1]
    previous = CheckpointManager.meta(latest).get("plan") or {}
    changed = sorted(k for k in set(previous) | set(items) if previous.get(k) != items.get(k))
    shown = ", ".join(f"{k} {previous.get(k)!r} -> {items.get(k)!r}" for k in changed[:8])
    more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
    log.info(
        "checkpoints in %s belong to another configuration (kept); changed: %s%s",
        newest, shown or "the data or the starting weights", more,
    )  # fmt: skip


def run_phase(
    phase: Phase,
    *,
    train: TrainConfig,
    curated: str,
    log_metrics: Callable[[dict[str, float], int], None],
    curve: Path | None = None,
) -> PhaseResult:
    """Runs one phase to its end with a `Trainer`, then frees it; the next phase may read its export."""
    trainer = Trainer(phase, train=train, curated=curated, log_metrics=log_metrics, curve=curve)
    trainer.resume_or_init()
    loop_result = trainer.fit()
    result = PhaseResult(phase.plan, loop_result, trainer.fingerprint, trainer.resumed_from, trainer.rank)
    trainer.close()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 wrote the export the next phase reads
    return result
