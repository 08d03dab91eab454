"""What a pipeline run records beside its stages (components/pipeline_record.py), from hand-written stage reports.

The same records from a real pipeline run, through MLflow and Prefect servers: tests/services.
"""

from __future__ import annotations

import json
from pathlib import Path

from components import pipeline_record
from components.config import load_config

ROOT = Path(__file__).resolve().parents[1]

REPORTS = {
    "curate": {"counts": {"curated": 31, "pool": 56}},
    "pretrain": {"plan": {"global_batch_size": 64, "lr": 0.001}},
    "evaluate": {
        "models": {
            "teacher": {"knn.top1": 0.5, "depth_linear.rmse": 1.25},
            "student_vit_small": {"knn.top1": 0.75, "depth_linear.rmse": 1.5},
        }
    },
    "report": {
        "gate_passed": False,
        "final_model": {
            "name": "student_vit_small", "arch": "vit_small", "role": "student",
            "metrics": {"knn.top1": 0.75, "depth_linear.rmse": 1.5, "robustness.mce": float("nan")},
        },
        "gate": {
            "passed": False, "metric": "knn.top1", "min": 0.8, "baseline": "random_init",
            "rows": [{"task": "knn", "metric": "top1", "value": 0.75, "lower": 0.8, "upper": None}],
        },
    },
}  # fmt: skip


def test_parent_run_columns_come_from_the_config_and_the_stage_reports() -> None:
    cfg = load_config(ROOT / "params.yaml", {"model.arch": "vit_small", "optim.epochs": 7, "data.raw": "s3://b/raw"})
    assert pipeline_record.comparison_params(cfg, REPORTS) == {
        "preset": "vit_small", "epochs": 7, "global_batch_size": 64, "data_source": "s3://b/raw", "extra_pool": "none",
        "curated_images": 31, "final_model": "student_vit_small", "final_model_arch": "vit_small",
    }  # fmt: skip
    # Non-finite values are not logged; the gate's verdict is a number too, so runs sort and filter on it.
    assert pipeline_record.comparison_metrics(REPORTS) == {"knn.top1": 0.75, "depth_linear.rmse": 1.5, "gate_passed": 0}
    # A run that stopped before training knows its config only.
    assert set(pipeline_record.comparison_params(cfg, {})) == {"preset", "epochs", "data_source", "extra_pool"}
    assert pipeline_record.comparison_metrics({}) == {}


def test_artifact_tables_and_the_gate_verdict() -> None:
    summary = {"stages": {"curate": {"status": "skipped", "duration_s": 1.5, "headline": {}},
                          "report": {"status": "failed", "duration_s": 0.0, "headline": {}},
                          "evaluate": {"status": "completed", "duration_s": 9.0,
                                       "headline": {"name": "knn_top1", "value": 0.123456}}}}  # fmt: skip
    rows = pipeline_record.stage_rows(summary)
    assert rows[2] == {"stage": "evaluate", "status": "completed", "duration_s": 9.0, "headline": "knn_top1 = 0.1235"}
    assert [r["headline"] for r in rows[:2]] == ["", ""]
    models = pipeline_record.evaluation_rows(REPORTS)
    assert [(m["model"], m["final"]) for m in models] == [("teacher", ""), ("student_vit_small", "yes")]
    gate = pipeline_record.gate_markdown(REPORTS, "http://mlflow/#/experiments/1/runs/abc")
    assert gate.startswith("# Quality gate: FAILED\n")
    assert "Candidate **student_vit_small** (vit_small, student)" in gate and "better than `random_init`" in gate
    assert "| knn | top1 | 0.75 | 0.8 |  |" in gate and gate.rstrip().endswith("runs/abc")
    no_candidate = {"report": {"gate_passed": False, "gate": {"reason": "no evaluated model has a role in []"}}}
    assert "No candidate: no evaluated model has a role in []." in pipeline_record.gate_markdown(no_candidate, None)
    assert "did not run" in pipeline_record.gate_markdown({}, None)


def test_stage_reports_are_read_where_the_stages_write_them(tmp_path: Path) -> None:
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "curate.json").write_text(json.dumps(REPORTS["curate"]))
    (tmp_path / "metrics" / "report.json").write_text("{not json")  # a half-written file is skipped, not fatal
    assert pipeline_record.read_stage_metrics(tmp_path, ["curate", "report", "evaluate"]) == {
        "curate": REPORTS["curate"]
    }
