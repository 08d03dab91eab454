"""Damaged checkpoints and full disks: verified loads, named errors, previous outputs left as they were.

The disk fills up through a write hook (a folder with a byte budget: writes past it raise ENOSPC and the free space
reported is what is left of it), and, where the machine lets an unprivileged user mount one (`unshare -rm`), on a
real 1 MiB tmpfs.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from components import storage
from components.config import load_config
from components.training import checkpoint
from components.training.checkpoint import CheckpointDamagedError, CheckpointManager

ROOT = Path(__file__).resolve().parents[2]


def _state(step: int, numel: int = 20_000) -> dict:
    torch.manual_seed(step)
    return {"model": {"w": torch.randn(numel)}, "loop": {"step": step}}


def _manager(root: Path, **kwargs) -> CheckpointManager:
    return CheckpointManager(root, keep_last=kwargs.pop("keep_last", 3), fingerprint="fp", **kwargs)


@pytest.fixture
def quota(monkeypatch):
    """A byte budget on a folder: writes beyond it raise ENOSPC; the free space reported is what is left of it."""
    budget: dict[str, object] = {}

    def limit(root: Path, num_bytes: int) -> None:
        budget.update(root=root, bytes=num_bytes)

    original_write = storage.HashingWriter.write

    def write(self, data):
        if budget and storage.tree_bytes(budget["root"]) + memoryview(data).nbytes > budget["bytes"]:
            self.error = OSError(errno.ENOSPC, "No space left on device")
            raise self.error
        return original_write(self, data)

    def free(path):
        return max(0, budget["bytes"] - storage.tree_bytes(budget["root"])) if budget else shutil.disk_usage("/").free

    monkeypatch.setattr(storage.HashingWriter, "write", write)
    monkeypatch.setattr(checkpoint, "free_bytes", free)
    monkeypatch.setattr(storage, "free_bytes", free)
    return limit


def test_a_checkpoint_records_the_digest_of_its_files(tmp_path):
    path = _manager(tmp_path).save(_state(4), 4)
    meta = CheckpointManager.meta(path)
    assert meta["files"]["state.pt"] == {
        "bytes": (path / "state.pt").stat().st_size, "sha256": storage.sha256_file(path / "state.pt")
    }  # fmt: skip
    assert CheckpointManager.verify(path) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_newest_checkpoint_is_named_moved_aside_and_the_one_before_resumed(tmp_path, caplog, damage):
    manager = _manager(tmp_path)
    manager.save(_state(4), 4)
    newest = manager.save(_state(8), 8)
    state_file = newest / "state.pt"
    data = state_file.read_bytes()
    if damage == "truncate":  # a node lost mid-write, on a filesystem without atomic renames
        state_file.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # a bad disk: same size, other bytes
        state_file.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])
    else:
        state_file.unlink()
        (newest / "state.pt.gone").touch()
    caplog.set_level(logging.WARNING, logger="dinov2")
    found = _manager(tmp_path).load_latest()
    if damage == "delete":  # no state.pt: not a complete checkpoint at all, so step 4 is simply the newest
        assert found[0].name == "step_00000004"
        return
    path, state = found
    assert path.name == "step_00000004" and torch.equal(state["model"]["w"], _state(4)["model"]["w"])
    aside = tmp_path / "step_00000008.damaged"
    assert aside.is_dir() and (aside / "state.pt").is_file() and not newest.exists()  # moved, never deleted
    why = {"truncate": "(truncated)", "flip": "(damaged)"}[damage]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(str(newest) in m and "state.pt" in m and why in m for m in errors), errors
    assert why in (aside / "DAMAGED.txt").read_text()
    _manager(tmp_path).save(_state(12), 12)  # pruning keeps what was set aside
    assert aside.is_dir()


def test_a_checkpoint_without_digests_that_torch_cannot_read_counts_as_damaged(tmp_path):
    manager = _manager(tmp_path)
    manager.save(_state(4), 4)
    newest = manager.save(_state(8), 8)
    meta = CheckpointManager.meta(newest)
    del meta["files"]  # as written before digests were recorded
    (newest / "meta.json").write_text(__import__("json").dumps(meta))
    (newest / "state.pt").write_bytes((newest / "state.pt").read_bytes()[:5000])
    path, _ = _manager(tmp_path).load_latest()
    assert path.name == "step_00000004" and (tmp_path / "step_00000008.damaged").is_dir()


def test_when_no_checkpoint_is_intact_the_run_stops_naming_them_all_and_moves_none(tmp_path):
    manager = _manager(tmp_path)
    paths = [manager.save(_state(s), s) for s in (4, 8)]
    for p in paths:
        (p / "state.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointDamagedError) as err:
        _manager(tmp_path).load_latest()
    assert "step_00000004" in str(err.value) and "step_00000008" in str(err.value) and "state.pt" in str(err.value)
    assert all(p.is_dir() for p in paths)


def test_a_full_disk_during_a_save_is_named_and_leaves_the_last_checkpoint_resumable(tmp_path, quota):
    manager = _manager(tmp_path)
    first = manager.save(_state(4), 4)
    quota(tmp_path, storage.tree_bytes(tmp_path) + 30_000)  # room for far less than another checkpoint
    with pytest.raises(storage.OutOfSpaceError) as err:
        manager.save(_state(8), 8)
    message = str(err.value)
    assert str(tmp_path / ".tmp-step_00000008") in message and "step 8" in message
    assert "No space left on device" in message and "it needs about" in message and "free" in message
    assert str(first) in message and "intact" in message
    assert not (tmp_path / ".tmp-step_00000008").exists()  # the partial folder is removed
    path, state = _manager(tmp_path).load_latest()
    assert path == first and state["loop"] == {"step": 4}


def test_prune_to_fit_removes_older_checkpoints_first_never_the_newest(tmp_path, quota, caplog):
    manager = _manager(tmp_path, keep_last=3, prune_to_fit=True)
    saved = [manager.save(_state(s), s) for s in (4, 8)]
    one = storage.tree_bytes(saved[0])
    quota(tmp_path, storage.tree_bytes(tmp_path) + one // 2)  # half a checkpoint free: the oldest must go
    caplog.set_level(logging.WARNING, logger="dinov2")
    third = manager.save(_state(12), 12)
    assert not saved[0].exists() and saved[1].is_dir() and third.is_dir()
    assert any("prune_to_fit" in r.getMessage() and str(saved[0]) in r.getMessage() for r in caplog.records)
    manager.keep_last = 1
    manager.prune()
    quota(tmp_path, storage.tree_bytes(tmp_path) + 1000)  # nothing left to prune but the newest
    with pytest.raises(storage.OutOfSpaceError) as err:
        manager.save(_state(16), 16)
    assert str(third) in str(err.value) and third.is_dir()
    assert _manager(tmp_path).load_latest()[0] == third


def test_a_full_disk_during_an_export_leaves_the_previous_export_as_it_was(tmp_path, quota):
    from components import exports
    from components.config import ModelConfig
    from components.model import backbone_from_config

    model = ModelConfig(arch="vit_test")
    out = tmp_path / "models" / "pretrain"
    state = backbone_from_config(model).state_dict()
    exports.write_export(out, model=model, backbone_state=state, heads=None, role="teacher", iterations=4)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    quota(tmp_path, storage.tree_bytes(tmp_path) + 4096)
    changed = {k: v + 1 for k, v in state.items()}
    with pytest.raises(storage.OutOfSpaceError) as err:
        exports.write_export(out, model=model, backbone_state=changed, heads=None, role="teacher", iterations=8)
    assert "the export of iteration 8" in str(err.value) and "as it was" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(out.parent.glob(".pretrain.export-partial"))


def test_a_full_disk_while_a_shard_is_written_leaves_the_shard_as_it_was(tmp_path, monkeypatch):
    from components import embedding

    shard = embedding.Shard("pool", 0, ("a", "b"), "fp1")
    embedding.write_shard(shard, tmp_path, np.ones((2, 4), np.float32), ["", ""])
    before = {p.name: p.read_bytes() for p in (tmp_path / "pool").iterdir()}

    def full(path, array):
        with open(path, "wb") as f:
            f.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(embedding, "_write_npy", full)
    again = embedding.Shard("pool", 0, ("a", "b"), "fp2")  # another model: the shard is recomputed
    with pytest.raises(storage.OutOfSpaceError) as err:
        embedding.write_shard(again, tmp_path, np.zeros((2, 4), np.float32), ["", ""])
    assert "embedding shard pool/shard-00000" in str(err.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "pool").iterdir()} == before
    assert embedding.shard_is_complete(shard, tmp_path) and not embedding.shard_is_complete(again, tmp_path)


def test_a_full_disk_in_the_curate_stage_leaves_the_previous_curated_set(tmp_path, monkeypatch):
    from components.stages import curate

    out = tmp_path / "curated"
    out.mkdir()
    (out / "manifest.parquet").write_bytes(b"previous")

    def fills_up(cfg, *, staging, **_):
        (staging / "manifest.parquet").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(curate, "_curate", fills_up)
    cfg = load_config(Path(__file__).resolve().parents[2] / "params.yaml")
    with pytest.raises(storage.OutOfSpaceError) as err:
        curate.run_curate(cfg, prepared="p", embeddings="e", out=str(out), metrics=str(tmp_path / "m.json"))
    assert "curate stage" in str(err.value) and str(out) in str(err.value)
    assert (out / "manifest.parquet").read_bytes() == b"previous"
    assert not (tmp_path / "curated.partial" / "manifest.parquet").exists()  # only finished shard work may stay


SMALL_FS_SCRIPT = """
import sys, torch
from components import storage
from components.training.checkpoint import CheckpointManager
root = sys.argv[1]
m = CheckpointManager(root, keep_last=3, fingerprint="fp")
m.save({"model": {"w": torch.zeros(50_000)}, "loop": {"step": 4}}, 4)
try:
    m.save({"model": {"w": torch.zeros(300_000)}, "loop": {"step": 8}}, 8)
except storage.OutOfSpaceError as err:
    print("ERROR", err)
print("LEFT", sorted(p.name for p in __import__("pathlib").Path(root).iterdir()))
print("LOADED", m.load_latest()[0].name)
"""


def test_a_real_small_filesystem_filled_during_a_save(tmp_path):
    """A 1 MiB tmpfs in a mount namespace of its own (skipped where unprivileged mounts are not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(SMALL_FS_SCRIPT)
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt}"],
                           capture_output=True)  # fmt: skip
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip("no unprivileged mount namespace here (unshare -rm)")
    out = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt} && {sys.executable} {script} {mnt}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert "No space left on device" in lines["ERROR"] and "step 8" in lines["ERROR"] and "free" in lines["ERROR"]
    assert lines["LEFT"] == "['step_00000004']" and lines["LOADED"] == "step_00000004"
