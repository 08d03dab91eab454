"""On the synthetic world, with the demo's teacher, the Mask2Former protocol beats the linear head on the same frozen
features.

Slow (about a quarter of an hour on 2 cores): `pytest -m slow tests/evaluation/test_eval_m2f_learning.py -s` prints
the figures. The teacher is trained here as `make demo` trains it: the synth, prepare, embed, curate and pretrain
stages with params.yaml, each through `python -m components`; the segmentation protocols then use params.yaml's
`evaluate` section (the CPU-sized Mask2Former configuration) with `mask2former` added to the variants.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from components.config import load_config
from components.evaluation.datasets import load_eval_datasets
from components.evaluation.models import build_model, discover_models, preprocessing
from components.evaluation.segmentation import run_segmentation

ROOT = Path(__file__).resolve().parents[2]
MARGIN = 0.10
"""Required gain in mIoU (absolute) of the Mask2Former protocol over the linear head."""


def _demo_teacher(workdir: Path) -> Path:
    """The pretrain stage's export of the demo's configuration, trained in `workdir`."""
    params = str(ROOT / "params.yaml")
    env = {**os.environ, "DINOV2_TRACKING": "off", "PYTHONPATH": str(ROOT)}
    for args in (
        ["synth", "--out", "data/synthetic"],
        ["prepare", "--raw", "data/synthetic", "--out", "data/prepared"],
        ["embed", "--prepared", "data/prepared", "--out", "data/embeddings"],
        ["curate", "--prepared", "data/prepared", "--embeddings", "data/embeddings", "--out", "data/curated"],
        ["pretrain", "--curated", "data/curated", "--checkpoints", "checkpoints/pretrain", "--out", "models/pretrain"],
    ):
        subprocess.run([sys.executable, "-m", "components", *args, "--params", params], cwd=workdir, env=env,
                       check=True, timeout=1800)  # fmt: skip
    return workdir / "models" / "pretrain"


def _weights_digest(path: Path) -> str:
    """A digest of the tensors (names, values), not of the file: two saves of the same weights differ in bytes."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(3600)  # pretraining (about 4 min) and the protocols (about 8 min) on 2 busy cores
def test_mask2former_beats_the_linear_head_on_the_demo_teacher(tmp_path: Path) -> None:
    export = _demo_teacher(tmp_path)
    cfg = load_config(ROOT / "params.yaml", {"evaluate.segmentation_variants": ["linear", "ms", "mask2former"]})
    spec = next(s for s in discover_models([str(export)]) if s.role == "teacher")
    model = build_model(spec, seed=cfg.seed).eval()
    data = load_eval_datasets(str(tmp_path / "data" / "synthetic"))
    mean, std = preprocessing(spec)
    start = time.perf_counter()
    results, _ = run_segmentation(model, data.segmentation, cfg.evaluate, side=cfg.evaluate.dense_image_size or 84,
                                  mean=mean, std=std, seed=cfg.seed)  # fmt: skip
    miou = {name: metrics["miou"] for name, (metrics, _) in results.items()}
    m2f = results["m2f"][1]
    print(json.dumps({
        "teacher_weights_sha256": _weights_digest(export / "backbone.pth"),
        "miou": miou, "m2f_train_s": m2f["train_s"], "m2f_predict_s": m2f["predict_s"],
        "m2f_iterations": m2f["iterations"], "segmentation_s": round(time.perf_counter() - start, 1),
    }))  # fmt: skip
    assert miou["m2f"] > miou["linear"] + MARGIN, miou
