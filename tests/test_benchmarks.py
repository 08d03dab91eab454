"""The benchmarks run and report what they promise (the numbers themselves are measured on GPUs, never asserted)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _run(script: str, *args: str) -> object:
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1] if script == "train_step.py" else proc.stdout)


def test_train_step_with_its_timm_baseline_data_and_profile(tmp_path):
    record = _run(
        "train_step.py", "--arch", "vit_small", "--device", "cpu", "--batch-per-gpu", "2", "--global-size", "28",
        "--local-size", "14", "--local-crops", "2", "--prototypes", "256", "--steps", "2", "--repeats", "2",
        "--warmup", "1", "--threads", "1", "--baseline", "timm", "--with-data", "--num-workers", "1",
        "--data-images", "16", "--data-image-size", "48", "--profile", str(tmp_path / "profile"), "--pack-crops",
    )  # fmt: skip
    ours, baseline = record["ours"], record["baseline"]
    for rate in (ours["img_s"], baseline["img_s"]):
        assert rate["repeats"] == 2 and 0 < rate["min"] <= rate["median"] <= rate["max"]
    assert record["ratio"] == round(ours["img_s"]["median"] / baseline["img_s"]["median"], 3)
    assert baseline["model"] == "vit_small_patch14_dinov2" and record["pack_crops"]
    assert ours["tflop_per_image"] > 0 and not ours["skipped"]
    assert set(ours["with_data"]) == {"img_s", "data_wait_share", "keeps_up", "num_workers"}
    profile = ours["profile"]
    assert (tmp_path / "profile" / "ours" / "trace.json").is_file() and profile["top"]
    assert abs(sum(profile["categories_share"].values()) - 1) < 1e-3
    assert {"matmul", "optimizer"} <= set(profile["categories_share"])


def test_backbone_with_its_timm_baseline():
    (record,) = _run(
        "backbone.py", "--arch", "vit_small", "--device", "cpu", "--batch", "2", "--img-size", "28", "--iters", "1",
        "--repeats", "2", "--warmup", "1", "--baseline", "timm",
    )  # fmt: skip
    assert record["baseline"]["model"] == "vit_small_patch14_dinov2"
    assert record["infer_ratio"] == round(record["infer_img_s"] / record["baseline"]["infer_img_s"], 3)
    assert record["train_img_s"] > 0 and record["baseline"]["train_img_s"] > 0


def test_dinov3_backbone_against_timms_dinov3_holding_the_same_weights():
    (record,) = _run(
        "backbone.py", "--arch", "dinov3_vit_test", "--device", "cpu", "--batch", "2", "--img-size", "32", "--iters",
        "1", "--repeats", "2", "--warmup", "1", "--baseline", "timm",
    )  # fmt: skip
    parity = record["parity"]
    assert parity["ok"] and parity["fp32"]["max_abs"] <= parity["tolerance"] == 1e-4
    assert set(parity["fp32"]) == {"cls_max_abs", "storage_max_abs", "patch_max_abs", "max_abs"}
    assert parity["bf16_autocast"] is None  # measured on a GPU only
    assert set(parity["fp32_release_bf16_periods"]) == set(parity["fp32"]) and parity["images"] == [4, 3, 32, 32]
    baseline = record["baseline"]
    assert baseline["model"] == "vit_small_patch16_dinov3_qkvb" and "rope_embed.periods" in baseline["dropped_keys"]
    for phase in ("infer", "train"):
        assert record[f"{phase}_ratio"] == round(record[f"{phase}_img_s"] / baseline[f"{phase}_img_s"], 3)
        assert record[f"{phase}_peak_mem_gib"] > 0 and baseline[f"{phase}_peak_mem_gib"] > 0
    assert "infer_mem_ratio" not in record  # the CPU's peak is the process's, not one model's


def test_gram_step_beside_the_same_step_without_gram(in_process_training, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    train_step = importlib.import_module("train_step")
    record = train_step.main([
        "--arch", "dinov3_vit_test", "--device", "cpu", "--batch-per-gpu", "2", "--global-size", "32",
        "--local-size", "16", "--local-crops", "2", "--prototypes", "256", "--steps", "1", "--repeats", "2",
        "--warmup", "0", "--threads", "1", "--gram", "--baseline", "no-gram",
    ])  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == record  # the JSON it prints
    ours, baseline = record["ours"], record["baseline"]
    assert record["gram"] == {"teacher_crops": [2, 64], "loss_weight": 1.0, "tokens": "all", "img_level": True,
                              "remove_neg": False}  # fmt: skip
    assert record["ratio"] == round(ours["img_s"]["median"] / baseline["img_s"]["median"], 3)
    assert 0 < ours["final_gram_loss"] < float("inf") and not ours["skipped"]
    assert baseline["model"] == "ours, gram off" and "final_gram_loss" not in baseline
    with pytest.raises(SystemExit):  # the Gram-off baseline of a step without Gram
        train_step.parse_args(["--arch", "dinov3_vit_test", "--baseline", "no-gram"])


def test_curation_reports_its_goals_against_the_exact_search_or_leaves_them_unmeasured():
    small = ("--num-vectors", "8000", "--num-centers", "100", "--subset", "3000", "--clusters", "20",
             "--kmeans-iters", "5", "--kind", "flat")  # fmt: skip
    record = _run("curation.py", *small, "--verify-pairs", "20")
    # A flat index finds every pair the exact search finds, and every planted copy.
    assert record["dedup_recall_vs_exact"] == 1.0 and record["planted_pair_recall"] == 1.0
    assert record["verification"]["pairs"] == 20 and record["verification"]["ms_per_pair"] > 0
    assert all(isinstance(v, bool) for v in record["goals_met"].values())
    quick = _run("curation.py", *small, "--verify-pairs", "0", "--skip-sklearn")
    assert "verification" not in quick
    # Goals that need the sklearn baseline are not measured, not failed.
    assert [k for k, v in quick["goals_met"].items() if v is None] == [
        "recall_at_least_0.97", "dedup_5x_sklearn", "kmeans_2x_sklearn"]  # fmt: skip


@pytest.mark.slow
def test_curation_scaling_runs_each_size_on_one_and_two_ranks_and_fits_the_exponent(tmp_path):
    """The scaling run's protocol on small sizes: every (size, ranks) point, the same edges on 1 and 2 ranks (one
    shard grid for both), peak memory of every rank, recall against the exact search, an exponent per rank count.
    Slow (six processes, two torchrun launches: about 60 s on 2 cores)."""
    record = _run("curation.py", "--scale", "3000,6000", "--ranks", "1,2", "--data-dir", str(tmp_path), "--kind",
                  "ivf_gemm", "--shards", "3", "--num-centers", "100", "--clusters", "10", "--kmeans-iters", "3",
                  "--recall-queries", "200")  # fmt: skip
    points = {(p["num_vectors"], p["ranks"]): p for p in record["points"]}
    assert set(points) == {(3000, 1), (3000, 2), (6000, 1), (6000, 2)}
    for (num, ranks), point in points.items():
        assert len(point["peak_rss_gib_per_rank"]) == ranks and point["dedup_s"] > 0
        assert point["dedup_recall_vs_exact"] >= 0.95 and point["exact_edges_of_queries"] > 10
        assert point["dedup_edges"] == points[(num, 1)]["dedup_edges"] > 0  # one shard grid: the same graph
    assert set(record["fits"]) == {f"{k}_exponent_{r}_ranks" for k in ("dedup_s", "kmeans_s") for r in (1, 2)}
    assert all(isinstance(v, float) for v in record["fits"].values())
