"""Feature sets with a known structure for the probe and retrieval tests, and a Mask2Former protocol small enough for
the default suite (imported by name: a unique module)."""

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


TINY_M2F = dict(
    m2f_crop_size=56, m2f_iterations=3, m2f_warmup_iterations=1, m2f_batch_size=2, m2f_num_queries=6,
    m2f_hidden_dim=32, m2f_decoder_layers=3, m2f_encoder_layers=1, m2f_num_points=64, m2f_adapter_inplanes=8,
)  # fmt: skip
"""`evaluate.m2f_*` values of a Mask2Former protocol that runs in seconds (it does not learn much)."""
