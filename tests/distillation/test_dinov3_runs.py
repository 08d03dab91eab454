"""DINOv3 through the training stages on the tiny world: continued pretraining from a released-layout DINOv3 file
with Gram anchoring (the Gram teacher is the starting model), and distillation from a DINOv3 teacher into a ViT and a
ConvNeXt student in one run. Each run ends with exports that load strictly into their family's backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from components import exports
from components.config import save_resolved, validate_config
from components.model import build_backbone, save_official_weights
from tests.distillation.test_distill_stage import _run as run_distill_cli
from tests.distillation.tiny import tiny_raw

DINOV3 = {"arch": "dinov3_vit_test", "patch_size": 16, "num_register_tokens": 4, "layerscale_init": 0.1}
PATCH16_CROPS = {"global_crops_size": 32, "local_crops_size": 32, "local_crops_number": 2}  # 32: ConvNeXt's stride
HIGHRES16 = {"global_crops_size": 64, "local_crops_size": 32}


@pytest.fixture
def released_dinov3(tmp_path: Path) -> Path:
    """A DINOv3 ViT in the release's file layout (`rope_embed.periods`, `storage_tokens`, `qkv.bias_mask`, ...)."""
    torch.manual_seed(5)
    return save_official_weights(build_backbone("dinov3_vit_test"), tmp_path / "dinov3_vit_test.pth")


def test_continued_pretraining_from_a_dinov3_file_with_gram(curated, released_dinov3, tmp_path, monkeypatch):
    from components.stages.pretrain import run_pretrain

    monkeypatch.setenv("DINOV2_TRACKING", "off")
    raw = tiny_raw(
        model={**DINOV3, "pretrained_weights": str(released_dinov3), "freeze_blocks": 1},
        crops=PATCH16_CROPS,
        highres=HIGHRES16,
        adapt={"head_fit_iterations": 2},
        optim={"epochs": 2, "epoch_length": 4, "warmup_epochs": 1},
        gram={"enabled": True, "loss_weight": 1.0, "teacher_resolution": 2.0},
    )
    run_pretrain(validate_config(raw), curated=str(curated), checkpoints=str(tmp_path / "ck"),
                 out=str(tmp_path / "out"), metrics=str(tmp_path / "m.json"),
                 curve=str(tmp_path / "c.csv"))  # fmt: skip
    curve = pd.read_csv(tmp_path / "c.csv")
    gram = curve["gram_loss"].dropna()
    assert len(gram) and gram.ge(0).all() and gram.lt(10).all()  # logged at every logging step of the phase
    export = exports.read_export(tmp_path / "out")
    assert export.arch == "dinov3_vit_test" and export.role == "teacher"
    backbone = export.build_backbone()
    released = torch.load(released_dinov3, weights_only=True)
    assert torch.equal(backbone.rope_embed.periods, released["rope_embed.periods"])
    assert not torch.equal(backbone.blocks[1].attn.qkv.weight, released["blocks.1.attn.qkv.weight"])  # it trained
    for frozen in ("storage_tokens", "cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"):
        assert torch.equal(backbone.state_dict()[frozen], released[frozen]), frozen  # model.freeze_blocks: 1
    plan = (tmp_path / "out" / "plan.yaml").read_text()
    assert "gram:" in plan and "head_fit:" in plan


def test_distillation_from_a_dinov3_teacher_into_a_vit_and_a_convnext(
    curated, released_dinov3, tiny_world, tmp_path, caplog_dinov2
):
    cfg = validate_config(
        tiny_raw(
            model=DINOV3,
            crops=PATCH16_CROPS,
            highres=HIGHRES16,
            distill={
                "teacher_weights": str(released_dinov3),
                "teacher_arch": "dinov3_vit_test",
                "students": ["dinov3_vit_test", "convnext_test"],
                "head_fit_iterations": 2,
            },  # fmt: skip
        )
    )
    params = save_resolved(cfg, tmp_path / "params.yaml")
    log = run_distill_cli(params, curated, tmp_path, tmp_path / "unused", caplog_dinov2)
    assert "the teacher has no heads: fitting" in log
    curve = pd.read_csv(tmp_path / "curve.csv")
    for student in ("dinov3_vit_test", "convnext_test"):
        assert curve[f"{student}.loss"].notna().all(), student
        desc = json.loads((tmp_path / "models" / student / "model.json").read_text())
        assert desc["arch"] == student and desc["role"] == "student"
        assert desc["provenance"]["teacher"]["arch"] == "dinov3_vit_test"
        backbone = exports.read_export(tmp_path / "models" / student).build_backbone().eval()
        out = backbone.forward_features(torch.randn(2, 3, 64, 96))
        assert out["x_norm_patchtokens"].shape[1] == (64 // 16) * (96 // 16), student  # the teacher's patch grid
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["iterations"] == 8
