"""The one command-line surface: `python -m components <stage> [paths] [--params params.yaml]`.

Paths are on the command line (their defaults are the ones dvc.yaml uses); hyperparameters come from params.yaml only.
The config is loaded and validated before any stage code is imported, so a bad key fails in a fraction of a second,
naming the key and the value. A dispatch table (`components.stages.specs.STAGES`) maps each stage to its `run_<stage>`
wrapper and the params sections it reads; the stage gets a view of the config that refuses any other section, so
dvc.yaml's `params`, which a test keeps equal to the table, are what the stage reads.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from components.config import DEFAULT_PARAMS, ConfigError, load_config, restrict_sections
from components.stages.specs import STAGES

EXIT_CONFIG_ERROR = 2
EXIT_GATE_FAILED = 3
EXIT_FAULT = 4
"""A fault of the machine the stage ran on, named: out of space, no intact checkpoint."""


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
    cfg = restrict_sections(cfg, spec.sections, reader=f"stage {args.stage}")  # it reads what dvc.yaml declares
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
