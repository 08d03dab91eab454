"""The one command-line surface: `python -m components <stage> [paths] [--params params.yaml]`.

Paths are on the command line (their defaults are the ones dvc.yaml uses); hyperparameters come from params.yaml only.
The config is loaded and validated before any stage code is imported, so a bad key fails in a fraction of a second,
naming the key and the value. A dispatch table maps each stage to its `run_<stage>` wrapper.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

from components.config import DEFAULT_PARAMS, ConfigError, load_config

EXIT_CONFIG_ERROR = 2
EXIT_GATE_FAILED = 3


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
    """Top-level params.yaml keys the stage reads; dvc.yaml's `params` lists the same."""
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
        TRAIN_SECTIONS,
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
        (*TRAIN_SECTIONS, "highres"),
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
        (*TRAIN_SECTIONS, "distill"),
        (
            PathArg("curated", "data/curated", "the curate stage's output"),
            PathArg("teacher", "models/pretrain", "the pretrain stage's exported models"),
            PathArg("checkpoints", "checkpoints/distill", "resumable training checkpoints (kept across runs)"),
            PathArg("out", "models/distill", "one exported student per preset: <out>/<preset>/ (official layout)"),
            _metrics("distill"),
            PathArg("curve", "metrics/distill_curve.csv", "step metrics of the run, per student (DVC plot)"),
        ),
    ),
    "evaluate": StageSpec(
        "evaluate frozen features of every model on the evaluation tasks",
        "components.stages.evaluate:run_evaluate",
        ("seed", "model", "distill", "evaluate"),
        (
            PathArg("prepared", "data/prepared", "the prepare stage's output (evaluation images)"),
            PathArg("pretrained", "models/pretrain", "the pretrain stage's exported models"),
            PathArg("distilled", "models/distill", "the distill stage's exported models"),
            PathArg("out", "metrics/eval", "one metrics JSON per model and task, plus plots"),
            _metrics("evaluate"),
        ),
    ),
    "report": StageSpec(
        "comparison table, quality gate and model registry entry",
        "components.stages.report:run_report",
        ("report",),
        (
            PathArg("evals", "metrics/eval", "the evaluate stage's output"),
            PathArg("pretrained", "models/pretrain", "the pretrain stage's exported models"),
            PathArg("distilled", "models/distill", "the distill stage's exported models"),
            PathArg("out", "reports/comparison", "comparison table, figures, quality-gate result"),
            _metrics("report"),
        ),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components",
        description="DINOv2 pipeline stages. Paths on the command line, hyperparameters in params.yaml.",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, spec in STAGES.items():
        p = sub.add_parser(name, help=spec.help, description=f"{spec.help}. Reads params: {', '.join(spec.sections)}.")
        for arg in spec.paths:
            default = f" (default: {arg.default})" if arg.default else ""
            p.add_argument(f"--{arg.name}", default=arg.default, help=f"{arg.help}{default}")
        p.add_argument("--params", default=DEFAULT_PARAMS, type=Path, help="params file (default: params.yaml)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = STAGES[args.stage]
    try:
        cfg = load_config(args.params)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    module, func = spec.target.split(":")
    run = getattr(importlib.import_module(module), func)
    kwargs = {arg.name: getattr(args, arg.name) for arg in spec.paths}
    from components.gates import GateFailed

    try:
        run(cfg, **kwargs)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except GateFailed as err:
        print(f"error: gate failed in stage {args.stage}:\n{err}", file=sys.stderr)
        return EXIT_GATE_FAILED
    return 0
