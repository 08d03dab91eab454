"""A small weighted kNN classifier on frozen CLS features (Wu et al. 2018, as DINO evaluates), for monitoring.

The evaluation stage owns the reported metrics; this one watches the teacher during training (`train.knn_eval_*`)
and backs the test that pretraining learns. Layout: `<root>/<split>/<class>/<image>` (the synthetic world's
`eval/classification`, or any folder of that shape).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from components.evaluation.knn import knn_scores
from components.model import eval_transform
from components.training.data import decode_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def labelled_images(root: str | Path, split: str) -> tuple[list[Path], list[int], list[str]]:
    """Paths, integer labels and class names of `<root>/<split>/<class>/*`, sorted."""
    base = Path(root) / split
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: no such labelled split")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    paths, labels = [], []
    for i, name in enumerate(classes):
        for p in sorted((base / name).iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(p)
                labels.append(i)
    return paths, labels, classes


@torch.no_grad()
def embed(
    encode: Callable[[Tensor], Tensor],
    paths: list[Path],
    *,
    image_size: int,
    device: torch.device,
    batch_size: int = 64,
) -> Tensor:
    """L2-normalised features (n, D) of images through `encode` (images (B, 3, S, S) -> CLS (B, D))."""
    transform = eval_transform(image_size)
    feats = []
    for i in range(0, len(paths), batch_size):
        x = torch.stack([transform(decode_rgb(p.read_bytes())) for p in paths[i : i + batch_size]])
        feats.append(F.normalize(encode(x.to(device)).float(), dim=-1).cpu())
    return torch.cat(feats)


def knn_accuracy(
    encode: Callable[[Tensor], Tensor],
    root: str | Path,
    *,
    image_size: int,
    device: torch.device,
    train_split: str = "train",
    query_split: str = "val",
    k: int = 20,
) -> float:
    """kNN top-1 of `encode`'s features: memory bank `train_split`, queries `query_split`."""
    bank, bank_labels, _ = labelled_images(root, train_split)
    query, query_labels, _ = labelled_images(root, query_split)
    fb = embed(encode, bank, image_size=image_size, device=device)
    fq = embed(encode, query, image_size=image_size, device=device)
    labels = torch.tensor(bank_labels)
    scores = knn_scores(fb, labels, fq, k=k, temperature=0.07, num_classes=int(labels.max()) + 1)
    return float((scores.argmax(1) == torch.tensor(query_labels)).float().mean())
