"""Stage `report`: comparison table, figures, quality gate and MLflow Model Registry entry.

Run: `python -m components report --evals metrics/eval --pretrained models/pretrain --distilled models/distill
--out reports/comparison --metrics metrics/report.json` (what dvc.yaml runs; params.yaml's `report` section).

Outputs under --out (reports/comparison/; the Prefect flow's reports/pipeline_summary.json lives outside it):
```
table.md, table.html     headline metric per task and model (best in bold), then every metric of every task
figures/*.png            PCA of patch features as RGB, retrieval neighbours, segmentation and depth beside the
                         ground truth, robustness by severity, kNN accuracy against k
quality_gate.json        the candidate, the gate's rows and verdict
registry.json            the registered model version and whether the alias moved (or why nothing was registered)
model_card.json          the registered candidate: its evaluated models entry, headline metrics and the gate's verdict
gates/                   the quality gate's Great Expectations result and Data Docs
config.yaml              the resolved config
```
Everything is also logged to the stage's MLflow run. Each candidate backbone (a model whose role is in
`report.candidate_roles`) is logged as an MLflow model of the run: a pyfunc that takes images and returns the CLS and
mean-patch features, its preset's preprocessing and the official-layout weights included (components/serving.py).
The best candidate that passes the quality gate (by `report.gate_metric`; when none passes, the best) becomes a new
version of `report.registered_model`; the alias `champion` moves to it when the gate passes, so
`mlflow.pyfunc.load_model("models:/dinov2-backbone@champion")` and `mlflow models serve -m
models:/dinov2-backbone@champion` give the latest backbone that passed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from components.config import PipelineConfig, ReportConfig
from components.evaluation.metrics import headline_pairs, mlflow_key
from components.evaluation.outputs import clear_output, write_json
from components.evaluation.report import (
    headline_table,
    load_evaluation,
    metric_value,
    quality_gate_frame,
    rank_candidates,
    reference_notes,
    render_figures,
    task_tables,
    write_tables,
)
from components.log import get_logger
from components.stages.shell import StageRun, stage_run

log = get_logger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """The evaluate stage's results as the report reads them: the long metrics frame, the evaluated models, and the
    candidates (models whose role may be registered), best first by the gate metric."""

    frame: pd.DataFrame
    models: list[dict[str, Any]]
    ranked: list[str]

    @property
    def candidate(self) -> str | None:
        return self.ranked[0] if self.ranked else None

    def spec(self, name: str | None) -> dict[str, Any]:
        """A model's entry of models.json ({} for None or an unknown name)."""
        return next((m for m in self.models if m["name"] == name), {})

    def headline(self, name: str | None) -> dict[str, float]:
        """{"<task>.<headline metric>": value} of a model, over the tasks it was evaluated on."""
        if name is None:
            return {}
        values = {f"{t}.{m}": metric_value(self.frame, name, f"{t}.{m}") for t, m in headline_pairs(self.frame["task"])}
        return {k: v for k, v in values.items() if math.isfinite(v)}


