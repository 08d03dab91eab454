"""The DINO head's weight-normalised prototypes and the release's head layout, read and written."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components.model import DINOHead
from components.model.adapter import (
    CheckpointError,
    load_official_heads,
    normalize_heads_state,
    official_heads_state,
)


def release_head(in_dim: int, out_dim: int, hidden: int = 32, bottleneck: int = 8) -> nn.Module:
    """The release's DINOHead as its `dino_head.py` builds it: an MLP, then `weight_norm(nn.Linear)` with g = 1."""

    class ReleaseHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Sequential(
                nn.Linear(in_dim, hidden),
                nn.GELU(),
                nn.Linear(hidden, hidden),
                nn.GELU(),
                nn.Linear(hidden, bottleneck),
            )
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
            self.last_layer.weight_g.data.fill_(1)

        def forward(self, x):
            return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12))

    return ReleaseHead()


def by_hand(head: DINOHead, x: torch.Tensor) -> torch.Tensor:
    """logits_k = x_hat . (g_k v_k / ||v_k||), from the head's own parameters."""
    z = F.normalize(head.mlp(x), dim=-1)
    g, v = head.last_layer.weight_g, head.last_layer.weight_v
    return z @ (g * v / v.norm(dim=1, keepdim=True)).t()


def test_prototypes_have_trainable_norms_initialised_to_one():
    torch.manual_seed(0)
    head = DINOHead(in_dim=16, out_dim=11, hidden_dim=32, bottleneck_dim=8)
    g, v = head.last_layer.weight_g, head.last_layer.weight_v
    assert g.shape == (11, 1) and v.shape == (11, 8) and torch.equal(g, torch.ones(11, 1))
    assert [n for n, _ in head.named_parameters()][-2:] == ["last_layer.weight_g", "last_layer.weight_v"]
    x = torch.randn(5, 16)
    head(x).logsumexp(-1).sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0  # the norms learn
    with torch.no_grad():
        g.mul_(torch.linspace(0.5, 3.0, 11).unsqueeze(1))  # a prototype's norm scales its logit
        v.mul_(7.0)  # the direction's own norm does not
    torch.testing.assert_close(head(x), by_hand(head, x))
    assert head(x).abs().max() > 1.0  # no longer cosines alone


def test_a_release_head_loads_and_gives_the_same_logits():
    torch.manual_seed(0)
    release = release_head(16, 11)
    with torch.no_grad():
        release.last_layer.weight_g.mul_(torch.rand(11, 1) + 0.5)  # as after training
    state = release.state_dict()
    assert set(state) >= {"last_layer.weight_g", "last_layer.weight_v", "mlp.4.weight"}
    for wrapped in (
        {"teacher": {f"dino_head.{k}": v for k, v in state.items()}},  # the release's teacher_checkpoint.pth
        {
            "model": {f"student.dino_head.{k}": v * 0 for k, v in state.items()}
            | {f"teacher.dino_head.{k}": v for k, v in state.items()}
        },
        {f"module.teacher.dino_head.{k}": v for k, v in state.items()},
    ):
        ours = DINOHead(16, 11, hidden_dim=32, bottleneck_dim=8)
        load_official_heads({"dino_head": ours}, wrapped)
        x = torch.randn(4, 16)
        torch.testing.assert_close(ours(x), release(x))
        torch.testing.assert_close(ours(x), by_hand(ours, x))


def test_pytorch_parametrized_weight_norm_and_our_format_1_load_too():
    torch.manual_seed(0)
    src = DINOHead(16, 11, hidden_dim=32, bottleneck_dim=8)
    with torch.no_grad():
        src.last_layer.weight_g.fill_(1.0)
    x = torch.randn(4, 16)
    mlp = {f"dino_head.{k}": v for k, v in src.state_dict().items() if k.startswith("mlp.")}
    g, v = src.last_layer.weight_g.detach(), src.last_layer.weight_v.detach()
    parametrized = {
        **mlp,
        "dino_head.last_layer.parametrizations.weight.original0": g,
        "dino_head.last_layer.parametrizations.weight.original1": v,
    }
    format_1 = {  # our exports before the release's layout: prototypes of norm 1 under `last_layer.weight`
        "format": 1,
        "dino_head": {**{k.removeprefix("dino_head."): t for k, t in mlp.items()}, "last_layer.weight": v * 3.0},
        "ibot_head": None,
        "dino_center": torch.full((1, 11), 0.5),
    }
    for checkpoint in (parametrized, format_1):
        ours = DINOHead(16, 11, hidden_dim=32, bottleneck_dim=8)
        found = load_official_heads({"dino_head": ours}, checkpoint)
        torch.testing.assert_close(ours(x), src(x))
    assert torch.equal(found.centers["dino"], torch.full((1, 11), 0.5))


def test_heads_round_trip_through_the_release_layout():
    torch.manual_seed(0)
    dino, ibot = DINOHead(16, 11, hidden_dim=32, bottleneck_dim=8), DINOHead(16, 7, hidden_dim=32, bottleneck_dim=8)
    with torch.no_grad():
        dino.last_layer.weight_g.uniform_(0.5, 2.0)
    centers = {"dino": torch.randn(1, 11), "ibot": torch.randn(1, 7)}
    flat = official_heads_state({"dino_head": dino.state_dict(), "ibot_head": ibot.state_dict()}, centers)
    assert "dino_head.last_layer.weight_g" in flat and "ibot_patch_loss.center" in flat  # the release's names
    found = normalize_heads_state(flat)
    assert sorted(found.heads) == ["dino_head", "ibot_head"] and torch.equal(found.centers["ibot"], centers["ibot"])
    copies = {"dino_head": DINOHead(16, 11, hidden_dim=32, bottleneck_dim=8), "ibot_head": DINOHead(16, 7, 3, 32, 8)}
    load_official_heads(copies, flat)
    for name, src in (("dino_head", dino), ("ibot_head", ibot)):
        assert all(
            torch.equal(a, b)
            for a, b in zip(src.state_dict().values(), copies[name].state_dict().values(), strict=True)
        )


def test_heads_that_do_not_fit_are_named():
    dino = DINOHead(16, 11, hidden_dim=32, bottleneck_dim=8)
    flat = official_heads_state({"dino_head": dino.state_dict()}, {})
    other = DINOHead(16, 12, hidden_dim=32, bottleneck_dim=8)
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch for 'dino_head\.last_layer\.weight_g': checkpoint \[11, 1\], model \[12, 1\]",
    ):
        load_official_heads({"dino_head": other}, flat)
    with pytest.raises(CheckpointError, match="ibot_head: not in the checkpoint.*tied.*ibot.separate_head is true"):
        load_official_heads({"dino_head": DINOHead(16, 11, 3, 32, 8), "ibot_head": DINOHead(16, 7, 3, 32, 8)}, flat)
    with pytest.raises(CheckpointError, match=r"missing key 'dino_head\.mlp\.4\.bias'"):
        load_official_heads(
            {"dino_head": DINOHead(16, 11, 3, 32, 8)}, {k: v for k, v in flat.items() if "mlp.4.bias" not in k}
        )
