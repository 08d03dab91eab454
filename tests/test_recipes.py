"""The recipes of infra/recipes/: each loads over params.yaml and validates with the keys its header tells a user to
set, and the DINOv3 ones plan what the release's configs compute (global batch, learning rate after scaling,
schedule kinds and lengths, teacher temperature and momentum, crops, heads, KoLeo, Gram, the students).

The release's values are written here as its configs state them (dinov3/configs/train/*.yaml in
facebookresearch/dinov3) and its learning rates scaled as its code scales them (`apply_scaling_rules_to_cfg` and
`build_schedulers_v2`: `lr * 4 * sqrt(batch / 1024)`), independently of `components.config.scaled_lr`. No training
runs: plans and schedules are pure functions of the config.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from components.config import PipelineConfig, apply_overrides, read_params, read_recipe, validate_config
from components.model import backbone_from_config
from components.model.families import build_from_fields
from components.training.plan import PhasePlan, WeightsPlan, distill_plan, highres_plan, pretrain_plan

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "infra" / "recipes"

USER_KEYS: dict[str, dict[str, Any]] = {
    "adapt_": {"model.pretrained_weights": "/ckpt/weights.pth", "train.knn_eval_root": "/data/labelled"},
    "distill_": {"distill.teacher_weights": "/ckpt/dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"},
}
"""What each recipe's header tells a user to `--set` besides data.raw (by file-name prefix)."""


def release_lr(lr: float, global_batch: int) -> float:
    """The DINOv3 release's `sqrt_wrt_1024` rule, as its code applies it to `optim.lr` and `schedules.lr.peak`."""
    return lr * 4 * math.sqrt(global_batch / 1024)


def user_keys(name: str) -> dict[str, Any]:
    return next((keys for prefix, keys in USER_KEYS.items() if name.startswith(prefix)), {})


def recipe_config(name: str) -> PipelineConfig:
    """params.yaml with the recipe and its user keys applied, validated."""
    recipe = read_recipe(RECIPES / name)
    return validate_config(apply_overrides(read_params(ROOT / "params.yaml"), {**recipe, **user_keys(name)}), name)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)


# --------------------------------------------------------------------------------------------------------------------
# Every recipe
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_validates_over_params_with_the_keys_it_names(path: Path) -> None:
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    for key in user_keys(path.name):
        assert f"--set {key}=" in header, f"{path.name}'s header does not tell the user to set {key}"
    recipe = read_recipe(path)
    cfg = recipe_config(path.name)
    resolved = cfg.model_dump(mode="json")
    for dotted, value in recipe.items():  # each value reaches the config as written (no key shadowed or renamed)
        if dotted in user_keys(path.name):
            continue
        node: Any = resolved
        for part in dotted.split("."):
            node = node[part]
        want = list(value) if isinstance(value, tuple | list) else value
        assert node == want or (isinstance(node, list) and node == list(want)), (path.name, dotted, node, value)


def test_a_recipe_key_that_params_does_not_have_is_refused(tmp_path: Path) -> None:
    from components.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES / "dinov3_vit7b16.yaml").read_text() + "gram.teacher_crops_size: 512\n")
    with pytest.raises(ConfigError, match=r"gram\.teacher_crops_size: unknown key"):
        validate_config(apply_overrides(read_params(ROOT / "params.yaml"), read_recipe(bad)))


# --------------------------------------------------------------------------------------------------------------------
# DINOv3 ViT-7B/16: the release's three runs as the pretrain stage's two phases and pretrain_highres
# --------------------------------------------------------------------------------------------------------------------

RANKS_7B = 256  # 32 nodes of 8 GPUs (the release's README)


@pytest.fixture(scope="module")
def vit7b() -> PipelineConfig:
    return recipe_config("dinov3_vit7b16.yaml")


@pytest.fixture(scope="module")
def vit7b_phases(vit7b, tmp_path_factory) -> list[PhasePlan]:
    from components.stages.pretrain import pretrain_phases

    root = tmp_path_factory.mktemp("7b")
    main, gram = pretrain_phases(vit7b, None, root / "checkpoints", root / "out", RANKS_7B)
    high = highres_plan(vit7b, world_size=RANKS_7B, weights=WeightsPlan("export", "models/pretrain", "digest"))
    return [main.plan, gram.plan, high]


