"""Prefect flows over the DVC pipeline: one task per dvc.yaml stage, in dvc.yaml's order.

Run the whole pipeline:     python -m flows.pipeline            (what `make demo` runs)
One stage (and what it needs): python -m flows.pipeline --stage evaluate
From the Prefect UI:        the deployments in prefect.yaml (`prefect deploy --all`, then "Run" on a deployment).

Each task runs `dvc repro --single-item <stage>` through DVC's Python API, so DVC alone decides whether a stage is
stale and records what ran in dvc.lock; a second run of an unchanged pipeline skips every stage. The flow opens one
MLflow parent run, hands its id to the stage processes through the environment (each stage opens a nested run), and
tags each stage's run with the DVC hashes of its inputs and outputs once the stage is locked. Parameter overrides from
the UI are validated first, then written to params.yaml as `dvc exp run -S` would, so dvc.lock records them.

When the stages are done (or one failed), the parent run gets the parameters that tell pipeline runs apart and the
final model's headline metrics (components/pipeline_record.py), and the flow run publishes Prefect artifacts: the
stage summary (`pipeline-stages`), the evaluation comparison (`evaluation-comparison`), the quality gate's verdict
(`quality-gate`) and, with an MLflow server, a link to the parent run (`mlflow-parent-run`).

A Prefect server that goes away mid-flow does not stop the stages. Prefect 3.9 orchestrates task runs on the client:
their states travel as events through a websocket, which are dropped (with an error line) while the server is away,
and the task goes on; the stages themselves are `dvc repro` subprocesses that never talk to Prefect, and MLflow's
records are queued (components/tracking_queue.py). What does call the API is the flow run's own state, at its start
and end, and the artifacts above: Prefect's client retries a refused connection `PREFECT_CLIENT_MAX_RETRIES` times
with pauses of 2, 4, 8, ... s (5 by default: about a minute), after which the flow run crashes although every stage
completed. `python -m flows.pipeline` and the deployments (prefect.yaml) raise it to `FLOW_CLIENT_RETRIES` (about 17
minutes of outage), and artifacts that still cannot be published are skipped with a warning (the summary is in
`reports/pipeline_summary.json` and MLflow).
"""

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import chdir, contextmanager
from pathlib import Path
from typing import Any, Literal

import psutil
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from components import pipeline_record
from components.cli import EXIT_REASONS, STAGES
from components.config import (
    DEFAULT_PARAMS,
    Arch,
    ConfigError,
    PipelineConfig,
    load_config,
    parse_override,
    read_recipe,
)
from components.jsonio import write_json
from components.tracking import FLOW_RUN_ENV, PARENT_RUN_ENV, Tracker, dvc_lock_hashes, existing_run, start_run

SUMMARY_PATH = Path("reports/pipeline_summary.json")
StageName = Literal[tuple(STAGES)]  # a drop-down of dvc.yaml's stages in the Prefect UI's run form
NETWORK_STAGES = frozenset({"prepare", "embed", "report"})
"""Stages that may read S3 or talk to a registry: retried, unless their command exited with a named code."""


class StageFailedError(RuntimeError):
    """A stage's command failed: the message names the stage, its exit code and, for a named code, what it means
    (`components.cli.EXIT_REASONS`)."""

    def __init__(self, stage: str, exit_code: int) -> None:
        reason = f": {EXIT_REASONS[exit_code]}" if exit_code in EXIT_REASONS else ""
        super().__init__(f"stage {stage} failed (exit code {exit_code}{reason})")
        self.stage, self.exit_code = stage, exit_code

    def __reduce__(self) -> tuple[Any, ...]:  # pickled with its fields (Prefect may persist a failed task's result)
        return type(self), (self.stage, self.exit_code)


