"""Multi-node runs through the launch scripts of infra/launch, as a user starts them: two "nodes" on this machine.

Each node is one `infra/launch/torchrun.sh` with `NNODES=2` and a c10d rendezvous on 127.0.0.1, one CPU rank each
(gloo, `DS_ACCELERATOR=cpu`). Pretraining under ZeRO-2 and ZeRO-3 checkpoints on two nodes and resumes on one node,
one rank with the whole global batch (the checkpoints' fingerprint is the global batch's, not its split); with no
shared filesystem (each node its own folders) it resumes from the S3 mirror exactly. `embed` on two nodes writes
the embeddings of a one-process run. The DeepSpeed launcher's command line is checked from a hostfile, without ssh.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from components import storage
from components.config import load_config, save_resolved, validate_config
from components.training.layout import step_name

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN_SH = ROOT / "infra" / "launch" / "torchrun.sh"
DEEPSPEED_SH = ROOT / "infra" / "launch" / "deepspeed.sh"
STEPS, PERIOD, PER_RANK = 4, 2, 4


def node_env(**extra: str) -> dict[str, str]:
    """A node's environment: this interpreter first on PATH (the scripts call `python`), DeepSpeed on the CPU, no
    tracking, one thread per rank, one rank per node."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    base = {"PATH": path, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "DINOV2_TRACKING": "off"}
    return {**os.environ, **base, "OMP_NUM_THREADS": "1", "GPUS": "1", **extra}


def launch(stage: str, args: list[str], log: Path, **env: str) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([str(TORCHRUN_SH), stage, *args], env=node_env(**env), stdout=out, stderr=out)


