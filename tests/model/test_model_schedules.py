"""Schedule values at known steps and parameter-group rules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from components.model import DINOHead, build_backbone, build_schedules, cosine_schedule, param_groups


def test_cosine_schedule_known_values():
    kw = {"base_value": 1.0, "final_value": 0.0, "total_steps": 110, "warmup_steps": 10}
    assert cosine_schedule(0, **kw) == 0.0  # warm-up starts at 0 ...
    assert cosine_schedule(9, **kw) == 1.0  # ... and reaches the base on its last step (linspace)
    assert cosine_schedule(5, **kw) == pytest.approx(5 / 9)
    assert cosine_schedule(10, **kw) == 1.0  # cosine starts at the base
    assert cosine_schedule(60, **kw) == pytest.approx(0.5)  # half-way through the 100 cosine steps
    assert cosine_schedule(109, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert cosine_schedule(110, **kw) == 0.0 and cosine_schedule(10_000, **kw) == 0.0
    frozen = {**kw, "freeze_steps": 5, "total_steps": 115}
    assert cosine_schedule(3, **frozen) == 0.0 and cosine_schedule(14, **frozen) == 1.0


def test_cosine_schedule_matches_release_arrays():
    """The release's CosineScheduler, rebuilt with numpy-free lists."""
    base, final, total, warmup, start = 0.004, 1e-6, 50, 7, 0.0
    warm = [start + (base - start) * i / (warmup - 1) for i in range(warmup)]
    n = total - warmup
    cos = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    release = warm + cos
    ours = [
        cosine_schedule(i, base_value=base, final_value=final, total_steps=total, warmup_steps=warmup)
        for i in range(total)
    ]
    assert ours == pytest.approx(release, rel=1e-12, abs=1e-15)


def test_training_schedules():
    s = build_schedules(
        lr=0.002,
        min_lr=1e-6,
        total_steps=1000,
        warmup_steps=200,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum=0.992,
        final_momentum=1.0,
        teacher_temp=0.07,
        warmup_teacher_temp=0.04,
        teacher_temp_warmup_steps=300,
        freeze_last_layer_steps=100,
    )
    v0, v_end = s.at(0), s.at(999)
    assert v0 == pytest.approx(
        {"lr": 0, "last_layer_lr": 0, "weight_decay": 0.04, "momentum": 0.992, "teacher_temp": 0.04}
    )
    assert s.at(199)["lr"] == pytest.approx(0.002) and s.at(200)["lr"] == pytest.approx(0.002)
    assert s.at(99)["last_layer_lr"] == 0.0 and s.at(100)["last_layer_lr"] == s.at(100)["lr"] > 0
    assert s.at(299)["teacher_temp"] == pytest.approx(0.07) and s.at(5000)["teacher_temp"] == 0.07
    assert s.at(150)["teacher_temp"] == pytest.approx(0.04 + 0.03 * 150 / 299)
    assert s.at(500)["weight_decay"] == pytest.approx(0.22)  # half-way: the cosine mean of 0.04 and 0.4
    assert v_end["momentum"] == pytest.approx(1.0, abs=1e-4) and s.at(1000)["momentum"] == 1.0
    assert v_end["lr"] == pytest.approx(1e-6, abs=1e-7)


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = build_backbone("vit_test", depth=3, num_register_tokens=2)
        self.dino_head = DINOHead(64, 10, hidden_dim=16, bottleneck_dim=8)


def test_param_groups_rules():
    student = Student()
    groups = param_groups(student, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    info = {name: g for g in groups for name in g["names"]}
    assert set(info) == {n for n, _ in student.named_parameters()}
    L = 3

    def lr(name):
        return info[name]["lr_multiplier"]

    def wd(name):
        return info[name]["wd_multiplier"]

    assert lr("backbone.cls_token") == 0.5 ** (L + 1)  # embeddings and tokens are layer 0
    assert lr("backbone.register_tokens") == lr("backbone.pos_embed") == lr("backbone.mask_token") == 0.5**4
    assert lr("backbone.patch_embed.proj.weight") == pytest.approx(0.2 * 0.5**4)
    assert lr("backbone.blocks.0.attn.qkv.weight") == 0.5**3  # block i is layer i + 1
    assert lr("backbone.blocks.2.mlp.fc2.weight") == 0.5
    assert lr("backbone.norm.weight") == 1.0 and lr("dino_head.mlp.0.weight") == 1.0
    for name in ("backbone.blocks.1.attn.qkv.bias", "backbone.blocks.1.norm1.weight", "backbone.blocks.1.ls2.gamma"):
        assert wd(name) == 0.0, name
    for name in ("backbone.cls_token", "backbone.pos_embed", "backbone.register_tokens", "backbone.mask_token"):
        assert wd(name) == 0.0, name
    assert wd("backbone.blocks.1.attn.qkv.weight") == 1.0
    for name in ("dino_head.last_layer.weight_v", "dino_head.last_layer.weight_g"):  # the prototypes and their norms
        assert wd(name) == 1.0 and info[name]["is_last_layer"] and lr(name) == 1.0, name
    assert not info["dino_head.mlp.0.weight"]["is_last_layer"]
    torch.optim.AdamW(groups, lr=0.0)  # the groups are what torch's optimizers take (the engine sets lr and wd)


def test_param_groups_skip_frozen_and_plain_backbone():
    model = build_backbone("vit_test")
    model.mask_token.requires_grad_(False)
    groups = param_groups(model)
    names = [n for g in groups for n in g["names"]]
    assert "mask_token" not in names and "blocks.1.attn.qkv.weight" in names
    assert {g["lr_multiplier"] for g in groups} == {1.0}