def _exit_code(err: BaseException) -> int | None:
    """The exit code of the stage command behind a DVC error (the first one named along its causes)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        match = re.search(r"exited with (-?\d+)", str(current))
        if match:
            return int(match.group(1))
        current = current.__cause__ or current.__context__
    return None


FLOW_CLIENT_RETRIES = 9
"""Tries of the flow's Prefect API calls after the first (pauses of 2, 4, ..., 512 s: about 17 minutes in all), so that
a Prefect server restart does not crash a flow whose stages went on without it."""


def _python_on_path() -> None:
    """Puts this interpreter's folder first on PATH: dvc.yaml's commands say `python -m components`, and the stage
    processes must run in the environment the flow runs in (a virtualenv that may not be activated)."""
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = f"{bindir}{os.pathsep}{path}"


def stage_order(root: Path) -> list[str]:
    """Stage names in dvc.yaml's order."""
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def _target(root: Path, stage: str) -> str:
    """A DVC target that names the stage in this checkout's dvc.yaml, whatever the working directory."""
    return f"{root / 'dvc.yaml'}:{stage}"


def upstream_of(root: Path, stage: str) -> list[str]:
    """`stage` and the stages it depends on, in pipeline order (DVC's graph decides)."""
    from dvc.repo import Repo

    with chdir(root), Repo(str(root)) as repo:
        (target,) = repo.stage.collect(_target(root, stage))
        graph = repo.index.graph
        import networkx as nx

        needed = {s.name for s in nx.dfs_postorder_nodes(graph, target)}
    return [s for s in stage_order(root) if s in needed]


def _write_overrides(params_path: Path, overrides: dict[str, Any]) -> None:
    """Sets dotted keys in params.yaml, keeping its comments (as `dvc exp run -S` does)."""
    from ruamel.yaml import YAML

    ry = YAML()
    ry.preserve_quotes = True
    doc = ry.load(params_path.read_text())
    for dotted, value in overrides.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    with params_path.open("w") as fh:
        ry.dump(doc, fh)


def collect_overrides(
    arch: str | None,
    epochs: int | None,
    epoch_length: int | None,
    raw: str | None,
    extra_pool: list[str] | None,
    overrides: dict[str, Any] | None,
) -> dict[str, Any]:
    """The flow's typed parameters as dotted params.yaml keys (the free-form `overrides` win)."""
    typed = {
        "model.arch": arch,
        "optim.epochs": epochs,
        "optim.epoch_length": epoch_length,
        "data.raw": raw,
        "data.extra_pool": extra_pool,
    }
    merged = {k: v for k, v in typed.items() if v is not None}
    merged.update(overrides or {})
    return merged


def _retry_unless_named(task: Any, task_run: Any, state: Any) -> bool:
    """Retries a network stage unless its command exited with a named code (bad configuration or input, a failed
    gate, a named fault): those fail the same way again."""
    try:
        state.result()
    except StageFailedError as err:
        return err.exit_code not in EXIT_REASONS
    except Exception:  # noqa: BLE001 - anything else (a lost connection) may pass on a second try
        return True
    return False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@task(task_run_name="{stage}", retry_delay_seconds=10)
def run_stage(stage: str, root: str) -> dict[str, Any]:
    """Reproduces one stage through DVC and returns its outcome for the pipeline summary."""
    from dvc.repo import Repo

    logger = get_run_logger()
    start = time.monotonic()
    metrics_path = pipeline_record.stage_metrics_path(Path(root), stage)
    # DVC resolves paths (its run cache included) against the working directory, so it must be the checkout
    with chdir(root), Repo(root) as repo:
        try:
            ran = repo.reproduce(_target(Path(root), stage), single_item=True)
        except Exception as err:
            code = _exit_code(err)
            if code is None:
                raise
            raise StageFailedError(stage, code) from err
    duration = time.monotonic() - start
    status = "completed" if ran else "skipped"
    report = _read_json(metrics_path)
    if ran:
        with existing_run(report.get("mlflow_run_id"), Path(root)) as stage_tracker:
            stage_tracker.set_tags(dvc_lock_hashes(stage, Path(root) / "dvc.lock"))
    logger.info("stage %s %s in %.1f s", stage, status, duration)
    return {
        "stage": stage,
        "status": status,
        "duration_s": round(duration, 2),
        "compute_s": report.get("timing", {}).get("compute_s", 0.0) if ran else 0.0,
        "headline": report.get("headline") or {},
    }


