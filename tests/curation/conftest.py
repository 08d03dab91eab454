"""Fixtures of the curation tests: controlled embeddings with planted near-duplicates, and stage configs."""

from __future__ import annotations

import numpy as np
import pytest

from tests.curation.vectors import planted


@pytest.fixture
def planted_vectors() -> tuple[np.ndarray, list[list[int]]]:
    return planted(400)
