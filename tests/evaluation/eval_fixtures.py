"""Feature sets with a known structure for the probe and retrieval tests (imported by name: a unique module)."""

from __future__ import annotations

import numpy as np
import torch


def clustered_features(num_classes: int, per_class: int, dim: int = 16, seed: int = 0, noise: float = 0.1):
    """(features (N, dim), labels (N,)): one random unit direction per class plus small noise (linearly separable)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(num_classes), per_class)
    x = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    return torch.tensor(x, dtype=torch.float32), labels
