"""The shell every stage runs in: one MLflow run, timed phases, gates, the stage's metrics file.

It sits beside the stages it serves (`components/stages/`), under them only the components they share.

A `run_<stage>` wrapper opens `stage_run(...)`, does its file I/O and calls its pure core; everything a stage has in
common (nesting under the pipeline's parent run, logging the sections it reads and the resolved config, timing the
stage's own compute apart from tracking and gates, writing `metrics/<stage>.json`) lives here, once.

Timing: `compute_s` is the stage process's wall time (from process start, so interpreter start-up and imports
count as the stage's own) minus the time spent in gates (`gates_s`) and in tracking calls (`tracking_s`); the flow
compares the sum of `compute_s` with its own wall time to report orchestration overhead.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from components.config import PipelineConfig, flatten, save_resolved
from components.jsonio import write_json
from components.log import get_logger, is_main_process
from components.stages.specs import sections_of
from components.tracking import FLOW_RUN_ENV, PARENT_RUN_ENV, DatasetRecord, Tracker, start_run

log = get_logger(__name__)


@dataclass
class StageRun:
    """Handle a stage uses to log, gate and report its headline metric."""

    name: str
    cfg: PipelineConfig
    tracker: Tracker
    gates_s: float = 0.0
    tracking_s: float = 0.0
    headline: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            setattr(self, phase, getattr(self, phase) + time.monotonic() - start)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Logs step metrics to MLflow (non-finite values are logged too: MLflow stores NaN)."""
        with self._timed("tracking_s"):
            self.tracker.log_metrics(metrics, step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        with self._timed("tracking_s"):
            self.tracker.log_params(params)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        with self._timed("tracking_s"):
            self.tracker.log_artifact(path, artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        with self._timed("tracking_s"):
            self.tracker.set_tags(tags)

    def timed_tracking(self) -> Any:
        """A block whose time counts as tracking (for the tracker's heavier calls: `log_model`, `register_model`)."""
        return self._timed("tracking_s")

    def log_dataset(self, dataset: DatasetRecord) -> None:
        """Records a dataset the stage read (MLflow's dataset lineage)."""
        with self._timed("tracking_s"):
            self.tracker.log_dataset(dataset)

    def gate(self, name: str, df: Any, expectations: Sequence[Any], out_dir: Path, **kwargs: Any) -> Any:
        """Runs a Great Expectations gate; a failure raises `GateFailed` after its report is saved and logged."""
        from components import gates

        try:
            with self._timed("gates_s"):
                result = gates.run_gate(name, df, list(expectations), out_dir, **kwargs)
        except gates.GateFailed as err:
            self.log_artifact(out_dir, artifact_path="gates")
            self.set_tags({f"gate.{name}": "failed"})
            log.error("gate %s failed:\n%s", name, err)
            raise
        self.log_artifact(out_dir, artifact_path="gates")
        self.set_tags({f"gate.{name}": "passed"})
        return result

    def set_headline(self, name: str, value: float) -> None:
        """The one number the pipeline summary shows for this stage."""
        self.headline = {"name": name, "value": value}

    def record(self, metrics: Mapping[str, Any]) -> None:
        """Adds final metrics to the stage's metrics file and to MLflow (numbers only)."""
        self.summary.update(metrics)
        numbers = {k: float(v) for k, v in _flat_numbers(metrics).items()}
        if numbers:
            self.log_metrics(numbers)


def _flat_numbers(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
        elif isinstance(value, int | float) and math.isfinite(value):
            out[f"{prefix}{key}"] = value
    return out


def _section(tree: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _process_age_s() -> float:
    return max(0.0, time.time() - psutil.Process().create_time())


@contextmanager
def stage_run(
    name: str,
    cfg: PipelineConfig,
    *,
    config_out: Path,
    metrics_out: Path | None,
) -> Iterator[StageRun]:
    """Runs a stage inside its MLflow run and writes its metrics file when it succeeds.

    Args:
        name: Stage name as in dvc.yaml.
        cfg: The validated config.
        config_out: Where the resolved config is saved (inside the stage's outputs).
        metrics_out: The stage's metrics JSON (dvc.yaml `metrics`), or None.
    """
    dumped = cfg.model_dump(mode="json")
    params = flatten({s: _section(dumped, s) for s in sections_of(name)})  # the sections the stage reads
    with start_run(
        name,
        cfg.tracking.experiment,
        parent_run_id=os.environ.get(PARENT_RUN_ENV) or None,
        tags={"stage": name, "prefect_flow_run_id": os.environ.get(FLOW_RUN_ENV)},
    ) as tracker:
        run = StageRun(name=name, cfg=cfg, tracker=tracker)
        with run._timed("tracking_s"):
            tracker.log_params(params)
            if is_main_process():
                tracker.log_artifact(save_resolved(cfg, config_out), artifact_path="config")
        yield run
        if not is_main_process():  # rank 0 alone writes the metrics file, as it alone logs
            return
        process_s = _process_age_s()
        timing = {
            "process_s": round(process_s, 3),
            "gates_s": round(run.gates_s, 3),
            "tracking_s": round(run.tracking_s, 3),
        }
        timing["compute_s"] = round(max(0.0, process_s - run.gates_s - run.tracking_s), 3)
        report = {
            "stage": name,
            "headline": run.headline,
            **run.summary,
            "timing": timing,
            "mlflow_run_id": tracker.run_id,
        }
        if metrics_out is not None:
            tracker.log_artifact(write_json(metrics_out, report), artifact_path="metrics")
        tracker.log_metrics({f"timing.{k}": v for k, v in timing.items()})
        log.info("stage %s done: %s", name, json.dumps(timing))
