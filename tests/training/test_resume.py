"""A pretraining run killed with SIGKILL and re-run ends with exactly the weights of an uninterrupted run; a run
checkpointed on 2 ranks continues on 1 with the same global batch.

Both SIGKILL runs go through the real stage (`python -m components pretrain`), with stochastic depth above 0.1 (the
efficient subset path draws from torch's generator), softmax centring (a buffer with a deferred update) and a
data-loading worker, so the test covers generator states, buffers and the data position, not only the weights.
"""

from __future__ import annotations

import json
import os
import shutil
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


def _steps(work: Path) -> list[Path]:
    """The run's checkpoint folders, `<checkpoints>/pretrain/<fingerprint>/step_<N>`."""
    return sorted((work / "ck").glob("pretrain/*/step_*"))


def _final_state(work: Path) -> dict:
    (final,) = [p for p in _steps(work) if p.name == f"step_{STEPS:08d}"]
    return torch.load(final / "state.pt", map_location="cpu", weights_only=True)


def test_sigkill_then_rerun_reproduces_the_uninterrupted_run(curated, tiny_world, tmp_path):
    params = _params(tmp_path, tiny_world[0] / "eval" / "classification")
    full, killed = tmp_path / "full", tmp_path / "killed"
    full.mkdir(), killed.mkdir()
    reference = _start(params, curated, full)
    victim = _start(params, curated, killed)
    deadline = time.monotonic() + 240
    while not any(p.name == f"step_{PERIOD:08d}" and (p / "meta.json").exists() for p in _steps(killed)):
        assert victim.poll() is None, (killed / "log.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(60) == -signal.SIGKILL
    assert f"step_{STEPS:08d}" not in {p.name for p in _steps(killed)}, "the run finished before it was killed"
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
    assert len(_steps(killed)) == 2  # keep_last
    curve = (killed / "curve.csv").read_text().splitlines()
    assert len(curve) == 1 + STEPS // 2  # the rows logged before the kill are kept in the checkpoint
    assert "knn_top1" in curve[0]


def _run_stage(params: Path, curated: Path, work: Path) -> str:
    """The stage through its CLI to the end; returns its log."""
    proc = _start(params, curated, work)
    assert proc.wait(300) == 0, (work / "log.txt").read_text()[-3000:]
    return (work / "log.txt").read_text()


def test_a_run_continues_on_another_number_of_ranks_with_the_same_global_batch(curated, tmp_path):
    """2 ranks x 16 images, checkpointed at step 4, continue on 1 rank x 16 x 2 accumulation steps from step 4."""
    raw = load_config(ROOT / "params.yaml").model_dump(mode="json")
    raw["model"].update(arch="vit_test")
    raw["dino"].update(head_n_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16)
    raw["crops"].update(global_crops_size=28, local_crops_size=14, local_crops_number=1)
    raw["optim"].update(epochs=2, epoch_length=4, warmup_epochs=1)
    raw["teacher"].update(warmup_teacher_temp_epochs=1)
    raw["train"].update(batch_size_per_gpu=16, nproc_per_node=2, num_workers=0, checkpoint_period=4, log_period=2,
                        keep_last=3, device="cpu", cpu_threads=1)  # fmt: skip
    two_ranks = save_resolved(validate_config(raw), tmp_path / "two.yaml")
    raw["train"].update(nproc_per_node=1, grad_accum_steps=2)
    one_rank = save_resolved(validate_config(raw), tmp_path / "one.yaml")
    raw["optim"].update(base_lr=0.01)
    other_lr = save_resolved(validate_config(raw), tmp_path / "other.yaml")

    _run_stage(two_ranks, curated, tmp_path)
    (folder,) = (tmp_path / "ck" / "pretrain").iterdir()
    first = json.loads((folder / "step_00000008" / "meta.json").read_text())
    shutil.rmtree(folder / "step_00000008")  # as if the 2-rank job had stopped after its step-4 checkpoint
    log = _run_stage(one_rank, curated, tmp_path)
    assert "resuming from" in log and "(step 4, 128 samples seen)" in log  # the same step and data position
    assert [p.name for p in (tmp_path / "ck" / "pretrain").iterdir()] == [folder.name]  # the same configuration
    final = json.loads((folder / "step_00000008" / "meta.json").read_text())
    assert final["fingerprint"] == first["fingerprint"] and final["loop"]["samples_seen"] == 8 * 32
    assert len((tmp_path / "curve.csv").read_text().splitlines()) == 1 + 4  # the 2-rank rows are kept
    state = torch.load(folder / "step_00000008" / "state.pt", map_location="cpu", weights_only=True)
    assert state["world_size"] == 1 and state["plan"]["batch"]["grad_accum_steps"] == 2

    log = _run_stage(other_lr, curated, tmp_path)  # another configuration: a new run, the old checkpoints kept
    assert "belong to another configuration (kept); changed: schedule.base_lr 0.016 -> 0.01, schedule.lr" in log
    assert len(list((tmp_path / "ck" / "pretrain").iterdir())) == 2 and (folder / "step_00000008").is_dir()
