"""Fixtures of the training tests: a small synthetic world on which a few dozen CPU steps learn."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from components.config import SyntheticConfig

LEARNING_WORLD = SyntheticConfig(
    num_classes=4, image_size=48, pool_size=256, duplicate_fraction=0.0, leak_per_class=0, seed_per_class=1,
    eval_train_per_class=10, eval_val_per_class=1, eval_test_per_class=10, num_places=2, views_per_place=2,
    bad_files=False,
)  # fmt: skip


@pytest.fixture(scope="session")
def learning_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(root, curated folder) of `LEARNING_WORLD`: 4 classes, 256 pool images, 10 + 10 labelled per class."""
    from components.synthetic import render_world

    root = tmp_path_factory.mktemp("learns") / "world"
    render_world(LEARNING_WORLD, 0, root, num_workers=0)
    curated = root.parent / "curated"
    curated.mkdir()
    pd.DataFrame({"uri": sorted(str(p) for p in (root / "pool").rglob("*") if p.is_file())}).to_parquet(
        curated / "manifest.parquet"
    )
    return root, curated
