"""The pure curation core on controlled embeddings: provenance, report, modes, and bad inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from components.config import CurateConfig
from components.curation.curate import PROVENANCE_COLUMNS, curate, whiten
from tests.curation.vectors import planted, unit

BASE = {
    "dedup_threshold": 0.8,
    "eval_threshold": 0.8,
    "verify": "off",
    "calibration_images": 0,
    "num_clusters": 8,
    "cluster_take": 10,
    "cluster_min_seeds": 2,
}


def world(num_pool: int = 300, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, list[list[int]], list[int]]:
    """A manifest of pool + one seed set + eval rows over planted vectors.

    Pool rows 0..num_pool-1 hold 20 planted groups; eval rows are near-copies of the first member of 3 groups
    (planted leaks); seeds are fresh vectors near 5 pool images.
    """
    x, groups = planted(num_pool, dim=32, num_groups=20, copies=2, seed=seed)
    rng = np.random.default_rng(seed + 1)
    leaks = [g[0] for g in groups[:3]]
    eval_x = unit(x[leaks] + 0.05 * rng.standard_normal((3, 32)))
    seed_x = unit(x[[g[0] for g in groups[5:10]]] + 0.3 * rng.standard_normal((5, 32)))
    rows = (
        [("pool", "pool", "")] * num_pool
        + [("seeds/animals", "seed", "cat")] * 5
        + [("eval/classification", "test", "cat")] * 3
    )
    manifest = pd.DataFrame(
        {
            "uri": [f"img_{i:04d}.jpg" for i in range(len(rows))],
            "sha256": [f"{i:064x}" for i in range(len(rows))],
            "width": 64,
            "height": 64,
            "source": [r[0] for r in rows],
            "split": [r[1] for r in rows],
            "label": [r[2] for r in rows],
            "decodable": True,
        }
    )
    return manifest, np.concatenate([x, seed_x, eval_x]).astype(np.float16), groups, leaks


def test_retrieval_mode_end_to_end() -> None:
    manifest, x, groups, leaks = world()
    result = curate(manifest=manifest, embeddings=x, cfg=CurateConfig(**BASE), seed=0)
    cur, report = result.manifest, result.report
    assert list(cur.columns) == [*manifest.columns, *PROVENANCE_COLUMNS]
    assert cur["uri"].is_unique and (cur["dup_group_size"] == 1).all()
    assert (cur["max_eval_similarity"] < 0.8).all()
    # No leaked group survives: neither the leaked image nor its near-copies.
    leaked = {manifest["uri"][m] for g in groups[:3] for m in g}
    assert not leaked & set(cur["uri"])
    assert report["eval_dedup"]["pool_images_removed"] == 9 and report["eval_dedup"]["pool_groups_removed"] == 3
    assert report["dedup"]["group_size_histogram"]["3"] == 20
    assert report["counts"]["pool_after_dedup"] == 300 - 40
    assert set(cur["curation"]) <= {"seed", "sample", "cluster"} and (cur["curation"] == "seed").sum() == 5
    sample = cur[cur["curation"] == "sample"]
    assert (sample["seed_uri"] != "").all() and sample["retrieval_similarity"].notna().all()
    assert (cur.loc[cur["curation"] == "cluster", "cluster"] >= 0).all()
    assert report["per_source"]["seeds/animals"] == 5
    assert report["retrieval"]["per_seed_set"]["animals"]["retrieved"] == report["per_source"]["pool"]
    assert result.duplicate_groups and len(result.duplicate_groups[0]) == 3


def test_dedup_and_hkmeans_modes() -> None:
    manifest, x, _, _ = world()
    dedup_only = curate(manifest=manifest, embeddings=x, cfg=CurateConfig(**BASE, mode="dedup"), seed=0)
    assert (dedup_only.manifest["curation"] == "dedup").sum() == 300 - 40 - 3  # 3 leaked groups left after dedup
    cfg = CurateConfig(**BASE, mode="hkmeans", max_images=50, hkmeans_levels=(16, 4), include_seeds=False)
    sampled = curate(manifest=manifest, embeddings=x, cfg=cfg, seed=0)
    assert len(sampled.manifest) == 50 and (sampled.manifest["curation"] == "hkmeans").all()
    assert sampled.report["hkmeans"]["levels"] == [16, 4]


def test_per_seed_set_cap_and_max_images() -> None:
    manifest, x, _, _ = world()
    capped = curate(manifest=manifest, embeddings=x, cfg=CurateConfig(**BASE, max_per_seed_set=7), seed=0)
    assert capped.report["per_source"]["pool"] == 7
    small = curate(manifest=manifest, embeddings=x, cfg=CurateConfig(**BASE, max_images=12), seed=0)
    assert len(small.manifest) == 12 and (small.manifest["curation"] == "seed").sum() == 5  # seeds kept first


def test_empty_pool() -> None:
    manifest, x, _, _ = world()
    keep = manifest["source"] != "pool"
    result = curate(manifest=manifest[keep], embeddings=x[keep.to_numpy()], cfg=CurateConfig(**BASE), seed=0)
    assert result.report["counts"]["pool"] == 0
    assert (result.manifest["curation"] == "seed").all() and len(result.manifest) == 5


def test_seed_set_with_no_match(caplog: pytest.LogCaptureFixture) -> None:
    manifest, x, _, _ = world()
    cfg = CurateConfig(**{**BASE, "retrieval": "sample", "sample_min_similarity": 0.999})
    result = curate(manifest=manifest, embeddings=x, cfg=cfg, seed=0)
    assert result.report["retrieval"]["per_seed_set"]["animals"]["retrieved"] == 0
    assert "retrieved no pool image" in caplog.text
    assert (result.manifest["curation"] == "seed").all()


def test_mismatched_inputs_are_rejected() -> None:
    manifest, x, _, _ = world()
    with pytest.raises(ValueError, match="manifest rows but"):
        curate(manifest=manifest, embeddings=x[:-1], cfg=CurateConfig(**BASE), seed=0)


def test_whitening_is_unit_norm_and_decorrelates() -> None:
    rng = np.random.default_rng(0)
    common = rng.standard_normal(16)
    x = unit(common * 5 + rng.standard_normal((500, 16)))  # every row shares one strong direction
    assert (x @ x.T).mean() > 0.9
    w = whiten(x, np.arange(500))
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-5)
    assert abs((w @ w.T).mean()) < 0.05
