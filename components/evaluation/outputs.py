"""Helpers for the evaluate and report stages' output folders: clearing a folder safely, and strict JSON
(`components.jsonio`, re-exported here)."""

from __future__ import annotations

import shutil
from pathlib import Path

from components.jsonio import jsonable, write_json

__all__ = ["clear_output", "jsonable", "write_json"]


def clear_output(folder: Path, markers: tuple[str, ...]) -> None:
    """Empties a stage's output folder before a run (results of models no longer evaluated must not linger).

    Only a folder that is empty or holds one of `markers` (an earlier run's files) is removed; anything else is a
    user's folder given by mistake, and is refused rather than deleted.
    """
    if not folder.exists():
        return
    if not folder.is_dir() or (any(folder.iterdir()) and not any((folder / m).exists() for m in markers)):
        raise FileExistsError(f"{folder}: exists and is not an earlier output of this stage; refusing to replace it")
    shutil.rmtree(folder)
