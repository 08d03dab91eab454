"""Fixtures of the distillation tests: a teacher export (the curated manifest is the root conftest's)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.distillation.tiny import LAUNCHER_ENV, tiny_config


@pytest.fixture(scope="session")
def teacher_export(tmp_path_factory) -> Path:
    """A pretrain-stage export (backbone, heads, model.json) of a seeded vit_test `SSLMetaArch`, separate iBOT head."""
    from components.training.meta_arch import SSLMetaArch

    cfg = tiny_config(ibot={"separate_head": True})
    torch.manual_seed(123)
    arch = SSLMetaArch(cfg)
    out = tmp_path_factory.mktemp("teacher")
    arch.export(arch.state_dict(), out, iterations=0)
    return out


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Runs in this process set torch's thread count (`train.cpu_threads`); later tests get the original back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


_WORLD_ENV: dict[str, str] = {}
"""The rendezvous of this process's world of one, once a test has started it (DeepSpeed reads it at every engine)."""


@pytest.fixture(autouse=True)
def _no_launcher_env_leaks():
    """In-process runs make this process a world of one, and `init_distributed` says so in the environment. Other
    test modules' subprocesses (torchrun scenarios, stage runs) inherit the environment and would try that
    rendezvous, so the variables are set only while a test of this folder runs; the process group itself stays
    (DeepSpeed cannot start over in one process)."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    if dist.is_available() and dist.is_initialized():
        os.environ.update(_WORLD_ENV)
    yield
    if dist.is_available() and dist.is_initialized():
        _WORLD_ENV.update({k: os.environ[k] for k in LAUNCHER_ENV if k in os.environ})
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
