"""The issue's "Must show" on the synthetic world: planted near-duplicates found, no evaluation leakage.

Runs synth -> prepare -> embed -> curate with params.yaml as it is (the configured model), then scores the duplicate
groups and the curated set against ground_truth.json. Slow (a few minutes on 2 cores): `pytest -m slow`.

With `embed.weights: null` the backbone is a seeded random init: calibration and local-feature verification find
most planted copies (measured on the default world: pair recall 0.87 at precision 0.98, no planted leak left, see
docs/curation_at_scale.md), so the issue's bar for real photographs (precision 0.95, recall 0.85) holds, while the
0.99 recall and precision of a trained copy detector remain an expected failure. Point DINOV2_EMBED_WEIGHTS (and
DINOV2_EMBED_ARCH) at an official checkpoint to run that one for real.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from components.config import load_config
from components.prepare import prepare
from components.stages.curate import run_curate
from components.stages.embed import read_prepared, run_embed
from components.synthetic import render_world
from tests.curation.curation_truth import planted_groups, relative, score_groups

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = os.environ.get("DINOV2_EMBED_WEIGHTS")
REAL_MODEL = pytest.mark.xfail(
    WEIGHTS is None, reason="random-init features: recall ~0.87 at precision ~0.98; set DINOV2_EMBED_WEIGHTS"
)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with pytest.MonkeyPatch.context() as env:  # tracking off for this module only
        env.setenv("DINOV2_TRACKING", "off")
        yield _outcome(tmp_path_factory)


def _outcome(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    overrides = {"embed.weights": WEIGHTS, "embed.arch": os.environ.get("DINOV2_EMBED_ARCH", "vit_small")}
    cfg = load_config(ROOT / "params.yaml", overrides=overrides if WEIGHTS else None)
    tmp = tmp_path_factory.mktemp("world")
    world = tmp / "synthetic"
    truth = render_world(cfg.synthetic, cfg.seed, world, num_workers=2)
    manifest, _ = prepare(raw=str(world), cfg=cfg.prepare)
    (tmp / "prepared").mkdir()
    manifest.to_parquet(tmp / "prepared" / "manifest.parquet", index=False)
    run_embed(cfg, prepared=str(tmp / "prepared"), out=str(tmp / "emb"), metrics=str(tmp / "embed.json"))
    run_curate(
        cfg, prepared=str(tmp / "prepared"), embeddings=str(tmp / "emb"), out=str(tmp / "cur"), metrics=str(tmp / "c")
    )
    # The duplicate groups exactly as the stage formed them: every removed duplicate points at its group's keeper.
    kept = read_prepared(tmp / "prepared")
    pool = kept[kept["source"] == "pool"]
    removed = pd.read_parquet(tmp / "cur" / "removed.parquet")
    keeper = dict(zip(removed["uri"], removed["duplicate_of"], strict=True))
    dups = removed["reason"].eq("duplicate")
    labels = {u: keeper[u] if u in keeper and dups[removed["uri"].eq(u)].any() else u for u in pool["uri"]}
    paths = [relative(u, world) for u in pool["uri"]]
    ids = {u: i for i, u in enumerate(sorted(set(labels.values())))}
    scores = score_groups(
        {relative(u, world): ids[label] for u, label in labels.items()}, planted_groups(truth, set(paths))
    )
    curated = pd.read_parquet(tmp / "cur" / "manifest.parquet")
    leaks = {leak["path"] for leak in truth["leaks"]}
    scores["leaks_in_curated"] = sum(relative(u, world) in leaks for u in curated["uri"])
    scores["report"] = json.loads((tmp / "cur" / "report.json").read_text())
    print(json.dumps({k: v for k, v in scores.items() if k != "report"}))
    return scores


def test_demo_curation_finds_planted_copies_precisely(outcome: dict[str, Any]) -> None:
    assert outcome["precision"] >= 0.95 and outcome["recall"] >= 0.85
    verification = outcome["report"]["verification"]
    assert verification["max_dup_group_size"] == 1
    assert outcome["report"]["calibration"]["dedup"]["expected_precision"] >= 0.98


@REAL_MODEL
def test_planted_duplicates_recall_and_precision(outcome: dict[str, Any]) -> None:
    assert outcome["recall"] >= 0.99 and outcome["precision"] >= 0.99


def test_no_planted_leak_reaches_the_curated_set(outcome: dict[str, Any]) -> None:
    assert outcome["leaks_in_curated"] == 0
