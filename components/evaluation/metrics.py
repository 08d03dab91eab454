"""Pure metric functions with the standard definitions: no I/O, no models, numpy or torch in, floats out.

- kNN classification: the similarity-weighted vote of Wu et al. (2018) as DINO and DINOv2 use it (top-k cosine
  neighbours, each votes softmax(s / T) over the k for its label, T = 0.07), and top-k accuracy.
- Retrieval: non-interpolated average precision per query (mean over the query's positives of the precision at each
  positive's rank), mAP over queries with at least one positive, and Recall@k (a query counts when one of its first
  k results is a positive; place recognition's definition, Arandjelovic et al. 2016), positives by identity or by a
  distance threshold.
- Semantic segmentation: a confusion matrix accumulated over the split with the ignore index left out, per-class IoU
  TP / (TP + FP + FN), mIoU as the mean over classes present in the ground truth or the predictions (mmsegmentation's
  nan-mean), pixel accuracy and mean class accuracy.
- Monocular depth: Eigen et al. (2014) metrics as the BTS / Monocular-Depth-Estimation-Toolbox code computes them
  (the code DINOv2's depth numbers come from): valid pixels min_depth < gt < max_depth (inside an optional evaluation
  crop), predictions clipped to [min_depth, max_depth], each metric computed per image then averaged over images.
- Robustness: ImageNet-C's Corruption Error CE_c = sum_s E_{s,c} / sum_s E^base_{s,c} and mCE = 100 x mean_c CE_c
  (Hendrycks & Dietterich 2019), the relative mCE, each normalised by a baseline model's errors.

`metric_spec(name)` gives each metric's valid range and direction (the evaluation gate and the report use them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

# --------------------------------------------------------------------------------------------------------------------
# Metric names: valid range and direction
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """Valid range of a metric and whether a larger value is better (None: neither, e.g. a spread)."""

    lower: float
    upper: float
    higher_is_better: bool | None


_UNIT = (0.0, 1.0)
_POSITIVE = (0.0, math.inf)
_SPECS: tuple[tuple[str, MetricSpec], ...] = (
    (r"^(val_)?top\d+(_k\d+)?$", MetricSpec(*_UNIT, True)),
    (r"^fewshot_\d+_top\d+$", MetricSpec(*_UNIT, True)),
    (r"^(map|recall@\d+)$", MetricSpec(*_UNIT, True)),
    (r"^(map|mp@\d+)_(easy|medium|hard)$", MetricSpec(*_UNIT, True)),
    (r"^(miou|pixel_acc|macc)$", MetricSpec(*_UNIT, True)),
    (r"^delta[123]$", MetricSpec(*_UNIT, True)),
    (r"^(rmse|abs_rel|sq_rel|log10|rmse_log|silog)$", MetricSpec(*_POSITIVE, False)),
    (r"^mce$", MetricSpec(*_POSITIVE, False)),
    (r"^relative_mce$", MetricSpec(-math.inf, math.inf, False)),
    (r"^(clean_error|error_[a-z_]+)$", MetricSpec(*_UNIT, False)),
)


HEADLINE_METRICS: dict[str, str] = {
    "knn": "top1",
    "linear": "top1",
    "logreg": "top1",
    "retrieval": "map",
    "retrieval_revisited": "map_medium",
    "place_recognition": "recall@1",
    "segmentation_linear": "miou",
    "segmentation_ms": "miou",
    "segmentation_m2f": "miou",
    "depth_linear": "rmse",
    "depth_linear4": "rmse",
    "depth_dpt": "rmse",
    "robustness": "mce",
}
"""The one metric per task that the comparison table leads with and the quality gate compares."""

BENCHMARK_SEP = "-"
"""A benchmark's results sit beside the demo's tasks as `<benchmark>-<task>` (`ade20k-segmentation_linear`)."""


def headline_metric(task: str) -> str | None:
    """The headline metric of a task or of a benchmark's task (`<benchmark>-<task>`); None when it has none."""
    return HEADLINE_METRICS.get(task.rpartition(BENCHMARK_SEP)[2])


