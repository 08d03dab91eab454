"""The faster step computes what the straightforward one did, on fixed inputs (CPU, float32 or float64).

- crops packed through each block (`train.pack_crops`) against one crop size after the other, stochastic depth
  included (the same subsets are drawn);
- Sinkhorn-Knopp with scaling vectors against the release's rescaling of the whole matrix;
- the engine's step (fused AdamW, per-module clipping and the non-finite skip decided on the device,
  `_foreach_lerp_` EMA) against the releases' step written out: their parameter groups (`get_params_groups_with_decay`
  per student module: layer-wise decay, patch-embedding multiplier, no weight decay on biases, norms and gammas, the
  tokens and position embedding decayed), torch's `clip_grad_norm_` on each student module on its own, a plain
  AdamW and the EMA, over several steps;
- a whole training step with packed crops against the same step without.
"""

from __future__ import annotations

import copy

import pytest
import torch

from components.model import build_backbone
from components.model.losses import sinkhorn_knopp
from components.training.engine import EngineSettings, TrainEngine
from tests.distillation.tiny import pretrain_module, tiny_config
from tests.model.test_model_losses import naive_sinkhorn  # the release's rescaling of the whole matrix
from tests.training.test_step import fixed_batch


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.4])
def test_packed_crops_compute_what_one_size_after_the_other_does(rate):
    torch.manual_seed(0)
    model = build_backbone("vit_test", drop_path_rate=rate, depth=3).double().train()
    packed = copy.deepcopy(model)
    packed.pack_crops = True
    crops = [torch.randn(6, 3, 28, 28, dtype=torch.float64), torch.randn(10, 3, 14, 14, dtype=torch.float64)]
    masks = [torch.rand(6, 4) > 0.5, None]
    outs = []
    for m in (model, packed):
        torch.manual_seed(1)  # the same stochastic-depth draws
        feats = m.forward_features(crops, masks)
        loss = sum(f["x_norm_clstoken"].square().sum() + f["x_norm_patchtokens"].mean() for f in feats)
        loss.backward()
        outs.append((feats, loss))
    for a, b in zip(outs[0][0], outs[1][0], strict=True):
        for key in ("x_norm_clstoken", "x_norm_patchtokens"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), packed.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize(("rows", "K", "temp"), [(64, 512, 0.07), (300, 4096, 0.04), (7, 33, 0.1)])
def test_sinkhorn_with_scaling_vectors_matches_the_releases_rescaling(rows, K, temp):
    torch.manual_seed(rows)
    z = torch.nn.functional.normalize(torch.randn(rows, 16), dim=-1)
    w = torch.nn.functional.normalize(torch.randn(K, 16), dim=-1)
    logits = z @ w.t()  # cosines, as the DINO head gives them
    ours = sinkhorn_knopp(logits, temp)
    torch.testing.assert_close(ours.double(), naive_sinkhorn(logits, temp, 3), rtol=2e-5, atol=1e-9)
    torch.testing.assert_close(ours.sum(-1), torch.ones(rows))
    assert sinkhorn_knopp(logits[:0], temp).shape == (0, K)  # a rank without masked patches