def run_report(
    cfg: PipelineConfig, *, evals: str, pretrained: str | None, distilled: str, out: str, metrics: str
) -> None:
    """Builds the report from the evaluate stage's outputs, gates the best candidate, logs the candidates as MLflow
    models and registers the best.

    `pretrained` (default: `pipeline.pretrained_model`, the model the pipeline goes on with) and `distilled` are the
    folders the candidates' weights came from (dvc.yaml deps of this stage); the weights to log are found through
    metrics/eval/models.json, whose roles mark the candidates (the pretrain export evaluated beside a later final model
    is `intermediate`, not a candidate).
    """
    log.info("candidates from %s and %s", pretrained or cfg.pipeline.pretrained_model, distilled)
    rc = cfg.report
    out_dir = Path(out)
    clear_output(out_dir, markers=("table.md", "quality_gate.json", "config.yaml"))
    with stage_run("report", cfg, config_out=out_dir / "config.yaml", metrics_out=Path(metrics)) as run:
        frame, models = load_evaluation(evals)
        ranked = rank_candidates(frame, models, rc.gate_metric, rc.candidate_roles)
        ev = Evaluation(frame, models, passing_first(frame, models, ranked, rc))
        order = [*ev.ranked, *(m["name"] for m in models if m["name"] not in ev.ranked)]
        figures = render_figures(Path(evals), models, out_dir / "figures") if rc.figures else []
        gate_info, failure = _quality_gate(run, ev, rc, out_dir)
        tables = task_tables(frame, order)
        notes = reference_notes(evals, models, list(tables))
        write_tables(out_dir, headline_table(frame, models, order), tables, gate_info, notes)
        write_json(out_dir / "quality_gate.json", gate_info)
        logged = _log_candidates(run, ev)
        registry = _register(run, ev, logged, gate_info, rc, out_dir)
        write_json(out_dir / "registry.json", registry)
        for name in ("table.md", "table.html", "quality_gate.json", "registry.json", "model_card.json"):
            run.log_artifact(out_dir / name, artifact_path="report")
        if figures:
            run.log_artifact(out_dir / "figures", artifact_path="report/figures")
        final = ev.spec(ev.candidate)
        run.record({
            "candidate": ev.candidate,
            "gate_passed": gate_info["passed"],
            "registered_version": registry.get("version"),
            "alias_moved": registry.get("alias_moved", False),
            "num_models": len(models),
            "num_logged_models": len(logged),
            "num_figures": len(figures),
            # What the pipeline's parent run and the Prefect flow show of this run (flows/pipeline.py).
            "final_model": {"name": ev.candidate, "arch": final.get("arch"), "role": final.get("role"),
                            "metrics": ev.headline(ev.candidate)},
            "gate": {"passed": gate_info["passed"], "metric": rc.gate_metric, "min": rc.gate_min,
                     "baseline": rc.baseline_model if rc.require_beats_baseline else None,
                     "rows": _finite_or_none(gate_info.get("rows", [])), "reason": gate_info.get("reason")},
        })  # fmt: skip
        value = metric_value(frame, ev.candidate, rc.gate_metric) if ev.candidate else math.nan
        if math.isfinite(value):
            run.set_headline(rc.gate_metric, value)
        if failure is not None and rc.fail_on_gate:
            raise failure


def _gate_baseline(models: Sequence[Mapping[str, Any]], rc: ReportConfig) -> str | None:
    """The model the gate compares against, when it was evaluated."""
    baseline = rc.baseline_model if rc.require_beats_baseline else None
    if baseline is not None and not any(m["name"] == baseline for m in models):
        log.warning("baseline %r was not evaluated; the gate cannot compare against it", baseline)
        return None
    return baseline


def passing_first(
    frame: pd.DataFrame, models: Sequence[Mapping[str, Any]], ranked: Sequence[str], rc: ReportConfig
) -> list[str]:
    """The candidates, those the quality gate would pass first (each group by the gate metric, best first): the
    registry's champion is the best model that passes, not the best by one metric that fails another."""
    baseline = _gate_baseline(models, rc)

    def passes(name: str) -> bool:
        rows = quality_gate_frame(frame, name, gate_metric=rc.gate_metric, gate_min=rc.gate_min, baseline=baseline)
        return bool(((rows["value"] >= rows["lower"]) & (rows["value"] <= rows["upper"])).all())

    verdicts = {name: passes(name) for name in ranked}
    return [n for n in ranked if verdicts[n]] + [n for n in ranked if not verdicts[n]]


