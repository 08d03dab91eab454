"""Data tests of the Great Expectations gates: each suite passes on a clean frame and fails, readably, on a bad one."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components import gates
from components.gates import GateFailed, run_gate


def manifest(num_rows: int = 20) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "uri": [f"file:///data/pool/img{i:03d}.jpg" for i in range(num_rows)],
            "sha256": [f"{i:064x}" for i in range(num_rows)],
            "width": np.full(num_rows, 96),
            "height": np.full(num_rows, 64),
            "source": ["pool"] * (num_rows - 2) + ["seeds"] * 2,
            "split": "train",
            "decodable": True,
        }
    )


def unit_embeddings(num_rows: int = 8, dim: int = 16) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((num_rows, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def fail(name: str, df: pd.DataFrame, expectations: list, out_dir: Path, **kwargs) -> GateFailed:
    with pytest.raises(GateFailed) as info:
        run_gate(name, df, expectations, out_dir, **kwargs)
    return info.value


# --------------------------------------------------------------------------------------------------------------------
# The gate: files, message, options
# --------------------------------------------------------------------------------------------------------------------


def test_passing_gate_writes_json_and_data_docs(tmp_path: Path) -> None:
    result = run_gate(
        "prepared_manifest", manifest(), gates.prepared_manifest_suite(min_side=32), tmp_path, id_column="uri"
    )

    assert result.success and not result.failures
    assert result.json_path == tmp_path.resolve() / "prepared_manifest.json"
    saved = json.loads(result.json_path.read_text())
    assert saved["success"] is True
    assert saved["statistics"]["evaluated_expectations"] == result.num_expectations > 0
    assert result.docs_index == tmp_path.resolve() / "docs" / "index.html"
    assert "prepared_manifest" in result.docs_index.read_text()
    pages = list((result.docs_dir / "validations").rglob("*.html"))
    assert len(pages) == 1 and "Expectation Validation Result" in pages[0].read_text()
    assert result.artifacts == (result.json_path, result.docs_dir)
    assert result.metrics["success"] == 1.0 and result.metrics["num_failed"] == 0.0
    # GE's unused fonts and GIFs (~4 MB) are not left in the site that every stage logs to MLflow.
    assert sum(p.stat().st_size for p in result.docs_dir.rglob("*") if p.is_file()) < 1_000_000


def test_failing_gate_saves_its_report_before_raising(tmp_path: Path) -> None:
    bad = manifest()
    bad.loc[4, "width"] = 8
    err = fail("prepared_manifest", bad, gates.prepared_manifest_suite(min_side=32), tmp_path, id_column="uri")

    assert isinstance(err, RuntimeError)
    assert not err.result.success
    assert json.loads(err.result.json_path.read_text())["success"] is False
    page = next((err.result.docs_dir / "validations").rglob("*.html")).read_text()
    assert "img004.jpg" in page  # Data Docs lists the offending row's id next to its value
    assert str(err.result.json_path) in str(err) and str(err.result.docs_index) in str(err)


def test_gate_failed_survives_pickling(tmp_path: Path) -> None:
    """Prefect and multiprocessing pickle a task's exception; the report and paths must come through."""
    bad = manifest()
    bad.loc[2, "decodable"] = False
    err = fail("prepared_manifest", bad, gates.prepared_manifest_suite(min_side=32), tmp_path, id_column="uri")
    clone = pickle.loads(pickle.dumps(err))
    assert isinstance(clone, GateFailed) and str(clone) == str(err) and clone.result == err.result


