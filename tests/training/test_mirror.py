"""The checkpoint layout and the checkpoint mirror: complete only with meta.json, pulled verified into a fresh
folder, a damaged mirrored checkpoint set aside (never deleted), an interrupted copy completed at a restart; on a
local mirror folder and against the suite's SeaweedFS server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components import storage
from components.config import ConfigError, load_config, validate_config
from components.training.checkpoint import CheckpointManager
from components.training.layout import CheckpointLayout, mirror_layout, parse_step, step_name
from components.training.mirror import CheckpointMirror, pull_export, push_export, resume_point

ROOT = Path(__file__).resolve().parents[2]


def test_the_layout_names_each_folder_in_one_place() -> None:
    local = CheckpointLayout("checkpoints/pretrain")
    assert local.run("pretrain", "abc") == "checkpoints/pretrain/pretrain/abc"
    assert local.step("gram", "abc", 40) == "checkpoints/pretrain/gram/abc/step_00000040"
    assert local.export("pretrain") == "checkpoints/pretrain/pretrain/export"
    assert local.export("head_fit", tag="0123") == "checkpoints/pretrain/head_fit/export-0123"
    assert local.curve("head_fit") == "checkpoints/pretrain/head_fit/curve.csv"
    remote = mirror_layout("s3://bucket/runs/", "pretrain")
    assert remote.step("pretrain", "abc", 8) == "s3://bucket/runs/pretrain/pretrain/abc/step_00000008"
    assert parse_step(step_name(123)) == 123
    assert parse_step("step_00000004.damaged") is None and parse_step(".tmp-step_00000004") is None
    with pytest.raises(ValueError, match="not a phase name"):
        local.phase("../x")


def test_a_bad_mirror_uri_fails_at_load_naming_the_key() -> None:
    raw = load_config(ROOT / "params.yaml").model_dump(mode="json")
    raw["train"]["checkpoint_mirror"] = "s3:///no-bucket"
    with pytest.raises(ConfigError, match="checkpoint_mirror"):
        validate_config(raw)


def _state(step: int) -> dict:
    torch.manual_seed(step)
    loop = {"step": step, "samples_seen": 8 * step}
    return {"model": {"w": torch.randn(64, 64)}, "loop": loop, "rng": [], "history": []}


def _manager(root: Path) -> CheckpointManager:
    return CheckpointManager(root, keep_last=2, fingerprint="fp")


def _saved(manager: CheckpointManager, mirror: CheckpointMirror, *steps: int, push: bool = True) -> None:
    for step in steps:
        path = manager.save(_state(step), step)
        if push:
            mirror.push(path)


@pytest.fixture(params=["folder", pytest.param("s3", marks=pytest.mark.services)])
def mirror_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A mirror prefix: a local folder, or a fresh bucket of the suite's SeaweedFS server."""
    if request.param == "folder":
        return str(tmp_path / "mirror" / "pretrain" / "pretrain" / "fp")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/pretrain/pretrain/fp"


def test_a_fresh_folder_resumes_from_the_newest_mirrored_checkpoint(tmp_path: Path, mirror_root: str) -> None:
    mirror = CheckpointMirror(mirror_root, keep_last=2)
    _saved(_manager(tmp_path / "node_a"), mirror, 2, 4, 6)
    assert mirror.complete() == [4, 6]  # keep_last, on the mirror too
    fresh = _manager(tmp_path / "node_b")
    assert resume_point(fresh, mirror) == 6
    path, state = fresh.load_latest(upto=6)
    assert path.name == step_name(6) and torch.equal(state["model"]["w"], _state(6)["model"]["w"])
    assert fresh.verify(path) is None


def test_a_mirrored_checkpoint_is_complete_only_with_its_meta(tmp_path: Path, mirror_root: str) -> None:
    mirror = CheckpointMirror(mirror_root, keep_last=2)
    manager = _manager(tmp_path / "local")
    _saved(manager, mirror, 2)
    path = manager.save(_state(4), 4)
    storage.upload_file(path / "state.pt", storage.join(mirror_root, path.name, "state.pt"))  # cut before meta.json
    assert mirror.complete() == [2]
    fresh = _manager(tmp_path / "fresh")
    assert resume_point(fresh, mirror) == 2


def test_a_local_checkpoint_the_mirror_lacks_is_copied_at_the_restart(tmp_path: Path, mirror_root: str) -> None:
    mirror = CheckpointMirror(mirror_root, keep_last=2)
    manager = _manager(tmp_path / "local")
    _saved(manager, mirror, 2)
    _saved(manager, mirror, 4, push=False)  # the job died before the copy
    assert resume_point(_manager(tmp_path / "local"), mirror) == 4
    assert mirror.complete() == [2, 4]


def test_a_damaged_mirrored_checkpoint_is_set_aside_and_the_older_one_resumed(tmp_path: Path, mirror_root: str) -> None:
    mirror = CheckpointMirror(mirror_root, keep_last=2)
    _saved(_manager(tmp_path / "local"), mirror, 2, 4)
    damaged = storage.join(mirror_root, step_name(4), "state.pt")
    storage.write_bytes(damaged, storage.read_bytes(damaged)[:-100] + b"\0" * 100)  # same size, other bytes
    fresh = _manager(tmp_path / "fresh")
    assert resume_point(fresh, mirror) == 2
    assert mirror.complete() == [2]
    aside = storage.join(mirror_root, f"{step_name(4)}.damaged")
    assert sorted(storage.basename(u) for u in storage.list_files(aside)) == ["DAMAGED.txt", "meta.json", "state.pt"]
    assert "sha256" in storage.read_bytes(storage.join(aside, "DAMAGED.txt")).decode()
    assert [p.name for p in fresh.root.iterdir()] == [step_name(2)]  # nothing of the damaged one placed locally


def test_a_node_whose_copy_is_damaged_pulls_it_again(tmp_path: Path, mirror_root: str) -> None:
    mirror = CheckpointMirror(mirror_root, keep_last=2)
    _saved(_manager(tmp_path / "node_a"), mirror, 2)
    node_b = _manager(tmp_path / "node_b")
    mirror.pull(2, node_b)
    (node_b.root / step_name(2) / "state.pt").write_bytes(b"broken")
    other = _manager(tmp_path / "node_b")  # a restarted process
    mirror.pull(2, other)
    assert other.verify(other.root / step_name(2)) is None
    assert (other.root / f"{step_name(2)}.damaged" / "DAMAGED.txt").is_file()  # set aside, never deleted


def test_exports_go_up_descriptor_last_and_come_down_whole(tmp_path: Path, mirror_root: str) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "backbone.pth").write_bytes(b"weights")
    (folder / "model.json").write_text(json.dumps({"weights": "backbone.pth"}))
    (folder / "config.yaml").write_text("not part of the export")
    uri = storage.join(mirror_root, "export")
    assert push_export(folder, uri) == [storage.join(uri, "model.json")]
    pull_export(uri, tmp_path / "elsewhere")
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["backbone.pth", "model.json"]
    assert (tmp_path / "elsewhere" / "backbone.pth").read_bytes() == b"weights"


@pytest.mark.services
def test_an_unreachable_mirror_bucket_is_named_before_any_step(s3_env: str) -> None:
    with pytest.raises(storage.StorageNotFoundError, match="bucket does not exist"):
        CheckpointMirror("s3://no-such-bucket-here/runs", keep_last=1).check_reachable()
