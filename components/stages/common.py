"""The shell of the training stages (`pretrain`, `pretrain_highres`, `distill`): launch, phases, tracking, gate.

A training stage names its phases (`components.training.trainer.Phase`: a plan, a module, where its weights come
from and where it writes) and hands them to `train_stage`, which:

- with `train.nproc_per_node` above 1 and no launcher around it, builds the plans once (so a bad configuration
  fails here, naming its keys) and relaunches the stage under `torchrun --standalone`;
- otherwise runs the phases one after the other on this rank: every phase but the last in its own MLflow run
  (`<stage>_<phase>`, beside the stage's), the last in the stage's run;
- writes `plan.yaml` (every phase's plan) beside `config.yaml` and logs both, then the step-metrics curve (written
  as the run goes, `components.training.curve`), the training-metrics gate (every logged `*loss` column finite),
  the exported model files and the metrics JSON.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from components import storage
from components.config import PipelineConfig, flatten, save_resolved
from components.log import get_logger, is_main_process

log = get_logger(__name__)

MAX_LOGGED_EXPORT_BYTES = 256 * 2**20
"""Model files larger than this are not copied into MLflow (model.json and the heads always are)."""
LOGGED_EXPORT_FILES = ("model.json", "heads.pth", "backbone.safetensors")


def needs_launcher(cfg: PipelineConfig, nproc_per_node: int | None = None) -> bool:
    """True when the stage must start `nproc_per_node` (None: `train.nproc_per_node`) ranks itself (no launcher
    around it)."""
    nproc = nproc_per_node if nproc_per_node is not None else cfg.train.nproc_per_node
    return nproc > 1 and not ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def world_size(cfg: PipelineConfig) -> int:
    """The number of ranks this stage trains on: the launcher's, or `train.nproc_per_node` of a relaunch."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return cfg.train.nproc_per_node


def relaunch(stage: str, cfg: PipelineConfig, paths: dict[str, str], nproc_per_node: int | None = None) -> None:
    """Runs this stage again under `torchrun --standalone` with `nproc_per_node` ranks (None: `train.nproc_per_node`)
    and the same config."""
    nproc = nproc_per_node if nproc_per_node is not None else cfg.train.nproc_per_node
    with tempfile.TemporaryDirectory(prefix=f"{stage}-") as tmp:
        params = save_resolved(cfg, Path(tmp) / "params.yaml")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "components", stage, "--params", str(params),
            *(arg for name, value in paths.items() for arg in (f"--{name}", value)),
        ]  # fmt: skip
        log.info("relaunching under torchrun: %s", " ".join(cmd))
        code = subprocess.run(cmd, check=False).returncode
    if code:
        raise SystemExit(code)


def train_stage(name: str, cfg: PipelineConfig, paths: dict[str, str], phases: Callable[[int], Sequence[Any]]) -> None:
    """Runs a training stage (see the module docstring).

    Args:
        name: the stage (dvc.yaml's name).
        cfg: the validated config.
        paths: the stage's CLI paths (`curated`, `checkpoints`, `out`, `metrics`, `curve`, ...).
        phases: the stage's phases for a number of ranks (a pure function of the config and the stage's inputs).
    """
    planned = phases(world_size(cfg))  # plans built, and checked, before any relaunch
    if needs_launcher(cfg):
        relaunch(name, cfg, paths)
        return
    from components.stages.shell import stage_run
    from components.tracking import PARENT_RUN_ENV, start_run
    from components.training.trainer import run_phase, share_export

    out = Path(paths["out"])
    with stage_run(name, cfg, config_out=out / "config.yaml", metrics_out=Path(paths["metrics"])) as run:
        if is_main_process():
            run.log_artifact(write_plans(planned, out / "plan.yaml"), artifact_path="config")
            run.log_params(flatten({"plan": planned[-1].plan.to_dict()}))
            if run.tracker.run_id is not None:
                log_curated(run, paths["curated"])
        for phase in planned[:-1]:  # the earlier phases, each in its own MLflow run beside the stage's
            with start_run(
                f"{name}_{phase.plan.phase}", cfg.tracking.experiment,
                parent_run_id=os.environ.get(PARENT_RUN_ENV) or None, tags={"stage": name, "phase": phase.plan.phase},
            ) as tracker:  # fmt: skip
                tracker.log_params(flatten({"plan": phase.plan.to_dict()}))
                curve = Path(phase.checkpoints.curve(phase.plan.phase))
                done = run_phase(
                    phase, train=cfg.train, curated=paths["curated"], log_metrics=tracker.log_metrics, curve=curve
                )
                if done.rank == 0:
                    tracker.log_artifact(write_curve(done.result.history, curve), "plots")
            share_export(phase, cfg.train)  # the next phase reads it on every node
        final = run_phase(
            planned[-1], train=cfg.train, curated=paths["curated"], log_metrics=run.log_metrics,
            curve=Path(paths["curve"]),
        )  # fmt: skip
        if final.rank == 0:
            record_phase(run, final, out, Path(paths["curve"]))


