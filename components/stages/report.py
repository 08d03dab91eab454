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
gates/                   the quality gate's Great Expectations result and Data Docs
config.yaml              the resolved config
```
Everything is also logged to the stage's MLflow run; the best candidate's backbone (model.json + weights) is logged
as the run's `model` artifact and registered from there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from components.config import PipelineConfig
from components.evaluation.metrics import mlflow_key
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
from components.stage import stage_run

log = get_logger(__name__)


def run_report(
    cfg: PipelineConfig, *, evals: str, pretrained: str | None, distilled: str, out: str, metrics: str
) -> None:
    """Builds the report from the evaluate stage's outputs, gates the best candidate and registers it.

    `pretrained` (default: `pipeline.pretrained_model`, the model the pipeline goes on with) and `distilled` are the
    folders the candidates' weights came from (dvc.yaml deps of this stage); the weights to register are found
    through metrics/eval/models.json, whose roles mark the candidates (the pretrain export evaluated beside a later
    final model is `intermediate`, not a candidate).
    """
    from components import gates
    from components.tracking import register_model

    log.info("candidates from %s and %s", pretrained or cfg.pipeline.pretrained_model, distilled)
    rc = cfg.report
    out_dir = Path(out)
    clear_output(out_dir, markers=("table.md", "quality_gate.json", "config.yaml"))
    with stage_run("report", cfg, config_out=out_dir / "config.yaml", metrics_out=Path(metrics)) as run:
        frame, models = load_evaluation(evals)
        ranked = rank_candidates(frame, models, rc.gate_metric, rc.candidate_roles)
        candidate = ranked[0] if ranked else None
        names = {m["name"] for m in models}
        baseline = rc.baseline_model if rc.require_beats_baseline else None
        if baseline is not None and baseline not in names:
            log.warning("baseline %r was not evaluated; the gate cannot compare against it", baseline)
            baseline = None
        order = [*ranked, *(m["name"] for m in models if m["name"] not in ranked)]
        figures = render_figures(Path(evals), models, out_dir / "figures") if rc.figures else []

        gate_info: dict[str, Any] = {"candidate": candidate, "gate_metric": rc.gate_metric, "passed": False}
        failure: gates.GateFailed | None = None
        if candidate is None:
            gate_info["reason"] = f"no evaluated model has a role in {list(rc.candidate_roles)} and {rc.gate_metric}"
            log.warning("quality gate: %s", gate_info["reason"])
        else:
            gate_df = quality_gate_frame(
                frame, candidate, gate_metric=rc.gate_metric, gate_min=rc.gate_min, baseline=baseline
            )
            gate_info["rows"] = gate_df.to_dict(orient="records")
            try:
                run.gate("quality", gate_df, gates.evaluation_metrics_suite(), out_dir / "gates",
                         id_column=list(gates.EVAL_ID_COLUMNS))  # fmt: skip
                gate_info["passed"] = True
            except gates.GateFailed as err:
                failure = err
                gate_info["report"] = str(err)
        tables = task_tables(frame, order)
        notes = reference_notes(evals, models, list(tables))
        write_tables(out_dir, headline_table(frame, models, order), tables, gate_info, notes)
        write_json(out_dir / "quality_gate.json", gate_info)

        registry: dict[str, Any] = {"registered": False}
        spec = next((m for m in models if m["name"] == candidate), None)
        if spec is None:
            registry["reason"] = "no candidate"
        elif run.tracker.run_id is None:
            registry["reason"] = "tracking is off"
        elif not spec.get("weights") or not Path(spec["weights"]).is_file():
            registry["reason"] = f"weights not found: {spec.get('weights')}"
        else:
            model_metrics = {f"{r.task}.{r.metric}": r.value for r in frame[frame["model"] == candidate].itertuples()}
            card = out_dir / "model_card.json"
            write_json(card, {"model": spec, "metrics": model_metrics, "gate": gate_info["passed"]})
            for path in (spec.get("descriptor"), spec["weights"], card):
                if path and Path(path).is_file():
                    run.log_artifact(path, artifact_path="model")
            tags = {"arch": spec["arch"], "role": spec["role"], "gate_passed": gate_info["passed"]}
            tags.update({mlflow_key(k): v for k, v in model_metrics.items()})
            registry.update(
                register_model(
                    name=rc.registered_model, run_id=run.tracker.run_id, artifact_path="model",
                    tags=tags, description=f"{candidate} ({spec['arch']}), {rc.gate_metric} = "
                    f"{metric_value(frame, candidate, rc.gate_metric):.4f}", alias=rc.champion_alias,
                    move_alias=gate_info["passed"],
                ),
                registered=True,
            )  # fmt: skip
            log.info(
                "registered %s as %s version %s; alias %r %s", candidate, rc.registered_model, registry["version"],
                rc.champion_alias, "moved" if registry["alias_moved"] else "kept (gate failed)",
            )  # fmt: skip
        write_json(out_dir / "registry.json", registry)

        for name in ("table.md", "table.html", "quality_gate.json", "registry.json"):
            run.log_artifact(out_dir / name, artifact_path="report")
        if figures:
            run.log_artifact(out_dir / "figures", artifact_path="report/figures")
        value = metric_value(frame, candidate, rc.gate_metric) if candidate else math.nan
        run.record({
            "candidate": candidate,
            "gate_passed": gate_info["passed"],
            "registered_version": registry.get("version"),
            "alias_moved": registry.get("alias_moved", False),
            "num_models": len(models),
            "num_figures": len(figures),
        })  # fmt: skip
        if math.isfinite(value):
            run.set_headline(rc.gate_metric, value)
        if failure is not None and rc.fail_on_gate:
            raise failure
