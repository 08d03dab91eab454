"""The phases' plans: pure functions of the config whose values keep params.yaml's meaning, and their fingerprints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, load_config, validate_config
from components.training.plan import WeightsPlan, fingerprint, head_fit_plan, highres_plan, pretrain_plan

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "params.yaml")


def _with(cfg, **sections):
    raw = cfg.model_dump(mode="json")
    for name, values in sections.items():
        raw[name].update(values)
    return validate_config(raw)


def test_the_pretrain_plan_is_params_yaml_in_steps(cfg):
    plan = pretrain_plan(_with(cfg, train={"batch_size_per_gpu": 32, "grad_accum_steps": 2}), world_size=4)
    n, o, t = cfg.optim.epoch_length, cfg.optim, cfg.teacher
    assert plan.batch.global_size == 32 * 2 * 4
    s = plan.schedule
    assert s.total_steps == o.epochs * n and s.warmup_steps == o.warmup_epochs * n
    assert s.freeze_last_layer_steps == o.freeze_last_layer_epochs * n
    assert s.teacher_temp_warmup_steps == t.warmup_teacher_temp_epochs * n
    assert s.base_lr == o.base_lr and s.lr == pytest.approx(o.base_lr * math.sqrt(256 / 1024))  # sqrt_wrt_1024
    assert s.momentum == t.momentum_teacher and plan.weights.kind == "random" and plan.frozen == ()
    schedules = plan.schedules()
    assert schedules.at(s.warmup_steps)["lr"] == pytest.approx(s.lr)
    assert schedules.at(0)["momentum"] == t.momentum_teacher


def test_the_highres_plan_keeps_each_keys_meaning(cfg):
    h = cfg.highres
    plan = highres_plan(cfg, world_size=2, weights=WeightsPlan("export", "models/pretrain", "abc"))
    assert plan.crops.global_crops_size == h.global_crops_size and plan.crops.local_crops_size == h.local_crops_size
    assert plan.batch.per_rank == h.batch_size_per_gpu and plan.batch.global_size == 2 * h.batch_size_per_gpu
    s = plan.schedule
    assert s.total_steps == h.iterations and s.warmup_steps == h.warmup_iterations  # steps, not one-step epochs
    assert s.base_lr == h.base_lr and s.freeze_last_layer_steps == 0 and s.teacher_temp_warmup_steps == 0
    assert s.weight_decay == s.weight_decay_end == cfg.optim.weight_decay_end
    assert s.momentum == h.momentum_teacher and s.final_momentum == cfg.teacher.final_momentum_teacher
    values = plan.schedules().at(0)
    assert values["teacher_temp"] == cfg.teacher.teacher_temp and values["weight_decay"] == cfg.optim.weight_decay_end


def test_a_head_fit_plan_freezes_the_backbones(cfg):
    teacher = cfg.model.model_copy(update={"arch": "vit_small", "drop_path_rate": 0.3})
    plan = head_fit_plan(cfg, stage="distill", world_size=1, model=teacher, weights=WeightsPlan("file", "t.pth", "d"))
    assert plan.model.arch == "vit_small" and plan.model.drop_path_rate == 0.0
    assert plan.frozen == ("student.backbone.", "teacher.backbone.")
    assert plan.schedule.total_steps == cfg.distill.head_fit_iterations
    assert plan.schedule.warmup_steps == cfg.distill.head_fit_iterations // 10
    assert plan.schedule.base_lr == cfg.distill.head_fit_base_lr


def test_the_fingerprint_holds_the_global_batch_not_its_split(cfg):
    def fp(per_rank, accum, world, **sections):
        train = {"batch_size_per_gpu": per_rank, "grad_accum_steps": accum, **sections.pop("train", {})}
        c = _with(cfg, train=train, **sections)
        return fingerprint(pretrain_plan(c, world_size=world).fingerprint_items(), {"curated": "x"})

    assert fp(16, 1, 2) == fp(16, 2, 1) == fp(8, 4, 1) == fp(32, 1, 1)  # 32 images per step, however split
    assert fp(16, 1, 2) != fp(16, 1, 4)  # another global batch: another run
    assert fp(16, 1, 2) != fp(16, 1, 2, optim={"base_lr": 0.01})
    assert fp(16, 1, 2) != fp(16, 1, 2, crops={"local_crops_number": 2})
    # Run mechanics change how a run goes, not what it computes.
    assert fp(16, 1, 2) == fp(16, 1, 2, train={"num_workers": 0, "checkpoint_period": 3, "zero_stage": 3})
    items = pretrain_plan(cfg, world_size=1).fingerprint_items()
    assert fingerprint(items, {"curated": "x"}) != fingerprint(items, {"curated": "y"})
    moved = pretrain_plan(cfg, world_size=1, weights=WeightsPlan("export", "/elsewhere", "d")).fingerprint_items()
    same = pretrain_plan(cfg, world_size=1, weights=WeightsPlan("export", "/here", "d")).fingerprint_items()
    assert moved == same  # weights count by their digest, not their path


def test_a_plan_is_plain_data_for_plan_yaml(cfg):
    plan = pretrain_plan(cfg, world_size=2)
    data = plan.to_dict()
    assert yaml.safe_load(yaml.safe_dump(data)) == data
    assert data["batch"]["global_size"] == plan.batch.global_size and data["model"]["arch"] == cfg.model.arch


def test_cross_field_checks_run_when_the_config_loads(cfg):
    with pytest.raises(ConfigError, match="optim.freeze_last_layer_epochs = 9 exceeds distill.epochs = 4"):
        _with(cfg, optim={"freeze_last_layer_epochs": 9, "epochs": 20}, distill={"epochs": 4})


def test_the_dinov3_constant_schedule_is_a_setting_of_every_phase(cfg):
    c = _with(
        cfg, optim={"schedule": "constant", "weight_decay": 0.04, "weight_decay_end": 0.04, "warmup_epochs": 1,
                    "weight_decay_warmup_epochs": 0},
        teacher={"momentum_teacher": 0.99, "final_momentum_teacher": 0.994, "momentum_warmup_epochs": 1},
        dino={"local_loss_weight": {"start": 1.0, "peak": 1.0, "end": 0.5, "warmup_epochs": 1, "cosine_epochs": 1}},
    )  # fmt: skip
    n = c.optim.epoch_length
    plan = pretrain_plan(c, world_size=1)
    assert plan.schedule.kind == "constant" and plan.schedule.momentum_warmup_steps == n
    assert plan.schedule.local_weight_warmup_steps == plan.schedule.local_weight_cosine_steps == n
    s = plan.schedules()
    last = plan.schedule.total_steps - 1
    assert s.at(n)["lr"] == s.at(last)["lr"] == plan.schedule.lr  # held after the warm-up: no cosine to min_lr
    assert s.at(0)["weight_decay"] == s.at(last)["weight_decay"] == 0.04
    assert s.at(0)["momentum"] == 0.99 and s.at(n)["momentum"] == s.at(last)["momentum"] == 0.994
    assert s.at(n - 1)["dino_local_loss_weight"] == 1.0 and s.at(2 * n)["dino_local_loss_weight"] == 0.5
    highres = highres_plan(c, world_size=1, weights=WeightsPlan("export", "models/pretrain", "abc")).schedules()
    assert highres.at(0)["dino_local_loss_weight"] == 0.5 and highres.at(0)["momentum"] == 0.994  # held
    cosine = pretrain_plan(cfg, world_size=1).schedules()
    assert cosine.at(cfg.optim.epochs * n - 1)["lr"] < cosine.at(cfg.optim.warmup_epochs * n)["lr"]  # DINOv2's decay


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"optim": {"weight_decay_warmup_epochs": 1}}, "weight_decay_warmup_epochs = 1 needs schedule = constant"),
        ({"teacher": {"momentum_warmup_epochs": 1}}, "teacher.momentum_warmup_epochs = 1 needs optim.schedule"),
        ({"dino": {"koleo_group_size": 8}}, "dino.koleo_group_size = 8 and dino.koleo_topk = 1 need dino.koleo_dist"),
        ({"dino": {"local_loss_weight": {"warmup_epochs": 2, "cosine_epochs": 9}}},
         "dino.local_loss_weight.warmup_epochs \\+ cosine_epochs = 11 exceeds optim.epochs"),
        ({"optim": {"schedule": "constant", "weight_decay_warmup_epochs": 9}, "distill": {"epochs": 4}},
         "weight_decay_warmup_epochs"),
        ({"optim": {"schedule": "linear"}}, "optim.schedule = 'linear'"),
    ],
)  # fmt: skip
def test_the_schedule_and_koleo_settings_are_checked_when_the_config_loads(cfg, sections, message):
    with pytest.raises(ConfigError, match=message):
        _with(cfg, **sections)


def test_a_koleo_group_must_hold_whole_rank_batches(cfg):
    c = _with(cfg, dino={"koleo_distributed": True, "koleo_group_size": 6}, train={"batch_size_per_gpu": 4})
    with pytest.raises(ConfigError, match="dino.koleo_group_size = 6: a KoLeo group must hold whole ranks' batches"):
        pretrain_plan(c, world_size=4)
    c = _with(cfg, dino={"koleo_distributed": True, "koleo_group_size": 8}, train={"batch_size_per_gpu": 4})
    assert pretrain_plan(c, world_size=4).batch.global_size == 16  # two groups of two ranks
    with pytest.raises(ConfigError, match="divide the 3 ranks' 12 images"):
        pretrain_plan(c, world_size=3)