def _quality_gate(
    run: StageRun, ev: Evaluation, rc: ReportConfig, out_dir: Path
) -> tuple[dict[str, Any], Exception | None]:
    """The gate's verdict on the candidate (`quality_gate.json`: the best that passes, else the best) and its failure,
    if it failed."""
    from components import gates

    candidate = ev.candidate
    gate_info: dict[str, Any] = {"candidate": candidate, "gate_metric": rc.gate_metric, "passed": False}
    if candidate is None:
        gate_info["reason"] = f"no evaluated model has a role in {list(rc.candidate_roles)} and {rc.gate_metric}"
        log.warning("quality gate: %s", gate_info["reason"])
        return gate_info, None
    baseline = _gate_baseline(ev.models, rc)
    gate_df = quality_gate_frame(
        ev.frame, candidate, gate_metric=rc.gate_metric, gate_min=rc.gate_min, baseline=baseline
    )
    gate_info["rows"] = gate_df.to_dict(orient="records")
    try:
        run.gate("quality", gate_df, gates.evaluation_metrics_suite(), out_dir / "gates",
                 id_column=list(gates.EVAL_ID_COLUMNS))  # fmt: skip
    except gates.GateFailed as err:
        gate_info["report"] = str(err)
        return gate_info, err
    gate_info["passed"] = True
    return gate_info, None


def _finite_or_none(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The gate's rows with open bounds (infinities) as None: the metrics file stays strict JSON."""
    return [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]


def _log_candidates(run: StageRun, ev: Evaluation) -> dict[str, str]:
    """Logs each candidate with an export as an MLflow model of the run; returns {name: model URI}."""
    from components.exports import read_export
    from components.serving import servable_model

    logged: dict[str, str] = {}
    for name in ev.ranked:
        descriptor = ev.spec(name).get("descriptor")
        if run.tracker.run_id is None or not descriptor or not Path(descriptor).is_file():
            continue
        export = read_export(descriptor)
        tags = {"arch": export.arch, "role": export.role, "export": export.folder, "export_digest": export.digest()}
        tags.update({mlflow_key(k): v for k, v in ev.headline(name).items()})
        with servable_model(export) as model, run.timed_tracking():
            uri = run.tracker.log_model(name, model, tags=tags)
        if uri is not None:
            logged[name] = uri
            log.info("logged %s (%s) as MLflow model %s", name, export.arch, uri)
    return logged


def _register(
    run: StageRun, ev: Evaluation, logged: Mapping[str, str], gate_info: Mapping[str, Any], rc: ReportConfig,
    out_dir: Path,
) -> dict[str, Any]:  # fmt: skip
    """Registers the best candidate's MLflow model and moves the alias if the gate passed (`registry.json`)."""
    candidate, spec, metrics = ev.candidate, ev.spec(ev.candidate), ev.headline(ev.candidate)
    write_json(out_dir / "model_card.json", {"model": spec or None, "metrics": metrics, "gate": gate_info["passed"]})
    if not spec:
        return {"registered": False, "reason": "no candidate"}
    if run.tracker.run_id is None:
        return {"registered": False, "reason": "tracking is off"}
    if candidate not in logged:
        return {"registered": False, "reason": f"no export to log for {candidate}: {spec.get('descriptor')}"}
    tags = {"arch": spec["arch"], "role": spec["role"], "gate_passed": gate_info["passed"]}
    tags.update({mlflow_key(k): v for k, v in metrics.items()})
    value = metric_value(ev.frame, candidate, rc.gate_metric)
    with run.timed_tracking():
        registry = run.tracker.register_model(
            rc.registered_model, logged[candidate], tags=tags, alias=rc.champion_alias,
            description=f"{candidate} ({spec['arch']}), {rc.gate_metric} = {value:.4f}",
            move_alias=bool(gate_info["passed"]),
        )  # fmt: skip
    log.info(
        "registered %s as %s version %s; alias %r %s", candidate, rc.registered_model, registry["version"],
        rc.champion_alias, "moved" if registry["alias_moved"] else "kept (gate failed)",
    )  # fmt: skip
    return {"registered": True, **registry}
