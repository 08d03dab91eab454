"""The report's pieces: PCA of patch features, tables, candidate ranking, the quality-gate frame.

The registry is exercised end to end in test_eval_stages.py.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from components.evaluation import report as R


def test_patch_pca_separates_a_planted_foreground() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.normal(scale=0.1, size=(3, 6, 6, 16))
    fg_true = np.zeros((3, 6, 6), bool)
    fg_true[:, 2:4, 2:5] = True  # the object sits in the middle, away from the border
    tokens[fg_true] += 5.0 * np.eye(16)[0]  # foreground patches share a strong direction
    tokens[fg_true] += rng.normal(size=(fg_true.sum(), 16))  # and vary among themselves (parts of the object)
    rgb, fg = R.patch_pca_rgb(tokens)
    assert np.array_equal(fg, fg_true)
    assert rgb.shape == (3, 6, 6, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert (rgb[~fg] == 0).all() and rgb[fg].max() == 1.0  # background black; components scaled to [0, 1]


def _frame() -> pd.DataFrame:
    rows = [
        ("teacher", "knn", "top1", 0.9),
        ("teacher", "depth_linear", "rmse", 0.5),
        ("student_vit_small", "knn", "top1", 0.8),
        ("student_vit_small", "depth_linear", "rmse", 0.4),
        ("random_init", "knn", "top1", 0.3),
        ("random_init", "depth_linear", "rmse", 0.45),
        ("dinov2_vits14", "knn", "top1", 0.99),
    ]
    return pd.DataFrame(rows, columns=["model", "task", "metric", "value"])


MODELS = [
    {"name": "teacher", "arch": "vit_tiny", "role": "teacher"},
    {"name": "student_vit_small", "arch": "vit_small", "role": "student"},
    {"name": "random_init", "arch": "vit_tiny", "role": "baseline"},
    {"name": "dinov2_vits14", "arch": "vit_small", "role": "official"},
]


def test_ranking_tables_and_bold_best() -> None:
    frame = _frame()
    assert R.rank_candidates(frame, MODELS, "knn.top1", ("teacher", "student")) == ["teacher", "student_vit_small"]
    assert R.rank_candidates(frame, MODELS, "depth_linear.rmse", ("teacher", "student"))[0] == "student_vit_small"
    table = R.headline_table(frame, MODELS, ["teacher", "student_vit_small"])
    assert list(table["model"]) == ["teacher", "student_vit_small", "random_init", "dinov2_vits14"]
    assert list(table.columns) == ["model", "arch", "role", "knn.top1", "depth_linear.rmse"]
    md = R.to_markdown(table)
    assert "**0.99**" in md and "**0.4**" in md  # higher-is-better and lower-is-better columns
    assert "n/a" in md  # the official checkpoint has no depth result
    assert "<b>0.99</b>" in R.to_html(table)
    tasks = R.task_tables(frame, ["teacher"])
    assert set(tasks) == {"knn", "depth_linear"} and tasks["knn"]["model"].iloc[0] == "teacher"


def test_reference_notes_under_their_tables(tmp_path) -> None:
    import json

    (tmp_path / "random_init").mkdir()
    ref = {"rmse": 1.23456, "abs_rel": 0.5, "delta1": 0.25}
    task = {"metrics": {"rmse": 1.0}, "details": {"mean_map": ref}}
    (tmp_path / "random_init" / "depth_linear.json").write_text(json.dumps(task))
    notes = R.reference_notes(tmp_path, MODELS, ["knn", "depth_linear"])  # the teacher has no file here
    assert list(notes) == ["depth_linear"] and "RMSE 1.235, AbsRel 0.5, delta1 0.25" in notes["depth_linear"]
    frame = _frame()
    R.write_tables(tmp_path, R.headline_table(frame, MODELS, []), R.task_tables(frame, []), {"passed": True}, notes)
    md = (tmp_path / "table.md").read_text()
    assert md.index("## depth_linear") < md.index("RMSE 1.235") and "RMSE 1.235" not in md.split("## depth_linear")[0]
    assert "<p>Image-blind reference" in (tmp_path / "table.html").read_text()


def test_quality_gate_frame() -> None:
    frame = _frame()
    gate = R.quality_gate_frame(frame, "teacher", gate_metric="knn.top1", gate_min=0.5, baseline="random_init")
    rows = {(r.task, r.metric): r for r in gate.itertuples()}
    assert rows[("knn", "top1")].lower == 0.5 and rows[("knn", "top1")].upper == math.inf
    beat_knn = rows[("knn_vs_random_init", "top1")]
    assert beat_knn.lower > 0.3 and beat_knn.value >= beat_knn.lower  # strictly better than the baseline
    beat_depth = rows[("depth_linear_vs_random_init", "rmse")]
    assert beat_depth.upper < 0.45 and beat_depth.value > beat_depth.upper  # the teacher's depth is worse: fails
    equal = R.quality_gate_frame(frame, "random_init", gate_metric="knn.top1", gate_min=0.0, baseline="random_init")
    assert (equal["value"] < equal["lower"]).any() or (equal["value"] > equal["upper"]).any()  # a tie is no win


def test_the_champion_is_the_best_candidate_that_passes_the_gate() -> None:
    from components.config import ReportConfig
    from components.stages.report import passing_first

    frame = _frame()  # the teacher has the best kNN but a depth RMSE worse than random_init's; the student beats it
    ranked = R.rank_candidates(frame, MODELS, "knn.top1", ("teacher", "student"))
    assert ranked == ["teacher", "student_vit_small"]
    assert passing_first(frame, MODELS, ranked, ReportConfig()) == ["student_vit_small", "teacher"]
    lenient = ReportConfig(require_beats_baseline=False)  # kNN above gate_min alone: both pass, kNN order kept
    assert passing_first(frame, MODELS, ranked, lenient) == ranked
    strict = ReportConfig(gate_min=0.95)  # nobody passes: the order by the gate metric
    assert passing_first(frame, MODELS, ranked, strict) == ranked
