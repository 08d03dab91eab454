"""Continued pretraining from released weights, and the final pretrained model the later stages read.

- A released backbone (no heads) first gets heads fitted on it, frozen; the backbone moves only afterwards.
- Its registers, interpolation and patch size come from the file; a file that does not fit the preset stops the
  stage before any step, naming the key and both shapes.
- evaluate, distill and report read `pipeline.pretrained_model` (the high-resolution export by default), and the
  flow runs pretrain_highres only when that names its export.
- Slow: continuing from a model that learned keeps what it learned with the head fit and the warm-up, and loses
  more without them at the same learning rate; a falling kNN stops the run early.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from components import exports
from components.config import validate_config
from components.model import build_backbone, save_official_weights
from components.model.adapter import CheckpointError
from components.training.knn import knn_accuracy
from tests.distillation.tiny import tiny_config, tiny_raw
from tests.training.test_learns import _config as learns_config

ROOT = Path(__file__).resolve().parents[2]


def _run(cfg, curated: Path, work: Path) -> dict:
    from components.stages.pretrain import run_pretrain

    run_pretrain(cfg, curated=str(curated), checkpoints=str(work / "ck"), out=str(work / "out"),
                 metrics=str(work / "m.json"), curve=str(work / "c.csv"))  # fmt: skip
    return json.loads((work / "m.json").read_text())


def _state(work: Path, phase: str, step: int) -> dict:
    (path,) = (work / "ck" / phase).glob(f"*/step_{step:08d}")
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)["model"]


@pytest.fixture
def quiet(monkeypatch, in_process_training):
    monkeypatch.setenv("DINOV2_TRACKING", "off")


def test_a_released_backbone_gets_its_heads_fitted_before_it_moves(curated, tmp_path, quiet):
    torch.manual_seed(3)
    released = save_official_weights(build_backbone("vit_test", num_register_tokens=4), tmp_path / "reg4.pth")
    raw = tiny_raw(
        model={"pretrained_weights": str(released), "layerscale_init": 0.1},
        adapt={"head_fit_iterations": 4},
        optim={"epochs": 2, "epoch_length": 2, "warmup_epochs": 1},
    )
    metrics = _run(validate_config(raw), curated, tmp_path)
    file = torch.load(released, weights_only=True)
    fitted = _state(tmp_path, "head_fit", 4)
    for net in ("student", "teacher"):  # the head fit left the released backbone bit for bit as it was
        assert all(torch.equal(fitted[f"{net}.backbone.{k}"], v) for k, v in file.items())
    trained = _state(tmp_path, "pretrain", 4)
    assert trained["teacher.backbone.register_tokens"].shape == (1, 4, 64)  # the file's registers, not the config's
    assert not torch.equal(trained["student.backbone.blocks.1.attn.qkv.weight"], file["blocks.1.attn.qkv.weight"])
    plans = (tmp_path / "out" / "plan.yaml").read_text()
    assert "head_fit:" in plans and "kind: phase" in plans and "interpolate_antialias: true" in plans
    curve = pd.read_csv(tmp_path / "c.csv")
    assert {"drift.total", "drift.block_00", "drift.stem"} <= set(curve.columns) and curve["drift.total"].iloc[-1] > 0
    assert metrics["iterations"] == 4 and metrics["stopped_early"] is None


def test_frozen_blocks_stay_as_released(curated, tmp_path, quiet):
    torch.manual_seed(3)
    released = save_official_weights(build_backbone("vit_test"), tmp_path / "b.pth")
    raw = tiny_raw(
        model={"pretrained_weights": str(released), "freeze_blocks": 1},
        adapt={"head_fit_iterations": 2},
        optim={"epochs": 2, "epoch_length": 2, "warmup_epochs": 1},
    )
    _run(validate_config(raw), curated, tmp_path)
    file, trained = torch.load(released, weights_only=True), _state(tmp_path, "pretrain", 4)
    for key in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "pos_embed"):
        assert torch.equal(trained[f"teacher.backbone.{key}"], file[key]) and torch.equal(
            trained[f"student.backbone.{key}"], file[key]
        )
    assert not torch.equal(trained["student.backbone.blocks.1.mlp.fc1.weight"], file["blocks.1.mlp.fc1.weight"])


def test_a_file_that_does_not_fit_the_preset_stops_before_any_step(curated, tmp_path, quiet):
    wrong = save_official_weights(build_backbone("vit_tiny"), tmp_path / "tiny.pth")
    cfg = tiny_config(model={"pretrained_weights": str(wrong)})
    with pytest.raises(
        CheckpointError, match=r"shape mismatch for 'cls_token': checkpoint \[1, 1, 192\], model \[1, 1, 64\]"
    ):
        _run(cfg, curated, tmp_path)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def test_the_files_geometry_comes_with_it(tmp_path):
    file = save_official_weights(build_backbone("vit_test", num_register_tokens=4, patch_size=7), tmp_path / "r.pth")
    source = exports.resolve_source(str(file), tiny_config().model)
    m = source.model
    assert (m.num_register_tokens, m.patch_size, m.interpolate_offset, m.interpolate_antialias) == (4, 7, 0.0, True)
    assert m.img_size == 518 // 7 * 7 and source.heads is None  # the file's position grid (74 x 74 patches of 7)


def test_later_stages_read_the_final_pretrained_model(tmp_path):
    from components.stages.evaluate import INTERMEDIATE, model_specs

    for folder in ("pretrain", "pretrain_highres"):
        out = tmp_path / folder
        exports.write_export(out, model=tiny_config().model, backbone_state=build_backbone("vit_test").state_dict(),
                             heads=None, role="teacher", iterations=1)  # fmt: skip
    cfg = tiny_config()
    specs = {s.name: s for s in model_specs(cfg, str(tmp_path / "pretrain"), str(tmp_path / "none"),
                                            str(tmp_path / "pretrain_highres"))}  # fmt: skip
    assert specs["teacher"].descriptor.startswith(str(tmp_path / "pretrain_highres"))
    assert specs["teacher_pretrain"].role == INTERMEDIATE  # beside it, never a registry candidate
    alone = model_specs(cfg, str(tmp_path / "pretrain"), str(tmp_path / "none"), str(tmp_path / "pretrain"))
    assert [s.name for s in alone] == ["teacher", "random_init"]


@pytest.mark.parametrize(("final", "runs_highres"), [("models/pretrain_highres", True), ("models/pretrain", False)])
def test_the_flow_runs_the_high_resolution_phase_only_when_its_export_is_used(tmp_path, final, runs_highres):
    from flows.pipeline import upstream_of
    from tests.pipeline_utils import make_workspace

    root = make_workspace(tmp_path / "ws", {"pipeline.pretrained_model": final})
    stages = upstream_of(root, "report")
    assert ("pretrain_highres" in stages) is runs_highres and stages[-1] == "report" and "distill" in stages


# -- continuing a model that learned -------------------------------------------------------------------------------


_LEARNED: dict[str, tuple[Path, float]] = {}


@pytest.fixture
def learned(learning_world, tmp_path_factory, quiet) -> tuple[Path, float]:
    """A 60-step pretraining run on the small world (test_learns.py's recipe), its export and teacher kNN top-1;
    trained once per session (in this process: `quiet` brings the world-of-one environment)."""
    if not _LEARNED:
        root, curated = learning_world
        work = tmp_path_factory.mktemp("learned")
        raw = learns_config().model_dump(mode="json")
        raw["optim"].update(epochs=6)
        cfg = validate_config(raw)
        _run(cfg, curated, work)
        _LEARNED["run"] = (work / "out", _knn(work / "out", root, cfg))
    return _LEARNED["run"]


def _knn(out: Path, root: Path, cfg) -> float:
    backbone = exports.read_export(out).build_backbone().eval()
    size = cfg.crops.global_crops_size
    return knn_accuracy(backbone, root / "eval" / "classification", image_size=size, device=torch.device("cpu"),
                        query_split="test")  # fmt: skip


def _continue(learned_out: Path, world: tuple, tmp_path: Path, monkeypatch, *, protected: bool, **sections) -> tuple:
    root, curated = world
    raw = learns_config().model_dump(mode="json")
    raw["model"].update(pretrained_weights=str(learned_out / "backbone.pth"))  # the backbone alone: no heads
    raw["optim"].update(epochs=3, base_lr=0.5, warmup_epochs=2 if protected else 0)
    raw["adapt"].update(head_fit_iterations=40, head_fit_base_lr=0.05)
    for name, values in sections.items():
        raw[name].update(values)
    if not protected:  # fresh random heads at full learning rate from the first step (dinov2 issue #204)
        from components.stages import pretrain as stage
        from components.training.plan import WeightsPlan

        def no_head_fit(cfg, stage_name, source, model, checkpoints, world_size):
            return [], WeightsPlan(source.kind, source.origin, source.digest), source.location

        monkeypatch.setattr(stage, "head_fit_first", no_head_fit)
    cfg = validate_config(raw)
    metrics = _run(cfg, curated, tmp_path)
    return _knn(tmp_path / "out", root, cfg), metrics


@pytest.mark.slow
def test_continuing_keeps_what_the_model_learned_and_unprotected_continuing_loses_more(
    learned,
    learning_world,
    tmp_path,
    quiet,
    monkeypatch,
):
    learned_out, start = learned
    kept, _ = _continue(learned_out, learning_world, tmp_path / "protected", monkeypatch, protected=True)
    lost, _ = _continue(learned_out, learning_world, tmp_path / "unprotected", monkeypatch, protected=False)
    print(json.dumps({"start": start, "head_fit_and_warmup": kept, "fresh_heads_no_warmup": lost}))
    assert kept >= start - 0.05, (start, kept)
    assert lost < kept - 0.05, (start, kept, lost)


@pytest.mark.slow
def test_a_falling_knn_stops_the_run_early(learned, learning_world, tmp_path, quiet, monkeypatch):
    learned_out, start = learned
    eval_root = str(learning_world[0] / "eval" / "classification")
    train = {"knn_eval_period": 10, "log_period": 10, "knn_eval_root": eval_root}
    _, metrics = _continue(learned_out, learning_world, tmp_path, monkeypatch, protected=False, train=train,
                           optim={"epochs": 6, "base_lr": 1.0}, adapt={"knn_stop_drop": 0.02})  # fmt: skip
    assert metrics["stopped_early"] and "fell below the start's" in metrics["stopped_early"], metrics
    assert metrics["iterations"] < 60
    shutil.rmtree(tmp_path / "ck")


@pytest.mark.parametrize("arch", ["small", "base", "large"])
def test_the_adaptation_recipes_are_valid_params(arch, tmp_path):
    from components.config import apply_overrides, read_params, read_recipe

    recipe = read_recipe(ROOT / "infra" / "recipes" / f"adapt_vit_{arch}.yaml")
    file = save_official_weights(build_backbone("vit_test"), tmp_path / "w.pth")  # a user sets their file
    cfg = validate_config(
        apply_overrides(
            read_params(ROOT / "params.yaml"),
            {**recipe, "model.pretrained_weights": str(file), "train.knn_eval_root": str(tmp_path)},
        )
    )
    assert (
        cfg.model.arch == f"vit_{arch}"
        and cfg.adapt.knn_stop_drop
        and cfg.pipeline.pretrained_model == "models/pretrain"
    )


def test_without_a_final_export_the_pretrain_export_is_the_teacher(tmp_path):
    from components.stages.evaluate import model_specs

    exports.write_export(tmp_path / "pretrain", model=tiny_config().model, heads=None, role="teacher", iterations=1,
                         backbone_state=build_backbone("vit_test").state_dict())  # fmt: skip
    specs = model_specs(tiny_config(), str(tmp_path / "pretrain"), str(tmp_path / "none"), str(tmp_path / "missing"))
    assert [(s.name, s.role) for s in specs] == [("teacher", "teacher"), ("random_init", "baseline")]
