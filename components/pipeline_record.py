"""What a pipeline run records beside its stages' own runs, read from the stages' metrics files (metrics/<stage>.json):
the MLflow parent run's comparison columns, and the tables the Prefect flow publishes as artifacts.

Parent-run parameters, the same names in every pipeline run so that MLflow's run table and compare view line runs up:
`preset` (model.arch), `epochs` (optim.epochs), `global_batch_size` (as the pretraining ran it: per-GPU batch x
accumulation x ranks), `data_source` (data.raw), `extra_pool` (data.extra_pool), `curated_images` (rows of the
curated set), `final_model` and `final_model_arch` (the report stage's best candidate: the model it registered).
Parent-run metrics: the final model's headline metric of every task it was evaluated on (`knn.top1`, `linear.top1`,
`retrieval.map`, `segmentation_linear.miou`, `depth_linear.rmse`, `robustness.mce`, ...) and `gate_passed` (1 or 0);
the tag `quality_gate` says `passed` or `failed`.

Nothing here talks to Prefect or MLflow: flows/pipeline.py logs and publishes what these functions return.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from components.config import PipelineConfig

METRICS_DIR = "metrics"
"""Where every stage writes `<stage>.json` (its `metrics` entry in dvc.yaml)."""


def stage_metrics_path(root: Path, stage: str) -> Path:
    return root / METRICS_DIR / f"{stage}.json"


def read_stage_metrics(root: Path, stages: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{stage: its metrics file} for the stages that have one (a stage that never ran has none)."""
    reports = {}
    for stage in stages:
        try:
            reports[stage] = json.loads(stage_metrics_path(root, stage).read_text())
        except (OSError, ValueError):
            continue
    return reports


def comparison_params(cfg: PipelineConfig, reports: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The parameters that tell pipeline runs apart (see the module docstring); unknown ones are left out."""
    final = reports.get("report", {}).get("final_model") or {}
    params = {
        "preset": cfg.model.arch,
        "epochs": cfg.optim.epochs,
        "global_batch_size": (reports.get("pretrain", {}).get("plan") or {}).get("global_batch_size"),
        "data_source": cfg.data.raw,
        "extra_pool": ", ".join(cfg.data.extra_pool) or "none",
        "curated_images": (reports.get("curate", {}).get("counts") or {}).get("curated"),
        "final_model": final.get("name"),
        "final_model_arch": final.get("arch"),
    }
    return {k: v for k, v in params.items() if v is not None}


def comparison_metrics(reports: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The final model's headline metric of every task, and `gate_passed` (1 or 0), from the report stage."""
    report = reports.get("report", {})
    metrics = {k: float(v) for k, v in ((report.get("final_model") or {}).get("metrics") or {}).items()}
    if "gate_passed" in report:
        metrics["gate_passed"] = float(bool(report["gate_passed"]))
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def stage_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per stage of the pipeline summary: status, duration and headline metric."""
    rows = []
    for stage, s in summary["stages"].items():
        head = s.get("headline") or {}
        headline = f"{head['name']} = {head['value']:.4g}" if head.get("name") else ""
        rows.append({"stage": stage, "status": s["status"], "duration_s": s["duration_s"], "headline": headline})
    return rows


def evaluation_rows(reports: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluated model: its headline metric of every task (the evaluate stage's `models`), the final
    model marked."""
    final = (reports.get("report", {}).get("final_model") or {}).get("name")
    models = reports.get("evaluate", {}).get("models") or {}
    return [
        {"model": name, "final": "yes" if name == final else "", **{k: round(v, 4) for k, v in metrics.items()}}
        for name, metrics in models.items()
    ]


def gate_markdown(reports: Mapping[str, Mapping[str, Any]], run_link: str | None) -> str:
    """The quality gate's verdict as Markdown: the candidate, the rule, each row checked."""
    report = reports.get("report")
    if not report:
        return "# Quality gate\n\nThe report stage did not run: no verdict."
    gate, final = report.get("gate") or {}, report.get("final_model") or {}
    verdict = "PASSED" if report.get("gate_passed") else "FAILED"
    lines = [f"# Quality gate: {verdict}", ""]
    if final.get("name"):
        rule = f"`{gate.get('metric')}` at least {gate.get('min')}"
        if gate.get("baseline"):
            rule += f", and every task's headline metric better than `{gate['baseline']}`"
        lines += [f"Candidate **{final['name']}** ({final.get('arch')}, {final.get('role')}); rule: {rule}.", ""]
        lines += ["| check | metric | value | lower | upper |", "| --- | --- | ---: | ---: | ---: |"]
        lines += [
            f"| {r['task']} | {r['metric']} | {_fmt(r['value'])} | {_fmt(r['lower'])} | {_fmt(r['upper'])} |"
            for r in gate.get("rows") or []
        ]
    else:
        lines.append(f"No candidate: {gate.get('reason') or 'no evaluated model may be registered'}.")
    if run_link:
        lines += ["", f"MLflow parent run: {run_link}"]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