def run_nodes(stage: str, node_args: list[list[str]], logs: list[Path], timeout: float = 300) -> None:
    """One `torchrun.sh <stage>` per node, all meeting at a fresh c10d rendezvous on 127.0.0.1; waits for every
    node and fails with the end of each node's log."""
    from infra.services import free_port

    rendezvous = {"RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "RDZV_ID": uuid.uuid4().hex[:12]}
    nnodes = str(len(node_args))
    procs = [launch(stage, args, log, NNODES=nnodes, **rendezvous) for args, log in zip(node_args, logs, strict=True)]
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        raise
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log.read_text()[-4000:]


def pretrain_params(tmp: Path, name: str, *, zero_stage: int, per_rank: int, mirror: str | None = None) -> Path:
    """vit_test at 28 px, 4 steps checkpointed every 2, no stochastic depth (its subsets are drawn per rank) and
    KoLeo over the global batch, so that 2 ranks x 4 images and 1 rank x 8 agree up to float summation order."""
    raw = load_config(ROOT / "params.yaml").model_dump(mode="json")
    raw["model"].update(arch="vit_test", drop_path_rate=0.0, layerscale_init=1e-5)
    raw["teacher"].update(momentum_teacher=0.992, warmup_teacher_temp_epochs=1)
    raw["dino"].update(head_n_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16, koleo_distributed=True)
    raw["ibot"].update(separate_head=True, head_n_prototypes=48, head_hidden_dim=32, head_bottleneck_dim=16)
    raw["crops"].update(global_crops_size=28, local_crops_size=14, local_crops_number=2)
    raw["optim"].update(epochs=2, epoch_length=STEPS // 2, warmup_epochs=1, base_lr=0.05, freeze_last_layer_epochs=0)
    raw["train"].update(batch_size_per_gpu=per_rank, zero_stage=zero_stage, num_workers=0, device="cpu",
                        cpu_threads=1, checkpoint_period=PERIOD, log_period=1, keep_last=2, nproc_per_node=1,
                        checkpoint_mirror=mirror)  # fmt: skip
    return save_resolved(validate_config(raw), tmp / f"{name}.yaml")


def stage_args(params: Path, curated: Path, work: Path) -> list[str]:
    paths = {"curated": curated, "checkpoints": work / "ck", "out": work / "out", "metrics": work / "metrics.json"}
    paths["curve"] = work / "curve.csv"
    return ["--params", str(params), *(arg for name, path in paths.items() for arg in (f"--{name}", str(path)))]


def losses(curve: Path) -> dict[int, float]:
    import pandas as pd

    frame = pd.read_csv(curve)
    return dict(zip(frame["step"].astype(int), frame["loss"].astype(float), strict=True))


def state_of(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize(
    "zero_stage", [pytest.param(2, marks=pytest.mark.slow), 3], ids=["zero2", "zero3"]
)  # ZeRO-3 (partitioned parameters) by default; ZeRO-2 with -m slow
def test_pretrain_on_two_nodes_resumes_on_one(curated: Path, tmp_path: Path, zero_stage: int) -> None:
    two = pretrain_params(tmp_path, "two", zero_stage=zero_stage, per_rank=PER_RANK)
    one = pretrain_params(tmp_path, "one", zero_stage=zero_stage, per_rank=2 * PER_RANK)
    args = stage_args(two, curated, tmp_path)
    run_nodes("pretrain", [args, args], [tmp_path / "node0.log", tmp_path / "node1.log"])
    (folder,) = (tmp_path / "ck" / "pretrain").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [step_name(PERIOD), step_name(STEPS)]
    two_nodes = losses(tmp_path / "curve.csv")
    assert state_of(folder / step_name(STEPS))["world_size"] == 2

    shutil.rmtree(folder / step_name(STEPS))  # as if the job had stopped after its step-2 checkpoint
    run_nodes("pretrain", [stage_args(one, curated, tmp_path)], [tmp_path / "one.log"])
    log = (tmp_path / "one.log").read_text()
    assert f"(step {PERIOD}, {PERIOD * 2 * PER_RANK} samples seen)" in log  # the same step and data position
    assert [p.name for p in (tmp_path / "ck" / "pretrain").iterdir()] == [folder.name]  # the same configuration
    final = state_of(folder / step_name(STEPS))
    assert final["world_size"] == 1 and final["loop"]["samples_seen"] == STEPS * 2 * PER_RANK
    one_node = losses(tmp_path / "curve.csv")
    assert sorted(one_node) == list(range(1, STEPS + 1))  # the two-node rows kept, the one-node rows after them
    for step in range(PERIOD + 1, STEPS + 1):  # the resumed steps: the same global batch, one rank
        assert one_node[step] == pytest.approx(two_nodes[step], rel=1e-3), step
    assert (tmp_path / "out" / "model.json").is_file()


@pytest.mark.services
def test_two_nodes_without_a_shared_filesystem_resume_from_s3_exactly(
    curated: Path, tmp_path: Path, s3_bucket: str
) -> None:
    """Each node has its own local folders; checkpoints reach the other node only through the S3 mirror. After the
    step-4 checkpoint, both folders are wiped and the mirror loses step 4 (the job died before copying it): the
    restarted job pulls step 2 onto both nodes and ends with exactly the weights of the uninterrupted run."""
    mirror = f"s3://{s3_bucket}/runs"
    params = pretrain_params(tmp_path, "p", zero_stage=2, per_rank=PER_RANK, mirror=mirror)
    nodes = [tmp_path / "node_a", tmp_path / "node_b"]
    args = [stage_args(params, curated, node) for node in nodes]
    for node in nodes:
        node.mkdir()
    run_nodes("pretrain", args, [node / "first.log" for node in nodes])
    (rank0,) = [node for node in nodes if (node / "metrics.json").is_file()]  # the node that held rank 0
    (fingerprint,) = [p.name for p in (rank0 / "ck" / "pretrain").iterdir() if p.is_dir() and p.name != "export"]
    remote = f"{mirror}/pretrain/pretrain/{fingerprint}"
    assert storage.exists(f"{remote}/{step_name(STEPS)}/meta.json")
    assert storage.exists(f"{mirror}/pretrain/pretrain/export/model.json")  # the phase's export
    uninterrupted = state_of(rank0 / "ck" / "pretrain" / fingerprint / step_name(STEPS))

    for node in nodes:
        shutil.rmtree(node)
        node.mkdir()
    for name in ("meta.json", "state.pt"):
        storage.delete(f"{remote}/{step_name(STEPS)}/{name}")
    run_nodes("pretrain", args, [node / "again.log" for node in nodes])
    logs = "".join((node / "again.log").read_text() for node in nodes)
    assert "resuming from" in logs and f"(step {PERIOD}, {PERIOD * 2 * PER_RANK} samples seen)" in logs
    assert "pulled from" in logs  # by rank 0 (the other ranks log nothing), into its node's empty folder
    for node in nodes:  # the other node's process pulled it into its own folder too
        assert (node / "ck" / "pretrain" / fingerprint / step_name(PERIOD) / "meta.json").is_file()
    (rank0,) = [node for node in nodes if (node / "metrics.json").is_file()]
    resumed = state_of(rank0 / "ck" / "pretrain" / fingerprint / step_name(STEPS))
    for key, value in uninterrupted["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key, value in uninterrupted["optimizer"]["exp_avg"].items():
        assert torch.equal(value, resumed["optimizer"]["exp_avg"][key]), key
    assert resumed["loop"] == uninterrupted["loop"]
    assert storage.exists(f"{remote}/{step_name(STEPS)}/meta.json")  # mirrored again


def embed_params(tmp: Path) -> Path:
    overrides = {"embed.arch": "vit_test", "embed.image_size": 28, "embed.num_workers": 0, "embed.batch_size": 8,
                 "embed.shard_size": 8}  # fmt: skip
    return save_resolved(load_config(ROOT / "params.yaml", overrides=overrides), tmp / "embed.yaml")


def test_embed_on_two_nodes_equals_one_process(tiny_world: tuple[Path, dict], tmp_path: Path, monkeypatch) -> None:
    from components.embedding import load_embeddings
    from components.prepare import prepare
    from components.stages.embed import run_embed

    monkeypatch.setenv("DINOV2_TRACKING", "off")
    params = embed_params(tmp_path)
    cfg = load_config(params)
    manifest, _ = prepare(raw=str(tiny_world[0]), cfg=cfg.prepare, num_workers=0)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    manifest.to_parquet(prepared / "manifest.parquet", index=False)
    run_embed(cfg, prepared=str(prepared), out=str(tmp_path / "one"), metrics=str(tmp_path / "one.json"))

    args = ["--params", str(params), "--prepared", str(prepared), "--out", str(tmp_path / "two"),
            "--metrics", str(tmp_path / "two.json")]  # fmt: skip
    run_nodes("embed", [args, args], [tmp_path / "node0.log", tmp_path / "node1.log"])
    report = json.loads((tmp_path / "two.json").read_text())
    assert report["world_size"] == 2 and report["shards"]["written"] < report["shards"]["total"]  # rank 0's share
    ids_one, x_one = load_embeddings(tmp_path / "one")
    ids_two, x_two = load_embeddings(tmp_path / "two")
    assert ids_two == ids_one and len(ids_one) == len(manifest)
    np.testing.assert_allclose(x_two.astype(np.float32), x_one.astype(np.float32), rtol=0, atol=1e-3)


@pytest.mark.slow  # the 2-rank equality runs by default in tests/curation/test_curate_distributed.py
def test_curate_on_two_nodes_equals_one_process(tiny_world: tuple[Path, dict], tmp_path: Path, monkeypatch) -> None:
    import pandas as pd

    from components.prepare import prepare
    from components.stages.curate import run_curate
    from components.stages.embed import run_embed

    monkeypatch.setenv("DINOV2_TRACKING", "off")
    overrides = {"curate.num_clusters": 4, "curate.source_share_bounds": {}}
    params = save_resolved(load_config(embed_params(tmp_path), overrides=overrides), tmp_path / "curate.yaml")
    cfg = load_config(params)
    manifest, _ = prepare(raw=str(tiny_world[0]), cfg=cfg.prepare, num_workers=0)
    prepared, embeddings = tmp_path / "prepared", tmp_path / "emb"
    prepared.mkdir()
    manifest.to_parquet(prepared / "manifest.parquet", index=False)
    run_embed(cfg, prepared=str(prepared), out=str(embeddings), metrics=str(tmp_path / "embed.json"))
    run_curate(cfg, prepared=str(prepared), embeddings=str(embeddings), out=str(tmp_path / "one"),
               metrics=str(tmp_path / "one.json"))  # fmt: skip

    args = ["--params", str(params), "--prepared", str(prepared), "--embeddings", str(embeddings),
            "--out", str(tmp_path / "two"), "--metrics", str(tmp_path / "two.json")]  # fmt: skip
    run_nodes("curate", [args, args], [tmp_path / "node0.log", tmp_path / "node1.log"])
    one, two = (pd.read_parquet(tmp_path / name / "manifest.parquet") for name in ("one", "two"))
    assert sorted(two["uri"]) == sorted(one["uri"])
    report_one, report_two = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("one", "two"))
    assert report_two["counts"] == report_one["counts"]


def test_the_deepspeed_launcher_command_from_a_hostfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What deepspeed.sh hands the DeepSpeed launcher for a hostfile, and the per-node command the launcher builds
    from it (pdsh over ssh, or `--no_ssh` with `NODE_RANK`); neither ssh nor pdsh is run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = bin_dir / "deepspeed"  # stands in for the launcher: records its arguments
    recorder.write_text('#!/usr/bin/env python3\nimport json, os, sys\nopen(os.environ["ARGS_OUT"], "w").write('
                        'json.dumps(sys.argv[1:]))\n')  # fmt: skip
    recorder.chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes of 8 GPUs\nnode0 slots=8\n\nnode1 slots=8\n")

    def launched(**env: str) -> list[str]:
        out = tmp_path / "args.json"
        base = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "ARGS_OUT": str(out)}
        cmd = [str(DEEPSPEED_SH), "pretrain", "--params", "my params.yaml"]
        subprocess.run(cmd, env={**os.environ, **base, **env}, check=True, cwd=tmp_path, timeout=60)
        return json.loads(out.read_text())

    args = launched(HOSTFILE="hostfile", MASTER_PORT="29555")  # relative to the caller's directory
    assert args == ["--no_local_rank", "--master_port", "29555", "--hostfile", str(hostfile), "--master_addr",
                    "node0", "--module", "components", "pretrain", "--params", "my params.yaml"]  # fmt: skip
    no_ssh = launched(HOSTFILE=str(hostfile), NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    assert no_ssh[no_ssh.index("--master_addr") + 1] == "10.0.0.1"
    assert no_ssh[no_ssh.index("--no_ssh") + 1 : no_ssh.index("--no_ssh") + 3] == ["--node_rank", "1"]
    missing = subprocess.run([str(DEEPSPEED_SH), "pretrain"], env={**os.environ, "HOSTFILE": "nope"}, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert missing.returncode == 2 and "HOSTFILE=nope: no such file" in missing.stderr

    # The launcher's own reading of those arguments: every host's slots, rank 0's host, the command each node runs.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.launcher import runner
    from deepspeed.launcher.multinode_runner import PDSHRunner

    parsed = runner.parse_args(args)
    pool = runner.fetch_hostfile(parsed.hostfile)
    assert dict(pool) == {"node0": 8, "node1": 8}
    active = runner.parse_inclusion_exclusion(pool, parsed.include, parsed.exclude)
    world_info = runner.encode_world_info(active)
    cmd, _, _ = PDSHRunner(parsed, world_info).get_cmd({}, active)
    assert cmd[:6] == ["pdsh", "-S", "-f", "1024", "-w", "node0,node1"]
    launch_at = cmd.index("deepspeed.launcher.launch")
    assert cmd[launch_at + 1 : launch_at + 7] == [f"--world_info={world_info}", "--node_rank=%n",
                                                  "--master_addr=node0", "--master_port=29555", "--module",
                                                  "--no_local_rank"]  # fmt: skip
    assert cmd[-4:] == ["components", "pretrain", "--params", '"my params.yaml"']  # the stage and its arguments
    decoded = json.loads(__import__("base64").urlsafe_b64decode(world_info))
    assert decoded == {"node0": list(range(8)), "node1": list(range(8))}
    assert runner.parse_args(no_ssh).no_ssh and runner.parse_args(no_ssh).node_rank == 1
