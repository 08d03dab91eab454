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

Gram anchoring (DINOv3, `gram` section, `components.training.gram`): with `gram.iterations` > 0 the main phase
exports to `<checkpoints>/pretrain/export` and the Gram refinement phase (`gram`) continues from there, its Gram
teacher the main phase's final EMA teacher, and writes the stage's export; otherwise `gram.enabled` anchors the main
phase itself (continued pretraining: to the starting model). The high-resolution phase is anchored too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from components.config import ConfigError, ModelConfig, PipelineConfig
from components.log import get_logger
from components.stages.common import head_fit_first, train_stage

log = get_logger(__name__)


def run_pretrain(cfg: PipelineConfig, *, curated: str, checkpoints: str, out: str, metrics: str, curve: str) -> None:
    """The `pretrain` stage (see the module docstring); `model.pretrained_weights` makes it continued pretraining."""
    from components import exports

    paths = {"curated": curated, "checkpoints": checkpoints, "out": out, "metrics": metrics, "curve": curve}
    with tempfile.TemporaryDirectory(prefix="pretrain-weights-") as tmp:
        source = None
        if cfg.model.pretrained_weights:  # checked before any step: a file that does not fit stops here
            source = exports.resolve_source(cfg.model.pretrained_weights, cfg.model, download_dir=Path(tmp))
            if source.model.arch != cfg.model.arch:
                raise ConfigError(
                    f"model.pretrained_weights = {source.origin} is an export of {source.model.arch}, but model.arch "
                    f"= {cfg.model.arch}"
                )
            log.info(
                "continuing from %s (sha256 %s, %d registers, heads %s)", source.origin, source.digest[:12],
                source.model.num_register_tokens, source.describe()["heads"],
            )  # fmt: skip
        gram_teacher = gram_teacher_weights(cfg, source.model if source else cfg.model, Path(tmp))
        train_stage(
            "pretrain",
            cfg,
            paths,
            lambda world: pretrain_phases(cfg, source, Path(checkpoints), Path(out), world, gram_teacher),
        )


def pretrain_phases(
    cfg: PipelineConfig, source: Any, checkpoints: Path, out: Path, world: int, gram_teacher: Any = None
) -> list[Any]:
    """Pretraining from scratch (one phase), or continued from `source`: its heads fitted first when it has none,
    then the whole model trained from there (the teacher starting as the student); then, with `gram.iterations`,
    the Gram refinement phase from the main phase's export (`gram_teacher`: `gram.teacher_weights` resolved)."""
    from components.training.layout import stage_layout
    from components.training.meta_arch import SSLMetaArch
    from components.training.plan import WeightsPlan, fingerprint, gram_phase_plan, pretrain_plan
    from components.training.trainer import Phase

    layout = stage_layout(checkpoints)
    refined = cfg.gram.enabled and cfg.gram.iterations > 0
    main_out = Path(layout.export("pretrain")) if refined else out
    if source is None:
        plan = pretrain_plan(cfg, world_size=world, gram_teacher=gram_teacher)
        phases = [Phase(plan, SSLMetaArch, layout, main_out)]
    else:
        phases, weights, location = head_fit_first(cfg, "pretrain", source, source.model, checkpoints, world)
        plan = pretrain_plan(cfg, world_size=world, weights=weights, model=source.model, gram_teacher=gram_teacher)
        drop = cfg.adapt.knn_stop_drop
        phases.append(Phase(plan, SSLMetaArch, layout, main_out, location, knn_stop_drop=drop))
    if refined:
        main = WeightsPlan("phase", "pretrain", fingerprint(plan.fingerprint_items()))
        gram = gram_phase_plan(cfg, world_size=world, weights=main, model=plan.model, gram_teacher=gram_teacher)
        phases.append(Phase(gram, SSLMetaArch, layout, out, str(main_out)))
    return phases


def gram_teacher_weights(cfg: PipelineConfig, model: ModelConfig, download_dir: Path) -> Any:
    """`gram.teacher_weights` as a `WeightsPlan`, checked to load into the trained backbone (`model`) before any
    step; None when Gram is off or its teacher is the phase's starting model."""
    import torch

    from components import exports
    from components.model import CheckpointError, backbone_from_config
    from components.model.adapter import check_official_weights
    from components.training.plan import WeightsPlan

    uri = cfg.gram.teacher_weights
    if not (cfg.gram.enabled and uri):
        return None
    source = exports.resolve_source(uri, model, download_dir=download_dir)
    try:
        with torch.device("meta"):  # the shapes only: the Gram teacher is a copy of the trained backbone
            check_official_weights(backbone_from_config(model), exports.read_weights(source.weights)[0])
    except CheckpointError as err:
        raise ConfigError(f"gram.teacher_weights = {uri} is not a copy of the trained backbone: {err}") from None
    return WeightsPlan(source.kind, source.location, source.digest)


def run_pretrain_highres(
    cfg: PipelineConfig, *, pretrained: str, curated: str, checkpoints: str, out: str, metrics: str, curve: str
) -> None:
    """The `pretrain_highres` stage: the high-resolution adaptation from the `pretrain` export."""
    from components.exports import export_digest
    from components.training.layout import stage_layout
    from components.training.meta_arch import SSLMetaArch
    from components.training.plan import WeightsPlan, highres_plan
    from components.training.trainer import Phase

    paths = {"pretrained": pretrained, "curated": curated, "checkpoints": checkpoints, "out": out}
    paths |= {"metrics": metrics, "curve": curve}
    weights = WeightsPlan("export", pretrained, export_digest(pretrained))  # a new pretrain export: a new run

    with tempfile.TemporaryDirectory(prefix="highres-weights-") as tmp:
        gram_teacher = gram_teacher_weights(cfg, cfg.model, Path(tmp))

        def phases(world: int) -> list[Phase]:
            plan = highres_plan(cfg, world_size=world, weights=weights, gram_teacher=gram_teacher)
            return [Phase(plan, SSLMetaArch, stage_layout(checkpoints), Path(out), pretrained)]

        train_stage("pretrain_highres", cfg, paths, phases)
