"""Stages `pretrain` and `pretrain_highres`: DINOv2 self-supervised pretraining under DeepSpeed ZeRO.

    python -m components pretrain --curated data/curated --checkpoints checkpoints/pretrain --out models/pretrain \
        --metrics metrics/pretrain.json --curve metrics/pretrain_curve.csv
    python -m components pretrain_highres --pretrained models/pretrain --curated data/curated \
        --checkpoints checkpoints/pretrain_highres --out models/pretrain_highres \
        --metrics metrics/pretrain_highres.json --curve metrics/pretrain_highres_curve.csv

With `train.nproc_per_node` above 1 and no launcher around it (no RANK / WORLD_SIZE), the stage relaunches itself
under `torchrun --standalone`; under torchrun or the DeepSpeed launcher (`infra/launch/`) it runs as one rank of the
job. Re-running after a crash resumes from the newest complete checkpoint of the same plan, on any number of ranks
with the same global batch.

Outputs: `models/pretrain/` (an export, `components.exports`: the teacher backbone in the official layout as
`backbone.pth` and `backbone.safetensors`, `heads.pth`, `model.json`; and `config.yaml`, `plan.yaml`, gate
reports), the step-metrics curve (a DVC plot) and the stage's metrics JSON. The high-resolution phase (paper,
appendix B.2) starts student and teacher from that export and runs the `highres` section's schedule
(`components.training.plan.highres_plan`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from components.config import PipelineConfig
from components.stages.common import train_stage


def run_pretrain(cfg: PipelineConfig, *, curated: str, checkpoints: str, out: str, metrics: str, curve: str) -> None:
    """The `pretrain` stage (see the module docstring)."""
    from components import exports
    from components.training.meta_arch import SSLMetaArch
    from components.training.plan import WeightsPlan, pretrain_plan
    from components.training.trainer import Phase

    paths = {"curated": curated, "checkpoints": checkpoints, "out": out, "metrics": metrics, "curve": curve}
    with tempfile.TemporaryDirectory(prefix="pretrain-weights-") as tmp:
        location, weights = None, WeightsPlan("random")
        if cfg.model.pretrained_weights:
            source = exports.resolve_source(cfg.model.pretrained_weights, cfg.model, download_dir=Path(tmp))
            location, weights = source.location, WeightsPlan(source.kind, source.origin, source.digest)

        def phases(world: int) -> list[Phase]:
            plan = pretrain_plan(cfg, world_size=world, weights=weights)
            return [Phase(plan, SSLMetaArch, Path(checkpoints) / "pretrain", Path(out), location)]

        train_stage("pretrain", cfg, paths, phases)


def run_pretrain_highres(
    cfg: PipelineConfig, *, pretrained: str, curated: str, checkpoints: str, out: str, metrics: str, curve: str
) -> None:
    """The `pretrain_highres` stage: the high-resolution adaptation from the `pretrain` export."""
    from components.exports import export_digest
    from components.training.meta_arch import SSLMetaArch
    from components.training.plan import WeightsPlan, highres_plan
    from components.training.trainer import Phase

    paths = {"pretrained": pretrained, "curated": curated, "checkpoints": checkpoints, "out": out}
    paths |= {"metrics": metrics, "curve": curve}
    weights = WeightsPlan("export", pretrained, export_digest(pretrained))  # a new pretrain export: a new run

    def phases(world: int) -> list[Phase]:
        plan = highres_plan(cfg, world_size=world, weights=weights)
        return [Phase(plan, SSLMetaArch, Path(checkpoints) / "highres", Path(out), pretrained)]

    train_stage("pretrain_highres", cfg, paths, phases)
