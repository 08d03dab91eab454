"""A pretraining run killed with SIGKILL and re-run ends with exactly the weights of an uninterrupted run.

Both runs go through the real stage (`python -m components pretrain`), with stochastic depth above 0.1 (the
efficient subset path draws from torch's generator), softmax centring (a buffer with a deferred update) and a
data-loading worker, so the test covers generator states, buffers and the data position, not only the weights.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from components.config import load_config, save_resolved, validate_config

ROOT = Path(__file__).resolve().parents[2]
STEPS, PERIOD = 16, 4


def _params(tmp: Path, eval_root: Path) -> Path:
    raw = load_config(ROOT / "params.yaml").model_dump(mode="json")
    raw["model"].update(arch="vit_test", drop_path_rate=0.2)
    raw["dino"].update(head_n_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16)
    raw["crops"].update(global_crops_size=28, local_crops_size=14, local_crops_number=2)
    raw["optim"].update(epochs=4, epoch_length=STEPS // 4, warmup_epochs=1)
    raw["teacher"].update(warmup_teacher_temp_epochs=1, centering="softmax")
    raw["train"].update(batch_size_per_gpu=8, num_workers=1, checkpoint_period=PERIOD, log_period=2, keep_last=2,
                        device="cpu", cpu_threads=1, knn_eval_period=8, knn_eval_root=str(eval_root))  # fmt: skip
    return save_resolved(validate_config(raw), tmp / "params.yaml")


def _start(params: Path, curated: Path, work: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "components", "pretrain", "--params", str(params), "--curated", str(curated),
           "--checkpoints", str(work / "ck"), "--out", str(work / "models"), "--metrics", str(work / "metrics.json"),
           "--curve", str(work / "curve.csv")]  # fmt: skip
    env = {**os.environ, "DINOV2_TRACKING": "off", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    log = open(work / "log.txt", "ab")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _final_state(work: Path) -> dict:
    return torch.load(work / "ck" / f"step_{STEPS:08d}" / "state.pt", map_location="cpu", weights_only=True)


def test_sigkill_then_rerun_reproduces_the_uninterrupted_run(curated, tiny_world, tmp_path):
    params = _params(tmp_path, tiny_world[0] / "eval" / "classification")
    full, killed = tmp_path / "full", tmp_path / "killed"
    full.mkdir(), killed.mkdir()
    reference = _start(params, curated, full)
    victim = _start(params, curated, killed)
    marker = killed / "ck" / f"step_{PERIOD:08d}" / "meta.json"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert victim.poll() is None, (killed / "log.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(60) == -signal.SIGKILL
    assert not (killed / "ck" / f"step_{STEPS:08d}").exists(), "the run finished before it was killed"
    resumed = _start(params, curated, killed)
    assert resumed.wait(300) == 0, (killed / "log.txt").read_text()[-3000:]
    assert reference.wait(300) == 0, (full / "log.txt").read_text()[-3000:]
    assert "resuming from" in (killed / "log.txt").read_text()

    a, b = _final_state(full), _final_state(killed)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["optimizer"]["exp_avg"]:
        assert torch.equal(a["optimizer"]["exp_avg"][key], b["optimizer"]["exp_avg"][key]), key
    assert a["loop"] == b["loop"]
    exported = [torch.load(w / "models" / "backbone.pth", weights_only=True) for w in (full, killed)]
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])
    assert len(list((killed / "ck").glob("step_*"))) == 2  # keep_last
    curve = (killed / "curve.csv").read_text().splitlines()
    assert len(curve) == 1 + STEPS // 2  # the rows logged before the kill are kept in the checkpoint
    assert "knn_top1" in curve[0]
