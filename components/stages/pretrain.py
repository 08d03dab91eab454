"""Stages `pretrain` and `pretrain_highres`: DINOv2 self-supervised pretraining under DeepSpeed ZeRO.

    python -m components pretrain --curated data/curated --checkpoints checkpoints/pretrain --out models/pretrain \
        --metrics metrics/pretrain.json --curve metrics/pretrain_curve.csv
    python -m components pretrain_highres --pretrained models/pretrain --curated data/curated \
        --checkpoints checkpoints/pretrain_highres --out models/pretrain_highres \
        --metrics metrics/pretrain_highres.json --curve metrics/pretrain_highres_curve.csv

With `train.nproc_per_node` above 1 and no launcher around it (no RANK / WORLD_SIZE), the stage relaunches itself
under `torchrun --standalone`; under torchrun or the DeepSpeed launcher (`infra/launch/`) it runs as one rank of the
job. Re-running after a crash resumes from the newest complete checkpoint of the same configuration.

Outputs: `models/pretrain/` (the teacher backbone in the official layout as `backbone.pth` and
`backbone.safetensors`, `heads.pth`, `model.json`, the resolved config, gate reports), the step-metrics curve
(a DVC plot) and the stage's metrics JSON. The high-resolution phase (paper, appendix B.2) starts student and teacher
from that export and runs the compressed schedule of the `highres` section (`highres_config`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from components import storage
from components.config import PipelineConfig, save_resolved
from components.log import get_logger

if TYPE_CHECKING:
    from components.stage import StageRun

log = get_logger(__name__)

MAX_LOGGED_EXPORT_BYTES = 256 * 2**20
"""Model files larger than this are not copied into MLflow (model.json and the heads always are)."""


def run_pretrain(cfg: PipelineConfig, *, curated: str, checkpoints: str, out: str, metrics: str, curve: str) -> None:
    """The `pretrain` stage (see the module docstring)."""
    paths = {"curated": curated, "checkpoints": checkpoints, "out": out, "metrics": metrics, "curve": curve}
    if needs_launcher(cfg):
        relaunch("pretrain", cfg, paths)
        return
    from components.training.meta_arch import SSLMetaArch

    train_stage("pretrain", cfg, paths, build=lambda: SSLMetaArch(cfg))


def run_pretrain_highres(
    cfg: PipelineConfig, *, pretrained: str, curated: str, checkpoints: str, out: str, metrics: str, curve: str
) -> None:
    """The `pretrain_highres` stage: the high-resolution adaptation from the `pretrain` export."""
    paths = {"pretrained": pretrained, "curated": curated, "checkpoints": checkpoints, "out": out}
    paths |= {"metrics": metrics, "curve": curve}
    if needs_launcher(cfg):
        relaunch("pretrain_highres", cfg, paths)
        return
    from components.exports import export_digest
    from components.training.meta_arch import SSLMetaArch
    from components.training.run import highres_config

    derived = highres_config(cfg)
    train_stage(
        "pretrain_highres", derived, paths, build=lambda: SSLMetaArch(derived),
        init=lambda module: module.load_pretrained(pretrained),
        inputs={"pretrained": export_digest(pretrained)},  # a new pretrain export starts this phase afresh
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------


def needs_launcher(cfg: PipelineConfig) -> bool:
    """True when the stage must start `train.nproc_per_node` ranks itself (no launcher around it)."""
    return cfg.train.nproc_per_node > 1 and not ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def relaunch(stage: str, cfg: PipelineConfig, paths: dict[str, str]) -> None:
    """Runs this stage again under `torchrun --standalone` with `train.nproc_per_node` ranks and the same config."""
    with tempfile.TemporaryDirectory(prefix=f"{stage}-") as tmp:
        params = save_resolved(cfg, Path(tmp) / "params.yaml")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={cfg.train.nproc_per_node}", "-m", "components", stage, "--params", str(params),
            *(arg for name, value in paths.items() for arg in (f"--{name}", value)),
        ]  # fmt: skip
        log.info("relaunching under torchrun: %s", " ".join(cmd))
        code = subprocess.run(cmd, check=False).returncode
    if code:
        raise SystemExit(code)


def train_stage(
    name: str,
    cfg: PipelineConfig,
    paths: dict[str, str],
    *,
    build: Callable[[], object],
    init: Callable[[object], None] | None = None,
    inputs: dict[str, str] | None = None,
) -> None:
    """A training stage's shell around `run_training`: MLflow run, curve CSV, training-metrics gate, exports logged,
    metrics JSON. `paths` holds the stage's CLI paths (`curated`, `checkpoints`, `out`, `metrics`, `curve`).
    Distillation reuses it with its own module; every logged column ending in `loss` is gated finite."""
    import pandas as pd

    from components import gates
    from components.cli import STAGES
    from components.stage import stage_run
    from components.training.run import run_training

    out = Path(paths["out"])
    with stage_run(
        name, cfg, sections=STAGES[name].sections, config_out=out / "config.yaml", metrics_out=Path(paths["metrics"])
    ) as run:
        if run.tracker.run_id is not None:
            _log_curated(run, paths["curated"])
        training = run_training(
            cfg, build_module=build, curated=paths["curated"], checkpoints=paths["checkpoints"], out=out,
            log_metrics=lambda row, step: run.log_metrics(row, step=step), init_module=init, inputs=inputs,
            desc=name,
        )  # fmt: skip
        if training.rank != 0:
            return
        result, derived = training.result, training.derived
        log.info("derived values: %s", derived)
        history = pd.DataFrame(result.history)  # the whole run's rows, those before a resume included
        _write_csv(history, Path(paths["curve"]))
        losses = [c for c in history.columns if c.endswith("loss")]
        run.gate("training_metrics", history, gates.training_metrics_suite(losses), out / "gates", id_column="step")
        _log_exports(run, out, Path(paths["curve"]))
        final = history.iloc[-1]
        run.record({
            "iterations": result.state.step,
            "final": {k: float(final[k]) for k in losses},
            "skipped_steps": result.state.skipped_steps,
            "decode_failures": result.state.decode_failures,
            "images_per_s": float(history["images_per_s"].median()),
            "derived": {k: v for k, v in derived.items() if k != "fingerprint"},
            "fingerprint": derived["fingerprint"],
            "resumed_from": str(training.resumed_from) if training.resumed_from else None,
            "checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
        })  # fmt: skip
        run.set_headline("loss", float(final["loss"]))


def _log_curated(run: StageRun, curated: str) -> None:
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


def _write_csv(frame: object, path: Path) -> None:
    with storage.atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _log_exports(run: object, out: Path, curve: Path) -> None:
    run.log_artifact(curve, artifact_path="plots")
    for f in ("model.json", "heads.pth", "backbone.safetensors"):
        p = out / f
        if p.is_file() and (f == "model.json" or p.stat().st_size <= MAX_LOGGED_EXPORT_BYTES):
            run.log_artifact(p, artifact_path="model")