def release_layer_id(name: str, n_blocks: int) -> int:
    """The releases' `get_vit_lr_decay_rate` layer id of a parameter named within its student module."""
    if n_blocks == 0:
        return 1  # a head: num_layers + 1 with num_layers 0
    if any(key in name for key in ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")):
        return 0
    if "blocks." in name:
        return int(name[name.find("blocks.") :].split(".")[1]) + 1
    return n_blocks + 1


def release_param_groups(student, layerwise_decay: float, patch_embed_lr_mult: float) -> list[dict]:
    """Both releases' groups, one per parameter, built for each student module on its own (their
    `get_params_groups` loop over `student.items()`)."""
    groups = []
    for module in student.values():
        n_blocks = len(module.blocks) if hasattr(module, "blocks") else 0
        for name, p in module.named_parameters():
            lr_mult = layerwise_decay ** (n_blocks + 1 - release_layer_id(name, n_blocks))
            if "patch_embed" in name:
                lr_mult *= patch_embed_lr_mult
            wd_mult = 0.0 if name.endswith("bias") or "norm" in name or "gamma" in name else 1.0
            groups.append({"params": [p], "lr_multiplier": lr_mult, "wd_multiplier": wd_mult,
                           "is_last_layer": "last_layer" in name, "name": name})  # fmt: skip
    return groups


def reference_step(module, optimizer, batch, values, clip):
    """One step as the releases' training loop runs it: schedules on the groups, loss, backward,
    `clip_grad_norm_` of each student module on its own, a plain AdamW, then the EMA as m t + (1 - m) s."""
    for group in optimizer.param_groups:
        group["lr"] = (values["last_layer_lr"] if group["is_last_layer"] else values["lr"]) * group["lr_multiplier"]
        group["weight_decay"] = values["weight_decay"] * group["wd_multiplier"]
    optimizer.zero_grad(set_to_none=True)
    module(batch, values)["loss"].backward()
    norms = {k: float(torch.nn.utils.clip_grad_norm_(v.parameters(), clip)) for k, v in module.student.items()}
    optimizer.step()
    m = values["momentum"]
    with torch.no_grad():
        for s, t in zip(module.student.parameters(), module.teacher.parameters(), strict=True):
            t.mul_(m).add_(s, alpha=1 - m)
    return norms


def test_the_engine_step_matches_the_releases_step_written_out(in_process_training):
    cfg = tiny_config(
        optim={"clip_grad": 30.0, "freeze_last_layer_epochs": 0}, ibot={"separate_head": True},
        model={"num_register_tokens": 2}, train={"batch_size_per_gpu": 4},
    )  # fmt: skip
    torch.manual_seed(0)
    module = pretrain_module(cfg)
    reference = copy.deepcopy(module)
    engine = TrainEngine(module, EngineSettings.from_plan(module.plan, cfg.train))
    groups = release_param_groups(reference.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
    assert {g["name"]: g["wd_multiplier"] for g in groups}["register_tokens"] == 1.0  # the tokens are decayed
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), foreach=False)
    schedules = module.plan.schedules()
    for step in range(3):
        batch, values = fixed_batch(cfg, seed=step), schedules.at(step + 2)  # past the lr warm-up's zero
        out = engine.train_step([batch], values)
        norms = reference_step(reference, optimizer, batch, values, clip=cfg.optim.clip_grad)
        assert not out.skipped
        assert out.module_norms == pytest.approx(norms, rel=1e-4)  # each module's norm before clipping, logged
        assert out.grad_norm == pytest.approx(sum(v * v for v in norms.values()) ** 0.5, rel=1e-4)
        clipped = [n > cfg.optim.clip_grad for n in norms.values()]
        assert all(clipped) if step == 0 else any(clipped) and not all(clipped)  # by its own factor; some not at all
    ours = engine.module.state_dict()
    for name, value in reference.state_dict().items():
        if name.endswith("attn.qkv.bias"):  # the key bias: zero gradient in exact arithmetic (the softmax over keys
            D = len(value) // 3  # ignores a constant per query), which AdamW turns from rounding noise into updates
            ours_qv, value_qv = (torch.cat((v[:D], v[2 * D :])) for v in (ours[name], value))
            torch.testing.assert_close(ours_qv, value_qv, rtol=1e-5, atol=1e-6, msg=name)
            continue
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_non_finite_loss_skips_the_step_on_the_device(in_process_training):
    cfg = tiny_config(train={"batch_size_per_gpu": 4})
    torch.manual_seed(0)
    module = pretrain_module(cfg)
    engine = TrainEngine(module, EngineSettings.from_plan(module.plan, cfg.train))
    values = module.plan.schedules().at(3)
    engine.train_step([fixed_batch(cfg)], values)
    student = {k: v.clone() for k, v in engine.module.student.state_dict().items()}
    moments = {k: v.clone() for k, v in engine.full_optimizer_state()["exp_avg"].items()}
    bad = fixed_batch(cfg, seed=1)
    bad["collated_global_crops"][0, 0, 0, 0] = float("nan")
    out = engine.train_step([bad], values)
    assert out.skipped_t.dtype == torch.bool and out.skipped and out.grad_norm == float("inf")
    assert all(torch.equal(v, engine.module.student.state_dict()[k]) for k, v in student.items())
    assert all(torch.equal(v, engine.full_optimizer_state()["exp_avg"][k]) for k, v in moments.items())
    assert all(torch.isfinite(p).all() for p in engine.module.teacher.parameters())
    assert not engine.train_step([fixed_batch(cfg, seed=2)], values).skipped


def test_a_step_with_packed_crops_matches_the_step_without():
    """The meta-architecture's loss and gradients with the student's crops packed, stochastic depth on."""
    cfg = tiny_config(model={"drop_path_rate": 0.3}, train={"batch_size_per_gpu": 4})
    results = []
    for pack in (False, True):
        torch.manual_seed(0)
        module = pretrain_module(cfg).double()
        module.student.backbone.pack_crops = pack
        batch = {
            k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in fixed_batch(cfg).items()
        }
        torch.manual_seed(5)  # the same stochastic-depth subsets
        out = module(batch, module.plan.schedules().at(3))
        out["loss"].backward()
        results.append((out, {n: p.grad for n, p in module.student.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (packed, packed_grads) = results
    for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss"):
        torch.testing.assert_close(packed[key], plain[key], rtol=1e-6, atol=0)
    assert packed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()))
