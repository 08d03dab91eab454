"""The `distill` stage through its CLI: a teacher without heads (heads fitted first), per-student exports, metrics,
curve and kNN monitoring, and an exact resume from the last checkpoint; the checkpoints are keyed by teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from components import exports
from components.cli import main
from components.config import save_resolved
from components.stages.distill import distill_phases
from components.training.plan import fingerprint
from tests.distillation.tiny import tiny_config


def _run(params: Path, curated: Path, work: Path, teacher: Path, caplog: pytest.LogCaptureFixture) -> str:
    """The stage as the CLI runs it, in this process (no interpreter start-up); returns its log."""
    caplog.clear()
    code = main(["distill", "--params", str(params), "--curated", str(curated), "--teacher", str(teacher),
                 "--checkpoints", str(work / "ck"), "--out", str(work / "models"),
                 "--metrics", str(work / "metrics.json"), "--curve", str(work / "curve.csv")])  # fmt: skip
    assert code == 0
    return caplog.text


def _state(ck: Path) -> dict:
    return torch.load(ck / "state.pt", map_location="cpu", weights_only=True)


def test_headless_teacher_distils_then_resumes_exactly(curated, teacher_export, tiny_world, tmp_path, caplog_dinov2):
    eval_root = tiny_world[0] / "eval" / "classification"
    cfg = tiny_config(
        distill={"teacher_weights": str(teacher_export / "backbone.pth"), "head_fit_iterations": 4},
        train={"knn_eval_period": 4, "knn_eval_root": str(eval_root)},
    )
    params = save_resolved(cfg, tmp_path / "params.yaml")
    log = _run(params, curated, tmp_path, tmp_path / "unused", caplog_dinov2)
    assert "the teacher has no heads: fitting" in log

    student = tmp_path / "models" / "vit_test"
    assert {p.name for p in student.iterdir()} == {"backbone.pth", "backbone.safetensors", "heads.pth", "model.json"}
    desc = json.loads((student / "model.json").read_text())
    assert desc["role"] == "student" and desc["iterations"] == 8 and desc["provenance"]["teacher"]["heads"] == "fitted"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["iterations"] == 8 and set(metrics["final"]) >= {"loss", "vit_test.dino_loss", "vit_test.ibot_loss"}
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert curve["vit_test.knn_top1"].notna().sum() == 2  # steps 4 and 8
    assert not any(c.startswith("drift.") for c in curve.columns)  # the students did not start from the teacher
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["distill", "head_fit"]  # one folder per phase
    (fit_export,) = (tmp_path / "ck" / "head_fit").glob("export-*")
    assert (fit_export / "heads.pth").is_file() and (tmp_path / "ck" / "head_fit" / "curve.csv").is_file()
    (fit_dir,) = [d for d in (tmp_path / "ck" / "head_fit").iterdir() if (d / "step_00000004").is_dir()]
    fitted = (fit_dir / "step_00000004" / "state.pt").stat().st_mtime_ns

    # A crash after the step-4 checkpoint: the re-run resumes there and ends exactly where the first run ended.
    (students_dir,) = (tmp_path / "ck" / "distill").iterdir()
    final = _state(students_dir / "step_00000008")
    shutil.rmtree(students_dir / "step_00000008")
    shutil.rmtree(tmp_path / "models")  # DVC removes the outputs before re-running
    log = _run(params, curated, tmp_path, tmp_path / "unused", caplog_dinov2)
    assert "resuming from" in log and "already at the final step 4" in log  # the head fit is not trained again
    assert (fit_dir / "step_00000004" / "state.pt").stat().st_mtime_ns == fitted
    again = _state(students_dir / "step_00000008")
    assert final["model"].keys() == again["model"].keys()
    assert all(torch.equal(final["model"][k], again["model"][k]) for k in final["model"])
    assert all(torch.equal(final["optimizer"]["exp_avg"][k], v) for k, v in again["optimizer"]["exp_avg"].items())
    assert (student / "model.json").is_file()


def test_the_students_checkpoints_are_keyed_by_teacher_and_students(teacher_export, tmp_path):
    def key(cfg, source):
        (phase,) = distill_phases(cfg, source, tmp_path, tmp_path, world=1)
        return fingerprint(phase.plan.fingerprint_items(), {"curated": "x"})

    cfg = tiny_config(ibot={"separate_head": True})
    source = exports.resolve_source(str(teacher_export), cfg.model)
    other = exports.WeightsSource(**{**vars(source), "digest": "b" * 64})  # another teacher's weights
    assert key(cfg, source) == key(cfg, source)
    assert key(cfg, source) != key(cfg, other)
    two = tiny_config(ibot={"separate_head": True}, distill={"students": ["vit_test", "vit_tiny"]})
    assert key(cfg, source) != key(two, source)
