"""Linear probing on frozen features: DINOv2's grid of linear classifiers, and logistic regression for small sets.

Linear probes (DINOv2 `eval/linear.py`): one linear layer per (feature variant, learning rate) - variants are the CLS
tokens of the last 1 or 4 blocks, with or without the average-pooled patch tokens - all trained together on the same
mini-batches by SGD (momentum 0.9, no weight decay, cosine schedule to 0, lr scaled by batch / 256, weights drawn
from N(0, 0.01), biases 0). The classifier with the best validation top-1 is reported on the test split. Features
are extracted once and cached, so the whole grid costs one pass of the backbone; unlike the official run there is
no random-resized-crop augmentation of the training images. The grid is vectorised: the classifiers of one variant
are one (D, L, C) weight tensor, and the cross-entropy gradient (softmax minus one-hot) and the per-lr momentum SGD
update are written out; the summed loss gives each classifier exactly the gradient of its own loss.

Logistic regression (DINOv2 `eval/log_regression.py`, the protocol for small datasets): L2-normalised CLS outputs,
L-BFGS multinomial logistic regression for C in 10^linspace(-6, 5, n), C chosen on the val split (10% of train when
there is none), then refit on train + val with that C and scored on test.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from components.evaluation.features import ImageFeatures, head_threads
from components.evaluation.metrics import restrict_to_classes, topk_accuracy

if TYPE_CHECKING:
    from components.evaluation.context import TaskContext, TaskOutputs

PAPER_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
"""DINOv2's learning-rate grid for linear probes."""


@dataclass(frozen=True)
class LinearProbe:
    """The selected classifier: its feature variant, learning rate and weights."""

    n_blocks: int
    avgpool: bool
    lr: float
    weight: Tensor
    """(D_in, C)."""
    bias: Tensor
    """(C,)."""

    def scores(self, features: ImageFeatures) -> Tensor:
        """(N, C) logits for image features."""
        return features.linear_input(self.n_blocks, self.avgpool) @ self.weight + self.bias

    @property
    def name(self) -> str:
        return f"blocks{self.n_blocks}_avgpool{int(self.avgpool)}_lr{self.lr:g}"