def test_gate_prints_no_progress_bars(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run_gate("prepared_manifest", manifest(), gates.prepared_manifest_suite(min_side=32), tmp_path)
    captured = capfd.readouterr()
    assert "Calculating Metrics" not in captured.err + captured.out


def test_raise_on_failure_false_returns_the_failed_result(tmp_path: Path) -> None:
    bad = manifest()
    bad.loc[0, "decodable"] = False
    result = run_gate(
        "prepared_manifest", bad, gates.prepared_manifest_suite(min_side=32), tmp_path, raise_on_failure=False
    )
    assert not result.success
    assert [f.expectation for f in result.failures] == ["expect_column_values_to_be_in_set"]
    with pytest.raises(GateFailed):
        result.raise_for_failure()


def test_gates_of_one_stage_share_one_site_and_a_rerun_replaces_its_page(tmp_path: Path) -> None:
    suite = gates.prepared_manifest_suite(min_side=32)  # one list, reused: the gate copies the expectations
    run_gate("first", manifest(), suite, tmp_path)
    run_gate("second", manifest(), suite, tmp_path)
    run_gate("second", manifest(), suite, tmp_path)

    index = (tmp_path / "docs" / "index.html").read_text()
    assert "first" in index and "second" in index
    assert len(list((tmp_path / "docs" / "validations" / "second").rglob("*.html"))) == 1
    assert {p.name for p in tmp_path.glob("*.json")} == {"first.json", "second.json"}


def test_ids_follow_rows_whatever_the_frame_index(tmp_path: Path) -> None:
    bad = manifest(5)
    bad.index = [7, 7, 3, 3, 0]  # non-unique, unordered
    bad.loc[bad.uri.str.endswith("img002.jpg"), "height"] = 1
    err = fail("prepared_manifest", bad, gates.prepared_manifest_suite(min_side=32), tmp_path, id_column="uri")
    (failure,) = err.result.failures
    assert failure.ids == ("file:///data/pool/img002.jpg",) and failure.values == (1,)


def test_without_id_column_the_report_names_row_positions(tmp_path: Path) -> None:
    bad = manifest(5)
    bad.loc[3, "width"] = 2
    err = fail("prepared_manifest", bad, gates.prepared_manifest_suite(min_side=32), tmp_path)
    assert err.result.failures[0].ids == (3,)
    assert "rows: [3]" in str(err)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    suite = gates.prepared_manifest_suite(min_side=32)
    with pytest.raises(ValueError, match="gate name"):
        run_gate("../escape", manifest(), suite, tmp_path)
    with pytest.raises(ValueError, match="no expectations"):
        run_gate("empty", manifest(), [], tmp_path)
    with pytest.raises(ValueError, match="id_column"):
        run_gate("ids", manifest(), suite, tmp_path, id_column="image_id")


def test_missing_column_fails_with_ges_error(tmp_path: Path) -> None:
    err = fail(
        "prepared_manifest", manifest().drop(columns="split"), gates.prepared_manifest_suite(min_side=32), tmp_path
    )
    assert "expect_column_values_to_not_be_null(column='split')" in str(err)
    assert 'The column "split" in BatchData does not exist' in str(err)


def test_empty_frame_fails_instead_of_passing_vacuously(tmp_path: Path) -> None:
    err = fail("prepared_manifest", manifest().iloc[:0], gates.prepared_manifest_suite(min_side=32), tmp_path)
    assert "expect_table_row_count_to_be_between(min_value=1)" in str(err)
    assert "observed: 0" in str(err)


def test_importing_the_module_does_not_import_great_expectations() -> None:
    code = "import sys, components.gates; assert 'great_expectations' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------------------------------


def test_prepared_manifest_suite_names_each_broken_rule_and_its_rows(tmp_path: Path) -> None:
    bad = manifest()
    bad.loc[3, "width"] = 10  # too small
    bad.loc[5, "height"] = 5000  # above max_side
    bad.loc[7, "sha256"] = bad.loc[8, "sha256"]  # duplicate content
    bad.loc[9, "decodable"] = False
    bad.loc[10, "source"] = None
    bad.loc[11, "sha256"] = "not-a-digest"
    err = fail(
        "prepared_manifest", bad, gates.prepared_manifest_suite(min_side=32, max_side=4096), tmp_path, id_column="uri"
    )
    message = str(err)
    by_rule = {(f.expectation, f.kwargs.get("column")): f for f in err.result.failures}

    assert message.startswith("Gate 'prepared_manifest' failed: 6 of")
    assert by_rule["expect_column_values_to_be_between", "width"].values == (10,)
    assert by_rule["expect_column_values_to_be_between", "width"].ids == ("file:///data/pool/img003.jpg",)
    assert by_rule["expect_column_values_to_be_between", "height"].ids == ("file:///data/pool/img005.jpg",)
    assert set(by_rule["expect_column_values_to_be_unique", "sha256"].ids) == {
        "file:///data/pool/img007.jpg",
        "file:///data/pool/img008.jpg",
    }
    assert by_rule["expect_column_values_to_be_in_set", "decodable"].ids == ("file:///data/pool/img009.jpg",)
    assert by_rule["expect_column_values_to_not_be_null", "source"].ids == ("file:///data/pool/img010.jpg",)
    assert by_rule["expect_column_values_to_match_regex", "sha256"].values == ("not-a-digest",)
    assert "expect_column_values_to_be_between(column='width', min_value=32" in message
    assert "1 of 20 rows unexpected; values: [10]; uri: ['file:///data/pool/img003.jpg']" in message


def test_prepared_manifest_sha256_unique_within_a_column(tmp_path: Path) -> None:
    df = manifest()
    df.loc[19, "sha256"] = df.loc[0, "sha256"]  # same bytes in pool (row 0) and seeds (row 19)
    suite = gates.prepared_manifest_suite(min_side=32, unique_within="source")
    assert run_gate("prepared_manifest", df, suite, tmp_path).success
    fail("prepared_manifest", df, gates.prepared_manifest_suite(min_side=32), tmp_path)


def test_embedding_frame_statistics() -> None:
    x = np.full((3, 4), 300.0, dtype=np.float16)  # 300^2 overflows float16: the norm must not
    x[1, 2] = np.nan
    x[2, 0] = np.inf
    frame = gates.embedding_frame(["a", "b", "c"], x, chunk_rows=2)
    assert list(frame.columns) == ["id", "norm", "num_nonfinite", "dim"]
    assert frame.norm[0] == pytest.approx(600.0)
    assert math.isnan(frame.norm[1]) and math.isinf(frame.norm[2])
    assert frame.num_nonfinite.tolist() == [0, 1, 1] and frame.dim.tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="ids"):
        gates.embedding_frame(["a"], x)


