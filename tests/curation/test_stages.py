"""The embed and curate stages on the tiny synthetic world: shards, resume, fingerprints, gates and bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from components.config import PipelineConfig, load_config
from components.embedding import load_embeddings, plan_shards, read_meta
from components.gates import GateFailed
from components.prepare import prepare
from components.stages.curate import run_curate
from components.stages.embed import run_embed

ROOT = Path(__file__).resolve().parents[2]
FAST = {
    "embed.arch": "vit_test",
    "embed.image_size": 28,
    "embed.num_workers": 0,
    "embed.batch_size": 16,
    "embed.shard_size": 16,
    "curate.num_clusters": 4,
    "curate.source_share_bounds": {},
}


def config(**overrides: Any) -> PipelineConfig:
    return load_config(ROOT / "params.yaml", overrides={**FAST, **overrides})


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DINOV2_TRACKING", "off")


def _prepare(source: Path, tmp: Path) -> tuple[Path, Path]:
    world = tmp / "world"
    shutil.copytree(source, world)
    manifest, _ = prepare(raw=str(world), cfg=config().prepare, num_workers=0)
    out = tmp / "prepared"
    out.mkdir()
    manifest.to_parquet(out / "manifest.parquet", index=False)
    return world, out


@pytest.fixture
def prepared(tiny_world: tuple[Path, dict], tmp_path: Path) -> tuple[Path, Path]:
    """(world copy, prepared folder) in tmp_path: the copy may be modified by the test."""
    return _prepare(tiny_world[0], tmp_path)


@pytest.fixture
def embedded(tiny_embedded: tuple[Path, Path]) -> tuple[Path, Path]:
    """(prepared folder, embeddings folder) shared by the tests that only read them (copy before modifying)."""
    return tiny_embedded


def embed(cfg: PipelineConfig, prepared: Path, tmp: Path) -> dict:
    run_embed(cfg, prepared=str(prepared), out=str(tmp / "emb"), metrics=str(tmp / "embed.json"))
    return json.loads((tmp / "embed.json").read_text())


def test_embed_shards_resume_and_fingerprint(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    _, prep = prepared
    manifest = pd.read_parquet(prep / "manifest.parquet")
    first = embed(config(), prep, tmp_path)
    meta = read_meta(tmp_path / "emb")
    assert meta["dim"] == 320 and meta["normalized"] and meta["features"] == "cls_grid"  # vit_test: 64 CLS + 4 x 64
    assert sum(meta["counts"].values()) == len(manifest) == first["counts"]["total"]
    assert first["shards"]["written"] == first["shards"]["total"] > 3  # several shards per part
    ids, x = load_embeddings(tmp_path / "emb")
    assert sorted(ids) == sorted(manifest["uri"]) and x.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(x.astype(np.float32), axis=1), 1.0, atol=2e-3)

    stale = tmp_path / "emb" / "pool" / ".shard-00000.npy.x1y2.tmp.npy"  # a write killed mid-way by an earlier run
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"partial")
    again = embed(config(), prep, tmp_path)  # resumed: every shard complete and of this fingerprint
    assert not stale.exists()
    assert again["shards"]["skipped"] == again["shards"]["total"] and again["shards"]["written"] == 0
    _, x_again = load_embeddings(tmp_path / "emb")
    np.testing.assert_array_equal(x, x_again)

    # An image replaced under the same name (a re-rendered world, an edited file): only its shard is embedded again.
    edited = tmp_path / "edited"
    shutil.copytree(prep, edited)
    rows = pd.read_parquet(edited / "manifest.parquet")
    rows.loc[rows.index[0], "sha256"] = "0" * 64
    rows.to_parquet(edited / "manifest.parquet", index=False)
    replaced = embed(config(), edited, tmp_path)
    assert replaced["shards"]["written"] == 1 and replaced["shards"]["skipped"] == replaced["shards"]["total"] - 1

    changed = embed(config(**{"embed.features": "cls"}), prep, tmp_path)  # another model: nothing reused
    assert changed["shards"]["written"] == changed["shards"]["total"]
    assert read_meta(tmp_path / "emb")["dim"] == 64


@pytest.mark.parametrize(("arch", "width"), [("dinov3_vit_test", 64), ("convnext_test", 64)])
def test_embed_with_dinov3_backbones(prepared: tuple[Path, Path], tmp_path: Path, arch: str, width: int) -> None:
    """A DINOv3 ViT (patch 16, storage tokens) and a ConvNeXt (patch tokens on its 16 px pseudo grid) embed the pool
    from a released-layout file: CLS and the four quadrants' mean patch tokens."""
    import torch

    from components.model import build_backbone, save_official_weights

    _, prep = prepared
    torch.manual_seed(0)
    weights = save_official_weights(build_backbone(arch), tmp_path / f"{arch}.pth")
    cfg = config(**{"embed.arch": arch, "embed.weights": str(weights), "embed.image_size": 64})
    assert cfg.embed.patch_size == 16  # the preset's, as params.yaml leaves it null
    embed(cfg, prep, tmp_path)
    meta = read_meta(tmp_path / "emb")
    assert meta["dim"] == 5 * width
    ids, x = load_embeddings(tmp_path / "emb")
    assert len(ids) == len(pd.read_parquet(prep / "manifest.parquet")) and np.isfinite(x.astype(np.float32)).all()


