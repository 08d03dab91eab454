"""What each stage is: its run wrapper, the params.yaml sections it reads, and its command-line paths.

The one place a stage's sections are declared: the CLI passes each stage a config that refuses other sections
(`components.config.restrict_sections`), the stage shell logs these sections to MLflow, and a test keeps dvc.yaml's
`params` and `deps` / `outs` equal to this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PathArg:
    name: str
    default: str | None
    help: str


@dataclass(frozen=True)
class StageSpec:
    help: str
    target: str
    """`module:function` of the stage's run wrapper."""
    sections: tuple[str, ...]
    """params.yaml sections the stage reads (or single keys, `data.raw`, of one it reads in part); dvc.yaml's `params`
    lists the same."""
    paths: tuple[PathArg, ...]


def _metrics(stage: str) -> PathArg:
    return PathArg("metrics", f"metrics/{stage}.json", "the stage's metrics JSON (DVC metrics)")


TRAIN_SECTIONS = ("seed", "model", "dino", "ibot", "teacher", "optim", "crops", "train")

STAGES: dict[str, StageSpec] = {
    "synth": StageSpec(
        "render the embedded synthetic image world (the default raw data)",
        "components.stages.synth:run_synth",
        ("seed", "synthetic"),
        (PathArg("out", "data/synthetic", "root of the rendered raw layout"), _metrics("synth")),
    ),
    "prepare": StageSpec(
        "decode and check every source image: manifest of usable images, rejects with reasons",
        "components.stages.prepare:run_prepare",
        ("data", "prepare"),
        (
            PathArg("raw", None, "root of the raw layout (default: params data.raw)"),
            PathArg("out", "data/prepared", "output folder: manifest.parquet, rejects.parquet"),
            _metrics("prepare"),
        ),
    ),
    "embed": StageSpec(
        "embed every prepared image with a backbone: float16 shards + ids",
        "components.stages.embed:run_embed",
        ("seed", "embed"),
        (
            PathArg("prepared", "data/prepared", "the prepare stage's output"),
            PathArg("out", "data/embeddings", "output folder of embedding shards"),
            _metrics("embed"),
        ),
    ),
    "curate": StageSpec(
        "deduplicate the pool, remove evaluation leakage, retrieve and balance: the curated manifest",
        "components.stages.curate:run_curate",
        ("seed", "embed", "curate"),
        (
            PathArg("prepared", "data/prepared", "the prepare stage's output"),
            PathArg("embeddings", "data/embeddings", "the embed stage's output"),
            PathArg("out", "data/curated", "output folder: manifest.parquet, report.json"),
            _metrics("curate"),
        ),
    ),
    "pretrain": StageSpec(
        "DINOv2 self-supervised pretraining under DeepSpeed ZeRO",
        "components.stages.pretrain:run_pretrain",
        (*TRAIN_SECTIONS, "adapt", "gram"),
        (
            PathArg("curated", "data/curated", "the curate stage's output"),
            PathArg("checkpoints", "checkpoints/pretrain", "resumable training checkpoints (kept across runs)"),
            PathArg("out", "models/pretrain", "exported teacher backbone (official layout) and heads"),
            _metrics("pretrain"),
            PathArg("curve", "metrics/pretrain_curve.csv", "step metrics of the run (DVC plot)"),
        ),
    ),
    "pretrain_highres": StageSpec(
        "high-resolution adaptation of the pretrained model (paper, appendix B.2)",
        "components.stages.pretrain:run_pretrain_highres",
        (*TRAIN_SECTIONS, "highres", "gram"),
        (
            PathArg("pretrained", "models/pretrain", "the pretrain stage's export (teacher backbone and heads)"),
            PathArg("curated", "data/curated", "the curate stage's output"),
            PathArg("checkpoints", "checkpoints/pretrain_highres", "resumable training checkpoints (kept across runs)"),
            PathArg("out", "models/pretrain_highres", "exported teacher backbone (official layout) and heads"),
            _metrics("pretrain_highres"),
            PathArg("curve", "metrics/pretrain_highres_curve.csv", "step metrics of the run (DVC plot)"),
        ),
    ),
    "distill": StageSpec(
        "distill the frozen teacher into the configured student presets",
        "components.stages.distill:run_distill",
        (*TRAIN_SECTIONS, "pipeline", "distill"),
        (
            PathArg("curated", "data/curated", "the curate stage's output"),
            PathArg("teacher", None, "the teacher's export (default: params pipeline.pretrained_model)"),
            PathArg("checkpoints", "checkpoints/distill", "resumable training checkpoints (kept across runs)"),
            PathArg("out", "models/distill", "one exported student per preset: <out>/<preset>/ (official layout)"),
            _metrics("distill"),
            PathArg("curve", "metrics/distill_curve.csv", "step metrics of the run, per student (DVC plot)"),
        ),
    ),
    "evaluate": StageSpec(
        "evaluate frozen features of every model on the evaluation tasks",
        "components.stages.evaluate:run_evaluate",
        ("seed", "data.raw", "model", "pipeline", "evaluate"),
        (
            PathArg("prepared", "data/prepared", "the prepare stage's output (evaluation images)"),
            PathArg("pretrained", "models/pretrain", "the pretrain stage's export"),
            PathArg("final", None, "the pretrained model used downstream (default: params pipeline.pretrained_model)"),
            PathArg("distilled", "models/distill", "the distill stage's exported models"),
            PathArg("out", "metrics/eval", "one metrics JSON per model and task, plus plots"),
            _metrics("evaluate"),
        ),
    ),
    "report": StageSpec(
        "comparison table, quality gate and model registry entry",
        "components.stages.report:run_report",
        ("pipeline", "report"),
        (
            PathArg("evals", "metrics/eval", "the evaluate stage's output"),
            PathArg("pretrained", None, "the pretrained model used downstream (default: pipeline.pretrained_model)"),
            PathArg("distilled", "models/distill", "the distill stage's exported models"),
            PathArg("out", "reports/comparison", "comparison table, figures, quality-gate result"),
            _metrics("report"),
        ),
    ),
}


COMMANDS: dict[str, StageSpec] = {
    "benchmark": StageSpec(
        "evaluate one model on one of the paper's benchmarks, read from its publisher's layout",
        "components.stages.benchmark:run_benchmark",
        ("seed", "evaluate"),
        (
            PathArg("name", None, "the benchmark (components/evaluation/benchmarks: ade20k, imagenet1k, ...)"),
            PathArg("root", None, "the benchmark's folder as its publisher ships it (local or s3://)"),
            PathArg("train_root", None, "ImageNet-1k's root, whose classifier the robustness benchmarks score"),
            PathArg("model", None, "an export folder, a model.json, a Torch Hub name or <arch>=<weights>"),
            PathArg("out", None, "output folder: <name>.json"),
        ),
    ),
}
"""Commands that are not DVC stages (their inputs are datasets outside the repository): same shell, same dispatch,
not in dvc.yaml. They take `--recipe` (infra/recipes/*.yaml) besides `--params`."""


def sections_of(stage: str) -> tuple[str, ...]:
    """The params sections `stage` (or a command) reads."""
    return (STAGES | COMMANDS)[stage].sections
