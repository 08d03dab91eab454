"""Mixed crop sizes in the high-resolution phase (DINOv3's high-resolution adaptation): the per-step draw of a
(global, local) pair, its agreement over ranks, accumulation and resumes, the config checks, the plan, and a few
Gram-anchored steps of the stage in the tiny world, each at the drawn size."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from components.config import ConfigError, load_config, validate_config
from components.training.data import StreamPlan, build_loader, crop_pair_index, read_manifest_uris
from components.training.plan import WeightsPlan, fingerprint, highres_plan

ROOT = Path(__file__).resolve().parents[2]
EXPORT = WeightsPlan("export", "models/pretrain", "abc")
MIXED = {"global_crops_size": None, "local_crops_size": None, "crop_sizes": [[28, 14], [42, 21]]}
"""Two pairs on the patch-7 grid of `vit_test` (4 x 4 and 6 x 6 patches)."""


def _raw(**sections):
    raw = load_config(ROOT / "params.yaml").model_dump(mode="json")
    for name, values in sections.items():
        raw[name].update(values)
    return raw


def _tiny(**sections):
    """vit_test (patch 7), small heads, 2 local crops, batch 4 in the high-resolution phase, `sections` on top."""
    raw = _raw(
        model={"arch": "vit_test", "patch_size": 7, "drop_path_rate": 0.0},
        dino={"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
        crops={"global_crops_size": 28, "local_crops_size": 14, "local_crops_number": 2},
        optim={"epochs": 2, "epoch_length": 2, "warmup_epochs": 1},
        teacher={"warmup_teacher_temp_epochs": 1},
    )
    raw["highres"].update(iterations=4, warmup_iterations=1, batch_size_per_gpu=4, **MIXED)
    raw["train"].update(batch_size_per_gpu=4, num_workers=0, checkpoint_period=2, keep_last=10, log_period=1,
                        device="cpu", cpu_threads=1)  # fmt: skip
    for name, values in sections.items():
        raw[name].update(values)
    return validate_config(raw)


# --------------------------------------------------------------------------------------------------------------------
# The draw (pure)
# --------------------------------------------------------------------------------------------------------------------


def test_the_draw_is_a_pure_function_of_the_seed_and_the_step():
    ratios = (0.3, 0.3, 0.3, 0.05, 0.05)  # the release's 7B
    forward = [crop_pair_index(0, s, ratios) for s in range(500)]
    backward = [crop_pair_index(0, s, ratios) for s in reversed(range(500))][::-1]  # no state between calls
    assert forward == backward and set(forward) == {0, 1, 2, 3, 4}
    assert forward != [crop_pair_index(1, s, ratios) for s in range(500)]  # the seed matters
    assert all(crop_pair_index(seed, s, (1.0,)) == 0 for seed in range(3) for s in range(50))  # one pair: no draw


@pytest.mark.parametrize("ratios", [(0.3, 0.3, 0.3, 0.05, 0.05), (0.5, 0.5), (0.9, 0.1), (0.2, 0.7, 0.1)])
def test_the_draw_follows_the_ratios(ratios):
    n = 20_000
    counts = np.bincount([crop_pair_index(7, s, ratios) for s in range(n)], minlength=len(ratios))
    for p, count in zip(ratios, counts, strict=True):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(count - n * p) < 4.5 * sigma, (ratios, counts)


def test_every_rank_and_every_split_of_a_step_draws_the_same_pair():
    ratios, seed = (0.5, 0.5), 3

    def pairs_by_position(per_rank, world, accum, start=0, micro_batches=24):
        seen = {}
        for rank in range(world):
            stream = StreamPlan(per_rank, rank, world, accum, ratios, seed).micro_batches(start)
            for _ in range(micro_batches):
                seen.update({r.position: r.crop_pair for r in next(stream)})
        return seen

    one = pairs_by_position(8, 1, 1)  # a global batch of 8 per step, however split
    assert one == {p: v for p, v in pairs_by_position(4, 2, 1).items() if p in one}
    assert one == {p: v for p, v in pairs_by_position(2, 2, 2, micro_batches=48).items() if p in one}
    steps = [crop_pair_index(seed, p // 8, ratios) for p in sorted(one)]
    assert [one[p] for p in sorted(one)] == steps and set(steps) == {0, 1}
    # A resumed stream (from a checkpoint's samples_seen) draws the pairs of the uninterrupted one.
    resumed = pairs_by_position(4, 2, 1, start=5 * 8, micro_batches=10)
    assert resumed == {p: one[p] for p in resumed}


# --------------------------------------------------------------------------------------------------------------------
# Config and plan
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("highres", "needle"),
    [
        ({"crop_sizes": [[112, 28], [168, 42]]}, "highres.crop_sizes replaces highres.global_crops_size = 112"),
        ({**MIXED, "crop_sizes": [[112, 28], [168, 40]]},
         "highres.crop_sizes[1] = [168, 40]: the local side 40 is not a multiple of model.patch_size = 14"),
        ({**MIXED, "crop_sizes": [[100, 28]]}, "highres.crop_sizes[0] = [100, 28]: the global side 100 is not"),
        ({**MIXED, "crop_sizes": [[112, 28], [168, 42]], "crop_size_ratios": [0.5, 0.3, 0.2]},
         "highres.crop_size_ratios = [0.5, 0.3, 0.2] has 3 ratios for the 2 pairs of highres.crop_sizes"),
        ({**MIXED, "crop_sizes": [[112, 28], [168, 42]], "crop_size_ratios": [0.5, 0.6]},
         "highres.crop_size_ratios = [0.5, 0.6]: Value error, needs one probability > 0 per pair, summing to 1"),
        ({**MIXED, "crop_sizes": [[112, 28], [168, 42]], "crop_size_ratios": [1.0, 0.0]}, "highres.crop_size_ratios"),
        ({"crop_size_ratios": [1.0]}, "highres.crop_size_ratios = [1.0] needs highres.crop_sizes"),
        ({"global_crops_size": None}, "highres.global_crops_size null needs highres.crop_sizes"),
        ({**MIXED, "crop_sizes": []}, "highres.crop_sizes = []: Value error, needs one or more [global, local]"),
        ({**MIXED, "crop_sizes": [[112, 28, 14]]}, "highres.crop_sizes.0"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(highres, needle):
    with pytest.raises(ConfigError) as err:
        validate_config(_raw(highres=highres))
    assert needle in str(err.value)


def test_the_gram_teachers_crops_of_every_pair_must_fit_the_patch():
    gram = {"enabled": True, "iterations": 2, "highres_teacher_resolution": 1.5}
    needle = r"gram.highres_teacher_resolution = 1.5 makes the Gram teacher's crops 189 px for the global crops of 126"
    with pytest.raises(ConfigError, match=needle + r" px \(highres.crop_sizes\[1\]\)"):
        validate_config(_raw(highres={**MIXED, "crop_sizes": [[112, 28], [126, 28]]}, gram=gram))


def test_one_pair_is_the_single_size_phase_and_its_fingerprint():
    single = highres_plan(validate_config(_raw()), world_size=1, weights=EXPORT)
    one_pair = validate_config(_raw(highres={**MIXED, "crop_sizes": [[112, 28]], "crop_size_ratios": [1.0]}))
    listed = highres_plan(one_pair, world_size=1, weights=EXPORT)
    assert single.crop_sizes is None and "crop_sizes" not in single.to_dict()
    assert listed.fingerprint_items() == single.fingerprint_items()  # checkpoints of earlier runs still resume
    assert "global_crops_size" not in single.schedules().at(0)


def test_the_plan_records_the_pairs_ratios_and_gram_teacher_sizes():
    gram = {"enabled": True, "iterations": 2, "highres_teacher_resolution": 1.5}
    mixed = {**MIXED, "crop_sizes": [[112, 28], [168, 42], [168, 56]], "crop_size_ratios": [0.6, 0.3, 0.1]}
    cfg = validate_config(_raw(highres=mixed, gram=gram))
    plan = highres_plan(cfg, world_size=2, weights=EXPORT)
    sizes = plan.crop_sizes
    assert sizes.pairs == ((112, 28), (168, 42), (168, 56)) and sizes.ratios == (0.6, 0.3, 0.1)
    assert sizes.gram_teacher_crops_sizes == (168, 252, 252)  # 1.5 x each global side, as the release's list
    assert (plan.crops.global_crops_size, plan.crops.local_crops_size, plan.gram.teacher_crops_size) == (112, 28, 168)
    pairs = plan.crop_pairs()
    assert [(c.global_crops_size, c.local_crops_size, t) for c, t in pairs] == [
        (112, 28, 168), (168, 42, 252), (168, 56, 252)]  # fmt: skip
    assert all(c.local_crops_number == cfg.crops.local_crops_number for c, _ in pairs)
    data = plan.to_dict()
    assert yaml.safe_load(yaml.safe_dump(data)) == data
    assert data["crop_sizes"]["pairs"] == [[112, 28], [168, 42], [168, 56]]
    items = plan.fingerprint_items()
    assert items["crop_sizes.ratios"] == [0.6, 0.3, 0.1]
    other = validate_config(_raw(highres={**mixed, "crop_size_ratios": [0.3, 0.6, 0.1]}, gram=gram))
    assert fingerprint(highres_plan(other, world_size=2, weights=EXPORT).fingerprint_items()) != fingerprint(items)
    values = [plan.schedules().at(s) for s in range(40)]  # each step's sides, logged with the schedules
    assert [(v["global_crops_size"], v["local_crops_size"]) for v in values] == [
        sizes.pairs[sizes.pair_at(cfg.seed, s)] for s in range(40)
    ]


# --------------------------------------------------------------------------------------------------------------------
# The loader and the stage, in the tiny world
# --------------------------------------------------------------------------------------------------------------------


def _shapes(batch):
    return {
        "global": tuple(batch["collated_global_crops"].shape),
        "local": tuple(batch["collated_local_crops"].shape),
        "gram": tuple(batch["collated_gram_teacher_crops"].shape),
        "masks": tuple(batch["collated_masks"].shape),
    }


def _expected(plan, step):
    """The shapes of a micro-batch of 4 images at step `step`'s drawn pair (2 global, 2 local crops each)."""
    g, loc = plan.crop_sizes.pairs[plan.crop_sizes.pair_at(plan.seed, step)]
    t = plan.crop_sizes.gram_teacher_crops_sizes[plan.crop_sizes.pair_at(plan.seed, step)]
    p = plan.model.patch_size
    return {"global": (8, 3, g, g), "local": (8, 3, loc, loc), "gram": (8, 3, t, t), "masks": (8, (g // p) ** 2)}


def test_each_micro_batch_has_its_steps_sizes_and_a_resumed_loader_the_same_crops(curated):
    cfg = _tiny(gram={"enabled": True, "iterations": 2, "highres_teacher_resolution": 1.5},
                train={"grad_accum_steps": 2})  # fmt: skip
    plan = highres_plan(cfg, world_size=1, weights=EXPORT)
    assert plan.batch.global_size == 8 and plan.crop_sizes.gram_teacher_crops_sizes == (42, 63)
    uris = read_manifest_uris(str(curated))

    def loader(start):
        return iter(build_loader(uris=uris, plan=plan, rank=0, world_size=1, start_position=start, num_workers=0))

    full = loader(0)
    batches = [next(full) for _ in range(8)]  # 4 steps of 2 micro-batches
    for i, batch in enumerate(batches):
        assert _shapes(batch) == _expected(plan, i // 2), i
        n_masked = int(batch["collated_masks"].any(-1).sum())
        assert n_masked == 4 and int(batch["n_masked_patches"]) == int(batch["collated_masks"].sum())
    assert len({b["collated_global_crops"].shape[-1] for b in batches}) == 2  # both pairs among the 4 steps
    resumed = loader(2 * plan.batch.global_size)  # a run resumed after step 2
    for batch in batches[4:]:
        again = next(resumed)
        for key in ("collated_global_crops", "collated_local_crops", "collated_gram_teacher_crops", "collated_masks"):
            assert torch.equal(again[key], batch[key]), key


@pytest.fixture
def quiet(monkeypatch, in_process_training):
    monkeypatch.setenv("DINOV2_TRACKING", "off")


def test_gram_anchored_highres_steps_run_at_the_drawn_sizes(curated, tmp_path, quiet, monkeypatch):
    """4 steps of the pretrain_highres stage with two pairs and Gram on, from a seeded pretrain export (about 5 s on
    2 cores): each step's forward sees its drawn pair's crops, masks and Gram teacher crops; the curve logs them."""
    from components.stages.pretrain import run_pretrain_highres
    from components.training.meta_arch import SSLMetaArch
    from components.training.plan import pretrain_plan

    cfg = _tiny(gram={"enabled": True, "iterations": 2, "highres_teacher_resolution": 1.5})
    torch.manual_seed(0)
    start = SSLMetaArch(pretrain_plan(cfg, world_size=1))
    start.export(start.state_dict(), tmp_path / "pretrain", iterations=0)
    seen = []
    forward = SSLMetaArch.forward

    def recording(self, batch, values):
        seen.append(_shapes(batch))
        return forward(self, batch, values)

    monkeypatch.setattr(SSLMetaArch, "forward", recording)
    run_pretrain_highres(cfg, pretrained=str(tmp_path / "pretrain"), curated=str(curated),
                         checkpoints=str(tmp_path / "ck"), out=str(tmp_path / "out"), metrics=str(tmp_path / "m.json"),
                         curve=str(tmp_path / "c.csv"))  # fmt: skip
    plan = highres_plan(cfg, world_size=1, weights=EXPORT)
    assert seen == [_expected(plan, s) for s in range(4)]
    assert len({s["global"] for s in seen}) == 2
    curve = pd.read_csv(tmp_path / "c.csv")
    drawn = [plan.crop_sizes.pairs[plan.crop_sizes.pair_at(cfg.seed, s)][0] for s in range(4)]
    assert curve["global_crops_size"].tolist() == drawn
    assert curve["gram_loss"].notna().all() and np.isfinite(curve["loss"]).all()
    recorded = yaml.safe_load((tmp_path / "out" / "plan.yaml").read_text())["highres"]["crop_sizes"]
    assert recorded == {"pairs": [[28, 14], [42, 21]], "ratios": [0.5, 0.5], "gram_teacher_crops_sizes": [42, 63]}