def headline_pairs(tasks: Iterable[str]) -> list[tuple[str, str]]:
    """(task, headline metric) of the given tasks: the demo's in `HEADLINE_METRICS` order, then the benchmarks' in
    the order given."""
    present = list(dict.fromkeys(str(t) for t in tasks))
    demo = [(t, m) for t, m in HEADLINE_METRICS.items() if t in present]
    benchmarks = [(t, m) for t in present if t not in HEADLINE_METRICS and (m := headline_metric(t)) is not None]
    return demo + benchmarks


def mlflow_key(name: str) -> str:
    """An MLflow-safe metric or tag name: `recall@5` becomes `recall_at_5` (MLflow refuses `@`)."""
    return name.replace("@", "_at_")


def metric_spec(name: str) -> MetricSpec:
    """The valid range and direction of a metric by its name (e.g. `top1`, `recall@5`, `rmse`, `mce`).

    Raises:
        KeyError: A name no rule covers (every metric a task writes must have one, so the gate can check it).
    """
    for pattern, spec in _SPECS:
        if re.match(pattern, name):
            return spec
    raise KeyError(f"no valid range known for metric {name!r}")


# --------------------------------------------------------------------------------------------------------------------
# Classification: kNN vote and top-k accuracy
# --------------------------------------------------------------------------------------------------------------------


def knn_vote(similarity: Tensor, bank_labels: Tensor, *, k: int, temperature: float = 0.07, num_classes: int) -> Tensor:
    """Class scores of the similarity-weighted kNN vote (Wu et al. 2018; DINOv2's `KnnModule`).

    Each query takes its k most similar bank entries; their similarities s_i are turned into weights
    softmax(s_i / T) over the k, and each neighbour adds its weight to its label's score.

    Args:
        similarity: (Q, M) cosine similarities between queries and the memory bank.
        bank_labels: (M,) integer labels of the bank.
        k: Neighbours per query; clipped to M.
        temperature: T of the vote (0.07 in DINO and DINOv2).
        num_classes: C, the number of classes.

    Returns:
        (Q, C) scores; each row sums to 1.
    """
    import torch  # imported here so that the report stage reads metric specs without loading torch

    if similarity.ndim != 2 or similarity.shape[1] != bank_labels.shape[0]:
        raise ValueError(f"similarity {tuple(similarity.shape)} does not match bank labels {tuple(bank_labels.shape)}")
    k = min(k, similarity.shape[1])
    top_sims, top_idx = similarity.topk(k, dim=1)  # (Q, k)
    weights = torch.softmax(top_sims / temperature, dim=1)  # (Q, k)
    votes = torch.zeros(similarity.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return votes.scatter_add_(1, bank_labels[top_idx], weights)  # (Q, C)


def restrict_to_classes(scores: Tensor, classes: Sequence[int] | None) -> Tensor:
    """(N, C) scores with every class outside `classes` set to -inf (ImageNet-A / -R are scored over their 200
    classes of ImageNet's 1000); unchanged for None."""
    if classes is None:
        return scores
    import torch

    keep = torch.zeros(scores.shape[1], dtype=torch.bool)
    keep[torch.as_tensor(list(classes), dtype=torch.long)] = True
    return scores.masked_fill(~keep.to(scores.device), -math.inf)


def topk_accuracy(scores: np.ndarray | Tensor, labels: np.ndarray | Tensor, k: int = 1) -> float:
    """Share of rows whose true label is among the k highest scores (k clipped to the number of classes).

    Ties are broken towards the lower class index (a stable sort), so a constant score predicts class 0.
    """
    scores = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=np.float64)
    labels = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores {scores.shape} do not match labels {labels.shape}")
    if scores.shape[0] == 0:
        return math.nan
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (N, k)
    return float((order == labels[:, None]).any(axis=1).mean())