def test_the_7b_network_heads_and_crops_are_the_releases(vit7b_phases) -> None:
    main, gram, high = vit7b_phases
    for plan in (main, gram, high):
        m = plan.model
        assert (m.arch, m.patch_size, m.num_register_tokens, m.drop_path_rate, m.layerscale_init) == (
            "dinov3_vit7b16", 16, 4, 0.4, 1e-5)  # fmt: skip
        d, i = plan.dino, plan.ibot
        assert (d.head_n_prototypes, d.head_bottleneck_dim, d.head_hidden_dim, d.head_nlayers) == (262144, 512, 8192, 3)
        assert i.separate_head and (i.head_n_prototypes, i.head_bottleneck_dim, i.head_hidden_dim) == (98304, 384, 4096)
        assert (i.mask_sample_probability, tuple(i.mask_ratio_min_max)) == (0.5, (0.1, 0.5))
        assert plan.teacher.centering == "sinkhorn_knopp"
        o = plan.optim
        assert (o.clip_grad, o.betas, o.layerwise_decay, o.patch_embed_lr_mult) == (30.0, (0.9, 0.99), 0.98, 0.2)
        c = plan.crops
        assert c.local_crops_number == 8 and tuple(c.global_crops_scale) == (0.32, 1.0)
        assert tuple(c.local_crops_scale) == (0.05, 0.32)
        assert (tuple(c.color_jitter), c.color_jitter_prob, c.grayscale_prob, tuple(c.blur_sigma), c.solarize_prob) == (
            (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, (0.1, 2.0), 0.2)  # fmt: skip
    assert (main.crops.global_crops_size, main.crops.local_crops_size) == (256, 112)
    assert (gram.crops.global_crops_size, gram.crops.local_crops_size) == (256, 112)
    assert (high.crops.global_crops_size, high.crops.local_crops_size) == (512, 112)  # the first of the release's mix
    mix = high.crop_sizes
    assert mix.pairs == ((512, 112), (768, 112), (768, 160), (768, 224), (768, 336))
    assert mix.ratios == (0.3, 0.3, 0.3, 0.05, 0.05)
    with torch.device("meta"):
        backbone = backbone_from_config(main.model)
    assert sum(p.numel() for p in backbone.parameters()) == pytest.approx(6.716e9, rel=1e-3)  # "6,716M" (its README)


def test_the_7b_main_phase_is_the_releases_pretraining_run(vit7b_phases) -> None:
    main, s = vit7b_phases[0], vit7b_phases[0].schedule
    assert main.batch.global_size == 16 * RANKS_7B == 4096 and main.gram is None
    assert s.kind == "constant" and close(s.lr, release_lr(5.0e-5, 4096))  # schedules.lr.peak
    assert (s.total_steps, s.warmup_steps, s.freeze_last_layer_steps) == (1000 * 1000, 100 * 1000, 5 * 1000)
    assert (s.weight_decay, s.weight_decay_end, s.weight_decay_warmup_steps) == (0.04, 0.04, 0)
    assert (s.momentum, s.final_momentum, s.momentum_warmup_steps) == (0.994, 0.994, 0)
    assert (s.warmup_teacher_temp, s.teacher_temp, s.teacher_temp_warmup_steps) == (0.04, 0.07, 100 * 1000)
    at = main.schedules().at
    assert at(0)["lr"] == 0.0 and close(at(50_000)["lr"], release_lr(5.0e-5, 4096) / 2)  # linear from 0 ...
    assert close(at(100_000)["lr"], release_lr(5.0e-5, 4096)) and close(at(999_999)["lr"], release_lr(5.0e-5, 4096))
    assert at(4_999)["last_layer_lr"] == 0.0 and at(5_000)["last_layer_lr"] > 0.0
    assert at(0)["teacher_temp"] == 0.04 and close(at(100_000)["teacher_temp"], 0.07)
    assert {at(k)["weight_decay"] for k in (0, 500_000)} == {0.04} and {at(k)["momentum"] for k in (0, 999_999)} == {
        0.994}  # fmt: skip
    # KoLeo: a group of 16 is one rank's batch of 16, the release's per-rank KoLeo of this run.
    assert main.dino.koleo_distributed and main.dino.koleo_group_size == main.batch.per_rank == 16


def test_the_7b_gram_phase_is_the_releases_gram_run(vit7b_phases) -> None:
    gram, s = vit7b_phases[1], vit7b_phases[1].schedule
    assert gram.phase == "gram" and gram.weights.kind == "phase" and gram.batch.global_size == 4096
    assert s.total_steps == 1200 * 1000 - 1000 * 1000 and s.warmup_steps == 0
    assert close(s.lr, release_lr(3.0e-5, 4096)) and close(gram.schedules().at(0)["lr"], release_lr(3.0e-5, 4096))
    assert (s.momentum, s.final_momentum, s.weight_decay, s.weight_decay_end) == (0.999, 0.999, 0.04, 0.04)
    assert (s.warmup_teacher_temp, s.teacher_temp, s.freeze_last_layer_steps) == (0.07, 0.07, 0)
    g = gram.gram
    assert (g.teacher_crops_size, g.teacher_no_distortions, g.tokens, g.img_level, g.remove_neg) == (
        512, True, "all", True, False)  # fmt: skip
    assert g.teacher_weights is None  # the main phase's final EMA teacher
    # loss_weight_schedule: 0, 0 for 1000 epochs, then a 1-epoch half cosine to 2.0 (the phase starts at step 1M)
    ramp = 2.0 + (0.0 - 2.0) * (1 + math.cos(math.pi * 500 / 999)) / 2  # its linspace(0, pi, 1000) at index 500
    assert g.weight(0) == 0.0 and close(g.weight(500), ramp) and g.weight(999) == g.weight(150_000) == 2.0
    # it_first_update 1010000, update_frequency 10000, max_updates 3: after steps 1.01M, 1.02M, 1.03M
    assert [k + 1 for k in range(s.total_steps) if g.refresh_after(k)] == [10_000, 20_000, 30_000]


def test_the_7b_highres_phase_is_the_releases_high_res_run(vit7b_phases) -> None:
    high, s = vit7b_phases[2], vit7b_phases[2].schedule
    assert high.batch.per_rank == 8 and high.batch.global_size == 8 * RANKS_7B == 2048
    assert s.total_steps == 30 * 1000 and s.warmup_steps == 10 * 1000  # cosine_epochs 10 (a linear ramp here)
    assert close(s.lr, release_lr(1.25e-5, 2048))  # schedules.lr.end
    assert (s.weight_decay_end, s.teacher_temp, s.warmup_teacher_temp) == (0.04, 0.07, 0.07)
    assert s.freeze_last_layer_steps == 0
    g = high.gram
    assert g.teacher_crops_size == 768 and g.weight(0) == g.weight(29_999) == 1.5 and g.refresh_period == 0
    assert high.crop_sizes.gram_teacher_crops_sizes == (768, 1152, 1152, 1152, 1152)  # 1.5 x each global side
    # koleo_distributed_loss_group_size 16: two ranks' batches of 8
    assert high.dino.koleo_distributed and high.dino.koleo_group_size == 2 * high.batch.per_rank


def test_the_7b_values_the_header_says_cannot_be_expressed(vit7b_phases) -> None:
    """The recipe's header lists what differs from the release; these are the plans' values it names. A change to
    the plans that makes one expressible fails here: the recipe (and its header) should then take the release's."""
    main, gram, high = vit7b_phases
    for plan in vit7b_phases:  # the release: 1 in the main run, 1 -> 0.5 in the Gram run, 0.5 in the high-res run
        at = plan.schedules().at
        assert at(0)["dino_local_loss_weight"] == at(plan.schedule.total_steps - 1)["dino_local_loss_weight"] == 1.0
    assert high.schedules().at(0)["momentum"] == 0.994  # the release: 0.999


# --------------------------------------------------------------------------------------------------------------------
# DINOv3 ViT-L/16 on ImageNet-1k (vitl_im1k_lin834.yaml) and its multi-distillation test
# --------------------------------------------------------------------------------------------------------------------

RANKS_IM1K = 32  # 4 nodes of 8 GPUs: "a total batch size of 2048 (64/gpu, 4 nodes here)"


@pytest.fixture(scope="module")
def im1k() -> PipelineConfig:
    return recipe_config("dinov3_vitl16_im1k.yaml")


def test_the_im1k_pretraining_is_vitl_im1k_lin834(im1k) -> None:
    plan = pretrain_plan(im1k, world_size=RANKS_IM1K)
    s, m = plan.schedule, plan.model
    assert plan.batch.global_size == 2048 and plan.gram is None and im1k.pipeline.pretrained_model == "models/pretrain"
    assert (m.arch, m.patch_size, m.num_register_tokens, m.drop_path_rate, m.layerscale_init) == (
        "dinov3_vitl16", 16, 0, 0.3, 1e-5)  # fmt: skip
    assert s.kind == "cosine" and close(s.lr, release_lr(0.001, 2048)) and s.min_lr == 1e-6
    assert (s.total_steps, s.warmup_steps, s.freeze_last_layer_steps) == (100 * 1250, 10 * 1250, 1250)
    assert (s.weight_decay, s.weight_decay_end, s.momentum, s.final_momentum) == (0.04, 0.4, 0.992, 1.0)
    assert (s.warmup_teacher_temp, s.teacher_temp, s.teacher_temp_warmup_steps) == (0.04, 0.07, 30 * 1250)
    at = plan.schedules().at
    assert close(at(12_499)["lr"], release_lr(0.001, 2048)) and at(0)["lr"] == 0.0  # the release's linspace warm-up
    assert close(at(125_000 - 1)["lr"], 1e-6 + 0.5 * (release_lr(0.001, 2048) - 1e-6) * (1 + math.cos(math.pi * (
        112_499 / 112_500))))  # fmt: skip
    o, d, i, c = plan.optim, plan.dino, plan.ibot, plan.crops
    assert (o.clip_grad, o.betas, o.layerwise_decay, o.patch_embed_lr_mult) == (3.0, (0.9, 0.999), 0.9, 0.2)
    assert (d.head_n_prototypes, d.head_bottleneck_dim, d.head_hidden_dim) == (65536, 256, 2048)
    assert d.koleo_loss_weight == 0.1
    assert not d.koleo_distributed and i.separate_head and (i.head_n_prototypes, i.head_hidden_dim) == (65536, 2048)
    assert (c.global_crops_size, c.local_crops_size, c.local_crops_number) == (224, 96, 8)
    with torch.device("meta"):
        backbone = backbone_from_config(plan.model)
    assert backbone.cfg.n_storage_tokens == 0 and backbone.cfg.embed_dim == 1024 and len(backbone.blocks) == 24


def test_the_im1k_distillation_is_the_multi_distillation_test(im1k) -> None:
    teacher = pretrain_plan(im1k, world_size=RANKS_IM1K).model
    plan = distill_plan(im1k, world_size=RANKS_IM1K, teacher=teacher, weights=WeightsPlan("export", "m", "d"))
    s = plan.schedule
    assert plan.students == ("dinov3_vits16", "dinov3_vitb16") and plan.teacher_model.arch == "dinov3_vitl16"
    assert s.kind == "cosine" and close(s.lr, release_lr(0.001, 2048)) and s.total_steps == 100 * 1250
    assert (s.warmup_steps, s.momentum, s.final_momentum, s.teacher_temp) == (10 * 1250, 0.992, 1.0, 0.07)
    with torch.device("meta"):
        students = [build_from_fields(name, **plan.model.model_dump(exclude={"arch"})) for name in plan.students]
    geometry = [(b.cfg.embed_dim, b.cfg.n_storage_tokens, b.cfg.patch_size) for b in students]
    assert geometry == [(384, 0, 16), (768, 0, 16)]


# --------------------------------------------------------------------------------------------------------------------
# Distillation of a released DINOv3 ViT into a ViT-S/16 and a ConvNeXt-Tiny
# --------------------------------------------------------------------------------------------------------------------

RANKS_DISTILL = 128  # "4096 for 16 nodes" (multi_distillation_convnext_test.yaml)


@pytest.fixture(scope="module")
def distill_cfg() -> PipelineConfig:
    return recipe_config("distill_dinov3_vits16_convnext_tiny.yaml")


def test_the_distillation_is_the_releases_convnext_recipe(distill_cfg) -> None:
    cfg = distill_cfg
    assert cfg.distill.teacher_arch is None and cfg.model.arch == "dinov3_vitl16"  # the teacher's preset
    plan = distill_plan(cfg, world_size=RANKS_DISTILL, teacher=cfg.model, weights=WeightsPlan("file", "t.pth", "d"))
    s = plan.schedule
    assert plan.students == ("dinov3_vits16", "dinov3_convnext_tiny") and plan.teacher_model.arch == "dinov3_vitl16"
    assert plan.batch.global_size == 32 * RANKS_DISTILL == 4096
    assert s.kind == "cosine" and close(s.lr, release_lr(2e-4, 4096)) and close(s.min_lr, release_lr(1e-6, 4096))
    assert (s.total_steps, s.warmup_steps, s.freeze_last_layer_steps) == (500 * 1250, 80 * 1250, 1250)
    assert (s.weight_decay, s.weight_decay_end, s.momentum, s.final_momentum) == (0.04, 0.2, 0.994, 1.0)
    assert (s.warmup_teacher_temp, s.teacher_temp) == (0.07, 0.07)
    o, d, i, c = plan.optim, plan.dino, plan.ibot, plan.crops
    assert (o.clip_grad, o.layerwise_decay, o.betas) == (3.0, 1.0, (0.9, 0.999))
    assert (d.head_n_prototypes, d.head_bottleneck_dim, d.head_hidden_dim) == (65536, 256, 2048)
    assert not d.koleo_distributed
    assert i.separate_head and (i.head_n_prototypes, i.head_hidden_dim) == (65536, 2048)
    assert i.mask_sample_probability == 0.0 and plan.model.drop_path_rate == 0.0  # distillation: no masking, no drop
    assert (c.global_crops_size, c.local_crops_size, c.local_crops_number) == (256, 112, 8)


def test_the_distillation_students_take_the_teachers_patch_grid(distill_cfg) -> None:
    plan = distill_plan(distill_cfg, world_size=1, teacher=distill_cfg.model, weights=WeightsPlan("file", "t", "d"))
    vit, convnext = (build_from_fields(name, **plan.model.model_dump(exclude={"arch"})) for name in plan.students)
    images = torch.zeros(1, 3, 64, 96)
    with torch.no_grad():
        grids = [b.eval().forward_features(images)["x_norm_patchtokens"].shape[1] for b in (vit, convnext)]
    assert grids == [(64 // 16) * (96 // 16)] * 2  # a ViT/16's and the ConvNeXt's pseudo-patch grid alike
    assert vit.cfg.n_storage_tokens == 4 and sum(p.numel() for p in vit.parameters()) == pytest.approx(21.6e6, rel=0.01)


# --------------------------------------------------------------------------------------------------------------------
# Continued pretraining of dinov3_vitl16 with Gram anchoring
# --------------------------------------------------------------------------------------------------------------------


def test_the_dinov3_adaptation_holds_the_releases_continuing_schedules() -> None:
    cfg = recipe_config("adapt_dinov3_vitl16_gram.yaml")
    plan = pretrain_plan(cfg, world_size=64, weights=WeightsPlan("file", "w.pth", "d"))
    s, at = plan.schedule, plan.schedules().at
    assert s.kind == "constant" and (s.momentum, s.final_momentum, s.weight_decay, s.weight_decay_end) == (
        0.999, 0.999, 0.04, 0.04)  # fmt: skip
    assert s.teacher_temp_warmup_steps == 0 and at(0)["teacher_temp"] == at(s.total_steps - 1)["teacher_temp"] == 0.07
    assert close(at(2 * 1250)["lr"], at(s.total_steps - 1)["lr"])  # held after the warm-up
    local = [at(k)["dino_local_loss_weight"] for k in (0, 624, 1249, 10_000)]  # 1 -> 0.5 over the first 1250 steps
    assert local[0] == 1.0 and 0.5 < local[1] < 1.0 and local[2] == local[3] == 0.5
    assert plan.ibot.separate_head and plan.dino.head_hidden_dim == plan.ibot.head_hidden_dim == 2048
    g = plan.gram
    assert g.weight(0) == 0.0 and g.weight(999) == 2.0 and g.teacher_crops_size == 512 and g.teacher_weights is None
