"""One step of the meta-architecture against the paper's formulas, and the prototypes' freeze in the first epoch.

The reference step is written here from the paper (Oquab et al. 2023, section 3, and the release's recipe it
describes), on the module's own networks but with none of its loss code: the teacher sees the two global crops
unmasked; its CLS and masked-patch logits are centred (Sinkhorn-Knopp as a plain loop, or a softmax with the centre,
zero at the first step) at the teacher temperature; the student sees the global crops with the mask token and the
local crops. DINO: each student global crop against the other teacher global crop (the teacher's chunks swapped), each
local crop against both teacher global crops, the batch-mean cross-entropies summed and divided by the number of
pairs (with DINOv3's local-crop weight w: the global pairs' mean and w x the local pairs' mean, each weighted by its
share of the pairs, as the DINOv3 release's `compute_losses` weighs them). iBOT: the cross-entropy of each masked
patch, averaged within its image, summed over the images and divided by the number of global-crop images. KoLeo: on
each global crop's CLS features, summed over the two crops.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from components.training.engine import EngineSettings, TrainEngine
from components.training.meta_arch import SSLMetaArch
from tests.distillation.tiny import pretrain_module, tiny_config

G, L, B = 2, 2, 4  # global crops, local crops, images


def fixed_batch(cfg, seed: int = 0) -> dict:
    """Crops and masks given by hand: images 0 and 2 of each global crop masked, at different ratios."""
    gen = torch.Generator().manual_seed(seed)
    size, small = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    n = (size // cfg.model.patch_size) ** 2
    masks = torch.zeros(G * B, n, dtype=torch.bool)
    for row, count in ((0, 1), (2, 2), (B, 3), (B + 2, 1)):
        masks[row, torch.randperm(n, generator=gen)[:count]] = True
    per_image = 1.0 / masks.sum(-1).clamp(min=1)
    return {
        "collated_global_crops": torch.randn(G * B, 3, size, size, generator=gen),
        "collated_local_crops": torch.randn(L * B, 3, small, small, generator=gen),
        "collated_masks": masks,
        "mask_indices_list": masks.flatten().nonzero().flatten(),
        "masks_weight": per_image.unsqueeze(-1).expand_as(masks)[masks],
        "n_global_crops": G,
        "n_local_crops": L,
    }


def sinkhorn_loop(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp, row by row and column by column: prototypes get equal mass, each sample sums to 1."""
    Q = torch.exp(logits / temp).t().clone()  # (K, B)
    K, N = Q.shape
    Q /= Q.sum()
    for _ in range(iterations):
        for k in range(K):
            Q[k] /= Q[k].sum() * K
        for b in range(N):
            Q[:, b] /= Q[:, b].sum() * N
    return (Q * N).t()


def targets(logits: torch.Tensor, temp: float, centering: str) -> torch.Tensor:
    if centering == "sinkhorn_knopp":
        return sinkhorn_loop(logits, temp)
    return torch.softmax(logits / temp, dim=-1)  # the centre is zero before the first update


def ce(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temp: float = 0.1) -> torch.Tensor:
    """Per-row cross-entropy between a teacher distribution and the student's softmax."""
    return -(teacher_probs * torch.log_softmax(student_logits / temp, dim=-1)).sum(-1)


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    x = F.normalize(x, dim=-1, eps=eps)
    terms = []
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        nearest = max(others, key=lambda j: float(x[i].detach() @ x[j].detach()))
        terms.append(-torch.log(F.pairwise_distance(x[i : i + 1], x[nearest : nearest + 1], eps=eps) + eps))
    return torch.cat(terms).mean()


def paper_step(module: SSLMetaArch, batch: dict, temp: float, local_weight: float = 1.0) -> dict[str, torch.Tensor]:
    plan = module.plan
    glob, local, masks = batch["collated_global_crops"], batch["collated_local_crops"], batch["collated_masks"]
    ibot_head_s = module.student["ibot_head"] if plan.ibot.separate_head else module.student["dino_head"]
    ibot_head_t = module.teacher["ibot_head"] if plan.ibot.separate_head else module.teacher["dino_head"]
    with torch.no_grad():
        t = module.teacher.backbone(glob, is_training=True)
        t_cls = module.teacher.dino_head(t["x_norm_clstoken"])  # (G B, K)
        t_patch = ibot_head_t(t["x_norm_patchtokens"][masks])  # (M, K), image-major within each crop
        t_dino = targets(t_cls, temp, plan.teacher.centering).view(G, B, -1)
        t_ibot = targets(t_patch, temp, plan.teacher.centering)
    s_glob = module.student.backbone(glob, masks=masks, is_training=True)
    s_local = module.student.backbone(local, is_training=True)
    s_cls = module.student.dino_head(s_glob["x_norm_clstoken"]).view(G, B, -1)
    l_cls = module.student.dino_head(s_local["x_norm_clstoken"]).view(L, B, -1)
    swapped = t_dino.flip(0)  # student crop 0 against teacher crop 1, and 1 against 0
    global_pairs = [ce(s_cls[g], swapped[g]).mean() for g in range(G)]
    local_pairs = [ce(l_cls[i], t_dino[g]).mean() for i in range(L) for g in range(G)]
    n = len(global_pairs) + len(local_pairs)
    global_mean, local_mean = sum(global_pairs) / len(global_pairs), sum(local_pairs) / len(local_pairs)
    dino = len(global_pairs) / n * global_mean + len(local_pairs) / n * local_weight * local_mean
    patch_ce = ce(ibot_head_s(s_glob["x_norm_patchtokens"][masks]), t_ibot)  # (M,)
    owner = masks.nonzero()[:, 0]  # the global-crop image of each masked patch
    per_image = [patch_ce[owner == i].mean() for i in range(G * B) if (owner == i).any()]
    ibot = sum(per_image) / (G * B)
    kl = sum(koleo(c) for c in s_glob["x_norm_clstoken"].chunk(G))
    loss = plan.dino.loss_weight * dino + plan.ibot.loss_weight * ibot + plan.dino.koleo_loss_weight * kl
    return {"loss": loss, "dino_loss": dino, "ibot_loss": ibot, "koleo_loss": kl}


