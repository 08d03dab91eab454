"""Pure pieces of training: DeepSpeed configs, the positional stream and its rank-invariant masks, undecodable images,
the checkpoint folder and the manifest digest. (The phases' plans: test_plan.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components.config import load_config
from components.training.checkpoint import CheckpointManager, code_digest
from components.training.data import MultiCropDataset, PlannedMaskCollate, SampleRef, StreamPlan, manifest_digest
from components.training.engine import EngineSettings, deepspeed_config
from components.training.plan import pretrain_plan

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "params.yaml")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_fills_the_templates(cfg, stage):
    settings = EngineSettings.from_plan(pretrain_plan(cfg, world_size=4), cfg.train, zero_stage=stage,
                                        grad_accum_steps=2, precision="bf16")  # fmt: skip
    ds = deepspeed_config(settings, world_size=4)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == cfg.train.batch_size_per_gpu * 2 * 4
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert ds["gradient_clipping"] == 0.0  # the engine clips each module on its own, under every stage


def test_a_template_with_its_own_gradient_clipping_is_refused(cfg, tmp_path):
    template = json.loads((ROOT / "infra/deepspeed/zero2.json").read_text()) | {"gradient_clipping": 1.0}
    (tmp_path / "zero2.json").write_text(json.dumps(template))
    settings = EngineSettings.from_plan(pretrain_plan(cfg, world_size=1), cfg.train, zero_stage=2, config_dir=tmp_path)
    with pytest.raises(ValueError, match="zero2.json: gradient_clipping = 1.0: leave it"):
        deepspeed_config(settings, world_size=1)


def _refs(world: int, rank: int, batch: int) -> list[SampleRef]:
    return next(StreamPlan(batch, rank, world).micro_batches(start_position=16))


def test_stream_and_masks_do_not_depend_on_the_number_of_ranks():
    one = _refs(1, 0, 8)
    two = _refs(2, 0, 4) + _refs(2, 1, 4)
    assert [r.position for r in one] == [r.position for r in two]
    collate = PlannedMaskCollate(seed=3, patch_grid=8, mask_ratio_min_max=(0.1, 0.5), mask_probability=0.5)
    m1, _ = collate.plan_masks(one, n_global=2)  # (2 x 8, 64), crop-major
    m2a, _ = collate.plan_masks(two[:4], n_global=2)
    m2b, _ = collate.plan_masks(two[4:], n_global=2)
    joined = torch.cat([m2a[:4], m2b[:4], m2a[4:], m2b[4:]])  # back to crop-major over the 8 images
    assert torch.equal(m1, joined)
    assert (m1.sum(1) > 0).sum() == 8  # half of the 16 global crops are masked


def test_an_undecodable_image_is_skipped_and_counted(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(good)
    bad.write_bytes(b"not an image")
    dataset = MultiCropDataset([str(bad), str(bad), str(good)], seed=0, augmentation=lambda img: img.size)
    out = [dataset[SampleRef(p, 0, p, 3)] for p in range(3)]
    assert all(o["crops"] == (32, 32) for o in out)
    assert sum(o["failures"] for o in out) >= 2


def test_checkpoints_are_atomic_pruned_and_scoped_to_their_configuration(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, fingerprint="a")
    (tmp_path / ".tmp-step_00000009").mkdir()  # a crash during a write
    assert manager.latest() is None
    for step in (1, 2, 3):
        manager.save({"loop": {"step": step}}, step)
    assert [s for s, _ in manager.complete()] == [2, 3]
    assert not (tmp_path / ".tmp-step_00000009").exists()
    assert manager.load(manager.latest())["loop"] == {"step": 3}
    other = CheckpointManager(tmp_path, keep_last=2, fingerprint="b")
    assert other.latest() is None  # another configuration never resumes these
    other.save({"loop": {"step": 1}}, 1)
    assert [json.loads((p / "meta.json").read_text())["fingerprint"] for _, p in other.complete()] == ["b"]

    assert json.loads((other.latest() / "meta.json").read_text())["code"] == ""


def test_superseded_checkpoints_are_skipped_then_replaced(tmp_path):
    old = CheckpointManager(tmp_path, keep_last=3, fingerprint="a", code="old")
    for step in (2, 4):
        old.save({"loop": {"step": step}}, step)
    new = CheckpointManager(tmp_path, keep_last=3, fingerprint="a", code="new")
    assert new.latest() == tmp_path / "step_00000004" and new.meta(new.latest())["code"] == "old"
    new.supersede()
    assert new.latest() is None
    new.save({"loop": {"step": 2}}, 2)  # the same folder name as a superseded one: kept, the other removed
    assert [(s, new.meta(p)["code"]) for s, p in new.complete()] == [(2, "new")]
    assert new.latest() == tmp_path / "step_00000002"


def test_manifest_and_code_digests(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"uri": ["a.jpg", "b.jpg"], "sha256": ["1", "2"], "label": ["p", "q"]})
    digests = []
    for name, f in [
        ("same", frame),
        ("relabelled", frame.assign(label=["z", "z"])),  # columns other than uri and sha256 do not count
        ("reordered", frame.iloc[::-1]),
        ("reencoded", frame.assign(sha256=["1", "3"])),
        ("no_hashes", frame[["uri"]]),
    ]:
        (tmp_path / name).mkdir()
        f.to_parquet(tmp_path / name / "manifest.parquet")
        digests.append(manifest_digest(str(tmp_path / name)))
    assert digests[0] == digests[1] and len(set(digests[1:])) == 4
    (tmp_path / "bad").mkdir()
    frame[["sha256"]].to_parquet(tmp_path / "bad" / "manifest.parquet")
    with pytest.raises(ValueError, match="no `uri` column"):
        manifest_digest(str(tmp_path / "bad"))
    assert code_digest() == code_digest() and len(code_digest()) == 16


def test_activation_checkpointing_keeps_keys_loss_and_gradients():
    import copy

    from components.model import build_backbone
    from components.training.engine import _checkpoint_activations

    torch.manual_seed(0)
    plain = build_backbone("vit_test", drop_path_rate=0.3).train()  # > 0.1: the subset path draws random rows
    ckpt = copy.deepcopy(plain)
    for block in ckpt.blocks:
        _checkpoint_activations(block)
    assert plain.state_dict().keys() == ckpt.state_dict().keys()
    x = torch.randn(4, 3, 28, 28)
    losses = []
    for model in (plain, ckpt):
        torch.manual_seed(1)
        loss = model.forward_features(x)["x_norm_clstoken"].square().sum()
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name  # the mask token is unused without masks
        assert a.grad is None or torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_precision_device_and_threads_resolve_as_documented(monkeypatch):
    from components.runtime import cpu_threads
    from components.training.engine import resolve_precision

    assert resolve_precision("auto", "cuda") == "bf16" and resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert cpu_threads(0, num_workers=1) == 1  # never oversubscribe the cores the data workers use
    assert cpu_threads(0, num_workers=4) == 1 and cpu_threads(3, num_workers=1) == 3


def test_deepspeed_config_without_templates_uses_deepspeed_defaults(cfg, tmp_path):
    plan = pretrain_plan(cfg, world_size=2)
    settings = EngineSettings.from_plan(plan, cfg.train, zero_stage=2, config_dir=tmp_path)  # installed: no infra/
    ds = deepspeed_config(settings, world_size=2)
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["train_batch_size"] == cfg.train.batch_size_per_gpu * 2
