"""Every model family through the evaluate and report stages: a DINOv3 ViT teacher, a DINOv3 ConvNeXt student and a
DINOv2 model side by side (tiny synthetic world, MLflow on a temporary SQLite file)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from components import exports
from components.config import ModelConfig, load_config
from components.model import backbone_from_config
from tests.evaluation.test_eval_stages import LIGHT


def _export(folder: Path, arch: str, role: str, seed: int, section: str | None = None) -> None:
    """An export written by the pipeline's writer (`components.exports`), as the training stages write them (a
    student: the `model` section `section` with the student's preset, as distillation builds its students)."""
    torch.manual_seed(seed)
    model = ModelConfig(arch=section or arch).model_copy(update={"arch": arch})
    state = backbone_from_config(model).state_dict()
    exports.write_export(folder, model=model, backbone_state=state, heads=None, role=role, iterations=0)


@pytest.mark.slow
def test_dinov3_teacher_convnext_student_and_dinov2_side_by_side(tiny_world, tmp_path: Path, monkeypatch) -> None:
    from components.evaluation.datasets import _rows_from_folders
    from components.stages.evaluate import run_evaluate
    from components.stages.report import run_report

    root, _ = tiny_world
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DINOV2_PARENT_RUN_ID", raising=False)
    _export(tmp_path / "models/pretrain", "dinov3_vit_test", "teacher", 1)
    _export(tmp_path / "models/distill/convnext_test", "convnext_test", "student", 2, section="dinov3_vit_test")
    _export(tmp_path / "dinov2", "vit_test", "teacher", 3)
    descriptor = json.loads((tmp_path / "models/distill/convnext_test/model.json").read_text())
    assert descriptor["overrides"] == {"resize_patch_tokens": True}  # its patch tokens on the 16 px grid
    prepared = tmp_path / "data/prepared"
    prepared.mkdir(parents=True)
    _rows_from_folders(str(root)).assign(decodable=True).to_parquet(prepared / "manifest.parquet")
    overrides = {**LIGHT, "evaluate.image_size": 64, "evaluate.dense_image_size": 64}
    overrides["evaluate.segmentation_variants"] = ["linear", "ms"]  # the ViT-Adapter needs a ViT: not the ConvNeXt
    overrides["evaluate.extra_models"] = [str(tmp_path / "dinov2/model.json")]
    cfg = load_config(Path(__file__).parents[2] / "params.yaml", {"data.raw": str(root), **overrides})

    run_evaluate(cfg, prepared=str(prepared), pretrained="models/pretrain", distilled="models/distill",
                 out="metrics/eval", metrics="metrics/evaluate.json")  # fmt: skip
    out = tmp_path / "metrics/eval"
    models = {m["name"]: m for m in json.loads((out / "models.json").read_text())}
    assert {models[n]["arch"] for n in models} >= {"dinov3_vit_test", "convnext_test", "vit_test"}
    frame = pd.read_csv(out / "metrics.csv")
    every_task = {"knn", "linear", "logreg", "retrieval", "segmentation_linear", "segmentation_ms", "depth_linear",
                  "depth_linear4", "robustness"}  # fmt: skip
    for name in models:
        assert set(frame.loc[frame["model"] == name, "task"]) == every_task, name
    assert frame["value"].notna().all()

    run_report(cfg, evals="metrics/eval", pretrained="models/pretrain", distilled="models/distill",
               out="reports/comparison", metrics="metrics/report.json")  # fmt: skip
    table = (tmp_path / "reports/comparison/table.md").read_text()
    for arch in ("dinov3_vit_test", "convnext_test", "vit_test"):
        assert f"| {arch} |" in table, arch
    registry = json.loads((tmp_path / "reports/comparison/registry.json").read_text())
    assert registry["registered"]


@pytest.mark.parametrize(
    ("arch", "overrides", "key"),
    [
        ("vit_test", {"num_register_tokens": 4}, "register_tokens"),  # a `_reg4` release
        ("dinov3_vit_test", {"untie_global_and_local_cls_norm": True}, "local_cls_norm.weight"),  # a SAT-493M layout
        ("convnext_test", {"depths": (1, 2, 1, 1)}, "stages.1.1.gamma"),
    ],
)
def test_an_extra_model_file_brings_its_geometry(tmp_path: Path, arch: str, overrides: dict, key: str) -> None:
    """`evaluate.extra_models: ["<arch>=<file>"]`: the file's registers, norms or depths, not the preset's."""
    from components.evaluation.models import build_model, extra_model
    from components.model import build_backbone, save_official_weights

    torch.manual_seed(0)
    saved = build_backbone(arch, **overrides)
    path = save_official_weights(saved, tmp_path / "released.pth")
    model = build_model(extra_model(f"{arch}={path}"), seed=1)
    assert torch.equal(model.state_dict()[key], saved.state_dict()[key])