@pytest.mark.parametrize(
    ("separate", "centering", "local_weight"),
    [(False, "sinkhorn_knopp", 1.0), (True, "sinkhorn_knopp", 0.5), (False, "softmax", 1.0), (True, "softmax", 1.0)],
)
def test_one_step_matches_the_papers_formulas(separate, centering, local_weight):
    cfg = tiny_config(
        model={"drop_path_rate": 0.0}, ibot={"separate_head": separate}, teacher={"centering": centering},
        dino={"koleo_loss_weight": 0.3},
    )  # fmt: skip
    torch.manual_seed(0)
    module = pretrain_module(cfg).double()
    with torch.no_grad():  # trained prototype norms and a teacher that is not the student, as after some steps
        module.student.dino_head.last_layer.weight_g.uniform_(0.5, 2.0)
        for p in module.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in fixed_batch(cfg).items()}
    temp = 0.06
    ours = module(batch, {"teacher_temp": temp, "dino_local_loss_weight": local_weight})
    ours["loss"].backward()
    grads = {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    reference = paper_step(module, batch, temp, local_weight)
    reference["loss"].backward()
    # The module computes its losses in float32 whatever the weights' dtype (as released): float32 tolerances.
    for term in ("loss", "dino_loss", "ibot_loss", "koleo_loss"):
        torch.testing.assert_close(ours[term].double(), reference[term].detach(), rtol=1e-6, atol=0, msg=term)
    assert reference["ibot_loss"] > 0 and grads.keys() == {
        n for n, p in module.student.named_parameters() if p.grad is not None
    }
    for name, p in module.student.named_parameters():
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6 * scale, msg=name)
    assert grads["dino_head.last_layer.weight_g"].abs().sum() > 0


def test_prototype_norms_stay_frozen_in_the_first_epoch_then_train(in_process_training):
    cfg = tiny_config(
        optim={"epochs": 2, "epoch_length": 2, "warmup_epochs": 0, "freeze_last_layer_epochs": 1, "base_lr": 0.5},
        ibot={"separate_head": True}, train={"batch_size_per_gpu": B},
    )  # fmt: skip
    torch.manual_seed(0)
    module = pretrain_module(cfg)
    engine = TrainEngine(module, EngineSettings.from_plan(module.plan, cfg.train))
    schedules = module.plan.schedules()
    names = [f"{net}.{head}.last_layer.{p}" for net in ("student", "teacher") for head in ("dino_head", "ibot_head")
             for p in ("weight_g", "weight_v")]  # fmt: skip
    params = dict(engine.module.named_parameters())
    groups = {n for g, meta in zip(engine.optimizer.param_groups, engine.group_meta, strict=True) if meta[2]
              for n, p in params.items() if any(p is q for q in g["params"])}  # fmt: skip
    assert {n for n in names if n.startswith("student.")} <= groups  # in the last-layer group ...
    wd = {n: meta[1] for g, meta in zip(engine.optimizer.param_groups, engine.group_meta, strict=True)
          for n, p in params.items() if any(p is q for q in g["params"])}  # fmt: skip
    assert wd["student.dino_head.last_layer.weight_g"] == 1.0  # ... with weight decay, as released
    before = {n: params[n].detach().clone() for n in names}
    for step in range(4):
        values = schedules.at(step)
        out = engine.train_step([fixed_batch(cfg, seed=step)], values)
        assert not out.skipped
        g = params["student.dino_head.last_layer.weight_g"]
        if step < 2:  # the first epoch: lr 0 on the last layer, though its gradient flows
            assert values["last_layer_lr"] == 0.0
            frozen = [n for n in names if n.startswith("student.")]  # (the EMA moves the teacher's by rounding)
            assert all(torch.equal(params[n], before[n]) for n in frozen), step
        else:
            assert values["last_layer_lr"] > 0
    assert not torch.equal(g, before["student.dino_head.last_layer.weight_g"])  # the norms train after the freeze
    assert not torch.equal(
        params["teacher.ibot_head.last_layer.weight_g"], before["teacher.ibot_head.last_layer.weight_g"]
    )
    assert math.isfinite(float(g.detach().sum()))
