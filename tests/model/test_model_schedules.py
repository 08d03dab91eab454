"""Schedule values at known steps (DINOv2's cosines, the DINOv3 recipe's constant values after warm-ups, its
`linear_warmup_cosine_decay`) and the parameter-group rules of both releases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from components.model import (
    DINOHead,
    build_backbone,
    build_schedules,
    cosine_schedule,
    param_groups,
    warmup_cosine_decay,
)
from components.model.schedules import no_weight_decay


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
        {"lr": 0, "last_layer_lr": 0, "weight_decay": 0.04, "momentum": 0.992, "teacher_temp": 0.04,
         "dino_local_loss_weight": 1.0}
    )  # fmt: skip
    assert s.at(199)["lr"] == pytest.approx(0.002) and s.at(200)["lr"] == pytest.approx(0.002)
    assert s.at(99)["last_layer_lr"] == 0.0 and s.at(100)["last_layer_lr"] == s.at(100)["lr"] > 0
    assert s.at(299)["teacher_temp"] == pytest.approx(0.07) and s.at(5000)["teacher_temp"] == 0.07
    assert s.at(150)["teacher_temp"] == pytest.approx(0.04 + 0.03 * 150 / 299)
    assert s.at(500)["weight_decay"] == pytest.approx(0.22)  # half-way: the cosine mean of 0.04 and 0.4
    assert v_end["momentum"] == pytest.approx(1.0, abs=1e-4) and s.at(1000)["momentum"] == 1.0
    assert v_end["lr"] == pytest.approx(1e-6, abs=1e-7)


def release_linear_warmup_cosine_decay(start, peak, end, warmup, total, cosine=None) -> list[float]:
    """The DINOv3 release's `linear_warmup_cosine_decay`, written out with lists (numpy's linspace with and without
    its end point)."""
    linear = [start + (peak - start) * i / warmup for i in range(warmup)]  # endpoint=False
    cosine = total - warmup if cosine is None else cosine
    angles = [math.pi * i / (cosine - 1) for i in range(cosine)] if cosine > 1 else [0.0] * cosine
    decay = [(peak - end) * (math.cos(a) + 1) / 2 + end for a in angles]
    return linear + decay + [end] * (total - warmup - cosine)


@pytest.mark.parametrize(
    ("start", "peak", "end", "warmup", "total", "cosine"),
    [(0.0, 1e-3, 1e-6, 7, 40, None), (1.0, 1.0, 0.5, 10, 30, 5), (0.0, 0.0, 5e-5, 0, 25, 10), (0.04, 0.2, 0.2, 9, 9, 0),
     (0.5, 0.5, 0.5, 0, 12, 1)],
)  # fmt: skip
def test_warmup_cosine_decay_matches_the_releases_arrays(start, peak, end, warmup, total, cosine):
    release = release_linear_warmup_cosine_decay(start, peak, end, warmup, total, cosine)
    kw = {"start": start, "peak": peak, "end": end, "warmup_steps": warmup, "total_steps": total}
    ours = [warmup_cosine_decay(i, **kw, cosine_steps=cosine) for i in range(total)]
    assert ours == pytest.approx(release, rel=1e-12, abs=1e-15)
    assert warmup_cosine_decay(total + 5, **kw, cosine_steps=cosine) == end  # past the end: the last value
    with pytest.raises(ValueError, match="do not fit"):
        warmup_cosine_decay(0, **{**kw, "total_steps": warmup + (cosine or 1) - 1}, cosine_steps=cosine or 1)


def test_the_constant_schedule_holds_each_value_after_its_warm_up():
    """The DINOv3 7B recipe's shape: lr warm-up from 0 then constant, weight decay and momentum from their start to
    their held value, the temperature's warm-up; the local-crop weight: 1, a cosine to 0.5, then 0.5."""
    s = build_schedules(
        lr=5e-5, min_lr=1e-6, total_steps=100, warmup_steps=10, weight_decay=0.04, weight_decay_end=0.2,
        momentum=0.99, final_momentum=0.994, teacher_temp=0.07, warmup_teacher_temp=0.04,
        teacher_temp_warmup_steps=20, freeze_last_layer_steps=5, kind="constant", weight_decay_warmup_steps=50,
        momentum_warmup_steps=4, local_weight_start=1.0, local_weight_peak=1.0, local_weight_end=0.5,
        local_weight_warmup_steps=60, local_weight_cosine_steps=11,
    )  # fmt: skip
    assert [s.at(i)["lr"] for i in (0, 5, 9)] == pytest.approx([0.0, 2.5e-5, 4.5e-5])  # linspace without its end
    assert all(s.at(i)["lr"] == 5e-5 for i in (10, 50, 99, 100, 10_000))  # min_lr unused: no decay
    assert s.at(4)["last_layer_lr"] == 0.0 and s.at(5)["last_layer_lr"] == s.at(5)["lr"] > 0
    assert s.at(0)["weight_decay"] == 0.04 and s.at(25)["weight_decay"] == pytest.approx(0.04 + 0.16 * 25 / 50)
    assert all(s.at(i)["weight_decay"] == 0.2 for i in (50, 99))
    assert s.at(2)["momentum"] == pytest.approx(0.992) and s.at(4)["momentum"] == s.at(99)["momentum"] == 0.994
    assert s.at(10)["teacher_temp"] == pytest.approx(0.055) and s.at(20)["teacher_temp"] == 0.07
    local = [s.at(i)["dino_local_loss_weight"] for i in range(100)]
    assert local[:61] == [1.0] * 61 and local[65] == pytest.approx(0.75) and local[70:] == [0.5] * 30
    same = build_schedules(**{**dict(lr=1.0, min_lr=0.0, total_steps=10, warmup_steps=0, weight_decay=0.1,
                           weight_decay_end=0.1, momentum=0.9, final_momentum=0.9, teacher_temp=0.07,
                           warmup_teacher_temp=0.07, teacher_temp_warmup_steps=0, freeze_last_layer_steps=0)},
                           kind="constant")  # fmt: skip
    assert {k: v for k, v in same.at(7).items()} == {
        "lr": 1.0, "last_layer_lr": 1.0, "weight_decay": 0.1, "momentum": 0.9, "teacher_temp": 0.07,
        "dino_local_loss_weight": 1.0,
    }  # fmt: skip


