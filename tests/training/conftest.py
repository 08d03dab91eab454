"""Fixtures of the training tests: a small curated manifest over the session's tiny synthetic world."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def curated(tiny_world, tmp_path_factory) -> Path:
    """A curated folder whose manifest lists the tiny world's pool images (bad files included: they are skipped)."""
    root, _ = tiny_world
    out = tmp_path_factory.mktemp("curated")
    uris = sorted(str(p) for p in (root / "pool").rglob("*") if p.is_file())
    pd.DataFrame({"uri": uris}).to_parquet(out / "manifest.parquet")
    return out
