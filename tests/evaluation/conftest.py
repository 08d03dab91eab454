"""Fixtures of the evaluation tests: a seeded `vit_test` backbone (known feature sets: eval_fixtures.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(scope="session")
def vit_test() -> nn.Module:
    """The cheapest real backbone (2 blocks of width 64), seeded, in eval mode; tests must not modify it."""
    from components.model import build_backbone

    torch.manual_seed(0)
    model = build_backbone("vit_test").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