# --------------------------------------------------------------------------------------------------------------------
# Retrieval and place recognition
# --------------------------------------------------------------------------------------------------------------------


def positives_by_label(query_labels: Sequence, database_labels: Sequence) -> np.ndarray:
    """(Q, M) boolean matrix: database item j is a positive of query i when they share an identity (place, object)."""
    return np.asarray(query_labels)[:, None] == np.asarray(database_labels)[None, :]


def positives_by_distance(query_xy: np.ndarray, database_xy: np.ndarray, threshold: float) -> np.ndarray:
    """(Q, M) boolean matrix: positives lie within `threshold` (same unit as the coordinates, e.g. 25 m in Pitts30k)."""
    query_xy, database_xy = np.asarray(query_xy, np.float64), np.asarray(database_xy, np.float64)
    dist = np.linalg.norm(query_xy[:, None, :] - database_xy[None, :, :], axis=-1)  # (Q, M)
    return dist <= threshold


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Non-interpolated AP of one query: the mean, over its positives, of the precision at each positive's rank.

    The database is ranked by decreasing score (ties: database order). NaN when the query has no positive.
    """
    positives = np.asarray(positives, bool)
    num_pos = int(positives.sum())
    if num_pos == 0:
        return math.nan
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    hits = positives[order]
    ranks = np.flatnonzero(hits) + 1  # 1-based rank of each positive
    precision_at_hits = np.arange(1, num_pos + 1) / ranks
    return float(precision_at_hits.mean())


def retrieval_metrics(
    similarity: np.ndarray, positives: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """mAP and Recall@k over queries with at least one positive.

    Args:
        similarity: (Q, M) query-to-database similarities (higher is closer).
        positives: (Q, M) boolean ground truth.
        ks: The k of Recall@k (clipped to M).

    Returns:
        `map`, `recall@k` for each k, and `num_queries` (queries with a positive; the others are left out, as in
        the place-recognition benchmarks).
    """
    similarity, positives = np.asarray(similarity, np.float64), np.asarray(positives, bool)
    if similarity.shape != positives.shape:
        raise ValueError(f"similarity {similarity.shape} and positives {positives.shape} differ")
    keep = positives.any(axis=1)
    out: dict[str, float] = {"num_queries": float(keep.sum())}
    if not keep.any():
        out["map"] = math.nan
        out.update({f"recall@{k}": math.nan for k in ks})
        return out
    similarity, positives = similarity[keep], positives[keep]
    out["map"] = float(np.mean([average_precision(s, p) for s, p in zip(similarity, positives, strict=True)]))
    order = np.argsort(-similarity, axis=1, kind="stable")
    ranked_hits = np.take_along_axis(positives, order, axis=1)  # (Q, M)
    for k in ks:
        out[f"recall@{k}"] = float(ranked_hits[:, : min(k, positives.shape[1])].any(axis=1).mean())
    return out


REVISITED_PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
"""Revisited Oxford / Paris (Radenovic et al. 2018): protocol -> (ground-truth lists that are positives, lists that
are ignored). Easy: easy positives, hard ones ignored; Medium: easy and hard positives; Hard: hard positives, easy
ones ignored. Junk images are ignored in every protocol."""


def revisited_ap(positions: np.ndarray, num_positives: int) -> float:
    """The revisited benchmark's AP of one query: the precision-recall curve integrated with the trapezoid rule.

    Args:
        positions: Sorted 0-based ranks of the positives in the ranking with the ignored images removed.
        num_positives: How many positives the query has.

    With r_j the rank of the j-th positive (0-based), each positive adds recall 1 / num_positives between the
    precisions j / r_j (1 when r_j = 0) and (j + 1) / (r_j + 1), averaged.
    """
    ap = 0.0
    for j, rank in enumerate(np.asarray(positions, np.int64)):
        before = 1.0 if rank == 0 else j / rank
        after = (j + 1) / (rank + 1)
        ap += (before + after) / 2.0 / num_positives
    return float(ap)


def revisited_map(
    similarity: np.ndarray, ground_truth: Sequence[Mapping[str, Sequence[int]]], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """mAP and mean precision@k under the Easy, Medium and Hard protocols of Revisited Oxford / Paris.

    Args:
        similarity: (Q, M) query-to-database similarities.
        ground_truth: Per query, database indices `easy`, `hard` and `junk` (the `gnd` of gnd_roxford5k.pkl).
        ks: k of the precision@k (`mp@k`): the share of positives among the first min(k, rank of the last positive)
            results, as the revisited evaluation computes it.

    Returns:
        `map_<protocol>` and `mp@k_<protocol>` for easy, medium, hard (averaged over the queries with at least one
        positive under that protocol), and `num_queries_<protocol>`.
    """
    similarity = np.asarray(similarity, np.float64)
    if similarity.shape[0] != len(ground_truth):
        raise ValueError(f"{similarity.shape[0]} queries but {len(ground_truth)} ground-truth entries")
    order = np.argsort(-similarity, axis=1, kind="stable")  # (Q, M) database indices, best first
    out: dict[str, float] = {}
    for protocol, (positive_keys, ignored_keys) in REVISITED_PROTOCOLS.items():
        aps, precisions = [], []
        for ranking, gnd in zip(order, ground_truth, strict=True):
            positives = np.unique(np.concatenate([np.asarray(gnd.get(k, ()), np.int64) for k in positive_keys]))
            if positives.size == 0:
                continue  # no positive under this protocol: the query does not count
            ignored = np.concatenate([np.asarray(gnd.get(k, ()), np.int64) for k in ignored_keys])
            kept = ranking[~np.isin(ranking, ignored)]
            positions = np.flatnonzero(np.isin(kept, positives))  # sorted 0-based ranks
            aps.append(revisited_ap(positions, positives.size))
            last = positions.max() + 1 if positions.size else 1  # 1-based rank of the last positive
            precisions.append([np.sum(positions + 1 <= min(last, k)) / min(last, k) for k in ks])
        out[f"num_queries_{protocol}"] = float(len(aps))
        out[f"map_{protocol}"] = float(np.mean(aps)) if aps else math.nan
        for i, k in enumerate(ks):
            out[f"mp@{k}_{protocol}"] = float(np.mean([p[i] for p in precisions])) if precisions else math.nan
    return out


# --------------------------------------------------------------------------------------------------------------------
# Semantic segmentation
# --------------------------------------------------------------------------------------------------------------------


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(C, C) pixel counts, rows = ground-truth class, columns = predicted class; `ignore_index` pixels left out.

    Raises:
        ValueError: Shapes differ, or a ground-truth or predicted value (other than the ignore index) is outside
            [0, C): a mask whose classes the head does not know would otherwise be silently miscounted.
    """
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"prediction and target sizes differ: {pred.shape} vs {target.shape}")
    keep = target != ignore_index
    pred, target = pred[keep].astype(np.int64), target[keep].astype(np.int64)
    for name, values in (("target", target), ("prediction", pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} holds class {values.max()} outside [0, {num_classes}) (ignore {ignore_index})")
    return np.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_scores(conf: np.ndarray) -> dict[str, float | list[float]]:
    """mIoU, pixel accuracy and mean class accuracy from an accumulated confusion matrix.

    IoU_c = TP_c / (TP_c + FP_c + FN_c). A class that is neither in the ground truth nor predicted has no IoU (NaN)
    and is left out of the mean, as mmsegmentation does; a class predicted but absent from the ground truth has
    IoU 0 and counts. Mean class accuracy averages TP_c / (TP_c + FN_c) over classes present in the ground truth.

    Returns:
        `miou`, `pixel_acc`, `macc` and `iou_per_class` (NaN where undefined).
    """
    conf = np.asarray(conf, np.float64)
    tp = np.diag(conf)
    gt_count, pred_count = conf.sum(axis=1), conf.sum(axis=0)
    union = gt_count + pred_count - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_count > 0, tp / gt_count, np.nan)
    total = conf.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan,
        "pixel_acc": float(tp.sum() / total) if total else math.nan,
        "macc": float(np.nanmean(acc)) if np.isfinite(acc).any() else math.nan,
        "iou_per_class": [float(v) for v in iou],
    }