def holdout_split(num: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train index, held-out index): a seeded random `fraction` held out (at least 1 item)."""
    order = np.random.default_rng(seed).permutation(num)
    cut = max(1, int(round(num * fraction)))
    return np.sort(order[cut:]), np.sort(order[:cut])


@head_threads()
def train_linear_probes(
    train: ImageFeatures,
    train_labels: np.ndarray,
    val: ImageFeatures,
    val_labels: np.ndarray,
    *,
    num_classes: int,
    lrs: Sequence[float] = PAPER_LRS,
    n_blocks: Sequence[int] = (1, 4),
    avgpool: Sequence[bool] = (False, True),
    epochs: int = 100,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[LinearProbe, dict[str, float]]:
    """Trains every (variant, lr) classifier together and picks the best on validation top-1.

    Returns:
        The best probe and every classifier's validation top-1, keyed by `LinearProbe.name`.
    """
    generator = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(train_labels, dtype=torch.long)
    variants = list(dict.fromkeys((min(n, train.cls.shape[1]), bool(p)) for n in n_blocks for p in avgpool))
    inputs = {v: train.linear_input(*v) for v in variants}  # (N, D_v) each
    base_lrs = torch.tensor(lrs, dtype=torch.float32) * batch_size / 256.0  # (L,), DINOv2's scaling
    # Classifiers of one variant share one (D, L, C) weight: the whole lr grid is a single matrix product.
    weights = {v: torch.randn(x.shape[1], len(lrs), num_classes, generator=generator) * 0.01 for v, x in inputs.items()}
    biases = {v: torch.zeros(len(lrs), num_classes) for v in variants}
    momentum = {v: (torch.zeros_like(weights[v]), torch.zeros_like(biases[v])) for v in variants}
    lr_w = base_lrs.view(1, -1, 1)  # (1, L, 1)
    lr_b = base_lrs.view(-1, 1)  # (L, 1)
    onehot = F.one_hot(y, num_classes).float()  # (N, C)
    n = len(y)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, epochs * steps_per_epoch)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            scale = 0.5 * (1.0 + math.cos(math.pi * step / total))  # cosine to 0 (CosineAnnealingLR)
            for v in variants:
                x = inputs[v][idx]  # (B, D)
                logits = (x @ weights[v].flatten(1)).view(len(idx), len(lrs), num_classes) + biases[v]  # (B, L, C)
                # Gradient of the sum over classifiers of each one's mean cross-entropy, written out (softmax minus
                # one-hot): each (D, C) slice gets exactly its own loss's gradient, with no autograd overhead.
                g = (torch.softmax(logits, dim=-1) - onehot[idx][:, None, :]) / len(idx)  # (B, L, C)
                grad_w = (x.T @ g.flatten(1)).view_as(weights[v])  # (D, L, C)
                grad_b = g.sum(dim=0)  # (L, C)
                mw, mb = momentum[v]
                mw.mul_(0.9).add_(grad_w)  # torch.optim.SGD momentum (dampening 0, weight decay 0)
                mb.mul_(0.9).add_(grad_b)
                weights[v] -= lr_w * scale * mw
                biases[v] -= lr_b * scale * mb
            step += 1
    val_acc: dict[str, float] = {}
    best: tuple[float, LinearProbe] | None = None
    with torch.no_grad():
        for v in variants:
            x_val = val.linear_input(*v)
            for i, lr in enumerate(lrs):
                probe = LinearProbe(v[0], v[1], float(lr), weights[v][:, i], biases[v][i])
                acc = topk_accuracy(x_val @ probe.weight + probe.bias, val_labels, 1)
                val_acc[probe.name] = acc
                if best is None or acc > best[0]:  # ties keep the earlier grid entry
                    best = (acc, probe)
    assert best is not None
    return best[1], val_acc


def evaluate_linear(
    train: ImageFeatures,
    train_labels: np.ndarray,
    val: ImageFeatures,
    val_labels: np.ndarray,
    test: ImageFeatures,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    lrs: Sequence[float] = PAPER_LRS,
    n_blocks: Sequence[int] = (1, 4),
    avgpool: Sequence[bool] = (False, True),
    epochs: int = 100,
    batch_size: int = 64,
    seed: int = 0,
    test_classes: Sequence[int] | None = None,
) -> tuple[dict[str, float], dict[str, Any], LinearProbe]:
    """The linear-probe protocol: train the grid, select on val (10% of train if val is empty), report test (scored
    over `test_classes` only when given: ImageNet-A / -R).

    Returns:
        (metrics `top1`, `top5`, `val_top1`; details: the chosen variant and every classifier's val top-1; the probe).
    """
    if len(val) == 0:
        keep, held = holdout_split(len(train), 0.1, seed)
        train, val = train.subset(keep), train.subset(held)
        train_labels, val_labels = train_labels[keep], train_labels[held]
    probe, val_acc = train_linear_probes(
        train, train_labels, val, val_labels, num_classes=num_classes, lrs=lrs, n_blocks=n_blocks, avgpool=avgpool,
        epochs=epochs, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    with torch.no_grad():
        scores = restrict_to_classes(probe.scores(test), test_classes)
    metrics = {
        "top1": topk_accuracy(scores, test_labels, 1),
        "top5": topk_accuracy(scores, test_labels, 5),
        "val_top1": val_acc[probe.name],
    }
    details = {
        "best": {"n_blocks": probe.n_blocks, "avgpool": probe.avgpool, "lr": probe.lr},
        "val_top1": val_acc,
        "epochs": epochs,
        "batch_size": batch_size,
    }
    return metrics, details, probe


def c_grid(num: int) -> np.ndarray:
    """The regularisation values swept: 10^linspace(-6, 5, num) (DINOv2 uses 45 values)."""
    return 10.0 ** np.linspace(-6, 5, num)


def evaluate_logreg(
    train: Tensor,
    train_labels: np.ndarray,
    val: Tensor,
    val_labels: np.ndarray,
    test: Tensor,
    test_labels: np.ndarray,
    *,
    num_c: int = 45,
    max_iter: int = 1000,
    seed: int = 0,
    test_classes: Sequence[int] | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Logistic regression with a C sweep (L-BFGS), chosen on val, refit on train + val, scored on test.

    Args:
        train, val, test: (N, D) features (the CLS outputs; L2-normalised here as DINOv2's ModelWithNormalize).
        num_c: How many C values in 10^[-6, 5].
        max_iter: L-BFGS iterations per fit.
        test_classes: Classes the test split is scored over (None: all).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    def prep(x: Tensor) -> np.ndarray:
        return F.normalize(x.float(), dim=1).double().numpy()

    x_train, x_val, x_test = prep(train), prep(val), prep(test)
    y_train, y_val = np.asarray(train_labels), np.asarray(val_labels)
    if len(x_val) == 0:
        keep, held = holdout_split(len(x_train), 0.1, seed)
        x_train, x_val, y_train, y_val = x_train[keep], x_train[held], y_train[keep], y_train[held]
    val_acc = {}
    # One estimator warm-started along increasing C: each fit starts from the previous optimum (same optima, faster).
    est = LogisticRegression(C=1.0, max_iter=max_iter, tol=1e-6, warm_start=True)
    # One BLAS thread: the problems are small, and BLAS threads spinning on a busy machine cost 10x (as `head_threads`).
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in c_grid(num_c):
            est.set_params(C=float(c))
            est.fit(x_train, y_train)
            val_acc[float(c)] = float((est.predict(x_val) == y_val).mean())
        best_c = max(val_acc, key=lambda c: (val_acc[c], -c))  # ties: the stronger regularisation
        final = LogisticRegression(C=best_c, max_iter=max_iter, tol=1e-6)
        final.fit(np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]))
    proba = np.zeros((len(x_test), int(max(y_train.max(), y_val.max())) + 1))
    proba[:, final.classes_] = final.predict_proba(x_test)
    if test_classes is not None:
        outside = np.ones(proba.shape[1], bool)
        outside[np.asarray(test_classes)[np.asarray(test_classes) < proba.shape[1]]] = False
        proba[:, outside] = -1.0
    metrics = {
        "top1": topk_accuracy(proba, test_labels, 1),
        "top5": topk_accuracy(proba, test_labels, 5),
        "val_top1": val_acc[best_c],
    }
    return metrics, {"best_c": best_c, "val_top1": {f"{c:.3g}": a for c, a in val_acc.items()}}


def linear_task(ctx: TaskContext) -> TaskOutputs:
    """The `linear` task: the probe grid on the shared features; the selected probe is kept in `ctx.probe` (the
    robustness task's classifier)."""
    feats, labels, cfg = ctx.classification_features(), ctx.labels, ctx.cfg
    metrics, details, ctx.probe = evaluate_linear(
        feats["train"], labels["train"], feats.get("val", ctx.empty_features()), labels["val"], feats["test"],
        labels["test"], num_classes=ctx.num_classes, lrs=cfg.linear_lrs, n_blocks=cfg.linear_n_blocks,
        avgpool=cfg.linear_avgpool, epochs=cfg.linear_epochs, batch_size=cfg.linear_batch_size, seed=ctx.seed,
        test_classes=ctx.classification.test_classes,
    )  # fmt: skip
    return {"linear": (metrics, details)}


def logreg_task(ctx: TaskContext) -> TaskOutputs:
    """The `logreg` task: logistic regression on the shared CLS outputs."""
    feats, labels, cfg = ctx.classification_features(), ctx.labels, ctx.cfg
    val = feats["val"].output if "val" in feats else torch.zeros(0, feats["train"].output.shape[1])
    metrics, details = evaluate_logreg(
        feats["train"].output, labels["train"], val, labels["val"], feats["test"].output, labels["test"],
        num_c=cfg.logreg_num_c, max_iter=cfg.logreg_max_iter, seed=ctx.seed,
        test_classes=ctx.classification.test_classes,
    )  # fmt: skip
    return {"logreg": (metrics, details)}
