"""A training checkpoint of the release seeds continued pretraining and distillation, heads included."""

from __future__ import annotations

import torch

from components import exports
from components.training.distill import DistillMetaArch
from components.training.plan import WeightsPlan, distill_plan
from tests.distillation.tiny import pretrain_module, tiny_config


def release_training_checkpoint(path, cfg) -> dict:
    """What the release's checkpointer saves: {"model": SSLMetaArch's state dict, "optimizer", "iteration"}, with
    the networks under `student.` / `teacher.` and the centres as `dino_loss.center`, `ibot_patch_loss.center`."""
    torch.manual_seed(7)
    source = pretrain_module(cfg)
    with torch.no_grad():
        for p in source.teacher.parameters():
            p.add_(torch.randn_like(p))  # a teacher unlike the student, to see which one is read
        source.teacher.dino_head.last_layer.weight_g.uniform_(0.5, 2.0)
    model = {f"{net}.{k}": v for net in ("student", "teacher") for k, v in getattr(source, net).state_dict().items()}
    model["dino_loss.center"] = torch.full((1, cfg.dino.head_n_prototypes), 0.25)
    model["ibot_patch_loss.center"] = torch.full((1, cfg.ibot.head_n_prototypes), 0.5)
    torch.save({"model": model, "optimizer": {}, "iteration": 1000}, path)
    return source.teacher.state_dict()


def test_continued_pretraining_starts_from_a_release_checkpoints_teacher(tmp_path):
    cfg = tiny_config(ibot={"separate_head": True}, teacher={"centering": "softmax"})
    teacher = release_training_checkpoint(tmp_path / "model_0000999.rank_0.pth", cfg)
    module = pretrain_module(cfg)
    module.initial_state(str(tmp_path / "model_0000999.rank_0.pth"))
    for net in (module.student, module.teacher):  # both start as the release's teacher, heads included
        assert all(torch.equal(v, teacher[k]) for k, v in net.state_dict().items())
    assert torch.equal(module.dino_loss.center, torch.full_like(module.dino_loss.center, 0.25))
    assert torch.equal(module.ibot_loss.center, torch.full_like(module.ibot_loss.center, 0.5))


def test_distillation_takes_a_release_checkpoints_teacher_heads(tmp_path):
    cfg = tiny_config(ibot={"separate_head": True})
    path = tmp_path / "teacher_checkpoint.pth"
    teacher = release_training_checkpoint(path, cfg)
    source = exports.resolve_source(str(path), cfg.model)
    assert source.heads == str(path)  # no head fit: the checkpoint has the teacher's heads
    plan = distill_plan(cfg, world_size=1, teacher=source.model, weights=WeightsPlan("file", str(path), source.digest))
    module = DistillMetaArch(plan)
    module.initial_state(source.location)
    assert all(torch.equal(v, teacher[k]) for k, v in module.teacher.state_dict().items())