# --------------------------------------------------------------------------------------------------------------------
# Monocular depth (Eigen et al. 2014)
# --------------------------------------------------------------------------------------------------------------------

DEPTH_METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "delta1", "delta2", "delta3")

# Evaluation crops as fractions of (height, width): (top, bottom, left, right).
EVAL_CROPS: dict[str, tuple[float, float, float, float]] = {
    # NYU-Depth V2: Eigen et al.'s crop of the 480 x 640 frames, rows 45:471 and columns 41:601.
    "nyu": (45 / 480, 471 / 480, 41 / 640, 601 / 640),
    # KITTI: Garg et al. (2016)'s crop and Eigen et al. (2014)'s, as in monodepth2 / BTS.
    "garg": (0.40810811, 0.99189189, 0.03594771, 0.96405229),
    "eigen": (0.3324324, 0.91351351, 0.0359477, 0.96405229),
}


def eval_crop_mask(shape: tuple[int, int], crop: str | None) -> np.ndarray:
    """(H, W) boolean mask of the named evaluation crop (`nyu`, `garg`, `eigen`), or all True for None."""
    mask = np.zeros(shape, bool)
    if crop is None:
        mask[:] = True
        return mask
    if crop not in EVAL_CROPS:
        raise ValueError(f"unknown depth evaluation crop {crop!r}; known: {', '.join(EVAL_CROPS)}")
    top, bottom, left, right = EVAL_CROPS[crop]
    h, w = shape
    mask[int(top * h) : int(bottom * h), int(left * w) : int(right * w)] = True
    return mask


