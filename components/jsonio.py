"""Strict JSON files, written in one place: every metrics file, report, descriptor and checkpoint meta.json.

Files are strict JSON (NaN and infinities as the strings "nan", "inf", "-inf"; numpy scalars as Python numbers),
written aside and renamed into place, so a reader (DVC, a resumed run, the next stage) never sees half a file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from components.storage import atomic_path


def jsonable(value: Any) -> Any:
    """A strict-JSON view of a value: non-finite floats as strings, numpy scalars as Python numbers, recursively."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    return value


def dumps(payload: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """`payload` as strict JSON text (see `jsonable`); other objects (paths, ...) as their string."""
    return json.dumps(jsonable(payload), indent=indent, sort_keys=sort_keys, allow_nan=False, default=str) + "\n"


def write_json(path: str | Path, payload: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Writes `payload` as strict JSON to `path` (parent folders created), atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(dumps(payload, indent=indent, sort_keys=sort_keys))
    return Path(path)
