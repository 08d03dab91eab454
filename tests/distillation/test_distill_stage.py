"""The `distill` stage through its CLI: a teacher without heads (heads fitted first), per-student exports, metrics,
curve and kNN monitoring, and an exact resume from the last checkpoint; the checkpoint folders are keyed by teacher."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from components.cli import main
from components.config import save_resolved
from components.stages.distill import remove_stale_runs, run_key
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


@pytest.fixture
def caplog_dinov2(caplog, monkeypatch):
    monkeypatch.setenv("DINOV2_TRACKING", "off")
    logger = logging.getLogger("dinov2")
    logger.addHandler(caplog.handler)  # the project's loggers do not propagate to the root
    caplog.set_level(logging.INFO, logger="dinov2")
    yield caplog
    logger.removeHandler(caplog.handler)


def test_headless_teacher_distils_then_resumes_exactly(curated, teacher_export, tiny_world, tmp_path, caplog_dinov2):
    eval_root = tiny_world[0] / "eval" / "classification"
    cfg = tiny_config(
        distill={"teacher_weights": str(teacher_export / "backbone.pth"), "head_fit_iterations": 4},
        train={"knn_eval_period": 4, "knn_eval_root": str(eval_root)},
    )
    params = save_resolved(cfg, tmp_path / "params.yaml")
    log = _run(params, curated, tmp_path, tmp_path / "unused", caplog_dinov2)
    assert "has no heads: fitting" in log

    student = tmp_path / "models" / "vit_test"
    assert {p.name for p in student.iterdir()} == {"backbone.pth", "backbone.safetensors", "heads.pth", "model.json"}
    desc = json.loads((student / "model.json").read_text())
    assert desc["role"] == "student" and desc["iterations"] == 8 and desc["provenance"]["teacher"]["heads"] == "fitted"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["iterations"] == 8 and set(metrics["final"]) >= {"loss", "vit_test.dino_loss", "vit_test.ibot_loss"}
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert curve["vit_test.knn_top1"].notna().sum() == 2  # steps 4 and 8
    runs = sorted(p.name.split("-")[0] for p in (tmp_path / "ck").iterdir())
    assert runs == ["students", "teacher_heads"]
    heads_dir = next((tmp_path / "ck").glob("teacher_heads-*"))
    assert (heads_dir / "export" / "heads.pth").is_file() and (heads_dir / "curve.csv").is_file()

    # A crash after the step-4 checkpoint: the re-run resumes there and ends exactly where the first run ended.
    students_dir = next((tmp_path / "ck").glob("students-*"))
    final = _state(students_dir / "step_00000008")
    shutil.rmtree(students_dir / "step_00000008")
    shutil.rmtree(tmp_path / "models")  # DVC removes the outputs before re-running
    log = _run(params, curated, tmp_path, tmp_path / "unused", caplog_dinov2)
    assert "resuming from" in log and "has no heads: fitting" not in log  # the teacher comes from the checkpoint
    again = _state(students_dir / "step_00000008")
    assert final["model"].keys() == again["model"].keys()
    assert all(torch.equal(final["model"][k], again["model"][k]) for k in final["model"])
    assert all(torch.equal(final["optimizer"]["exp_avg"][k], v) for k, v in again["optimizer"]["exp_avg"].items())
    assert (student / "model.json").is_file()


def test_checkpoint_folders_are_keyed_by_teacher_and_students(tmp_path):
    cfg = tiny_config()
    key = run_key("a" * 64, cfg)
    assert key == run_key("a" * 64, cfg)
    assert key != run_key("b" * 64, cfg)
    assert key != run_key("a" * 64, tiny_config(distill={"students": ["vit_test", "vit_tiny"]}))
    for name in (f"students-{key}", "students-old", "teacher_heads-old", "unrelated"):
        (tmp_path / name).mkdir()
    remove_stale_runs(tmp_path, keep={f"students-{key}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"students-{key}", "unrelated"]