def depth_errors(
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    valid: np.ndarray | None = None,
    crop: str | None = None,
) -> dict[str, float] | None:
    """The Eigen et al. metrics of one image, on its valid pixels.

    Valid pixels: min_depth < gt < max_depth, inside the crop and `valid`. Predictions are clipped to
    [min_depth, max_depth] (non-finite ones too) before the errors, as BTS and the depth toolbox do.

    Returns:
        `abs_rel` = mean |d - d*| / d*, `sq_rel` = mean (d - d*)^2 / d*, `rmse` = sqrt(mean (d - d*)^2),
        `rmse_log` = sqrt(mean (log d - log d*)^2), `log10` = mean |log10 d - log10 d*|,
        `silog` = 100 sqrt(mean g^2 - (mean g)^2) with g = log d - log d*, and `delta{i}` = share of pixels with
        max(d / d*, d* / d) < 1.25^i; d the prediction, d* the ground truth. None when no pixel is valid.
    """
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ")
    mask = (gt > min_depth) & (gt < max_depth) & eval_crop_mask(gt.shape, crop)
    if valid is not None:
        mask &= np.asarray(valid, bool)
    if not mask.any():
        return None
    d = np.nan_to_num(pred[mask], nan=min_depth, posinf=max_depth, neginf=min_depth).clip(min_depth, max_depth)
    t = gt[mask]
    ratio = np.maximum(d / t, t / d)
    g = np.log(d) - np.log(t)
    return {
        "abs_rel": float(np.mean(np.abs(d - t) / t)),
        "sq_rel": float(np.mean((d - t) ** 2 / t)),
        "rmse": float(np.sqrt(np.mean((d - t) ** 2))),
        "rmse_log": float(np.sqrt(np.mean(g**2))),
        "log10": float(np.mean(np.abs(np.log10(d) - np.log10(t)))),
        "silog": float(100.0 * np.sqrt(max(np.mean(g**2) - np.mean(g) ** 2, 0.0))),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25**2)),
        "delta3": float(np.mean(ratio < 1.25**3)),
    }


