"""Every evaluation metric against hand-computed values and known answers (perfect, constant, worked examples)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.evaluation import metrics as M

# --------------------------------------------------------------------------------------------------------------------
# kNN vote and top-k accuracy
# --------------------------------------------------------------------------------------------------------------------


def test_knn_vote_worked_example() -> None:
    # Bank: e1 (class 0), e2 (class 1), (0.6, 0.8) (class 1). Query e1: similarities 1, 0, 0.6.
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    sim = torch.tensor([[1.0, 0.0]]) @ bank.T
    scores = M.knn_vote(sim, labels, k=2, temperature=0.07, num_classes=2)
    # k = 2 keeps similarities 1 (class 0) and 0.6 (class 1); weights softmax(s / 0.07) over the two.
    w0 = math.exp(1 / 0.07) / (math.exp(1 / 0.07) + math.exp(0.6 / 0.07))
    assert scores[0, 0].item() == pytest.approx(w0, rel=1e-5)
    assert scores[0, 1].item() == pytest.approx(1 - w0, rel=1e-4)
    # k = 3 adds similarity 0 for class 1.
    scores = M.knn_vote(sim, labels, k=3, temperature=0.07, num_classes=2)
    e = [math.exp(s / 0.07) for s in (1.0, 0.0, 0.6)]
    assert scores[0, 0].item() == pytest.approx(e[0] / sum(e), rel=1e-5)
    assert scores.sum().item() == pytest.approx(1.0)


def test_knn_vote_clips_k_and_high_temperature_is_majority() -> None:
    sim = torch.tensor([[0.9, 0.8, 0.1]])
    labels = torch.tensor([1, 0, 0])
    scores = M.knn_vote(sim, labels, k=100, temperature=1e6, num_classes=2)  # k clipped to 3, nearly uniform weights
    assert scores[0].tolist() == pytest.approx([2 / 3, 1 / 3], rel=1e-4)


def test_topk_accuracy_known_answers() -> None:
    labels = np.array([0, 1, 2, 2])
    perfect = np.eye(3)[labels]
    assert M.topk_accuracy(perfect, labels, 1) == 1.0
    constant = np.ones((4, 3))  # ties go to class 0: right only for the first image
    assert M.topk_accuracy(constant, labels, 1) == 0.25
    assert M.topk_accuracy(constant, labels, 2) == 0.5  # classes 0 and 1
    assert M.topk_accuracy(constant, labels, 5) == 1.0  # k clipped to C
    worked = np.array([[0.1, 0.5, 0.4], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.3, 0.4]])
    assert M.topk_accuracy(worked, labels, 1) == 0.5  # rows 2 and 4 right
    assert M.topk_accuracy(worked, labels, 2) == 0.5  # rows 1 and 3: the label ranks last
    assert M.topk_accuracy(worked, labels, 3) == 1.0
    assert M.topk_accuracy(torch.tensor(worked), torch.tensor(labels), 1) == 0.5


# --------------------------------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------------------------------


def test_average_precision_worked_example() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    # positives at ranks 1, 3, 5: precisions 1/1, 2/3, 3/5
    assert M.average_precision(scores, np.array([1, 0, 1, 0, 1])) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert M.average_precision(scores, np.array([0, 0, 0, 1, 0])) == pytest.approx(1 / 4)
    assert M.average_precision(scores, np.array([1, 1, 0, 0, 0])) == 1.0  # perfect ranking
    assert math.isnan(M.average_precision(scores, np.zeros(5)))


def test_average_precision_matches_sklearn() -> None:
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.normal(size=30)
        positives = rng.random(30) < 0.3
        positives[0] = True
        assert M.average_precision(scores, positives) == pytest.approx(average_precision_score(positives, scores))


def test_retrieval_metrics_worked_example() -> None:
    sim = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.9, 0.8, 0.7, 0.6, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1]])
    pos = np.array([[1, 0, 1, 0, 1], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]], bool)  # query 3 has no positive: left out
    out = M.retrieval_metrics(sim, pos, ks=(1, 3, 5))
    assert out["num_queries"] == 2
    assert out["map"] == pytest.approx(((1 + 2 / 3 + 3 / 5) / 3 + 1 / 4) / 2)
    assert out["recall@1"] == 0.5 and out["recall@3"] == 0.5 and out["recall@5"] == 1.0


def test_retrieval_perfect_and_constant() -> None:
    labels = np.array([0, 1, 2])
    pos = M.positives_by_label(labels, labels)
    perfect = M.retrieval_metrics(np.eye(3), pos)
    assert perfect["map"] == 1.0 and perfect["recall@1"] == 1.0
    constant = M.retrieval_metrics(np.ones((3, 3)), pos, ks=(1,))  # ties in database order: only query 0 hits
    assert constant["recall@1"] == pytest.approx(1 / 3)
    assert constant["map"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_positives_by_distance() -> None:
    q = np.array([[0.0, 0.0]])
    db = np.array([[3.0, 4.0], [30.0, 0.0], [0.0, 25.0]])
    assert M.positives_by_distance(q, db, 25.0).tolist() == [[True, False, True]]


# --------------------------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------------------------


def test_segmentation_worked_example_with_ignore() -> None:
    target = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    conf = M.confusion_matrix(pred, target, num_classes=3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]  # the ignored pixel is not counted
    s = M.segmentation_scores(conf)
    # IoU: class 0 = 1 / (1 + 0 + 1), class 1 = 2 / (2 + 1 + 0), class 2 = 1
    assert s["iou_per_class"] == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert s["miou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert s["pixel_acc"] == pytest.approx(4 / 5)
    assert s["macc"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    # A class neither present nor predicted has no IoU and does not lower the mean.
    s4 = M.segmentation_scores(M.confusion_matrix(pred, target, num_classes=4))
    assert s4["miou"] == pytest.approx(s["miou"]) and math.isnan(s4["iou_per_class"][3])


def test_segmentation_perfect_and_constant() -> None:
    target = np.array([0, 1, 1, 2, 2, 2])
    perfect = M.segmentation_scores(M.confusion_matrix(target, target, 3))
    assert perfect["miou"] == 1.0 and perfect["pixel_acc"] == 1.0
    constant = M.segmentation_scores(M.confusion_matrix(np.full(6, 2), target, 3))
    # class 2 IoU = 3 / 6; classes 0 and 1 are in the ground truth but never predicted: IoU 0
    assert constant["miou"] == pytest.approx(0.5 / 3)
    assert constant["pixel_acc"] == pytest.approx(0.5)


def test_confusion_matrix_rejects_unknown_classes() -> None:
    with pytest.raises(ValueError, match="outside"):
        M.confusion_matrix(np.array([0, 1]), np.array([0, 5]), num_classes=3)
    with pytest.raises(ValueError, match="outside"):
        M.confusion_matrix(np.array([0, 7]), np.array([0, 1]), num_classes=3)


# --------------------------------------------------------------------------------------------------------------------
# Depth (Eigen et al.)
# --------------------------------------------------------------------------------------------------------------------

# A table computed by hand for pred [[1, 2], [3, 4]] against gt [[1, 2.5], [2, 0]] (0 = invalid): the valid pixels
# are (d, d*) = (1, 1), (2, 2.5), (3, 2).
DEPTH_TABLE = {
    "abs_rel": (0 + 0.5 / 2.5 + 1 / 2) / 3,  # 0.233333
    "sq_rel": (0 + 0.25 / 2.5 + 1 / 2) / 3,  # 0.2
    "rmse": math.sqrt((0 + 0.25 + 1) / 3),  # 0.645497
    "rmse_log": math.sqrt((0 + math.log(2 / 2.5) ** 2 + math.log(3 / 2) ** 2) / 3),  # 0.267205
    "log10": (0 + abs(math.log10(2 / 2.5)) + math.log10(3 / 2)) / 3,  # 0.091000
    "delta1": 1 / 3,  # ratios 1, 1.25, 1.5: only 1 < 1.25
    "delta2": 1.0,
    "delta3": 1.0,
}


def _naive_silog(pairs: list[tuple[float, float]]) -> float:
    g = [math.log(d) - math.log(t) for d, t in pairs]
    mean = sum(g) / len(g)
    return 100 * math.sqrt(sum(x * x for x in g) / len(g) - mean * mean)


def test_depth_metrics_against_hand_table() -> None:
    pred = np.array([[1.0, 2.0], [3.0, 4.0]])
    gt = np.array([[1.0, 2.5], [2.0, 0.0]])
    out = M.depth_errors(pred, gt, min_depth=1e-3, max_depth=10.0)
    assert out is not None
    for name, value in DEPTH_TABLE.items():
        assert out[name] == pytest.approx(value, rel=1e-9), name
    assert out["silog"] == pytest.approx(_naive_silog([(1, 1), (2, 2.5), (3, 2)]))
    assert DEPTH_TABLE["rmse"] == pytest.approx(0.645497, abs=1e-6)  # the table itself, to 6 decimals
    assert DEPTH_TABLE["rmse_log"] == pytest.approx(0.267205, abs=1e-6)
    assert DEPTH_TABLE["log10"] == pytest.approx(0.091000, abs=1e-6)


def test_depth_perfect_constant_caps_and_images() -> None:
    gt = np.array([[1.0, 2.0], [4.0, 8.0]])
    perfect = M.depth_errors(gt, gt, max_depth=10.0)
    assert perfect["rmse"] == 0 and perfect["abs_rel"] == 0 and perfect["delta1"] == 1.0
    constant = M.depth_errors(np.full_like(gt, 2.0), gt, max_depth=10.0)
    assert constant["abs_rel"] == pytest.approx((1 + 0 + 0.5 + 0.75) / 4)
    # Predictions are clipped to [min, max]: 100 m counts as 10 m; ground truth at or above the cap is not valid.
    clipped = M.depth_errors(np.array([100.0, 5.0]), np.array([8.0, 12.0]), max_depth=10.0)
    assert clipped["rmse"] == pytest.approx(2.0)
    assert M.depth_errors(np.array([1.0]), np.array([0.0])) is None
    # Averaged per image: image 1 rmse 0, image 2 rmse 1 -> 0.5 whatever their sizes.
    agg = M.depth_metrics([np.ones((2, 2)), np.array([[2.0]])], [np.ones((2, 2)), np.array([[1.0]])], max_depth=10)
    assert agg["rmse"] == pytest.approx(0.5) and agg["num_images"] == 2


def test_eval_crop_nyu() -> None:
    mask = M.eval_crop_mask((480, 640), "nyu")
    assert mask.sum() == (471 - 45) * (601 - 41)
    assert mask[45, 41] and not mask[44, 41] and not mask[45, 601]
    assert M.eval_crop_mask((4, 4), None).all()
    with pytest.raises(ValueError, match="unknown"):
        M.eval_crop_mask((4, 4), "nope")


# --------------------------------------------------------------------------------------------------------------------
# mCE
# --------------------------------------------------------------------------------------------------------------------


def test_mce_worked_example() -> None:
    errors = {"a": [0.2, 0.4], "b": [0.5, 0.5]}
    baseline = {"a": [0.4, 0.8], "b": [0.5, 1.5]}
    # CE_a = 0.6 / 1.2, CE_b = 1.0 / 2.0
    assert M.corruption_errors(errors, baseline) == pytest.approx({"a": 0.5, "b": 0.5})
    assert M.mean_corruption_error(errors, baseline) == pytest.approx(50.0)
    # relative: a: (0.1 + 0.3) / (0.2 + 0.6), b: (0.4 + 0.4) / (0.3 + 1.3)
    assert M.relative_mean_corruption_error(errors, 0.1, baseline, 0.2) == pytest.approx(50.0)
    assert M.mean_corruption_error(baseline, baseline) == pytest.approx(100.0)  # the baseline against itself


def test_mce_baseline_without_errors_is_left_out() -> None:
    errors = {"a": [0.2], "b": [0.3]}
    assert M.mean_corruption_error(errors, {"a": [0.4], "b": [0.0]}) == pytest.approx(50.0)
    assert math.isnan(M.mean_corruption_error(errors, {"a": [0.0], "b": [0.0]}))
    with pytest.raises(ValueError, match="severities"):
        M.corruption_errors({"a": [0.1, 0.2]}, {"a": [0.1]})


def test_relative_mce_leaves_out_corruptions_the_baseline_does_not_degrade_on() -> None:
    # 35/48 of the images wrong, clean and corrupted; 1 - 13/48 differs from 35/48 in the last bit (1.1e-16).
    clean, same = 35 / 48, 1 - 13 / 48
    errors = {"same": [0.8, 0.9, 0.9], "better": [0.8, 0.8, 0.8], "worse": [0.75, 0.85, 0.95]}
    baseline = {"same": [same] * 3, "better": [0.6, 0.6, 0.7], "worse": [0.8, 0.9, 1.0]}
    # Only "worse" counts: (0.05 + 0.15 + 0.25) / (0.8 + 0.9 + 1.0 - 3 x 35/48)
    expected = 100.0 * (0.45 / (2.7 - 3 * clean))
    assert M.relative_mean_corruption_error(errors, 0.7, baseline, clean) == pytest.approx(expected)
    assert math.isnan(M.relative_mean_corruption_error({"same": [0.8] * 3}, 0.7, {"same": [same] * 3}, clean))


def test_metric_specs() -> None:
    assert M.metric_spec("top1_k20").higher_is_better and M.metric_spec("recall@5").upper == 1.0
    assert M.metric_spec("rmse").higher_is_better is False and M.metric_spec("mce").upper == math.inf
    assert M.metric_spec("error_frost").higher_is_better is False
    with pytest.raises(KeyError):
        M.metric_spec("best_c")
    assert M.mlflow_key("retrieval.recall@5") == "retrieval.recall_at_5"
