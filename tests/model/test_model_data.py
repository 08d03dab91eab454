"""Masking, multi-crop augmentation and collate tests: mask ratios and shapes, crop sizes, the collated batch."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from components.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MaskingGenerator,
    MultiCropAugmentation,
    MultiCropCollate,
    augmentation_from_config,
    collate_from_config,
    eval_transform,
)


def test_mask_generator_counts_and_blocks():
    gen = MaskingGenerator((16, 16), max_num_patches=128, rng=random.Random(0))
    assert gen(0).shape == (16, 16) and not gen(0).any()
    for target in (10, 50, 100, 128):
        for _ in range(20):
            mask = gen(target)
            assert mask.dtype == torch.bool and mask.shape == (16, 16)
            assert 0 < mask.sum() <= target
    # a block-wise mask: most targets are met closely
    hits = [gen(77).sum().item() for _ in range(50)]
    assert sum(h >= 0.8 * 77 for h in hits) >= 40
    rect = torch.zeros(6, 10, dtype=torch.bool)
    added = MaskingGenerator((6, 10), rng=random.Random(1))._add_block(rect, 20)  # one block: a filled rectangle
    rows, cols = rect.nonzero(as_tuple=True)
    assert added == rect.sum() >= 1
    assert rect.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a filled rectangle


def fake_sample(n_local=3, g=28, s=14, target=0):
    crops = {
        "global_crops": [torch.randn(3, g, g), torch.randn(3, g, g)],
        "local_crops": [torch.randn(3, s, s) for _ in range(n_local)],
    }
    crops["global_crops_teacher"] = crops["global_crops"]
    return crops, target


def test_collate_layout_masks_and_weights():
    B, grid = 8, 16
    samples = [fake_sample(g=grid * 14, s=42) for _ in range(B)]
    collate = MultiCropCollate(grid, mask_ratio_min_max=(0.1, 0.5), mask_probability=0.5, rng=random.Random(0))
    out = collate(samples)
    assert out["collated_global_crops"].shape == (2 * B, 3, 224, 224)
    assert out["collated_local_crops"].shape == (3 * B, 3, 42, 42)
    # crop-major: row c * B + i is crop c of image i
    assert torch.equal(out["collated_global_crops"][B + 2], samples[2][0]["global_crops"][1])
    assert torch.equal(out["collated_local_crops"][2 * B + 5], samples[5][0]["local_crops"][2])

    masks = out["collated_masks"]
    assert masks.shape == (2 * B, grid * grid) and masks.dtype == torch.bool
    per_crop = masks.sum(-1)
    assert (per_crop > 0).sum() == B  # half of the 2 B global crops are masked
    assert per_crop.max() <= 0.5 * 256 and per_crop[per_crop > 0].min() >= 1
    # the ratios spread over [0.1, 0.5]: the masked crops' counts are spread too
    assert per_crop.float().max() > 2 * per_crop[per_crop > 0].float().min()
    M = int(masks.sum())
    assert out["n_masked_patches"].tolist() == [M] and out["mask_indices_list"].shape == (M,)
    assert torch.equal(masks.flatten()[out["mask_indices_list"]], torch.ones(M, dtype=torch.bool))
    torch.testing.assert_close(out["masks_weight"].sum(), torch.tensor(float(B)))  # 1 per masked image
    assert out["upperbound"] >= M
    assert out["n_global_crops"] == 2 and out["n_local_crops"] == 3


def test_collate_dtype_plain_dicts_and_no_locals():
    collate = MultiCropCollate((2, 3), mask_probability=0.0, dtype=torch.bfloat16)
    out = collate([fake_sample(n_local=0, g=14)[0] for _ in range(2)])
    assert out["collated_global_crops"].dtype == torch.bfloat16
    assert out["collated_local_crops"].numel() == 0
    assert out["collated_masks"].shape == (4, 6) and not out["collated_masks"].any()
    assert out["n_masked_patches"].item() == 0 and out["masks_weight"].numel() == 0
    with pytest.raises(ValueError, match="grid"):
        MultiCropCollate(16, mask_generator=MaskingGenerator(14))


def test_multicrop_augmentation_shapes_and_normalisation():
    torch.manual_seed(0)
    aug = MultiCropAugmentation(local_crops_number=4, global_crops_size=56, local_crops_size=28)
    image = Image.fromarray((torch.rand(80, 64, 3) * 255).to(torch.uint8).numpy())
    out = aug(image)
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 4
    assert out["global_crops_teacher"] is out["global_crops"]
    assert all(c.shape == (3, 56, 56) and c.dtype == torch.float32 for c in out["global_crops"])
    assert all(c.shape == (3, 28, 28) for c in out["local_crops"])
    assert type(out["local_crops"][0]) is torch.Tensor  # plain tensors, not tv_tensors
    assert -2.5 < out["global_crops"][0].mean() < 2.5
    # tensors in, uint8 or float in [0, 1]
    assert aug(torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8))["global_crops"][1].shape == (3, 56, 56)
    assert aug(torch.rand(3, 40, 50))["local_crops"][0].shape == (3, 28, 28)
    # default sizes, as the paper: 224 and 98
    default = MultiCropAugmentation(local_crops_number=1)(image)
    assert default["global_crops"][0].shape == (3, 224, 224) and default["local_crops"][0].shape == (3, 98, 98)


def unnormalised(crops: list[torch.Tensor]) -> list[torch.Tensor]:
    """Crops back in [0, 1] RGB (the augmentation's ImageNet normalisation undone)."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return [c * std + mean for c in crops]


def is_grey(crop: torch.Tensor) -> bool:
    return torch.allclose(crop[0], crop[1], atol=1e-5) and torch.allclose(crop[1], crop[2], atol=1e-5)


def test_photometric_strengths_are_arguments():
    image = Image.new("RGB", (40, 40), color=(200, 40, 40))  # one colour: crops, resizes and blurs keep it
    off = MultiCropAugmentation(
        local_crops_number=2, global_crops_size=28, local_crops_size=14, color_jitter=(0.0, 0.0, 0.0, 0.0),
        grayscale_prob=0.0, solarize_prob=0.0,
    )  # fmt: skip
    expected = torch.tensor([200, 40, 40], dtype=torch.float32)[:, None, None] / 255
    for _ in range(10):
        out = off(image)
        crops = unnormalised(out["global_crops"] + out["local_crops"])
        assert all(torch.allclose(c, expected, atol=1e-5) for c in crops)
    grey = MultiCropAugmentation(local_crops_number=2, global_crops_size=28, local_crops_size=14, grayscale_prob=1.0)
    assert all(is_grey(c) for c in unnormalised(grey(image)["local_crops"]))
    torch.manual_seed(0)
    jittered = MultiCropAugmentation(local_crops_number=8, global_crops_size=28, local_crops_size=14)(image)
    assert any(not torch.allclose(c, expected, atol=0.02) for c in unnormalised(jittered["local_crops"]))


def test_augmentation_and_collate_compose():
    aug = MultiCropAugmentation(local_crops_number=2, global_crops_size=28, local_crops_size=14)
    images = [Image.new("RGB", (40, 30), color=(i * 40, 100, 200)) for i in range(3)]
    batch = MultiCropCollate(2)([(aug(im), 0) for im in images])
    assert batch["collated_global_crops"].shape == (6, 3, 28, 28)
    assert batch["collated_local_crops"].shape == (6, 3, 14, 14)


def test_eval_transform():
    t = eval_transform(112)
    x = t(Image.new("RGB", (300, 200), color=(10, 200, 30)))
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32


def test_builders_from_project_config():
    from components.config import PipelineConfig

    cfg = PipelineConfig.model_validate({"crops": {"local_crops_number": 2, "global_crops_size": 56}})
    aug = augmentation_from_config(cfg.crops)
    collate = collate_from_config(cfg.crops, cfg.ibot, patch_size=14)
    batch = collate([(aug(Image.new("RGB", (64, 64))), 0) for _ in range(2)])
    assert batch["collated_global_crops"].shape == (4, 3, 56, 56)
    assert batch["collated_local_crops"].shape == (4, 3, 98, 98)
    assert batch["collated_masks"].shape == (4, 16)
    # the photometric keys reach the augmentation: every crop grey
    grey_cfg = PipelineConfig.model_validate({"crops": {"local_crops_number": 1, "grayscale_prob": 1.0}})
    crops = augmentation_from_config(grey_cfg.crops)(Image.new("RGB", (64, 64), color=(200, 40, 40)))["local_crops"]
    assert is_grey(unnormalised(crops)[0])