def test_shard_fingerprints_follow_each_rows_uri_and_content() -> None:
    manifest = pd.DataFrame(
        {"uri": [f"pool/{i}.jpg" for i in range(5)], "sha256": [f"{i:064x}" for i in range(5)], "source": "pool"}
    )
    base = [s.fingerprint for s in plan_shards(manifest, 2, "run")]
    assert len(base) == 3 and len(set(base)) == 3
    edited = manifest.copy()
    edited.loc[3, "sha256"] = "f" * 64  # row 3 sits in the second shard
    after = [s.fingerprint for s in plan_shards(edited, 2, "run")]
    assert after[0] == base[0] and after[1] != base[1] and after[2] == base[2]
    renamed = manifest.assign(uri=[f"pool/{i}.png" for i in range(5)])
    assert all(a.fingerprint != b for a, b in zip(plan_shards(renamed, 2, "run"), base, strict=True))
    assert all(a.fingerprint != b for a, b in zip(plan_shards(manifest, 2, "other"), base, strict=True))


def test_curate_stage_outputs(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    _, prep = prepared
    cfg = config()
    embed(cfg, prep, tmp_path)
    out = tmp_path / "curated"
    run_curate(
        cfg, prepared=str(prep), embeddings=str(tmp_path / "emb"), out=str(out), metrics=str(tmp_path / "c.json")
    )
    curated = pd.read_parquet(out / "manifest.parquet")
    report = json.loads((out / "report.json").read_text())
    assert {"curation", "seed_set", "seed_uri", "cluster", "max_eval_similarity", "dup_group_size"} <= set(curated)
    assert (curated["dup_group_size"] == 1).all()
    assert (curated["max_eval_similarity"] < report["eval_dedup"]["threshold"]).all()
    assert report["counts"]["curated"] == len(curated) > 0
    for key in ("dedup", "eval_dedup", "retrieval", "per_source", "per_cluster", "verification", "calibration"):
        assert key in report
    for name in ("dedup", "eval"):  # calibrated on the world itself, thresholds in force, curve in the report
        cal = report["calibration"][name]
        assert cal["accept_threshold_source"] == "calibrated" and cal["planted_copies"] > 10
        assert cal["expected_precision"] >= cfg.curate.dedup_precision and len(cal["curve"]) > 10
    assert report["dedup"]["threshold"] == report["calibration"]["dedup"]["accept_threshold"]
    # A random init on the synthetic world is the demo, not a mistake: no warning (real photos: test_real_photos).
    assert report["embeddings"]["random_weights"] is True and report["warnings"] == []
    # Nothing removed silently: every removed pool image is listed with what it duplicates and how it was decided.
    removed = pd.read_parquet(out / "removed.parquet")
    pool = int(report["counts"]["pool"])
    assert len(removed) == pool - report["counts"]["pool_after_eval_dedup"] == report["removed"]["count"] > 0
    assert set(removed["decided_by"]) <= {"embedding", "local_features"} and removed["duplicate_of"].ne("").all()
    assert set(removed["uri"]).isdisjoint(curated["uri"]) and len(report["removed_images"]) == len(removed)
    for name in ("gates/curated_manifest.json", "gates/calibration.json", "plots/calibration.png", "calibration.csv"):
        assert (out / name).is_file(), name
    assert not (tmp_path / "curated.partial").exists()
    metrics = json.loads((tmp_path / "c.json").read_text())
    assert metrics["headline"] == {"name": "curated_images", "value": float(len(curated))}


def test_deleted_file_is_reported_not_a_crash(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    world, prep = prepared
    manifest = pd.read_parquet(prep / "manifest.parquet")
    victim = manifest.loc[manifest["source"] == "pool", "uri"].iloc[0]
    Path(victim).unlink()  # deleted after prepare listed it
    cfg = config()
    result = embed(cfg, prep, tmp_path)
    assert result["counts"]["failed"] == 1
    failures = pd.read_parquet(tmp_path / "emb" / "failures.parquet")
    assert failures["id"].tolist() == [victim] and "no such file" in failures["error"].iloc[0]
    out = tmp_path / "curated"
    run_curate(
        cfg, prepared=str(prep), embeddings=str(tmp_path / "emb"), out=str(out), metrics=str(tmp_path / "c.json")
    )
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["missing_embedding"] == 1
    assert pd.read_parquet(out / "missing.parquet")["uri"].tolist() == [victim]
    assert victim not in set(pd.read_parquet(out / "manifest.parquet")["uri"])


def test_nan_embeddings_are_rejected_by_the_gate(embedded: tuple[Path, Path], tmp_path: Path) -> None:
    prep, emb = embedded
    cfg = config()
    shutil.copytree(emb, tmp_path / "emb")
    meta = read_meta(tmp_path / "emb")
    shard = tmp_path / "emb" / meta["shards"][0]["file"]
    x = np.load(shard)
    x[1] = np.nan
    np.save(shard, x)
    bad_id = pd.read_parquet(str(shard).replace(".npy", ".ids.parquet"))["id"].iloc[1]
    out = tmp_path / "curated"
    with pytest.raises(GateFailed) as err:
        run_curate(cfg, prepared=str(prep), embeddings=str(tmp_path / "emb"), out=str(out), metrics=str(tmp_path / "c"))
    assert "num_nonfinite" in str(err.value)
    offending = {i for failure in err.value.result.failures for i in failure.ids}
    assert offending == {bad_id}  # the report names the row (long ids are shortened in the message itself)
    assert not out.exists()  # a failed run leaves no manifest that looks complete


def test_empty_pool_runs(embedded: tuple[Path, Path], tmp_path: Path) -> None:
    prep, emb = embedded
    manifest = pd.read_parquet(prep / "manifest.parquet")
    (tmp_path / "prep").mkdir()
    manifest[manifest["source"] != "pool"].to_parquet(tmp_path / "prep" / "manifest.parquet", index=False)
    cfg = config(**{"curate.include_seeds": True})
    out = tmp_path / "curated"
    run_curate(cfg, prepared=str(tmp_path / "prep"), embeddings=str(emb), out=str(out), metrics=str(tmp_path / "c"))
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["pool"] == 0 and report["counts"]["curated"] == report["per_source"]["seeds/synthetic"]


def test_curate_logs_calibration_and_removals_to_mlflow(
    embedded: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.tracking import mlflow_client

    monkeypatch.setenv("DINOV2_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands here, not in the checkout
    prep, emb = embedded
    out = tmp_path / "curated"
    cfg = config(**{"curate.calibration_images": 24})
    run_curate(cfg, prepared=str(prep), embeddings=str(emb), out=str(out), metrics=str(tmp_path / "c.json"))
    run_id = json.loads((tmp_path / "c.json").read_text())["mlflow_run_id"]
    client = mlflow_client()
    curve = client.get_metric_history(run_id, "calibration.dedup.precision")
    assert len(curve) > 5 and len({m.step for m in curve}) == len(curve)  # one point per threshold (x 1000)
    run = client.get_run(run_id)
    report = json.loads((out / "report.json").read_text())
    expected = report["calibration"]["dedup"]["expected_precision"]
    assert run.data.metrics["calibration.dedup.expected_precision"] == pytest.approx(expected)
    assert run.data.params["curate.dedup_precision"] == "0.98" and "embed.features" in run.data.params
    assert run.data.tags["gate.calibration"] == "passed"
    logged = {a.path for a in client.list_artifacts(run_id, "curate")}
    assert {"curate/report.json", "curate/removed.parquet", "curate/plots", "curate/grids"} <= logged
