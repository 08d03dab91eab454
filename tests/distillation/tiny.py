"""The tiny configuration of the distillation tests: params.yaml shrunk to vit_test geometry and 28 / 14 px crops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.config import PipelineConfig, load_config, validate_config
from tests.conftest import LAUNCHER_ENV  # noqa: F401 - re-exported for the tests that launch fresh worlds

ROOT = Path(__file__).resolve().parents[2]


def tiny_raw(**sections: dict[str, Any]) -> dict[str, Any]:
    """params.yaml shrunk for unit tests: vit_test geometry, 28 / 14 px crops, 64 prototypes, batch 8, one thread.

    Keyword arguments update sections, e.g. `tiny_raw(distill={"students": ["vit_test", "vit_tiny"]})`.
    """
    raw = load_config(ROOT / "params.yaml").model_dump(mode="json")
    raw["model"].update(arch="vit_test")
    raw["dino"].update(head_n_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16)
    raw["ibot"].update(head_n_prototypes=48, head_hidden_dim=32, head_bottleneck_dim=16)
    raw["crops"].update(global_crops_size=28, local_crops_size=14, local_crops_number=2)
    raw["optim"].update(epochs=2, epoch_length=4, warmup_epochs=1, freeze_last_layer_epochs=0, base_lr=0.05)
    raw["teacher"].update(warmup_teacher_temp_epochs=0)
    raw["train"].update(batch_size_per_gpu=8, num_workers=0, device="cpu", cpu_threads=1, checkpoint_period=4)
    raw["train"].update(log_period=2)
    raw["distill"].update(students=["vit_test"], epochs=2, head_fit_iterations=4)
    for name, values in sections.items():
        raw[name].update(values)
    return raw


def tiny_config(**sections: dict[str, Any]) -> PipelineConfig:
    return validate_config(tiny_raw(**sections))


def pretrain_module(cfg: PipelineConfig) -> Any:
    """`SSLMetaArch` of the pretrain phase's plan of `cfg` on one rank."""
    from components.training.meta_arch import SSLMetaArch
    from components.training.plan import pretrain_plan

    return SSLMetaArch(pretrain_plan(cfg, world_size=1))
