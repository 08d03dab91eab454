"""Stage `distill`: a frozen teacher distilled into one or several smaller students at once, under DeepSpeed ZeRO.

    python -m components distill --curated data/curated --teacher models/pretrain --checkpoints checkpoints/distill \
        --out models/distill --metrics metrics/distill.json --curve metrics/distill_curve.csv

The teacher is the `--teacher` export (the pretrain stage's `models/pretrain`: backbone, heads, model.json), or
`distill.teacher_weights`: an official-layout backbone file (preset `distill.teacher_arch`) or another export folder.
A teacher without heads (the official release has backbones only) first gets DINO and iBOT heads fitted on its
frozen backbone (`distill.head_fit_iterations`, its own nested MLflow run `distill_teacher_heads`); then every
student in `distill.students` is distilled from it in one run, one teacher forward per batch
(`components.training.distill`). The run is the pretraining stage's shell and machinery (`train_stage`): MLflow step
metrics (per student: `<preset>.dino_loss`, ...; `<preset>.knn_top1` with `train.knn_eval_period`), the curve CSV,
the training-metrics gate, checkpoints with exact resume, `torchrun` relaunch for `train.nproc_per_node` > 1.

Checkpoints live under `--checkpoints` in folders named after the teacher's sha256 and the `distill` section
(`students-<key>/`, `teacher_heads-<key>/`): a new teacher or student list never resumes a stale run, and the
folders of a previous teacher are removed. Outputs: `<out>/<preset>/` per student (the spare EMA's backbone in the
official layout, `heads.pth`, `model.json` with role `student` and the teacher's provenance), `<out>/config.yaml`
(the derived config that ran), gate reports; the curve (a DVC plot) and the metrics JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from components.config import PipelineConfig, flatten
from components.log import get_logger, is_main_process
from components.stages.pretrain import needs_launcher, relaunch, train_stage

log = get_logger(__name__)

RUN_PREFIXES = ("students-", "teacher_heads-")
"""Folders under --checkpoints that this stage owns (one per teacher and configuration)."""


def run_distill(
    cfg: PipelineConfig, *, curated: str, teacher: str, checkpoints: str, out: str, metrics: str, curve: str
) -> None:
    """The `distill` stage (see the module docstring)."""
    paths = {"curated": curated, "teacher": teacher, "checkpoints": checkpoints, "out": out}
    paths |= {"metrics": metrics, "curve": curve}
    if needs_launcher(cfg):
        relaunch("distill", cfg, paths)
        return
    from components.training.distill import DistillMetaArch, check_geometry, distill_config, resolve_teacher

    derived = distill_config(cfg)  # validated before any file is read
    with tempfile.TemporaryDirectory(prefix="distill-teacher-") as tmp:
        source = resolve_teacher(cfg, teacher, download_dir=Path(tmp))
        check_geometry(cfg, source.model)
        log.info(
            "teacher %s (%s, sha256 %s, heads %s); students %s",
            source.origin, source.model.arch, source.digest[:12], source.describe()["heads"],
            ", ".join(cfg.distill.students),
        )  # fmt: skip
        root = Path(checkpoints)
        students_dir = root / f"students-{run_key(source.digest, cfg)}"
        heads_dir = root / f"teacher_heads-{source.digest[:16]}"
        remove_stale_runs(root, keep={students_dir.name, *([heads_dir.name] if source.heads is None else [])})

        def init(module: Any) -> None:  # a fresh run only: a resumed one holds its teacher in the checkpoint
            backbone, heads = source.weights, source.heads
            if heads is None:
                export = fit_heads(cfg, source, curated=curated, workdir=heads_dir)
                backbone, heads = export / "backbone.pth", export / "heads.pth"
            module.load_teacher(backbone, heads)

        train_stage(
            "distill", derived, {**paths, "checkpoints": str(students_dir)},
            build=lambda: DistillMetaArch(derived, source.model, source.describe()), init=init,
        )  # fmt: skip
    if is_main_process():
        log_student_exports(Path(metrics), Path(out))


def run_key(teacher_digest: str, cfg: PipelineConfig) -> str:
    """The students' checkpoint folder key: the teacher's identity and the `distill` section (students, head fit).

    The training fingerprint (`checkpoint.config_fingerprint`) covers the other sections; this covers what it
    leaves out, so a checkpoint never resumes with another teacher or another set of students.
    """
    blob = json.dumps({"teacher": teacher_digest, "distill": cfg.distill.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def remove_stale_runs(root: Path, keep: set[str]) -> None:
    """Removes this stage's run folders of other teachers or configurations (rank 0; DVC keeps the folder)."""
    if not is_main_process() or not root.is_dir():
        return
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(RUN_PREFIXES) and d.name not in keep:
            log.info("removing %s: checkpoints of another teacher or configuration", d)
            shutil.rmtree(d, ignore_errors=True)


def fit_heads(cfg: PipelineConfig, source: Any, *, curated: str, workdir: Path) -> Path:
    """`fit_teacher_heads` in its own MLflow run (`distill_teacher_heads`, beside the stage's), with its curve CSV."""
    import pandas as pd

    from components.tracking import PARENT_RUN_ENV, start_run
    from components.training.distill import fit_teacher_heads

    with start_run(
        "distill_teacher_heads",
        cfg.tracking.experiment,
        parent_run_id=os.environ.get(PARENT_RUN_ENV) or None,
        tags={"stage": "distill", "phase": "teacher_heads", "teacher_sha256": source.digest},
    ) as tracker:
        tracker.log_params(flatten({"distill": cfg.distill.model_dump(mode="json")}))
        export, history = fit_teacher_heads(
            cfg, source, curated=curated, workdir=workdir, log_metrics=lambda row, step: tracker.log_metrics(row, step)
        )
        if is_main_process() and history:
            curve = workdir / "curve.csv"
            pd.DataFrame(history).to_csv(curve, index=False)
            tracker.log_artifact(curve, "plots")
    return export


def log_student_exports(metrics: Path, out: Path) -> None:
    """Adds each student's model.json and heads to the stage's MLflow run (the shared shell logs a single model)."""
    from components.stages.pretrain import MAX_LOGGED_EXPORT_BYTES
    from components.tracking import MlflowTracker, mlflow_client, tracking_enabled

    run_id = json.loads(metrics.read_text()).get("mlflow_run_id") if metrics.is_file() else None
    if not tracking_enabled() or not run_id:
        return
    tracker = MlflowTracker(mlflow_client(), run_id)
    for descriptor in sorted(out.glob("*/model.json")):
        for f in ("model.json", "heads.pth", "backbone.safetensors"):
            p = descriptor.parent / f
            if p.is_file() and (f == "model.json" or p.stat().st_size <= MAX_LOGGED_EXPORT_BYTES):
                tracker.log_artifact(p, artifact_path=f"model/{descriptor.parent.name}")
