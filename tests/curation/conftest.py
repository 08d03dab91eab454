"""Fixtures of the curation tests: controlled embeddings with planted near-duplicates, and stage configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.curation.vectors import planted


@pytest.fixture
def planted_vectors() -> tuple[np.ndarray, list[list[int]]]:
    return planted(400)


@pytest.fixture(scope="session")
def tiny_embedded(tiny_world: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(prepared folder, embeddings folder) of the tiny world with the stage tests' settings, made once per session;
    tests only read them (copy before modifying)."""
    from tests.curation.test_stages import _prepare, config, embed

    with pytest.MonkeyPatch.context() as env:  # session scope: the function-scoped monkeypatch is not available
        env.setenv("DINOV2_TRACKING", "off")
        tmp = tmp_path_factory.mktemp("embedded")
        _, prep = _prepare(tiny_world[0], tmp)
        embed(config(), prep, tmp)
    return prep, tmp / "emb"
