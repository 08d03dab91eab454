"""The one command-line surface: `python -m components <stage> [paths] [--params params.yaml]`.

Paths are on the command line (their defaults are the ones dvc.yaml uses); hyperparameters come from params.yaml only.
The config is loaded and validated before any stage code is imported, so a bad key fails in a fraction of a second,
naming the key and the value. A dispatch table (`components.stages.specs.STAGES`) maps each stage to its `run_<stage>`
wrapper and the params sections it reads; the stage gets a view of the config that refuses any other section, so
dvc.yaml's `params`, which a test keeps equal to the table, are what the stage reads. Commands that are not DVC
stages (`benchmark`: `components.stages.specs.COMMANDS`) are dispatched the same way and also take `--recipe`, a file
of params.yaml overrides (infra/recipes/).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from components.config import DEFAULT_PARAMS, ConfigError, load_config, read_recipe, restrict_sections
from components.stages.specs import COMMANDS, STAGES

EXIT_CONFIG_ERROR = 2
EXIT_GATE_FAILED = 3
EXIT_BAD_INPUT = 4
"""A benchmark folder that is not its publisher's layout (the message names the file and what was expected)."""
EXIT_FAULT = 5
"""A fault of the machine the stage ran on, named: out of space, no intact checkpoint."""
EXIT_REASONS = {
    EXIT_CONFIG_ERROR: "bad configuration",
    EXIT_GATE_FAILED: "a quality gate failed",
    EXIT_BAD_INPUT: "bad input",
    EXIT_FAULT: "out of space or no intact checkpoint",
}
"""What each named exit code means; the message printed before it gives the file, key or value."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components",
        description="DINOv2 pipeline stages. Paths on the command line, hyperparameters in params.yaml.",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, spec in (STAGES | COMMANDS).items():
        p = sub.add_parser(name, help=spec.help, description=f"{spec.help}. Reads params: {', '.join(spec.sections)}.")
        for arg in spec.paths:
            default = f" (default: {arg.default})" if arg.default else ""
            p.add_argument(f"--{arg.name.replace('_', '-')}", dest=arg.name, default=arg.default,
                           help=f"{arg.help}{default}")  # fmt: skip
        p.add_argument("--params", default=DEFAULT_PARAMS, type=Path, help="params file (default: params.yaml)")
        if name in COMMANDS:
            p.add_argument("--recipe", help="a YAML file of params.yaml overrides (infra/recipes/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = (STAGES | COMMANDS)[args.stage]
    try:
        recipe = getattr(args, "recipe", None)
        cfg = load_config(args.params, overrides=read_recipe(recipe) if recipe else None)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    cfg = restrict_sections(cfg, spec.sections, reader=f"stage {args.stage}")  # it reads what dvc.yaml declares
    module, func = spec.target.split(":")
    run = getattr(importlib.import_module(module), func)
    kwargs = {arg.name: getattr(args, arg.name) for arg in spec.paths}
    from components.evaluation.benchmarks.common import LayoutError
    from components.gates import GateFailed

    try:
        run(cfg, **kwargs)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except LayoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except GateFailed as err:
        print(f"error: gate failed in stage {args.stage}:\n{err}", file=sys.stderr)
        return EXIT_GATE_FAILED
    except Exception as err:
        if not _named_fault(err):
            raise
        print(f"error: stage {args.stage}: {err}", file=sys.stderr)  # named in full: a traceback adds nothing
        return EXIT_FAULT
    return 0


def _named_fault(err: Exception) -> bool:
    """A disk that filled up, or no intact checkpoint: errors whose message says all (`EXIT_FAULT`)."""
    from components.storage import OutOfSpaceError
    from components.training.checkpoint import CheckpointDamagedError

    return isinstance(err, OutOfSpaceError | CheckpointDamagedError)
