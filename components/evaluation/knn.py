"""k-nearest-neighbour classification on frozen features (DINO / DINOv2's kNN protocol).

The memory bank is the train split's L2-normalised CLS outputs; each test image is classified by the similarity-weighted
vote of its k nearest bank entries at temperature T = 0.07 (`metrics.knn_vote`), for every k in the grid (10, 20, 100,
200 in the paper). The headline `top1` is the accuracy at k = 20, the value DINO found best and DINOv2 reports; with
20 not in the grid, the first k. The few-shot option keeps n random train images per class as the bank and averages
the accuracy over several draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from components.evaluation.metrics import knn_vote, restrict_to_classes, topk_accuracy

if TYPE_CHECKING:
    from components.evaluation.context import TaskContext, TaskOutputs

HEADLINE_K = 20


def headline_k(ks: Sequence[int]) -> int:
    """The k whose accuracy is the task's headline: 20 when in the grid, else the first."""
    return HEADLINE_K if HEADLINE_K in ks else ks[0]


@torch.inference_mode()
def knn_scores(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    *,
    k: int,
    temperature: float,
    num_classes: int,
    chunk_size: int = 1024,
) -> Tensor:
    """(Q, C) vote scores of each query against the bank; features are L2-normalised here (cosine similarity)."""
    bank = F.normalize(bank.float(), dim=1)
    out = []
    for start in range(0, queries.shape[0], chunk_size):
        q = F.normalize(queries[start : start + chunk_size].float(), dim=1)
        out.append(knn_vote(q @ bank.T, bank_labels, k=k, temperature=temperature, num_classes=num_classes))
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def evaluate_knn(
    train: Tensor,
    train_labels: np.ndarray,
    test: Tensor,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    few_shot: Sequence[int] = (),
    few_shot_tries: int = 5,
    seed: int = 0,
    test_classes: Sequence[int] | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """kNN top-1 / top-5 for each k, and the few-shot variant.

    Args:
        train, test: (M, D) and (Q, D) features (the model's CLS outputs).
        train_labels, test_labels: Integer labels.
        num_classes: C.
        ks: Neighbour counts (each clipped to the bank size).
        temperature: T of the vote.
        few_shot: Shots per class n; the bank keeps n random train images per class (fewer if a class has fewer).
        few_shot_tries: Draws per n, averaged.
        seed: Seed of the few-shot draws.
        test_classes: Classes the test set is scored over (ImageNet-A / -R: their 200); None: all.

    Returns:
        (metrics, details): `top1_k{k}`, `top5_k{k}`, `top1`, `top5` (at the headline k), `fewshot_{n}_top1`;
        details hold the headline k and the few-shot spread.
    """
    bank_labels = torch.as_tensor(train_labels, dtype=torch.long)
    metrics: dict[str, float] = {}
    for k in ks:
        scores = knn_scores(train, bank_labels, test, k=k, temperature=temperature, num_classes=num_classes)
        scores = restrict_to_classes(scores, test_classes)
        metrics[f"top1_k{k}"] = topk_accuracy(scores, test_labels, 1)
        metrics[f"top5_k{k}"] = topk_accuracy(scores, test_labels, 5)
    k0 = headline_k(ks)
    metrics["top1"], metrics["top5"] = metrics[f"top1_k{k0}"], metrics[f"top5_k{k0}"]
    details: dict[str, Any] = {"headline_k": k0, "bank_size": int(train.shape[0]), "num_test": int(test.shape[0])}
    for n in few_shot:
        accs = []
        for t in range(few_shot_tries):
            rng = np.random.default_rng(np.random.SeedSequence([seed, n, t]))
            index = np.concatenate(
                [rng.permutation(np.flatnonzero(train_labels == c))[:n] for c in range(num_classes)]
            ).astype(np.int64)
            scores = knn_scores(
                train[index], bank_labels[index], test, k=min(k0, len(index)), temperature=temperature,
                num_classes=num_classes,
            )  # fmt: skip
            accs.append(topk_accuracy(restrict_to_classes(scores, test_classes), test_labels, 1))
        metrics[f"fewshot_{n}_top1"] = float(np.mean(accs))
        details[f"fewshot_{n}_top1_std"] = float(np.std(accs))
    return metrics, details


def knn_task(ctx: TaskContext) -> TaskOutputs:
    """The `knn` task: the train split's CLS outputs as the memory bank, the test split scored."""
    feats, labels, cfg = ctx.classification_features(), ctx.labels, ctx.cfg
    metrics, details = evaluate_knn(
        feats["train"].output, labels["train"], feats["test"].output, labels["test"], num_classes=ctx.num_classes,
        ks=cfg.knn_k, temperature=cfg.knn_temperature, few_shot=cfg.knn_few_shot,
        few_shot_tries=cfg.knn_few_shot_tries, seed=ctx.seed, test_classes=ctx.classification.test_classes,
    )  # fmt: skip
    return {"knn": (metrics, details)}
