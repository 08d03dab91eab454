"""kNN, linear probes, logistic regression and retrieval on features with known structure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.evaluation.features import ImageFeatures
from components.evaluation.knn import evaluate_knn, headline_k
from components.evaluation.linear import c_grid, evaluate_linear, evaluate_logreg, train_linear_probes
from components.evaluation.retrieval import evaluate_retrieval
from tests.evaluation.eval_fixtures import clustered_features


def _as_features(x: torch.Tensor, n_blocks: int = 4) -> ImageFeatures:
    """Image features whose every block's CLS is `x` and whose pooled patches are noise-free copies too."""
    return ImageFeatures(x[:, None].repeat(1, n_blocks, 1), x.clone())


def test_knn_on_separable_clusters_and_few_shot() -> None:
    x, y = clustered_features(4, 20)
    metrics, details = evaluate_knn(
        x[::2], y[::2], x[1::2], y[1::2], num_classes=4, ks=(1, 20), few_shot=(1, 3), few_shot_tries=2
    )
    assert metrics["top1"] == 1.0 and metrics["top1_k1"] == 1.0 and metrics["top5"] == 1.0
    assert metrics["fewshot_1_top1"] == 1.0 and metrics["fewshot_3_top1"] == 1.0
    assert details["headline_k"] == 20 and details["bank_size"] == 40
    assert headline_k((10, 100)) == 10


def test_knn_constant_features_are_at_chance() -> None:
    x = torch.ones(12, 4)
    y = np.repeat(np.arange(3), 4)
    metrics, _ = evaluate_knn(x, y, x, y, num_classes=3, ks=(12,))
    assert metrics["top1"] == pytest.approx(1 / 3)  # every score ties: class 0 for everyone


def test_vectorised_probe_grid_equals_torch_sgd() -> None:
    """The written-out gradient and momentum update match torch.optim.SGD on an nn.Linear, step for step."""
    x, y = clustered_features(3, 10, dim=8, noise=0.5)
    feats = _as_features(x, n_blocks=1)
    lrs, epochs, batch, seed = (0.5, 2.0), 3, 8, 0
    probe, _ = train_linear_probes(
        feats, y, feats, y, num_classes=3, lrs=lrs, n_blocks=(1,), avgpool=(False,), epochs=epochs,
        batch_size=batch, seed=seed,
    )  # fmt: skip
    # Reference: the same initial weights and batch order (one generator, same draws), torch's SGD.
    generator = torch.Generator().manual_seed(seed)
    w0 = torch.randn(8, len(lrs), 3, generator=generator) * 0.01
    orders = [torch.randperm(len(y), generator=generator) for _ in range(epochs)]
    total = epochs * math.ceil(len(y) / batch)
    finals = []
    for i, lr in enumerate(lrs):
        linear = torch.nn.Linear(8, 3)
        with torch.no_grad():
            linear.weight.copy_(w0[:, i].T)
            linear.bias.zero_()
        opt = torch.optim.SGD(linear.parameters(), lr=lr * batch / 256, momentum=0.9, weight_decay=0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        for order in orders:
            for start in range(0, len(y), batch):
                idx = order[start : start + batch]
                loss = F.cross_entropy(linear(x[idx]), torch.as_tensor(y[idx]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        finals.append(linear)
    chosen = finals[lrs.index(probe.lr)]
    assert torch.allclose(probe.weight, chosen.weight.detach().T, atol=1e-5)
    assert torch.allclose(probe.bias, chosen.bias.detach(), atol=1e-5)


def test_linear_protocol_selects_on_val_and_reports_test() -> None:
    x, y = clustered_features(4, 30, dim=12, noise=0.2)
    train, val, test = (_as_features(x[i::3]) for i in range(3))
    labels = [y[i::3] for i in range(3)]
    metrics, details, probe = evaluate_linear(
        train, labels[0], val, labels[1], test, labels[2], num_classes=4, lrs=(1e-5, 0.1), epochs=30, batch_size=16
    )
    assert metrics["top1"] == 1.0 and metrics["val_top1"] == 1.0
    assert details["best"]["lr"] == 0.1  # 1e-5 barely moves the weights in 30 epochs: selection must see it
    assert len(details["val_top1"]) == 2 * 2 * 2  # (1 or 4 blocks) x (avgpool or not) x 2 lrs
    assert probe.scores(test).shape == (len(labels[2]), 4)
    # An empty val split: 10% of train is held out instead.
    empty = ImageFeatures(torch.zeros(0, 4, 12), torch.zeros(0, 12))
    metrics, _, _ = evaluate_linear(
        train, labels[0], empty, np.zeros(0, int), test, labels[2], num_classes=4, lrs=(0.1,), epochs=10
    )
    assert metrics["top1"] > 0.9 and metrics["val_top1"] == 1.0  # val_top1 is now on the held-out 10%


def test_logistic_regression_sweep() -> None:
    x, y = clustered_features(3, 20, dim=10, noise=0.2)
    metrics, details = evaluate_logreg(x[::3], y[::3], x[1::3], y[1::3], x[2::3], y[2::3], num_c=6, max_iter=200)
    assert metrics["top1"] == 1.0
    assert details["best_c"] in c_grid(6) and len(details["val_top1"]) == 6
    assert c_grid(45)[0] == pytest.approx(1e-6) and c_grid(45)[-1] == pytest.approx(1e5)


def test_retrieval_by_identity_and_by_distance() -> None:
    x, places = clustered_features(3, 3, dim=8, noise=0.05)
    query, db = x[::3], torch.cat([x[1::3], x[2::3]])
    q_labels, db_labels = places[::3], np.concatenate([places[1::3], places[2::3]])
    metrics, details = evaluate_retrieval(query, db, q_labels, db_labels, ks=(1, 5))
    assert metrics == {"map": 1.0, "recall@1": 1.0, "recall@5": 1.0}
    assert details["num_queries"] == 3 and all(details["neighbor_is_positive"][i][0] for i in range(3))
    # Positions put every database image 100 m from the queries: no positive within 25 m -> no query counts.
    q_xy, db_xy = np.zeros((3, 2)), np.full((6, 2), 100.0)
    metrics, details = evaluate_retrieval(
        query, db, q_labels, db_labels, query_xy=q_xy, database_xy=db_xy, positive_distance=25.0
    )
    assert details["num_queries"] == 0 and math.isnan(metrics["map"])