def head_fit_first(
    cfg: PipelineConfig, stage: str, source: Any, model: Any, checkpoints: Path, world: int
) -> tuple[list[Any], Any, str]:
    """For weights without heads, the phase that fits heads on their frozen backbone (`plan.head_fit_plan`).

    Returns:
        (the phases to run first, the next phase's `WeightsPlan`, the location it loads its weights from): no phase
        and the source itself when the weights have heads, else the head fit and its export.
    """
    from components.training.layout import stage_layout
    from components.training.meta_arch import SSLMetaArch
    from components.training.plan import WeightsPlan, fingerprint, head_fit_plan
    from components.training.trainer import Phase

    weights = WeightsPlan(source.kind, source.origin, source.digest)
    if source.heads is not None:
        return [], weights, source.location
    fit = head_fit_plan(cfg, stage=stage, world_size=world, model=model, weights=weights)
    layout = stage_layout(checkpoints)
    export = layout.export("head_fit", tag=source.digest[:16])
    after = WeightsPlan("phase", "head_fit", fingerprint(fit.fingerprint_items(), {"weights": source.digest}))
    return [Phase(fit, SSLMetaArch, layout, Path(export), source.location)], after, export


def log_curated(run: Any, curated: str) -> None:
    """The curated manifest as the run's training dataset in MLflow; its digest is the training set's identity that
    checkpoints record (`manifest_digest`)."""
    import pandas as pd

    from components.tracking import DatasetRecord, dataset_columns
    from components.training.data import manifest_digest, manifest_path

    path = manifest_path(curated)
    with storage.local_copy(path) as local:
        frame = pd.read_parquet(local)
    digest = manifest_digest(curated)
    run.log_dataset(DatasetRecord("curated", path, digest, len(frame), "training", dataset_columns(frame)))


def write_plans(phases: Sequence[Any], path: Path) -> Path:
    """Every phase's plan as YAML (`plan.yaml`), written aside and renamed."""
    plans = {p.plan.phase: p.plan.to_dict() for p in phases}
    with storage.atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(plans, sort_keys=False))
    return path


def write_curve(history: Sequence[dict[str, float]], path: Path) -> Path:
    """The logged step metrics as a CSV (a DVC plot), written aside and renamed."""
    import pandas as pd

    with storage.atomic_path(path) as tmp:
        pd.DataFrame(list(history)).to_csv(tmp, index=False)
    return path


def record_phase(run: Any, final: Any, out: Path, curve: Path) -> None:
    """The last phase's curve, training-metrics gate, exported files and summary in the stage's run and metrics."""
    import pandas as pd

    from components import gates

    result, plan = final.result, final.plan
    write_curve(result.history, curve)
    history = pd.DataFrame(result.history)  # the whole run's rows, those before a resume included
    losses = [c for c in history.columns if c.endswith("loss")]
    run.gate("training_metrics", history, gates.training_metrics_suite(losses), out / "gates", id_column="step")
    run.log_artifact(curve, artifact_path="plots")
    log_exports(run, out)
    last = history.iloc[-1]
    run.record({
        "iterations": result.state.step,
        "final": {k: float(last[k]) for k in losses},
        "skipped_steps": result.state.skipped_steps,
        "decode_failures": result.state.decode_failures,
        "images_per_s": float(history["images_per_s"].median()),
        "plan": {"global_batch_size": plan.batch.global_size, "lr": plan.schedule.lr,
                 "total_steps": plan.schedule.total_steps, "world_size": plan.batch.world_size},
        "fingerprint": final.fingerprint,
        "resumed_from": str(final.resumed_from) if final.resumed_from else None,
        "stopped_early": result.stopped,
        "checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
    })  # fmt: skip
    run.set_headline("loss", float(last["loss"]))


def log_exports(run: Any, out: Path) -> None:
    """Each export's descriptor, heads and (when not too large) safetensors backbone, under `model/` in MLflow."""
    for descriptor in sorted(out.glob("**/model.json")):
        folder = descriptor.parent
        prefix = "model" if folder == out else f"model/{folder.relative_to(out).as_posix()}"
        for f in LOGGED_EXPORT_FILES:
            p = folder / f
            if p.is_file() and (f == "model.json" or p.stat().st_size <= MAX_LOGGED_EXPORT_BYTES):
                run.log_artifact(p, artifact_path=prefix)