@contextmanager
def _parent_run(root: Path, experiment: str, name: str, params: dict[str, Any]) -> Iterator[Tracker]:
    """The pipeline's MLflow parent run; its id reaches the stage processes through the environment."""
    flow_run_id = flow_run.get_id()
    tags = {"kind": "pipeline", "prefect_flow_run_id": flow_run_id}
    with start_run(name, experiment, tags=tags, root=root) as tracker:
        tracker.log_params({f"override.{key}": value for key, value in params.items()})
        saved = {k: os.environ.get(k) for k in (PARENT_RUN_ENV, FLOW_RUN_ENV)}
        os.environ[PARENT_RUN_ENV] = tracker.run_id or ""
        os.environ[FLOW_RUN_ENV] = str(flow_run_id or "")
        try:
            yield tracker
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _not_done(status: str) -> dict[str, Any]:
    return {"status": status, "duration_s": 0.0, "compute_s": 0.0, "headline": {}}


def _summarize(
    outcomes: list[dict[str, Any]], stages: list[str], parent_run_id: str | None, failed: str | None = None
) -> dict[str, Any]:
    wall = time.time() - psutil.Process().create_time()
    compute = sum(o["compute_s"] for o in outcomes)
    by_stage = {o["stage"]: o for o in outcomes}
    return {
        "stages": {s: by_stage.get(s, _not_done("failed" if s == failed else "not run")) for s in stages},
        "mlflow_parent_run_id": parent_run_id,
        "pipeline_wall_s": round(wall, 2),
        "stages_compute_s": round(compute, 2),
        "orchestration_overhead_s": round(wall - compute, 2),
        "orchestration_overhead_pct": round(100.0 * (wall - compute) / wall, 1) if wall else 0.0,
    }


def _flow_run_name() -> str:
    """Names a run after what it runs: `<stage or pipeline>-<arch>-<epochs>ep`, from the parameters or params.yaml."""
    params = flow_run.get_parameters()
    stage = params.get("stage") or (flow_run.get_flow_name() or "pipeline").removeprefix("dinov2-")
    arch, epochs = params.get("arch"), params.get("epochs")
    if arch is None or epochs is None:
        try:
            cfg = load_config(Path(params.get("workdir") or ".") / DEFAULT_PARAMS)
            arch, epochs = arch or cfg.model.arch, epochs or cfg.optim.epochs
        except ConfigError:
            pass
    return "-".join(str(p) for p in (stage, arch, f"{epochs}ep" if epochs else None) if p)


