"""Helpers for the evaluate and report stages' output folders: strict JSON, and clearing a folder safely."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np


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


def jsonable(value: Any) -> Any:
    """A strict-JSON view of a result: NaN and infinities as strings, numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json(path: Path, payload: Any) -> None:
    """Writes strict JSON (see `jsonable`), creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(payload), indent=2, allow_nan=False, default=str) + "\n")