def test_the_cosine_schedule_has_no_weight_decay_or_momentum_warm_up():
    kw = dict(lr=1.0, min_lr=0.0, total_steps=10, warmup_steps=0, weight_decay=0.1, weight_decay_end=0.2,
              momentum=0.9, final_momentum=1.0, teacher_temp=0.07, warmup_teacher_temp=0.04,
              teacher_temp_warmup_steps=0, freeze_last_layer_steps=0)  # fmt: skip
    with pytest.raises(ValueError, match="no weight-decay or momentum warm-up"):
        build_schedules(**kw, weight_decay_warmup_steps=3)
    with pytest.raises(ValueError, match="unknown schedule kind 'linear'"):
        build_schedules(**kw, kind="linear")


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
    for name in ("backbone.blocks.1.attn.qkv.bias", "backbone.blocks.1.norm1.weight", "backbone.blocks.1.ls2.gamma",
                 "backbone.norm.bias", "dino_head.mlp.0.bias"):  # fmt: skip
        assert wd(name) == 0.0, name
    # Both releases decay the learned tokens and the position embedding (only biases, norms and gammas are exempt).
    for name in ("backbone.cls_token", "backbone.pos_embed", "backbone.register_tokens", "backbone.mask_token"):
        assert wd(name) == 1.0, name
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


def release_wd_multiplier(name: str) -> float:
    """Both releases' rule, as written in their `get_params_groups_with_decay` (DINOv2: `.bias`; DINOv3: `bias`, and
    `fourier_w`, which no model here has)."""
    return 0.0 if name.endswith("bias") or "norm" in name or "gamma" in name else 1.0


def test_weight_decay_follows_the_releases_rule_for_every_parameter():
    student = Student()
    info = {name: g for g in param_groups(student) for name in g["names"]}
    for name in info:
        assert info[name]["wd_multiplier"] == release_wd_multiplier(name), name
        assert no_weight_decay(name) == (release_wd_multiplier(name) == 0.0)
    assert no_weight_decay("storage_tokens") is False and no_weight_decay("blocks.3.local_cls_norm.weight") is True


def test_the_dino_head_weight_decay_multiplier_scales_its_decayed_weights_only():
    class Separate(Student):
        def __init__(self):
            super().__init__()
            self.ibot_head = DINOHead(64, 12, hidden_dim=16, bottleneck_dim=8)

    student = Separate()
    info = {name: g for g in param_groups(student, dino_head_wd_multiplier=0.25) for name in g["names"]}
    assert info["dino_head.mlp.0.weight"]["wd_multiplier"] == 0.25
    assert (
        info["dino_head.last_layer.weight_v"]["wd_multiplier"] == 0.25
        and info["dino_head.last_layer.weight_v"]["is_last_layer"]
    )
    assert info["dino_head.mlp.0.bias"]["wd_multiplier"] == 0.0  # biases stay undecayed
    assert info["ibot_head.mlp.0.weight"]["wd_multiplier"] == 1.0  # the iBOT head is not the DINO head
    assert info["backbone.cls_token"]["wd_multiplier"] == 1.0


def test_a_backbone_with_blocks_and_a_patch_embedding_numbers_its_layers():
    """A ViT that is not the DINOv2 class (the DINOv3 layout: `storage_tokens`) gets the release's layer ids."""

    class OtherViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Linear(4, 8)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
            self.storage_tokens = nn.Parameter(torch.zeros(1, 2, 8))
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
            self.norm = nn.LayerNorm(8)

    info = {n: g for g in param_groups(OtherViT(), layerwise_decay=0.5, patch_embed_lr_mult=0.2) for n in g["names"]}
    assert info["storage_tokens"]["lr_multiplier"] == info["cls_token"]["lr_multiplier"] == 0.5**3
    assert info["patch_embed.weight"]["lr_multiplier"] == pytest.approx(0.2 * 0.5**3)
    assert info["blocks.1.weight"]["lr_multiplier"] == 0.5 and info["norm.weight"]["lr_multiplier"] == 1.0
    assert info["storage_tokens"]["wd_multiplier"] == 1.0 and info["norm.weight"]["wd_multiplier"] == 0.0