def test_embeddings_suite_names_the_ids_of_nan_and_inf_rows(tmp_path: Path) -> None:
    x = unit_embeddings()
    assert run_gate(
        "embeddings",
        gates.embedding_frame([f"img{i}" for i in range(8)], x),
        gates.embeddings_suite(dim=16, normalized=True, num_rows=8),
        tmp_path,
        id_column="id",
    ).success

    x[2, 5] = np.nan
    x[6, 0] = np.inf
    x[4] *= 2  # finite but not unit norm
    frame = gates.embedding_frame([f"img{i}" for i in range(8)], x)
    err = fail("embeddings", frame, gates.embeddings_suite(dim=16, normalized=True), tmp_path, id_column="id")
    by_rule = {(f.expectation, f.kwargs.get("column")): f for f in err.result.failures}

    assert by_rule["expect_column_values_to_be_in_set", "num_nonfinite"].ids == ("img2", "img6")
    assert by_rule["expect_column_values_to_not_be_null", "norm"].ids == ("img2",)  # NaN norm
    assert set(by_rule["expect_column_values_to_be_between", "norm"].ids) == {"img4", "img6"}  # 2 and inf
    assert "expect_column_values_to_be_in_set(column='num_nonfinite', value_set=[0])" in str(err)
    assert "id: ['img2', 'img6']" in str(err)


def test_embeddings_suite_checks_shape(tmp_path: Path) -> None:
    frame = gates.embedding_frame(["a", "b"], unit_embeddings(2, 8))
    err = fail(
        "embeddings", frame, gates.embeddings_suite(dim=16, normalized=False, num_rows=3), tmp_path, id_column="id"
    )
    failed = {f.expectation: f for f in err.result.failures}
    assert failed["expect_column_values_to_be_in_set"].kwargs == {"column": "dim", "value_set": [16]}
    assert failed["expect_column_values_to_be_in_set"].values == (8, 8)
    assert failed["expect_table_row_count_to_equal"].observed == 2


def test_curated_manifest_suite_catches_leakage_and_duplicates(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {
            "uri": [f"u{i}" for i in range(5)],
            "max_eval_similarity": [0.2, 0.5, 0.95, 0.9, np.nan],
            "dup_group_size": [1, 1, 1, 2, 1],
        }
    )
    clean = df.iloc[:2]
    suite = gates.curated_manifest_suite(max_eval_similarity=0.9)
    assert run_gate("curated_manifest", clean, suite, tmp_path, id_column="uri").success

    err = fail("curated_manifest", df, suite, tmp_path, id_column="uri")
    by_rule = {(f.expectation, f.kwargs.get("column")): f for f in err.result.failures}
    leak = by_rule["expect_column_values_to_be_between", "max_eval_similarity"]
    assert leak.ids == ("u2", "u3")  # 0.9 is not strictly below 0.9
    assert leak.kwargs["strict_max"] is True
    assert by_rule["expect_column_values_to_not_be_null", "max_eval_similarity"].ids == ("u4",)
    assert by_rule["expect_column_values_to_be_in_set", "dup_group_size"].ids == ("u3",)


