"""Distillation's pieces on tiny models: the phases' plans, the frozen teacher shared by every student (one forward
per batch), students that train exactly as they would alone, the per-student exports, and the head-fitting phase for
teachers without heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components import exports
from components.config import ConfigError, validate_config
from components.stages.distill import distill_phases
from components.training.checkpoint import LoopState
from components.training.data import build_loader, read_manifest_uris
from components.training.distill import DistillMetaArch
from components.training.engine import EngineSettings, TrainEngine
from components.training.loop import LoopSettings, train
from components.training.meta_arch import SSLMetaArch
from components.training.plan import WeightsPlan, distill_plan, head_fit_plan
from components.training.trainer import run_phase
from tests.distillation.tiny import tiny_config, tiny_raw

SEPARATE = {"separate_head": True}


def _plan(cfg, teacher_export: Path):
    source = exports.resolve_source(str(teacher_export), cfg.model)
    plan = distill_plan(cfg, world_size=1, teacher=source.model, weights=WeightsPlan("export", None, source.digest))
    return plan, source


def _module(cfg, teacher_export: Path, seed: int = 0) -> DistillMetaArch:
    plan, source = _plan(cfg, teacher_export)
    torch.manual_seed(seed)
    module = DistillMetaArch(plan, source.describe())
    module.initial_state(source.location)
    return module


def _engine(module: DistillMetaArch, cfg) -> TrainEngine:
    return TrainEngine(module, EngineSettings.from_plan(module.plan, cfg.train))


def _batches(plan, curated: Path, start: int = 0):
    uris = read_manifest_uris(str(curated))
    return iter(build_loader(uris=uris, plan=plan, rank=0, world_size=1, start_position=start, num_workers=0))


# -- config ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("distill", "needle"),
    [
        ({"students": ["vit_test", "vit_test"]}, "distill.students"),
        ({"students": []}, "distill.students"),
        ({"teacher_arch": "vit_large"}, "teacher_arch is set but teacher_weights is null"),
        ({"epochs": 0}, "distill.epochs = 0"),
        ({"base_lr": 0}, "distill.base_lr = 0"),
        ({"momentum_ema": 1.5}, "distill.momentum_ema = 1.5"),
        ({"head_fit_iterations": 0}, "distill.head_fit_iterations = 0"),
    ],
)
def test_bad_distill_values_name_the_key(distill, needle):
    with pytest.raises(ConfigError, match=needle):
        validate_config(tiny_raw(distill=distill))


def test_distill_length_must_hold_the_warmup_when_the_config_loads():
    with pytest.raises(ConfigError, match="optim.warmup_epochs = 2 exceeds distill.epochs = 1"):
        tiny_config(optim={"warmup_epochs": 2}, distill={"epochs": 1})
    with pytest.raises(ConfigError, match="distill.momentum_ema = 0.999 exceeds"):
        tiny_config(teacher={"final_momentum_teacher": 0.995}, distill={"momentum_ema": 0.999})


def test_the_phases_follow_the_papers_recipe(teacher_export, tmp_path):
    cfg = tiny_config(model={"drop_path_rate": 0.3}, distill={"students": ["vit_test", "vit_tiny"], "base_lr": 0.01})
    source = exports.resolve_source(str(teacher_export / "backbone.pth"), cfg.model)
    fit, d = (p.plan for p in distill_phases(cfg, source, tmp_path, tmp_path / "out", world=1))
    assert d.model.drop_path_rate == 0.0  # no stochastic depth
    assert d.ibot.mask_sample_probability == 0.0  # no masking
    assert d.schedule.teacher_temp_warmup_steps == 0  # a trained teacher: its final temperature from the start
    assert d.schedule.warmup_teacher_temp == d.schedule.teacher_temp == cfg.teacher.teacher_temp
    assert d.schedule.momentum == cfg.distill.momentum_ema  # the spare EMA's schedule
    assert d.schedule.total_steps == cfg.distill.epochs * cfg.optim.epoch_length and d.schedule.base_lr == 0.01
    assert d.optim.clip_grad == cfg.optim.clip_grad  # each student's modules clipped on their own, as released
    assert d.students == ("vit_test", "vit_tiny") and d.teacher_model.arch == "vit_test"
    assert d.weights.kind == "phase" and d.weights.source == "head_fit"  # the fitted heads are its teacher
    assert fit.phase == "head_fit" and fit.model.drop_path_rate == 0.0
    assert fit.schedule.total_steps == cfg.distill.head_fit_iterations and fit.schedule.freeze_last_layer_steps == 0
    assert fit.ibot.mask_sample_probability == cfg.ibot.mask_sample_probability  # the pretraining losses, masked
    assert fit.frozen == ("student.backbone.", "teacher.backbone.")
    (only,) = distill_phases(cfg, exports.resolve_source(str(teacher_export), cfg.model), tmp_path, tmp_path, 1)
    assert only.plan.weights.kind == "export"  # an export with heads: no head fit


# -- the meta-architecture -------------------------------------------------------------------------------------------


def test_teacher_is_frozen_and_outside_optimizer_and_ema(teacher_export):
    module = _module(tiny_config(ibot=SEPARATE, distill={"students": ["vit_test", "vit_tiny"]}), teacher_export)
    module.train()
    assert not module.teacher.training and not module.students_ema.training and module.students.training
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert not any(p.requires_grad for p in module.students_ema.parameters())
    optimised = {
        id(p) for g in module.optim_param_groups(layerwise_decay=0.9, patch_embed_lr_mult=0.2) for p in g["params"]
    }
    assert optimised == {id(p) for p in module.students.parameters()}
    assert [(s, t) for s, t in module.ema_pairs()] == [
        (module.students[n], module.students_ema[n]) for n in ("vit_test", "vit_tiny")
    ]
    assert all(b.drop_path_rate == 0.0 for s in module.students.values() for b in s.backbone.blocks)


def test_two_students_call_the_teacher_once_per_batch(teacher_export, curated):
    cfg = tiny_config(
        ibot=SEPARATE,
        train={"grad_accum_steps": 2, "batch_size_per_gpu": 4},
        distill={"students": ["vit_test", "vit_tiny"]},
    )
    module = _module(cfg, teacher_export)
    calls = []
    module.teacher.backbone.register_forward_hook(lambda *_: calls.append(1))
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    students_before = {k: v.clone() for k, v in module.students.state_dict().items()}
    engine = _engine(module, cfg)
    rows: list[dict] = []
    steps = 2
    train(
        engine, _batches(module.plan, curated), module.plan.schedules(), LoopState(),
        LoopSettings(total_steps=steps, log_period=1, checkpoint_period=100, max_nonfinite_steps=2),
        save_checkpoint=lambda s: None, log_metrics=lambda row, step: rows.append(row),
    )  # fmt: skip
    assert len(calls) == steps * 2  # one teacher forward per micro-batch (2 accumulated per step), for both students
    assert module.teacher_calls == steps * 2
    after = engine.module
    assert all(torch.equal(v, after.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert not torch.equal(
        students_before["vit_tiny.dino_head.mlp.0.weight"], after.students["vit_tiny"].dino_head.mlp[0].weight
    )
    for student in ("vit_test", "vit_tiny"):
        for term in ("loss", "dino_loss", "ibot_loss", "koleo_loss"):
            assert all(torch.isfinite(torch.tensor(r[f"{student}.{term}"])) for r in rows)
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["vit_test.loss"] + rows[-1]["vit_tiny.loss"], rel=1e-5)


def test_each_student_trains_exactly_as_it_would_alone(teacher_export, curated):
    """Students share only the teacher's targets: each student's modules clipped on their own (the clipping active),
    a 2-student step moves each student exactly as a single-student run from the same weights on the same batch."""
    both = tiny_config(ibot=SEPARATE, optim={"clip_grad": 0.05}, distill={"students": ["vit_test", "vit_tiny"]})
    alone = tiny_config(ibot=SEPARATE, optim={"clip_grad": 0.05}, distill={"students": ["vit_test"]})
    pair, single = _module(both, teacher_export), _module(alone, teacher_export, seed=1)
    single.load_state_dict(
        {k: v for k, v in pair.state_dict().items() if ".vit_tiny." not in k}, strict=True
    )  # same teacher, same vit_test weights
    batch = next(_batches(pair.plan, curated))
    values = pair.plan.schedules().at(5)
    engines = [_engine(m, c) for m, c in ((pair, both), (single, alone))]
    outs = [e.train_step([batch], values) for e in engines]
    assert float(outs[0].terms["vit_test.loss"]) == pytest.approx(float(outs[1].terms["vit_test.loss"]), rel=1e-6)
    norms = outs[0].module_norms
    assert set(norms) == {f"{s}.{m}" for s in ("vit_test", "vit_tiny") for m in ("backbone", "dino_head", "ibot_head")}
    assert min(norms.values()) > 0.05  # every module clipped, each by its own factor
    assert {k: v for k, v in norms.items() if k.startswith("vit_test.")} == pytest.approx(outs[1].module_norms)
    a = engines[0].module.students["vit_test"].state_dict()
    b = engines[1].module.students["vit_test"].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)


def test_export_writes_each_students_ema_in_the_official_layout(teacher_export, tmp_path):
    from components.evaluation.models import discover_models
    from components.model import backbone_from_config, load_official_weights

    cfg = tiny_config(ibot=SEPARATE, distill={"students": ["vit_test", "vit_tiny"]})
    module = _module(cfg, teacher_export)
    with torch.no_grad():  # make the EMA differ from the student, to see which one is exported
        for p in module.students_ema.parameters():
            p.add_(1.0)
    module.export(module.state_dict(), tmp_path, iterations=7)
    for name in ("vit_test", "vit_tiny"):
        folder = tmp_path / name
        assert {p.name for p in folder.iterdir()} == {"backbone.pth", "backbone.safetensors", "heads.pth", "model.json"}
        desc = json.loads((folder / "model.json").read_text())
        assert desc["arch"] == name and desc["role"] == "student" and desc["iterations"] == 7
        teacher = desc["provenance"]["teacher"]
        assert teacher["heads"] == "exported" and len(teacher["sha256"]) == 64
        geometry = module.plan.model.model_copy(update={"arch": name})
        loaded = load_official_weights(backbone_from_config(geometry), folder / "backbone.pth")
        assert torch.equal(loaded.cls_token, module.students_ema[name].backbone.cls_token)
        heads = torch.load(folder / "heads.pth", weights_only=True)  # the release's layout
        ema = module.students_ema[name]
        assert torch.equal(heads["dino_head.last_layer.weight_g"], ema.dino_head.last_layer.weight_g)
        assert torch.equal(heads["ibot_head.mlp.4.weight"], ema.ibot_head.mlp[4].weight)
    specs = discover_models([str(tmp_path)])
    assert sorted(s.name for s in specs) == ["student_vit_test", "student_vit_tiny"]


def test_teacher_heads_must_fit_the_heads_sections(teacher_export):
    cfg = tiny_config(ibot=SEPARATE, dino={"head_n_prototypes": 32})
    with pytest.raises(ValueError, match=r"shape mismatch for 'dino_head\.last_layer\.weight_g'"):
        _module(cfg, teacher_export)
    with pytest.raises(ValueError, match="ibot.separate_head is false"):
        _module(tiny_config(), teacher_export)  # exported separate, configured tied


def test_students_must_share_the_teachers_patch_grid(teacher_export, tmp_path):
    cfg = tiny_config(ibot=SEPARATE, model={"patch_size": 7})
    source = exports.resolve_source(str(teacher_export), tiny_config().model)
    with pytest.raises(ConfigError, match="model.patch_size = 7"):
        distill_phases(cfg, source, tmp_path, tmp_path, world=1)


# -- teachers without heads ------------------------------------------------------------------------------------------


def test_head_fit_trains_only_the_heads_and_learns(teacher_export, curated, tmp_path):
    cfg = tiny_config(distill={"head_fit_iterations": 24, "head_fit_base_lr": 0.5}, train={"log_period": 4})
    source = exports.resolve_source(str(teacher_export / "backbone.pth"), cfg.model)
    assert source.heads is None
    fit, _ = distill_phases(cfg, source, tmp_path / "ck", tmp_path / "out", world=1)
    done = run_phase(fit, train=cfg.train, curated=str(curated), log_metrics=lambda row, step: None)
    first, last = done.result.history[0], done.result.history[-1]
    assert last["dino_loss"] < first["dino_loss"] - 0.05, (first, last)  # the heads learn the frozen features
    (final,) = (tmp_path / "ck" / "head_fit" / done.fingerprint).glob("step_00000024")
    state = torch.load(final / "state.pt", weights_only=True)["model"]
    official = torch.load(teacher_export / "backbone.pth", weights_only=True)
    assert torch.equal(state["teacher.backbone.cls_token"], official["cls_token"])  # backbone never moves
    assert torch.equal(state["student.backbone.cls_token"], official["cls_token"])
    assert {p.name for p in fit.out.iterdir()} >= {"backbone.pth", "heads.pth", "model.json"}
    plan = distill_plan(cfg, world_size=1, teacher=source.model, weights=WeightsPlan("phase", "head_fit", "x"))
    DistillMetaArch(plan).initial_state(str(fit.out))  # the fitted heads serve as targets


def test_head_fit_module_freezes_the_backbone():
    cfg = tiny_config()
    plan = head_fit_plan(cfg, stage="distill", world_size=1, model=cfg.model, weights=WeightsPlan("random"))
    module = SSLMetaArch(plan)
    groups = module.optim_param_groups(layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    optimised = {id(p) for g in groups for p in g["params"]}
    assert optimised == {id(p) for p in module.student.dino_head.parameters()}
    assert [t for _, t in module.ema_pairs()] == [module.teacher.dino_head]
    assert module.checkpointed_blocks() == ()