@flow(name="dinov2-pipeline", flow_run_name=_flow_run_name, log_prints=True)
def pipeline(
    stage: StageName | None = None,
    arch: Arch | None = None,
    epochs: int | None = None,
    epoch_length: int | None = None,
    raw: str | None = None,
    extra_pool: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    workdir: str = ".",
) -> dict[str, Any]:
    """The DINOv2 pipeline: synth, prepare, embed, curate, pretrain, distill, evaluate, report.

    Args:
        stage: Run only this stage and the stages it depends on (each skipped by DVC when up to date); None runs all.
        arch: Backbone preset to pretrain (params `model.arch`), e.g. vit_small, vit_large, vit_giant2.
        epochs: Pretraining length in epochs (params `optim.epochs`).
        epoch_length: Iterations per epoch (params `optim.epoch_length`).
        raw: Root of the raw image layout, a folder or s3://bucket/prefix (params `data.raw`).
        extra_pool: More pool sources: folders, s3:// prefixes, .tar shards (params `data.extra_pool`).
        overrides: Any other params.yaml keys as dotted names, e.g. {"train.batch_size_per_gpu": 64}.
        workdir: The project checkout holding dvc.yaml and params.yaml.
    """
    root = Path(workdir).resolve()
    params_path = root / DEFAULT_PARAMS
    changes = collect_overrides(arch, epochs, epoch_length, raw, extra_pool, overrides)
    cfg = load_config(params_path, overrides=changes)  # fails here, before any stage, on a bad key or value
    if changes:
        _write_overrides(params_path, changes)
    _python_on_path()
    order = stage_order(root)
    if stage is not None and stage not in order:
        raise ConfigError(f"stage {stage!r} is not in dvc.yaml (stages: {', '.join(order)})")
    # The whole pipeline is what its last stage needs (DVC's graph: pretrain_highres only when
    # pipeline.pretrained_model names its export).
    stages = upstream_of(root, stage or order[-1])
    outcomes: list[dict[str, Any]] = []
    with _parent_run(root, cfg.tracking.experiment, _flow_run_name(), changes) as parent:
        try:
            for name in stages:
                options = {"retries": 2} if name in NETWORK_STAGES else {}
                runner = run_stage.with_options(retry_condition_fn=_retry_unless_named, **options)
                outcomes.append(runner(name, str(root)))
        except BaseException:  # a failed run is summarised too: which stage failed, what ran before it
            _finish(root, cfg, parent, outcomes, stages, failed=stages[len(outcomes)])
            raise
        return _finish(root, cfg, parent, outcomes, stages)


def _finish(
    root: Path,
    cfg: PipelineConfig,
    parent: Tracker,
    outcomes: list[dict[str, Any]],
    stages: list[str],
    failed: str | None = None,
) -> dict[str, Any]:
    """Writes the pipeline summary, logs the parent run's comparison columns and publishes the Prefect artifacts."""
    summary = _summarize(outcomes, stages, parent.run_id, failed)
    write_json(root / SUMMARY_PATH, summary)
    # The reports of the stages this run ran or found up to date: a failed or partial run shows no older results.
    _record(parent, cfg, summary, pipeline_record.read_stage_metrics(root, [o["stage"] for o in outcomes]))
    return summary


def _record(parent: Tracker, cfg: PipelineConfig, summary: dict[str, Any], reports: dict[str, Any]) -> None:
    """The parent run's comparison columns, and the flow run's Prefect artifacts (see the module docstring)."""
    parent.log_params(pipeline_record.comparison_params(cfg, reports))
    parent.log_metrics(pipeline_record.comparison_metrics(reports))
    if "report" in reports:
        parent.set_tags({"quality_gate": "passed" if reports["report"].get("gate_passed") else "failed"})
    link = parent.url()
    try:
        _publish(summary, reports, link, parent.run_id)
    except Exception as err:  # noqa: BLE001 - the results are in the summary file and MLflow already
        get_run_logger().warning(
            "Prefect artifacts not published (%s); the run's summary is in %s and in MLflow", err, SUMMARY_PATH
        )


def _publish(summary: dict[str, Any], reports: dict[str, Any], link: str | None, parent_run_id: str | None) -> None:
    """The flow run's Prefect artifacts: the stage table, the evaluation comparison, the gate, the MLflow link."""
    where = f" MLflow parent run: {link}" if link else f" MLflow parent run {parent_run_id}." if parent_run_id else ""
    create_table_artifact(
        pipeline_record.stage_rows(summary), key="pipeline-stages",
        description=f"Each stage: status, duration, headline metric.{where}",
    )  # fmt: skip
    if "evaluate" in reports:
        create_table_artifact(
            pipeline_record.evaluation_rows(reports), key="evaluation-comparison",
            description=f"Headline metric of every task, one row per evaluated model.{where}",
        )  # fmt: skip
    create_markdown_artifact(
        pipeline_record.gate_markdown(reports, link),
        key="quality-gate",
        description=f"The report stage's verdict.{where}",
    )
    if link:
        create_link_artifact(
            link,
            link_text="MLflow parent run",
            key="mlflow-parent-run",
            description="This pipeline run in MLflow: its stages' runs, params, metrics and models.",
        )


