"""The issue's must-show on the synthetic world, on the CPU: a distilled student reaches at least 90% of its teacher's
kNN accuracy in a short run and beats the same preset trained from scratch for the same number of steps.

Slow (about 10 minutes on 2 idle cores; the figures: `pytest -m slow tests/distillation/test_distill_learning.py -s`).

The runs, all through the real stages and params.yaml (the demo's recipe):
- teacher: `pretrain` as configured (vit_tiny, 2 x 56 px + 4 x 28 px crops, batch 32, 96 steps); its export;
- distilled: `distill` with the configured student (vit_test) for distill.epochs x optim.epoch_length = 128 steps,
  for each of SEEDS (initialisation and data order);
- scratch: `pretrain` of the same preset for the same 128 steps, as the pipeline would train it (params.yaml's
  pretraining recipe, `optim.epochs` = `distill.epochs`), for each of SEEDS; the assertion's baseline;
- matched: the same with the distillation's lr and EMA momentum (`distill.base_lr`, `distill.momentum_ema`), so
  that the objective is the only difference; reported, not asserted (docs/distillation.md: at demo scale the two are
  within seed noise);
- headless: `distill` from the teacher's backbone file alone (`distill.teacher_weights`: heads fitted first, 32
  steps), one seed: it must reach the same 90% and its head fit must lower its losses.
kNN: the 20-NN weighted vote on the frozen CLS features of each exported model (the spare EMA for the students, the
EMA teacher for pretraining), memory bank `train`, queries `test` of a world rendered with 40 labelled images per
class in each of those splits (320 queries: 1 point of accuracy is 3 images). Single runs of a 2-block student differ
by several points from seed to seed, hence the means over seeds.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from components.config import PipelineConfig, load_config, save_resolved, validate_config
from components.model import build_backbone, load_official_weights
from components.training.knn import knn_accuracy

ROOT = Path(__file__).resolve().parents[2]
SHARE_OF_TEACHER = 0.9
"""A distilled student must reach this share of its teacher's kNN top-1."""
SEEDS = (0, 1, 2)


def _knn(export: Path, root: Path, size: int) -> float:
    desc = json.loads((export / "model.json").read_text())
    model = build_backbone(desc["arch"], patch_size=desc["patch_size"], img_size=desc["img_size"])
    load_official_weights(model, export / "backbone.pth")
    return knn_accuracy(model.eval(), root, image_size=size, device=torch.device("cpu"), query_split="test")


def _config(cfg: PipelineConfig, **sections: dict) -> PipelineConfig:
    raw = cfg.model_dump(mode="json")
    for name, values in sections.items():
        if isinstance(raw[name], dict):
            raw[name].update(values)
        else:
            raw[name] = values
    return validate_config(raw)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 14 stage runs: about 600 s on 2 idle cores, the default per-test cap
def test_distilled_students_reach_the_teacher_and_beat_scratch(tmp_path):
    from components.synthetic import render_world

    cfg = _config(load_config(ROOT / "params.yaml"), train={"checkpoint_period": 10_000})
    world = tmp_path / "world"
    render_world(
        cfg.synthetic.model_copy(update={"eval_train_per_class": 40, "eval_test_per_class": 40}), cfg.seed, world
    )
    curated = tmp_path / "curated"
    curated.mkdir()
    uris = sorted(str(p) for p in (world / "pool").rglob("*") if p.is_file())
    pd.DataFrame({"uri": uris}).to_parquet(curated / "manifest.parquet")
    d = cfg.distill

    def run(name: str, stage: str, config: PipelineConfig, **extra: str) -> Path:
        w = tmp_path / name
        w.mkdir()
        params = save_resolved(config, w / "params.yaml")
        paths = {"curated": str(curated), "checkpoints": str(w / "ck"), "out": str(w / "out"),
                 "metrics": str(w / "m.json"), "curve": str(w / "curve.csv"), **extra}  # fmt: skip
        cmd = [sys.executable, "-m", "components", stage, "--params", str(params)]
        cmd += [a for k, v in paths.items() for a in (f"--{k}", v)]
        subprocess.run(cmd, cwd=ROOT, check=True, timeout=1800, env={**os.environ, "DINOV2_TRACKING": "off"})
        return w

    root, size = world / "eval" / "classification", cfg.crops.global_crops_size
    teacher = run("teacher", "pretrain", cfg) / "out"
    acc: dict[str, object] = {"teacher": _knn(teacher, root, size)}
    for student in d.students:
        distilled, scratch, matched = [], [], []
        for seed in SEEDS:
            w = run(f"distilled_{seed}", "distill", _config(cfg, seed=seed), teacher=str(teacher))
            distilled.append(_knn(w / "out" / student, root, size))
            recipe = _config(cfg, seed=seed, model={"arch": student}, optim={"epochs": d.epochs})
            scratch.append(_knn(run(f"scratch_{student}_{seed}", "pretrain", recipe) / "out", root, size))
            same_lr = _config(
                cfg, seed=seed, model={"arch": student}, optim={"epochs": d.epochs, "base_lr": d.base_lr},
                teacher={"momentum_teacher": d.momentum_ema},
            )  # fmt: skip
            matched.append(_knn(run(f"matched_{student}_{seed}", "pretrain", same_lr) / "out", root, size))
        acc[student] = {"distilled": distilled, "scratch": scratch, "matched": matched}
    headless = run("headless", "distill", _config(cfg, distill={"teacher_weights": str(teacher / "backbone.pth")}),
                   teacher=str(tmp_path / "unused"))  # fmt: skip
    fit = pd.read_csv(headless / "ck" / "head_fit" / "curve.csv")
    acc["headless"] = {s: _knn(headless / "out" / s, root, size) for s in d.students}
    print(json.dumps({
        "steps": {"teacher": cfg.optim.epochs * cfg.optim.epoch_length, "students": d.epochs * cfg.optim.epoch_length,
                  "head_fit": d.head_fit_iterations},
        "knn_top1": acc,
        "head_fit": {k: [float(fit[k].iloc[0]), float(fit[k].iloc[-1])] for k in ("dino_loss", "ibot_loss")},
    }))  # fmt: skip
    bar = SHARE_OF_TEACHER * acc["teacher"]
    for student in d.students:
        distilled, scratch = acc[student]["distilled"], acc[student]["scratch"]
        assert min(distilled) >= bar, acc
        assert statistics.mean(distilled) > statistics.mean(scratch), acc
        assert acc["headless"][student] >= bar, acc
    assert fit["dino_loss"].iloc[-1] < fit["dino_loss"].iloc[0] and fit["ibot_loss"].iloc[-1] < fit["ibot_loss"].iloc[0]
