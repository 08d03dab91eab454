"""The evaluate and report stages end to end on the tiny synthetic world, with MLflow on a temporary SQLite file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from components.cli import STAGES
from components.config import load_config
from tests.evaluation.eval_fixtures import TINY_M2F

LIGHT = {
    "evaluate.image_size": 28,
    "evaluate.dense_image_size": 28,
    "evaluate.knn_few_shot": [1],
    "evaluate.knn_few_shot_tries": 2,
    "evaluate.linear_epochs": 5,
    "evaluate.logreg_num_c": 3,
    "evaluate.segmentation_epochs": 2,
    "evaluate.segmentation_ms_scales": [1.0],
    "evaluate.segmentation_variants": ["linear", "ms", "mask2former"],
    **{f"evaluate.{k}": v for k, v in TINY_M2F.items()},
    "evaluate.depth_epochs": 2,
    "evaluate.corruptions": ["gaussian_noise", "frost"],
    "evaluate.corruption_severities": [1, 5],
    "evaluate.robustness_images_per_class": 1,
    "evaluate.num_figure_samples": 2,
}


class _Reads:
    """A config that records which sections (and which keys of `data`) the code reads."""

    def __init__(self, cfg: Any, seen: set[str], prefix: str = "") -> None:
        self._cfg, self._seen, self._prefix = cfg, seen, prefix

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._cfg, name)
        if callable(value):  # model_dump, model_copy: the whole tree, not a read of one section
            return value
        if self._prefix + name == "data":
            return _Reads(value, self._seen, "data.")
        self._seen.add(self._prefix + name)
        return value


def _export(folder: Path, arch: str, role: str, seed: int) -> None:
    from components.model import build_backbone, save_official_weights

    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    save_official_weights(build_backbone(arch), folder / "backbone.pth")
    (folder / "model.json").write_text(json.dumps({"arch": arch, "patch_size": 14, "num_register_tokens": 0,
                                                   "weights": "backbone.pth", "role": role}))  # fmt: skip


def test_evaluate_then_report(tiny_world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.evaluation.datasets import _rows_from_folders
    from components.stages.evaluate import run_evaluate
    from components.stages.report import run_report

    root, _ = tiny_world
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DINOV2_PARENT_RUN_ID", raising=False)
    _export(tmp_path / "models/pretrain", "vit_test", "teacher", 1)
    _export(tmp_path / "models/distill/vit_test", "vit_test", "student", 2)
    prepared = tmp_path / "data/prepared"
    prepared.mkdir(parents=True)
    rows = _rows_from_folders(str(root)).assign(decodable=True)
    rows.to_parquet(prepared / "manifest.parquet")
    cfg = load_config(
        Path(__file__).parents[2] / "params.yaml", {"data.raw": str(root), "model.arch": "vit_test", **LIGHT}
    )

    reads: set[str] = set()
    run_evaluate(_Reads(cfg, reads), prepared=str(prepared), pretrained="models/pretrain", distilled="models/distill",
                 out="metrics/eval", metrics="metrics/evaluate.json")  # fmt: skip
    # What the stage reads is what it declares (components/stages/specs.py, dvc.yaml); `tracking` names the MLflow
    # experiment, where the run is logged rather than what it computes, and no stage declares it.
    assert reads - {"tracking"} == set(STAGES["evaluate"].sections)
    out = tmp_path / "metrics/eval"
    models = json.loads((out / "models.json").read_text())
    assert [m["name"] for m in models] == ["teacher", "student_vit_test", "random_init"]
    frame = pd.read_csv(out / "metrics.csv")
    tasks = set(frame["task"])
    assert tasks == {"knn", "linear", "logreg", "retrieval", "segmentation_linear", "segmentation_ms",
                     "segmentation_m2f", "depth_linear", "depth_linear4", "robustness"}  # fmt: skip
    assert ((frame["value"] >= frame["lower"]) & (frame["value"] <= frame["upper"])).all()
    knn = json.loads((out / "teacher/knn.json").read_text())
    assert knn["model"] == "teacher" and 0 <= knn["metrics"]["top1"] <= 1 and knn["details"]["headline_k"] == 20
    robustness = json.loads((out / "random_init/robustness.json").read_text())
    assert robustness["metrics"]["mce"] == pytest.approx(100.0)  # the baseline against itself
    assert set(robustness["details"]["errors"]) == {"gaussian_noise", "frost"}
    assert (out / "plots/headline.csv").is_file() and (out / "samples/teacher.npz").is_file()
    assert (out / "gates/evaluation_metrics.json").is_file()
    stage = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    assert stage["headline"]["name"] == "knn_top1" and stage["num_models"] == 3

    # Report 1: the gate compares against the random baseline (untrained models rarely beat it on every task).
    run_report(cfg, evals="metrics/eval", pretrained="models/pretrain", distilled="models/distill",
               out="reports/comparison", metrics="metrics/report.json")  # fmt: skip
    rep = tmp_path / "reports/comparison"
    for name in (
        "table.md",
        "table.html",
        "quality_gate.json",
        "registry.json",
        "figures/pca_patch_features.png",
        "figures/segmentation.png",
        "figures/segmentation_m2f.png",
        "figures/depth.png",
        "figures/robustness.png",
        "figures/knn_k.png",
    ):
        assert (rep / name).is_file(), name  # fmt: skip
    gate = json.loads((rep / "quality_gate.json").read_text())
    registry = json.loads((rep / "registry.json").read_text())
    assert registry["registered"] and registry["version"] == 1
    assert registry["alias_moved"] == gate["passed"]
    table = (rep / "table.md").read_text()
    assert "| model | arch | role |" in table
    ref = json.loads((out / "teacher/depth_linear.json").read_text())["details"]["mean_map"]
    assert f"mean depth map: RMSE {ref['rmse']:.4g}," in table.split("## depth_linear\n")[1].split("## ")[0]

    # Report 2: a gate that passes moves the champion alias to the new version.
    easy = cfg.model_copy(
        update={"report": cfg.report.model_copy(update={"require_beats_baseline": False, "figures": False})}
    )
    run_report(easy, evals="metrics/eval", pretrained="models/pretrain", distilled="models/distill",
               out="reports/comparison", metrics="metrics/report.json")  # fmt: skip
    registry = json.loads((rep / "registry.json").read_text())
    assert registry["version"] == 2 and registry["alias_moved"] and registry["previous_alias_version"] is None
    from components.tracking import mlflow_client

    champion = mlflow_client().get_model_version_by_alias(cfg.report.registered_model, "champion")
    assert int(champion.version) == 2
    report_metrics = json.loads((tmp_path / "metrics/report.json").read_text())
    assert report_metrics["gate_passed"] and report_metrics["registered_version"] == 2

    # A failed gate fails the stage when asked to, after writing the report.
    strict = cfg.model_copy(
        update={"report": cfg.report.model_copy(update={"gate_min": 2.0, "fail_on_gate": True, "figures": False})}
    )
    from components.gates import GateFailed

    with pytest.raises(GateFailed, match="quality"):
        run_report(strict, evals="metrics/eval", pretrained="models/pretrain", distilled="models/distill",
                   out="reports/comparison", metrics="metrics/report.json")  # fmt: skip
    assert json.loads((rep / "registry.json").read_text())["alias_moved"] is False
