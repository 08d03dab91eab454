"""Curation on real photographs with planted copies and look-alike distinct pictures, default configuration, no
trained weights (a random initialisation embeds; calibration and local-feature verification do the rest).

The default test runs a few photographs; the slow one all of them (the figures of docs/curation_at_scale.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from components.config import load_config
from components.prepare import prepare
from components.stages.curate import run_curate
from components.stages.embed import run_embed
from tests.curation import real_photos

pytest.importorskip("skimage")
ROOT = Path(__file__).resolve().parents[2]


def curate_photos(tmp: Path, photos: tuple[str, ...], per_photo: int, with_copies: int) -> dict:
    truth = real_photos.build(tmp / "raw", photos=photos, per_photo=per_photo, with_copies=with_copies)
    # A pool without seed sets: selection keeps every survivor (mode dedup); everything else as in params.yaml.
    overrides = {"curate.mode": "dedup", "curate.source_share_bounds": {}, "embed.num_workers": 0}
    cfg = load_config(ROOT / "params.yaml", overrides=overrides)
    manifest, rejects = prepare(raw=str(tmp / "raw"), cfg=cfg.prepare, num_workers=0)
    assert rejects.empty and len(manifest) == len(truth["pictures"]) + len(truth["copies"])
    (tmp / "prepared").mkdir()
    manifest.to_parquet(tmp / "prepared" / "manifest.parquet", index=False)
    run_embed(cfg, prepared=str(tmp / "prepared"), out=str(tmp / "emb"), metrics=str(tmp / "embed.json"))
    run_curate(
        cfg, prepared=str(tmp / "prepared"), embeddings=str(tmp / "emb"), out=str(tmp / "cur"), metrics=str(tmp / "c")
    )
    report = json.loads((tmp / "cur" / "report.json").read_text())
    removed = pd.read_parquet(tmp / "cur" / "removed.parquet").to_dict(orient="records")
    scores = real_photos.score(truth, removed, tmp / "raw")
    scores["calibration"] = {k: v for k, v in report["calibration"]["dedup"].items() if k != "curve"}
    scores["verification"] = report["dedup"]["pairs"].get("verification")
    scores["warnings"] = report["warnings"]
    print(json.dumps(scores, indent=1))
    return scores


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DINOV2_TRACKING", "off")


def test_real_photos_default_configuration(tmp_path: Path) -> None:
    scores = curate_photos(tmp_path, ("astronaut", "coffee", "rocket"), per_photo=3, with_copies=1)
    assert scores["precision"] >= 0.95 and scores["recall"] >= 0.85
    assert any("random weights" in w for w in scores["warnings"])  # a random init on a real pool is called out


@pytest.mark.slow
def test_real_photos_all_kinds(tmp_path: Path) -> None:
    scores = curate_photos(tmp_path, real_photos.PHOTOS, per_photo=4, with_copies=2)
    assert scores["precision"] >= 0.95 and scores["recall"] >= 0.85
    assert min(scores["recall_per_kind"].values()) >= 0.7
