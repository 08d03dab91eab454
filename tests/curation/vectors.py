"""Controlled embeddings for the curation tests: random unit vectors with planted near-duplicate groups."""

from __future__ import annotations

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted(
    num: int, dim: int = 32, *, num_groups: int = 20, copies: int = 2, noise: float = 0.15, seed: int = 0
) -> tuple[np.ndarray, list[list[int]]]:
    """`num` random unit vectors; rows of each group are near-copies of the group's first row (cosine ~0.96)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num, dim)).astype(np.float32)
    rows = rng.permutation(num)[: num_groups * (copies + 1)].reshape(num_groups, copies + 1)
    for group in rows:
        x[group[1:]] = x[group[0]] + noise * rng.standard_normal((copies, dim))
    return unit(x), [sorted(g.tolist()) for g in rows]
