"""Stage `distill`: a frozen teacher distilled into one or several smaller students at once, under DeepSpeed ZeRO.

    python -m components distill --curated data/curated --teacher models/pretrain --checkpoints checkpoints/distill \
        --out models/distill --metrics metrics/distill.json --curve metrics/distill_curve.csv

The teacher is the `--teacher` export (the pretrain stage's `models/pretrain`), or `distill.teacher_weights`: an
export folder, or a weight file of preset `distill.teacher_arch`: a released backbone, or a training checkpoint of
the release (its teacher's heads are used). Two phases, each resumable (`components.training.trainer`):

1. `head_fit`, only for a teacher without heads: DINO and iBOT heads fitted on its frozen backbone with the
   pretraining losses (`distill.head_fit_iterations`; its own MLflow run `distill_head_fit`); its export, under
   `--checkpoints`, is the next phase's teacher.
2. `distill`: every student of `distill.students` distilled from the teacher in one run, one teacher forward per
   batch (`components.training.distill`), with the pretraining stage's machinery: MLflow step metrics (per student:
   `<preset>.dino_loss`, ...; `<preset>.knn_top1` with `train.knn_eval_period`), the curve CSV, the
   training-metrics gate, checkpoints with exact resume, `torchrun` relaunch for `train.nproc_per_node` > 1.

Each phase's checkpoints are named after its plan's fingerprint, which covers the teacher's weights: another
teacher or student list never resumes a stale run (the older checkpoints are kept). Outputs: `<out>/<preset>/` per
student (an export of its spare EMA, role `student`, with the teacher's provenance), `<out>/config.yaml` and
`<out>/plan.yaml`, gate reports; the curve (a DVC plot) and the metrics JSON.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from components.config import ConfigError, PipelineConfig
from components.stages.common import head_fit_first, train_stage

if TYPE_CHECKING:
    from components.exports import WeightsSource
    from components.training.trainer import Phase


def run_distill(
    cfg: PipelineConfig,
    *,
    curated: str,
    teacher: str | None,
    checkpoints: str,
    out: str,
    metrics: str,
    curve: str,
) -> None:
    """The `distill` stage (see the module docstring); the teacher defaults to `pipeline.pretrained_model`."""
    from components import exports
    from components.log import get_logger

    log = get_logger(__name__)
    teacher = teacher or cfg.pipeline.pretrained_model
    paths = {"curated": curated, "teacher": teacher, "checkpoints": checkpoints, "out": out}
    paths |= {"metrics": metrics, "curve": curve}
    with tempfile.TemporaryDirectory(prefix="distill-teacher-") as tmp:
        base = cfg.model.model_copy(update={"arch": cfg.distill.teacher_arch or cfg.model.arch})
        source = exports.resolve_source(cfg.distill.teacher_weights or teacher, base, download_dir=Path(tmp))
        log.info(
            "teacher %s (%s, sha256 %s, heads %s); students %s", source.origin, source.model.arch,
            source.digest[:12], source.describe()["heads"], ", ".join(cfg.distill.students),
        )  # fmt: skip
        if source.heads is None:
            log.info(
                "the teacher has no heads: fitting DINO / iBOT heads on its frozen backbone for %d iterations first",
                cfg.distill.head_fit_iterations,
            )
        train_stage(
            "distill", cfg, paths, lambda world: distill_phases(cfg, source, Path(checkpoints), Path(out), world)
        )


def distill_phases(cfg: PipelineConfig, source: WeightsSource, checkpoints: Path, out: Path, world: int) -> list[Phase]:
    """The stage's phases: the head fit of a headless teacher, then distillation from the teacher (or its fit)."""
    from components.training.distill import DistillMetaArch
    from components.training.layout import stage_layout
    from components.training.plan import distill_plan
    from components.training.trainer import Phase

    check_patch_grid(cfg, source.model.patch_size)
    phases, weights, location = head_fit_first(cfg, "distill", source, source.model, checkpoints, world)
    plan = distill_plan(cfg, world_size=world, teacher=source.model, weights=weights)
    info = source.describe()
    return [*phases, Phase(plan, lambda p: DistillMetaArch(p, info), stage_layout(checkpoints), out, location)]


def check_patch_grid(cfg: PipelineConfig, teacher_patch_size: int) -> None:
    """Students share the teacher's patch grid: iBOT compares their patch tokens position by position.

    Raises:
        ConfigError: `model.patch_size` differs from the teacher's.
    """
    if cfg.model.patch_size != teacher_patch_size:
        raise ConfigError(
            f"model.patch_size = {cfg.model.patch_size} (the students') differs from the teacher's patch size "
            f"{teacher_patch_size}: the iBOT loss compares patch tokens one to one"
        )