def depth_metrics(
    preds: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    *,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    crop: str | None = None,
) -> dict[str, float]:
    """The Eigen et al. metrics averaged over images (each image weighs the same, whatever its valid pixels).

    Returns:
        Every name in `DEPTH_METRICS` and `num_images` (images with at least one valid pixel).
    """
    per_image = [
        e
        for p, g in zip(preds, gts, strict=True)
        if (e := depth_errors(p, g, min_depth=min_depth, max_depth=max_depth, crop=crop)) is not None
    ]
    out = {name: float(np.mean([e[name] for e in per_image])) if per_image else math.nan for name in DEPTH_METRICS}
    out["num_images"] = float(len(per_image))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Robustness (ImageNet-C)
# --------------------------------------------------------------------------------------------------------------------


def corruption_errors(
    errors: Mapping[str, Sequence[float]], baseline: Mapping[str, Sequence[float]]
) -> dict[str, float]:
    """Corruption Error per corruption: CE_c = sum_s E_{s,c} / sum_s E^base_{s,c}.

    Args:
        errors: Corruption name to the model's top-1 errors at each severity.
        baseline: The same for the baseline model (AlexNet in the ImageNet-C paper), same corruptions and severities.

    Returns:
        CE_c for each corruption the baseline has a non-zero error sum on (others cannot be normalised: left out).
    """
    out: dict[str, float] = {}
    for name, errs in errors.items():
        if name not in baseline:
            raise KeyError(f"the baseline has no errors for corruption {name!r}")
        base = baseline[name]
        if len(base) != len(errs):
            raise ValueError(f"{name}: {len(errs)} severities against the baseline's {len(base)}")
        denominator = float(np.sum(base))
        if denominator > 0:
            out[name] = float(np.sum(errs)) / denominator
    return out


def mean_corruption_error(errors: Mapping[str, Sequence[float]], baseline: Mapping[str, Sequence[float]]) -> float:
    """mCE in percent: 100 x the mean over corruptions of CE_c (Hendrycks & Dietterich 2019). NaN if none counts."""
    ce = corruption_errors(errors, baseline)
    return 100.0 * float(np.mean(list(ce.values()))) if ce else math.nan


def mean_corruption_error_against_means(
    errors: Mapping[str, Sequence[float]], baseline_means: Mapping[str, float]
) -> tuple[float, dict[str, float]]:
    """mCE against a baseline known by its error averaged over the severities (AlexNet's published table).

    CE_c = mean_s E_{s,c} / mean-error^base_c; with all five severities this is the published sum_s E_{s,c} /
    sum_s E^base_{s,c} exactly. Returns (mCE in percent, CE_c per corruption); NaN if no corruption counts.
    """
    ce = {}
    for name, errs in errors.items():
        if name not in baseline_means:
            raise KeyError(f"the baseline has no error for corruption {name!r}")
        if baseline_means[name] > 0 and len(errs):
            ce[name] = float(np.mean(errs)) / float(baseline_means[name])
    return (100.0 * float(np.mean(list(ce.values()))) if ce else math.nan), ce


def relative_mean_corruption_error(
    errors: Mapping[str, Sequence[float]],
    clean_error: float,
    baseline: Mapping[str, Sequence[float]],
    baseline_clean_error: float,
) -> float:
    """Relative mCE in percent: mean_c of sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean).

    Measures the degradation a corruption causes rather than the error itself; corruptions on which the baseline does
    not degrade (a denominator of 0 up to rounding, or negative: the ratio's sign would flip) are left out. NaN if none
    counts.
    """
    ratios = []
    for name, errs in errors.items():
        base = baseline[name]
        denominator = float(np.sum(np.asarray(base) - baseline_clean_error))
        # Errors are fractions of a finite test set: a sum of differences below 1e-9 is rounding, not degradation.
        if denominator > 1e-9:
            ratios.append(float(np.sum(np.asarray(errs) - clean_error)) / denominator)
    return 100.0 * float(np.mean(ratios)) if ratios else math.nan
