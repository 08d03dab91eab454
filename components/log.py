"""Logging on rank 0 through one helper.

`get_logger(__name__)` everywhere; under torchrun or the DeepSpeed launcher only rank 0 prints INFO, the other ranks
print warnings and errors only, so a multi-rank log reads like a single-process one.
"""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def rank() -> int:
    """The global rank from the launcher's environment (0 outside a distributed launch)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def get_logger(name: str) -> logging.Logger:
    """A logger under the `dinov2` hierarchy, configured once per process on first use."""
    global _CONFIGURED
    if not _CONFIGURED:
        handler = logging.StreamHandler(sys.stderr)
        prefix = f"[rank {rank()}] " if "RANK" in os.environ else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root = logging.getLogger("dinov2")
        root.addHandler(handler)
        root.setLevel(logging.INFO if is_main_process() else logging.WARNING)
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(f"dinov2.{name.removeprefix('components.').removeprefix('flows.')}")
