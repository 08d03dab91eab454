"""Fixtures of the distillation tests: a teacher export (the curated manifest is the root conftest's)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.distillation.tiny import pretrain_module, tiny_config


@pytest.fixture(scope="session")
def teacher_export(tmp_path_factory) -> Path:
    """A pretrain-stage export (backbone, heads, model.json) of a seeded vit_test `SSLMetaArch`, separate iBOT head."""
    cfg = tiny_config(ibot={"separate_head": True})
    torch.manual_seed(123)
    arch = pretrain_module(cfg)
    out = tmp_path_factory.mktemp("teacher")
    arch.export(arch.state_dict(), out, iterations=0)
    return out


@pytest.fixture(autouse=True)
def _trains_in_this_process(in_process_training):
    """Every test here may run training in this process (the root conftest's `in_process_training`)."""
    yield


@pytest.fixture
def caplog_dinov2(caplog, monkeypatch):
    monkeypatch.setenv("DINOV2_TRACKING", "off")
    logger = logging.getLogger("dinov2")
    logger.addHandler(caplog.handler)  # the project's loggers do not propagate to the root
    caplog.set_level(logging.INFO, logger="dinov2")
    yield caplog
    logger.removeHandler(caplog.handler)
