"""A short CPU pretraining run on the synthetic world learns: the teacher's kNN accuracy beats the same
architecture at its random initialisation by a clear margin.

Slow (minutes): `pytest -m slow tests/training/test_learning.py -s` prints the measured figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from components.config import load_config, save_resolved, validate_config
from components.model import backbone_from_config, load_official_weights
from components.training.knn import knn_accuracy

ROOT = Path(__file__).resolve().parents[2]
MARGIN = 0.10
"""Required gain in kNN top-1 (absolute) over the random initialisation."""


@pytest.mark.slow
def test_pretraining_beats_random_init_on_knn(tmp_path):
    from components.synthetic import render_world

    cfg = load_config(ROOT / "params.yaml")  # the demo's recipe: vit_tiny, 56 / 28 px crops, 96 iterations
    world = tmp_path / "world"
    render_world(cfg.synthetic, cfg.seed, world)
    curated = tmp_path / "curated"
    curated.mkdir()
    uris = sorted(str(p) for p in (world / "pool").rglob("*") if p.is_file())
    pd.DataFrame({"uri": uris}).to_parquet(curated / "manifest.parquet")
    raw = cfg.model_dump(mode="json")
    raw["train"].update(checkpoint_period=10_000)
    params = save_resolved(validate_config(raw), tmp_path / "params.yaml")
    out = tmp_path / "models"
    cmd = [sys.executable, "-m", "components", "pretrain", "--params", str(params), "--curated", str(curated),
           "--checkpoints", str(tmp_path / "ck"), "--out", str(out), "--metrics", str(tmp_path / "m.json"),
           "--curve", str(tmp_path / "curve.csv")]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=1800, env={**os.environ, "DINOV2_TRACKING": "off"})

    root, size = world / "eval" / "classification", cfg.crops.global_crops_size
    torch.manual_seed(cfg.seed)  # the initialisation the run started from
    random_init = backbone_from_config(cfg.model.model_copy(update={"drop_path_rate": 0.0})).eval()
    trained = load_official_weights(backbone_from_config(cfg.model), out / "backbone.pth").eval()
    acc = {
        name: knn_accuracy(model, root, image_size=size, device=torch.device("cpu"), query_split="test")
        for name, model in (("random_init", random_init), ("teacher", trained))
    }
    metrics = json.loads((tmp_path / "m.json").read_text())
    print(json.dumps({"knn_top1": acc, "margin": acc["teacher"] - acc["random_init"], "timing": metrics["timing"]}))
    assert acc["teacher"] >= acc["random_init"] + MARGIN, acc