def test_source_shares_suite(tmp_path: Path) -> None:
    bounds = {"pool": (0.5, 0.9), "seeds": (0.1, 0.5), "retrieved": (0.0, 0.3)}
    suite = gates.source_shares_suite(bounds)
    good = gates.source_share_frame(["pool"] * 7 + ["seeds"] * 3, expected=bounds)
    assert good.set_index("source").share.to_dict() == {"pool": 0.7, "seeds": 0.3, "retrieved": 0.0}
    assert run_gate("curated_sources", good, suite, tmp_path, id_column="source").success

    bad = gates.source_share_frame(["pool"] * 19 + ["seeds"])
    err = fail("curated_sources", bad, suite, tmp_path, id_column="source")
    message = str(err)
    assert "row_condition=(source == 'pool')" in message and "source: ['pool']" in message  # 0.95 > 0.9
    assert "row_condition=(source == 'seeds')" in message and "values: [0.05]" in message
    assert "expect_column_distinct_values_to_contain_set" in message and "'missing': ['retrieved']" in message
    with_null = gates.source_share_frame(["pool", None, "pool"])
    assert fail("curated_sources", with_null, suite, tmp_path).result.failures[0].kwargs == {"column": "source"}
    with pytest.raises(ValueError, match="retrieved"):
        gates.source_shares_suite({"retrieved": (0.5, 0.2)})


def test_between_alone_lets_nan_through(tmp_path: Path) -> None:
    """Why `expect_finite` is two expectations: GE counts NaN as missing, not as out of range."""
    not_null, between = gates.expect_finite("loss")
    df = pd.DataFrame({"step": [0, 1], "loss": [1.0, np.nan]})
    assert run_gate("between_only", df, [between], tmp_path).success
    assert not run_gate("not_null_only", df, [not_null], tmp_path, raise_on_failure=False).success


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_training_metrics_suite_catches_non_finite_losses(tmp_path: Path, bad_value: float) -> None:
    df = pd.DataFrame(
        {
            "step": np.arange(0, 50, 10),
            "loss": [4.2, 3.9, 3.5, 3.3, 3.1],
            "dino_loss": np.array([2.0, 1.9, 1.8, 1.7, 1.6], dtype=np.float32),
        }
    )
    suite = gates.training_metrics_suite(["loss", "dino_loss"])
    assert run_gate("training_metrics", df, suite, tmp_path, id_column="step").success

    df.loc[3, "dino_loss"] = bad_value
    err = fail("training_metrics", df, suite, tmp_path, id_column="step")
    (failure,) = err.result.failures
    assert failure.kwargs["column"] == "dino_loss" and failure.ids == (30,)
    assert "step: [30]" in str(err)
    assert json.loads(err.result.json_path.read_text())["success"] is False  # strict JSON despite the non-finite


def test_evaluation_metrics_suite_checks_each_value_against_its_own_range(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {
            "model": ["teacher"] * 5,
            "task": ["knn", "knn", "depth", "segmentation", "retrieval"],
            "metric": ["top1", "top5", "rmse", "miou", "map"],
            "value": [0.61, 0.85, 0.42, 0.33, 0.5],
            "lower": [0.0, 0.0, 0.0, 0.0, 0.0],
            "upper": [1.0, 1.0, np.inf, 1.0, 1.0],
        }
    )
    suite = gates.evaluation_metrics_suite()
    ids = list(gates.EVAL_ID_COLUMNS)
    assert run_gate("evaluation_metrics", df, suite, tmp_path, id_column=ids).success

    df.loc[1, "value"] = 1.2  # accuracy above 1
    df.loc[2, "value"] = -0.1  # negative RMSE
    df.loc[3, "value"] = np.nan
    err = fail("evaluation_metrics", df, suite, tmp_path, id_column=ids)
    by_rule = {(f.expectation, f.kwargs.get("column_A")): f for f in err.result.failures}
    assert by_rule["expect_column_pair_values_a_to_be_greater_than_b", "upper"].ids == (
        ("teacher", "knn", "top5"),
        ("teacher", "segmentation", "miou"),
    )
    assert by_rule["expect_column_pair_values_a_to_be_greater_than_b", "value"].ids == (
        ("teacher", "depth", "rmse"),
        ("teacher", "segmentation", "miou"),
    )
    assert by_rule["expect_column_values_to_not_be_null", None].ids == (("teacher", "segmentation", "miou"),)
    assert "model, task, metric: [('teacher', 'knn', 'top5')" in str(err)
