"""The Mask2Former protocol's parts: deformable attention against a direct loop, the matcher against brute force, the
losses on worked examples, shapes through the adapter, the schedule, the crops, the sliding window, and the protocol
on the tiny world and on an ADE20K-style set."""

from __future__ import annotations

import json
import math
from itertools import permutations
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from components.config import ConfigError, EvaluateConfig, load_config, read_recipe
from components.evaluation.datasets import load_eval_datasets
from components.evaluation.mask2former.adapter import AdapterConfig, ViTAdapter, block_groups
from components.evaluation.mask2former.criterion import (
    Target,
    bce_loss,
    class_loss,
    dice_loss,
    hungarian_match,
    matching_cost,
    point_sample,
    semantic_targets,
    stage_loss,
)
from components.evaluation.mask2former.deform_attn import MSDeformAttn, ms_deform_attn, reference_points
from components.evaluation.mask2former.head import Mask2Former, Mask2FormerConfig, semantic_probs
from components.evaluation.mask2former.protocol import poly_lr, slide_inference, train_crop, windows
from components.evaluation.segmentation import run_segmentation
from components.model import build_backbone
from tests.evaluation.eval_fixtures import TINY_M2F

ROOT = Path(__file__).resolve().parents[2]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------------------------
# Multi-scale deformable attention
# --------------------------------------------------------------------------------------------------------------------