def stage_flow(stage: str) -> Any:
    """A flow that runs one stage (and its stale upstream), for a deployment per stage."""

    @flow(name=f"dinov2-{stage}", flow_run_name=_flow_run_name, log_prints=True)
    def one_stage(
        arch: Arch | None = None,
        epochs: int | None = None,
        overrides: dict[str, Any] | None = None,
        workdir: str = ".",
    ) -> dict[str, Any]:
        return pipeline.fn(stage=stage, arch=arch, epochs=epochs, overrides=overrides, workdir=workdir)

    one_stage.__doc__ = f"Runs the `{stage}` stage of the DINOv2 pipeline (DVC skips it when up to date)."
    return one_stage


synth_flow = stage_flow("synth")
prepare_flow = stage_flow("prepare")
embed_flow = stage_flow("embed")
curate_flow = stage_flow("curate")
pretrain_flow = stage_flow("pretrain")
pretrain_highres_flow = stage_flow("pretrain_highres")
distill_flow = stage_flow("distill")
evaluate_flow = stage_flow("evaluate")
report_flow = stage_flow("report")


def format_summary(summary: dict[str, Any], root: Path) -> str:
    """The table `make demo` prints at the end, and the commands to open the UIs."""
    lines = [f"{'stage':<10} {'status':<10} {'duration':>9}  headline metric", "-" * 60]
    for name, s in summary["stages"].items():
        head = s.get("headline") or {}
        metric = f"{head['name']} = {head['value']:.4g}" if head.get("name") else ""
        lines.append(f"{name:<10} {s['status']:<10} {s['duration_s']:>8.1f}s  {metric}")
    lines += [
        "-" * 60,
        f"pipeline {summary['pipeline_wall_s']:.1f} s, stages' own compute {summary['stages_compute_s']:.1f} s, "
        f"orchestration overhead {summary['orchestration_overhead_s']:.1f} s "
        f"({summary['orchestration_overhead_pct']:.1f}%)",
        f"MLflow parent run: {summary['mlflow_parent_run_id']}",
        f"summary written to {SUMMARY_PATH}",
        "",
        "Open the results:",
        f"  MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'} --port 5000",
        "              then http://127.0.0.1:5000",
        "  Prefect UI: .venv/bin/prefect server start   then http://127.0.0.1:4200",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--stage", help="run only this stage (and what it needs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params.yaml override")
    parser.add_argument("--recipe", help="a YAML file of params.yaml overrides (infra/recipes/), before --set")
    parser.add_argument("--workdir", default=".", help="project checkout (default: .)")
    args = parser.parse_args(argv)
    try:
        overrides = read_recipe(args.recipe) if args.recipe else {}
        overrides.update(parse_override(item) for item in args.set)
        load_config(Path(args.workdir) / DEFAULT_PARAMS, overrides=overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with patient_prefect_client():
        summary = pipeline(stage=args.stage, overrides=overrides or None, workdir=args.workdir)
    print(format_summary(summary, Path(args.workdir).resolve()))
    return 0


@contextmanager
def patient_prefect_client() -> Iterator[None]:
    """Prefect's client retries for `FLOW_CLIENT_RETRIES` unless PREFECT_CLIENT_MAX_RETRIES is set (see the module
    docstring); prefect.yaml sets the same for the deployments' flow runs."""
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    if "PREFECT_CLIENT_MAX_RETRIES" in os.environ:
        yield
        return
    with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: FLOW_CLIENT_RETRIES}):
        yield


if __name__ == "__main__":
    sys.exit(main())
