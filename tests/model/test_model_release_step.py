"""The optimizer step's pieces against numbers recorded from the releases' own code.

`fixtures/release_optim_step.pt` was recorded by a script outside the project that imports the DINOv2 release
(facebookresearch/dinov2, `dinov2.utils.param_groups`) and the DINOv3 release (facebookresearch/dinov3:
`train/param_groups.py`, `train/cosine_lr_scheduler.py`, `loss/koleo_loss.py`, `loss/dino_clstoken_loss.py`,
`models/vision_transformer.py`, `layers/dino_head.py`) and saves, on inputs built from
`torch.Generator().manual_seed(0)`:
- `warmup_cosine`, `cosine`: DINOv3's `linear_warmup_cosine_decay` arrays and the releases' `CosineScheduler`
  arrays, with their arguments;
- `koleo*`: `KoLeoLoss` and single-process `KoLeoLossDistributed(topk=1, 2, 3)` (values and input gradients) on a
  (10, 6) batch with a near-duplicate row;
- `dino_weighted`: DINOv3's `compute_losses` DINO term (`dino_global_scale` x the global loss with
  `ignore_diagonal` + `dino_local_scale` x w x the local loss) for w = 1, 0.5, 0.25 on (G=2, L=4, B=3, K=7) inputs;
- `dinov2_groups`: DINOv2's `get_params_groups_with_decay` (layer-wise decay 0.9, patch-embedding multiplier 0.2)
  on each module of this project's `vit_test` student (depth 3, 2 registers, DINO and iBOT heads), whose names are
  the release's: (lr multiplier, wd multiplier, is last layer) by name;
- `dinov3_groups`, `dinov3_shapes`: DINOv3's `get_params_groups_with_decay_fsdp` (same multipliers, DINO-head
  weight-decay multiplier 1.0) on each module of the release's own ViT of the 7B layout at width 32 (depth 3, 2
  storage tokens, masked key bias, SwiGLU, untied local CLS norm) with its DINO and iBOT heads, and their shapes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from components.model import (
    DINOHead,
    DINOLoss,
    build_backbone,
    cosine_schedule,
    koleo_loss,
    koleo_loss_distributed,
    param_groups,
    warmup_cosine_decay,
)

FIXTURE = Path(__file__).with_name("fixtures") / "release_optim_step.pt"


@pytest.fixture(scope="module")
def release() -> dict:
    return torch.load(FIXTURE, weights_only=False)


def _rows(groups: list[dict]) -> dict[str, tuple[float, float, bool]]:
    return {n: (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups for n in g["names"]}


def test_dinov2_param_groups_are_the_releases(release):
    backbone = build_backbone("vit_test", depth=3, num_register_tokens=2)
    student = nn.ModuleDict({
        "backbone": backbone,
        "dino_head": DINOHead(backbone.embed_dim, 10, hidden_dim=16, bottleneck_dim=8),
        "ibot_head": DINOHead(backbone.embed_dim, 12, hidden_dim=16, bottleneck_dim=8),
    })  # fmt: skip
    ours = _rows(param_groups(student, layerwise_decay=0.9, patch_embed_lr_mult=0.2))
    assert ours.keys() == release["dinov2_groups"].keys()
    for name, (lr, wd, last) in release["dinov2_groups"].items():
        assert ours[name] == (pytest.approx(lr, rel=1e-12), wd, last), name
    assert ours["backbone.register_tokens"][1] == ours["backbone.pos_embed"][1] == 1.0  # the tokens are decayed


def module_with_names(shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """A module whose parameters have these dotted names and shapes (numbered parts become `nn.ModuleList`s)."""
    root = nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        node = root
        for i, part in enumerate(path):
            listed = i + 1 < len(path) and path[i + 1].isdigit()
            if isinstance(node, nn.ModuleList):
                while len(node) <= int(part):
                    node.append(nn.Module())
                node = node[int(part)]
                continue
            if not hasattr(node, part):
                node.add_module(part, nn.ModuleList() if listed else nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))
    return root


def test_dinov3_param_groups_are_the_releases_for_its_layout(release):
    """Storage tokens in layer 0 and decayed, the untied local CLS norm after the blocks and undecayed, SwiGLU and
    masked-key-bias blocks numbered, heads at multiplier 1."""
    student = module_with_names(release["dinov3_shapes"])
    assert [n for n, _ in student.named_parameters()] == list(release["dinov3_shapes"])
    ours = _rows(param_groups(student, layerwise_decay=0.9, patch_embed_lr_mult=0.2))
    assert ours.keys() == release["dinov3_groups"].keys()
    for name, (lr, wd, last) in release["dinov3_groups"].items():
        assert ours[name] == (pytest.approx(lr, rel=1e-12), wd, last), name


def test_schedules_are_the_releases_arrays(release):
    for case in release["warmup_cosine"]:
        start, peak, end, warmup, total, cosine = case["args"]
        kw = {"start": start, "peak": peak, "end": end, "warmup_steps": warmup, "total_steps": total}
        ours = [warmup_cosine_decay(i, **kw, cosine_steps=cosine) for i in range(total)]
        assert ours == pytest.approx(case["values"].tolist(), rel=1e-13, abs=1e-16), case["args"]
    for case in release["cosine"]:
        c = case["kwargs"]
        kw = {
            "base_value": c["base_value"],
            "final_value": c["final_value"],
            "total_steps": c["total_iters"],
            "warmup_steps": c.get("warmup_iters", 0),
            "start_warmup_value": c.get("start_warmup_value", 0.0),
        }
        ours = [cosine_schedule(i, **kw) for i in range(c["total_iters"])]
        assert ours == pytest.approx(case["values"].tolist(), rel=1e-13, abs=1e-16), c


def test_koleo_is_the_releases(release):
    x = release["koleo_input"]
    torch.testing.assert_close(koleo_loss(x), release["koleo"], rtol=1e-6, atol=0)
    for k in (1, 2, 3):
        xi = x.clone().requires_grad_(True)
        value = koleo_loss_distributed(xi, topk=k)
        value.backward()
        torch.testing.assert_close(value.detach(), release[f"koleo_top{k}"], rtol=1e-6, atol=0)
        torch.testing.assert_close(xi.grad, release[f"koleo_top{k}_grad"], rtol=1e-5, atol=1e-7)


def test_the_local_crop_weight_is_the_releases(release):
    inputs = release["dino_inputs"]
    K = inputs["teacher"].shape[-1]
    for w, expected in release["dino_weighted"].items():
        ours = DINOLoss(K)(inputs["student_global"], inputs["student_local"], inputs["teacher"], local_weight=w)
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0, msg=f"local weight {w}")