def _bilinear_zero_padded(level: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Value of a (h, w, Dh) map at normalised (x, y), pixel centres at (j + 0.5) / w, zero outside."""
    h, w, _ = level.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(level.shape[-1], dtype=level.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * level[yy, xx]
    return out


def _deform_attn_loop(value, shapes, locations, weights) -> torch.Tensor:
    """Multi-scale deformable attention written out: every image, query, head, level and point."""
    B, _, M, Dh = value.shape
    _, Q, _, L, P, _ = locations.shape
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    out = torch.zeros(B, Q, M, Dh, dtype=value.dtype)
    for b in range(B):
        for q in range(Q):
            for m in range(M):
                for lv, (h, w) in enumerate(shapes):
                    level = value[b, starts[lv] : starts[lv + 1], m].reshape(h, w, Dh)
                    for p in range(P):
                        x, y = locations[b, q, m, lv, p].tolist()
                        out[b, q, m] += weights[b, q, m, lv, p] * _bilinear_zero_padded(level, x, y)
    return out.reshape(B, Q, M * Dh)


def test_deform_attn_equals_a_direct_loop() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (2, 3), (1, 2)]  # non-square levels
    B, Q, M, Dh, P = 2, 4, 2, 3, 3
    value = torch.randn(B, sum(h * w for h, w in shapes), M, Dh, generator=g, dtype=torch.float64)
    locations = torch.rand(B, Q, M, len(shapes), P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2  # some outside
    weights = torch.rand(B, Q, M, len(shapes), P, generator=g, dtype=torch.float64)
    fast = ms_deform_attn(value, shapes, locations, weights)
    assert fast.shape == (B, Q, M * Dh)
    assert torch.allclose(fast, _deform_attn_loop(value, shapes, locations, weights), atol=1e-12)
    with pytest.raises(ValueError, match="shapes"):
        ms_deform_attn(value, shapes[:2], locations, weights)
    # bf16 values (autocast on a GPU) are sampled in float32 and returned in bf16
    half = ms_deform_attn(value.bfloat16(), shapes, locations.bfloat16(), weights.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.allclose(half.double(), fast, atol=0.1)


def test_deform_attn_module_offsets_are_pixels_of_each_level() -> None:
    """With identity projections, one head, one point offset by one pixel to the right (x) of each query's pixel
    centre, the module returns the value of the right-hand neighbour, on a non-square map (x scaled by w, y by h)."""
    attn = MSDeformAttn(4, num_levels=1, num_heads=1, num_points=1).double()
    with torch.no_grad():
        for proj in (attn.value_proj, attn.output_proj):
            proj.weight.copy_(torch.eye(4))
            proj.bias.zero_()
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0]))  # +1 px in x, 0 in y
    h, w = 2, 3
    value = torch.randn(1, h * w, 4, dtype=torch.float64)
    ref = reference_points([(h, w)]).double()[None, :, None]  # (1, 6, 1, 2)
    out = attn(torch.zeros(1, h * w, 4, dtype=torch.float64), ref, value, [(h, w)])
    grid = value.view(h, w, 4)
    expected = torch.cat([grid[:, 1:], torch.zeros(h, 1, 4, dtype=torch.float64)], dim=1).reshape(1, h * w, 4)
    assert torch.allclose(out, expected, atol=1e-6)  # reference points are float32


# --------------------------------------------------------------------------------------------------------------------
# Matching and losses
# --------------------------------------------------------------------------------------------------------------------


def _naive_cost(class_logits, mask_points, labels, target_points) -> np.ndarray:
    """Mask2Former's matching cost pair by pair: 2 (-p(c)) + 5 mean BCE + 5 dice on the same points."""
    Q, T = len(class_logits), len(labels)
    cost = np.zeros((Q, T))
    for q in range(Q):
        p_class = torch.softmax(class_logits[q].double(), 0)
        s = torch.sigmoid(mask_points[q].double())
        for t in range(T):
            y = target_points[t].double()
            bce = -(y * torch.log(s) + (1 - y) * torch.log(1 - s)).mean()
            dice = 1 - (2 * (s * y).sum() + 1) / (s.sum() + y.sum() + 1)
            cost[q, t] = 2 * -p_class[labels[t]] + 5 * bce + 5 * dice
    return cost


@pytest.mark.parametrize("seed", range(6))
def test_matcher_finds_the_brute_force_optimum(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    B, C, h, w, K = 2, 5, 6, 8, 40
    Q = 3 + seed % 3
    class_logits = torch.randn(B, Q, C + 1, generator=g) * 2
    mask_logits = torch.randn(B, Q, h, w, generator=g) * 3
    targets = []
    for b in range(B):
        T = 1 + (seed + b) % min(Q, 3)
        labels = torch.randperm(C, generator=g)[:T]
        targets.append(Target(labels, (torch.rand(T, 12, 16, generator=g) > 0.5).float()))
    points = torch.rand(B, K, 2, generator=g)
    matches = hungarian_match(class_logits, mask_logits, targets, num_points=K, generator=g, points=points)
    for b, ((rows, cols), target) in enumerate(zip(matches, targets, strict=True)):
        pred = point_sample(mask_logits[b : b + 1], points[b : b + 1])[0]  # (Q, K)
        tgt = point_sample(target.masks[:, None], points[b : b + 1].expand(len(target.labels), -1, -1))[:, 0]
        cost = _naive_cost(class_logits[b], pred, target.labels, tgt)
        assert np.allclose(matching_cost(class_logits[b], pred, target.labels, tgt).numpy(), cost, atol=1e-5)
        T = len(target.labels)
        best = min(sum(cost[r, t] for t, r in enumerate(perm)) for perm in permutations(range(Q), T))
        assert sorted(cols.tolist()) == list(range(T)) and len(set(rows.tolist())) == T
        assert cost[rows.numpy(), cols.numpy()].sum() == pytest.approx(best, abs=1e-5)


def test_semantic_targets_one_mask_per_class_present() -> None:
    mask = torch.tensor([[0, 1], [255, 1]])
    target = semantic_targets(mask, ignore_index=255)
    assert target.labels.tolist() == [0, 1]
    assert target.masks.tolist() == [[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]  # ignored: in no mask


def test_mask_losses_worked_examples() -> None:
    logits = torch.zeros(2, 4)  # sigmoid 0.5 everywhere
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # dice per mask: 1 - (2 * 0.5 * n + 1) / (0.5 * 4 + n + 1): n = 2 -> 0.4, n = 1 -> 1 - 2 / 4 = 0.5
    assert dice_loss(logits, targets, num_masks=2).item() == pytest.approx((0.4 + 0.5) / 2)
    assert bce_loss(logits, targets, num_masks=4).item() == pytest.approx(2 * math.log(2) / 4)
    confident = torch.tensor([[20.0, 20.0, -20.0, -20.0]])
    assert bce_loss(confident, targets[:1], num_masks=1).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(confident, targets[:1], num_masks=1).item() == pytest.approx(0.0, abs=1e-6)


def test_class_loss_weights_no_object() -> None:
    """Query 0 matched to class 0, query 1 unmatched ("no object" = index 2, weight 0.1): the weighted mean."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    matches = [(torch.tensor([0]), torch.tensor([0]))]
    targets = [Target(torch.tensor([0]), torch.ones(1, 2, 2))]
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    ce1 = -math.log(math.e / (math.e + 2))
    assert class_loss(logits, matches, targets).item() == pytest.approx((ce0 + 0.1 * ce1) / 1.1, rel=1e-6)


def test_stage_loss_prefers_the_right_masks() -> None:
    """The same class logits; masks equal to the targets (logit +-8) lose less than swapped ones, through the
    matching: the matcher pairs each query with the target its mask fits."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 32, 32)  # large enough that the few points on the halves' border weigh little
    masks[0, :, :16], masks[1, :, 16:] = 1.0, 1.0
    targets = [Target(torch.tensor([1, 3]), masks)]
    class_logits = torch.zeros(1, 2, 5)
    class_logits[0, 0, 1], class_logits[0, 1, 3] = 6.0, 6.0
    good = stage_loss(class_logits, (masks * 16 - 8)[None], targets, num_points=256, generator=g)
    swapped = stage_loss(class_logits, (masks.flip(0) * 16 - 8)[None], targets, num_points=256, generator=g)
    assert good["ce"] < 0.05 and good["dice"] < 0.1
    # The matcher pairs by mask (5 BCE + 5 dice outweigh 2 p(c)): the masks still fit, the classes no longer do.
    assert swapped["mask"] < 1.0 and swapped["dice"] < 0.1 and swapped["ce"] > 1.0


def test_semantic_probs_is_the_mask_class_product() -> None:
    logits = torch.log(torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]]))  # 2 queries, 2 classes + no object
    masks = torch.tensor([[[[0.0]], [[2.0]]]])  # (1, 2, 1, 1)
    s = semantic_probs(logits, masks, (1, 1))[0, :, 0, 0]
    sig = torch.sigmoid(torch.tensor([0.0, 2.0]))
    assert torch.allclose(s, torch.stack([0.6 * sig[0] + 0.2 * sig[1], 0.3 * sig[0] + 0.2 * sig[1]]), atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Adapter and head
# --------------------------------------------------------------------------------------------------------------------


def _half(n: int) -> int:
    return (n + 1) // 2  # a 3x3 stride-2 conv (or max-pool) with padding 1


@pytest.mark.parametrize("size", [(56, 56), (42, 70)])
@pytest.mark.parametrize("registers", [0, 4])
def test_adapter_and_head_shapes(size: tuple[int, int], registers: int) -> None:
    torch.manual_seed(0)
    backbone = build_backbone("vit_test", num_register_tokens=registers).eval()
    adapter = ViTAdapter(backbone, AdapterConfig(inplanes=8))
    H, W = size
    x = torch.randn(2, 3, H, W)
    pyramid = adapter(x)
    h, w = _half(_half(H)), _half(_half(W))
    expected = [(h, w)]
    for _ in range(3):
        h, w = _half(h), _half(w)
        expected.append((h, w))
    assert [tuple(f.shape) for f in pyramid] == [(2, 64, *s) for s in expected]
    model = Mask2Former(adapter, Mask2FormerConfig(num_classes=5, hidden_dim=32, num_queries=7, decoder_layers=4,
                                                   encoder_layers=1, ffn_dim=64))  # fmt: skip
    outputs = model(x)
    assert len(outputs) == 5  # before the first layer and after each of 4
    for logits, masks in outputs:
        assert logits.shape == (2, 7, 6) and masks.shape == (2, 7, *expected[0])


def test_backbone_frozen_and_gradients_reach_the_first_injector() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("vit_test")
    model = Mask2Former(ViTAdapter(backbone, AdapterConfig(inplanes=8)),
                        Mask2FormerConfig(num_classes=3, hidden_dim=32, num_queries=4, decoder_layers=3,
                                          encoder_layers=1, ffn_dim=64))  # fmt: skip
    model.train()
    assert not backbone.training  # the frozen backbone stays in eval mode
    assert block_groups(2, 4) == [(0, 0), (1, 1)] and block_groups(12, 4) == [(0, 2), (3, 5), (6, 8), (9, 11)]
    assert block_groups(40, 4) == [(0, 9), (10, 19), (20, 29), (30, 39)]
    logits, masks = model(torch.randn(2, 3, 28, 42))[-1]
    (logits.sum() + masks.sum()).backward()
    assert all(p.grad is None for p in backbone.parameters())
    # gamma of the first injector scales what enters block 0: its gradient went back through the frozen blocks
    assert model.adapter.injectors[0].gamma.grad.abs().sum() > 0


def test_recomputed_blocks_give_the_same_gradients() -> None:
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        adapter = ViTAdapter(build_backbone("vit_test"), AdapterConfig(inplanes=8, checkpoint_blocks=recompute))
        with torch.no_grad():
            for injector in adapter.injectors:
                injector.gamma.fill_(0.5)  # so that the injectors' attention weights get gradients too
        torch.manual_seed(1)
        sum(f.square().mean() for f in adapter.train()(torch.randn(2, 3, 28, 42))).backward()
        grads.append([p.grad.clone() for p in adapter.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))
    assert any(g.abs().sum() > 0 for g in grads[0][:8])


# --------------------------------------------------------------------------------------------------------------------
# Schedule, crops, sliding window
# --------------------------------------------------------------------------------------------------------------------


def test_poly_lr_with_warmup() -> None:
    kw = dict(base_lr=1e-3, total=100, warmup=10)
    assert poly_lr(0, **kw) == pytest.approx(1e-3 * 1e-6)
    assert poly_lr(5, **kw) == pytest.approx(1e-3 * 0.95**0.9 * (1e-6 + (1 - 1e-6) * 0.5))
    assert poly_lr(10, **kw) == pytest.approx(1e-3 * 0.9**0.9)
    assert poly_lr(100, **kw) == 0.0
    assert poly_lr(0, base_lr=1e-3, total=100, warmup=0) == pytest.approx(1e-3)


def test_train_crop_keeps_image_and_mask_aligned() -> None:
    """Pixel colour encodes the label: after crop and flip the two still agree; beyond a small image, padding."""
    labels = np.repeat(np.arange(12, dtype=np.uint8)[None], 8, axis=0)  # 8 x 12, column j has label j
    labels[:2] = 255
    image = Image.fromarray(np.stack([labels * 20] * 3, axis=-1))  # 255 * 20 wraps to 236 in uint8, as below
    rng = np.random.default_rng(0)
    flipped, lefts = 0, set()
    for _ in range(12):  # shorter side 8 = the crop at scale 1: no resampling, a random 8 x 8 window
        img, mask = train_crop(image, labels, crop=8, scale_range=(1.0, 1.0), ignore_index=255, fill=(1, 2, 3),
                               rng=rng)  # fmt: skip
        assert img.shape == (8, 8, 3) and mask.shape == (8, 8)
        assert (img[..., 0] == (mask.astype(np.int64) * 20) % 256).all()
        flipped += int(mask[-1, 0] > mask[-1, -1])
        lefts.add(int(mask[-1].min()))
    assert 0 < flipped < 12 and len(lefts) > 1  # both orientations and several windows drawn
    # rescaled to a shorter side of 6 (6 x 9) inside a 12 px crop: the rest is padding
    img, mask = train_crop(image, labels, crop=12, scale_range=(0.5, 0.5), ignore_index=255, fill=(1, 2, 3), rng=rng)
    assert (mask[6:] == 255).all() and (mask[:, 9:] == 255).all() and (img[6:, 9:] == (1, 2, 3)).all()


def test_windows_cover_the_image() -> None:
    assert windows(50, 70, 28, 20) == [(y, y + 28, x, x + 28) for y in (0, 20, 22) for x in (0, 20, 40, 42)]
    assert windows(20, 28, 28, 20) == [(0, 20, 0, 28)]  # smaller than the crop: one window, padded later


class _PixelModel(nn.Module):
    """A stand-in for Mask2Former whose semantic scores are a pixel-wise function of the input (one query of class
    0 whose mask logit is the first channel), so sliding windows must reproduce the whole-image scores."""

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        logits = torch.tensor([[[3.0, 0.0]]]).expand(len(x), 1, 2)  # class 0, no object
        return [(logits, x[:, :1])]


def test_sliding_window_equals_the_whole_image() -> None:
    image = torch.randn(3, 50, 70)
    scores = slide_inference(_PixelModel(), image, crop=28, stride=20, batch_size=3)
    expected = semantic_probs(torch.tensor([[[3.0, 0.0]]]), image[None, :1], (50, 70))[0]
    assert scores.shape == (1, 50, 70) and torch.allclose(scores, expected, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------------------------------


def test_config_keys_are_checked() -> None:
    assert "mask2former" in EvaluateConfig(segmentation_variants=("linear", "mask2former")).segmentation_variants
    for bad, key in (
        ({"m2f_scale_range": (2.0, 1.0)}, "m2f_scale_range"),
        ({"m2f_hidden_dim": 48}, "m2f_hidden_dim"),
        ({"m2f_warmup_iterations": 10, "m2f_iterations": 10}, "m2f_warmup_iterations"),
    ):
        with pytest.raises(ValueError, match=key):
            EvaluateConfig(**bad)


def test_protocol_on_the_tiny_world(tiny_world, vit_test) -> None:
    root, _ = tiny_world
    data = load_eval_datasets(str(root))
    cfg = EvaluateConfig(segmentation_variants=("linear", "mask2former"), segmentation_epochs=2, head_batch_size=4,
                         num_figure_samples=2, **TINY_M2F)  # fmt: skip
    results, samples = run_segmentation(vit_test, data.segmentation, cfg, side=28, mean=MEAN, std=STD)
    assert set(results) == {"linear", "m2f"}
    metrics, details = results["m2f"]
    assert set(metrics) == {"miou", "pixel_acc", "macc"} and all(0 <= v <= 1 for v in metrics.values())
    assert details["iterations"] == 3 and details["crop"] == 56 and details["trainable_parameters"] > 0
    assert samples["seg_pred_m2f"].shape == samples["seg_pred"].shape == (2, 28, 28)
    assert all(p.grad is None for p in vit_test.parameters()) and not vit_test.training


def test_ade20k_layout_through_the_loader(tmp_path: Path, vit_test) -> None:
    """ADE20K's conventions: 150 classes stored as 1..150, 0 = "other" (ignored), declared in meta.json."""
    seg = tmp_path / "eval" / "segmentation"
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        (seg / split / "images").mkdir(parents=True)
        (seg / split / "masks").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (30, 44, 3), dtype=np.uint8)).save(seg / split / "images" / f"{i}.jpg")
            mask = rng.choice(np.array([0, 1, 2, 150], np.uint8), size=(30, 44))
            Image.fromarray(mask).save(seg / split / "masks" / f"{i}.png")
    (seg / "meta.json").write_text(json.dumps({"num_classes": 150, "reduce_zero_label": True}))
    data = load_eval_datasets(str(tmp_path))
    cfg = EvaluateConfig(segmentation_variants=("mask2former",), **TINY_M2F)
    results, _ = run_segmentation(vit_test, data.segmentation, cfg, side=28, mean=MEAN, std=STD)
    metrics, details = results["m2f"]
    assert details["num_classes"] == 150 and len(details["iou_per_class"]) == 150
    # mask values 1, 2, 150 are classes 0, 1, 149 (present in the ground truth: an IoU); 0 is "other", ignored
    assert all(not math.isnan(details["iou_per_class"][c]) for c in (0, 1, 149))
    assert 0 <= metrics["miou"] <= 1


def test_paper_recipe_validates(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "params.yaml", read_recipe(ROOT / "infra/recipes/ade20k_m2f_vitg14.yaml")).evaluate
    assert cfg.segmentation_variants == ("linear", "ms", "mask2former") and cfg.tasks == ("segmentation",)
    assert (cfg.m2f_crop_size, cfg.m2f_iterations, cfg.m2f_batch_size) == (896, 40000, 16)
    assert cfg.m2f_crop_size % 14 == 0  # the crop is used as is with patch 14
    nested = tmp_path / "nested.yaml"
    nested.write_text("evaluate:\n  m2f_lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match="dotted keys"):
        read_recipe(nested)


def test_gpu_benchmark_runs_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/m2f_train.py's smoke configuration prints its JSON (the GPU figures come from run_gpu.sh)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("m2f_train", ROOT / "benchmarks" / "m2f_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--tiny", "--threads", "1", "--steps", "1", "--warmup", "1", "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["arch"] == "vit_test" and out["crop"] == 56 and out["img_s"] > 0 and out["peak_mem_gib"] is None
