"""Segmentation and depth heads: the bin read-out, the losses, learning on features with a known answer, and the
full protocols on the tiny synthetic world."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.config import EvaluateConfig
from components.evaluation.datasets import load_eval_datasets
from components.evaluation.depth import (
    DPTHead,
    LinearDepthHead,
    bins_to_depth,
    mean_depth_map,
    mean_map_metrics,
    run_depth,
    sig_loss,
)
from components.evaluation.features import cache_on_device, predict_batches, take_batch
from components.evaluation.segmentation import run_segmentation, train_seg_head

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_bins_to_depth() -> None:
    centres = torch.linspace(1.0, 10.0, 4)  # 1, 4, 7, 10
    uniform = bins_to_depth(torch.zeros(1, 4, 1, 1), centres)
    assert uniform.item() == pytest.approx(5.5)  # equal weights: the mean of the centres
    peaked = bins_to_depth(torch.tensor([0.0, 0.0, 1e4, 0.0]).view(1, 4, 1, 1), centres)
    assert peaked.item() == pytest.approx(7.0, abs=1e-3)  # (ReLU + 0.1): one dominant bin
    # (ReLU(l) + 0.1) / sum: negative logits count as 0.1 each
    mixed = bins_to_depth(torch.tensor([-5.0, 0.9, -1.0, -1.0]).view(1, 4, 1, 1), centres)
    assert mixed.item() == pytest.approx((0.1 * 1 + 1.0 * 4 + 0.1 * 7 + 0.1 * 10) / 1.3)


def test_sig_loss_known_values() -> None:
    gt = torch.rand(1, 1, 4, 4) * 5 + 1
    valid = gt > 0
    assert sig_loss(gt, gt, valid).item() == pytest.approx(0.0, abs=1e-6)
    # A prediction off by a constant factor: g is constant (variance 0), loss = sqrt(0.15) |mean g|.
    doubled = sig_loss(2 * gt + 1e-3, gt, valid).item()  # +eps inside the logs: log(2 gt + 2 eps) - log(gt + eps)
    assert doubled == pytest.approx(math.sqrt(0.15) * math.log(2), rel=1e-4)


def test_head_shapes() -> None:
    x = torch.randn(2, 10, 3, 4)
    assert LinearDepthHead(10, n_bins=8, min_depth=0.1, max_depth=5).forward(x).shape == (2, 1, 12, 16)
    maps = [(torch.randn(2, 32, 4, 4), torch.randn(2, 32)) for _ in range(4)]
    out = DPTHead(32, features=16, min_depth=0.1)(maps)
    assert out.shape == (2, 1, 64, 64) and (out >= 0.1).all()


def test_predict_batches_equals_one_pass() -> None:
    """Batch-wise prediction (7 rows in batches of 3) equals one pass over all rows, for both kinds of head input."""
    torch.manual_seed(0)
    feats = torch.randn(7, 10, 3, 3)
    head = LinearDepthHead(10, n_bins=8, min_depth=0.1, max_depth=5).eval()
    with torch.no_grad():
        whole = head(feats)
    assert torch.allclose(predict_batches(head, feats, batch_size=3), whole, atol=1e-6)
    pairs = [(torch.randn(7, 16, 2, 2), torch.randn(7, 16)) for _ in range(4)]
    dpt = DPTHead(16, features=8, min_depth=0.1).eval()
    with torch.no_grad():
        whole = dpt(pairs)
    assert torch.allclose(predict_batches(dpt, pairs, batch_size=3), whole, atol=1e-5)
    assert cache_on_device(feats, "cpu") is feats and cache_on_device(pairs, "cpu") is pairs  # host memory already
    taken = take_batch(pairs, torch.tensor([4, 1]))
    assert len(taken) == len(pairs)
    for (m, c), (pm, pc) in zip(taken, pairs, strict=True):
        assert torch.equal(m, pm[[4, 1]]) and torch.equal(c, pc[[4, 1]])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda])])
def test_segmentation_head_learns_features_that_encode_the_class(device: str) -> None:
    """Features are one-hot class maps at patch resolution: a linear head must reach perfect pixel accuracy, on the
    CPU and on a GPU (where the head trains while the features stay in host memory)."""
    rng = np.random.default_rng(0)
    classes = torch.as_tensor(rng.integers(0, 3, size=(24, 4, 4)))
    feats = torch.nn.functional.one_hot(classes, 3).permute(0, 3, 1, 2).float() * 3  # (N, 3, 4, 4)
    targets = classes.repeat_interleave(4, 1).repeat_interleave(4, 2)  # nearest x4 upsampling: (N, 16, 16)
    head = train_seg_head(
        feats, targets, num_classes=3, ignore_index=255, epochs=60, lr=0.05, batch_size=8, seed=0, device=device
    )
    assert all(p.device.type == device for p in head.parameters())
    logits = torch.nn.functional.interpolate(predict_batches(head, feats, batch_size=5, device=device), size=(16, 16))
    assert (logits.argmax(1) == targets).float().mean().item() == 1.0


def test_dense_protocols_on_the_tiny_world(tiny_world, vit_test) -> None:
    root, _ = tiny_world
    data = load_eval_datasets(str(root))
    cfg = EvaluateConfig(
        segmentation_variants=("linear", "ms"), segmentation_ms_scales=(1.0, 1.5), segmentation_epochs=2,
        depth_heads=("linear", "linear4", "dpt"), dpt_features=16, depth_epochs=2, head_batch_size=4,
        num_figure_samples=2,
    )  # fmt: skip
    kw = dict(side=28, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    seg, samples = run_segmentation(vit_test, data.segmentation, cfg, **kw)
    assert set(seg) == {"linear", "ms"}
    for metrics, _details in seg.values():
        assert 0 <= metrics["miou"] <= 1 and 0 <= metrics["pixel_acc"] <= 1
    assert seg["ms"][1]["blocks"] == [0, 1] and seg["ms"][1]["flip"] and seg["linear"][1]["blocks"] == [1]
    assert samples["seg_pred"].shape == samples["seg_gt"].shape == (2, 28, 28)
    dep, samples = run_depth(vit_test, data.depth, cfg, **kw)
    assert set(dep) == {"linear", "linear4", "dpt"}
    for metrics, details in dep.values():
        assert metrics["rmse"] > 0 and 0 <= metrics["delta1"] <= 1 and details["num_val_scored"] == 4
        assert set(details["mean_map"]) == set(metrics) and details["mean_map"] == dep["linear"][1]["mean_map"]
    lo, hi = samples["depth_range"]
    assert samples["depth_pred"].min() >= lo - 1e-3 and samples["depth_pred"].max() <= hi + 1e-2


@pytest.mark.gpu
@cuda
def test_dense_protocols_on_cuda_agree_with_the_cpu(tiny_world, vit_test) -> None:
    """The same protocols with the backbone and the heads on a GPU (bf16 features) score within a small margin of
    the CPU run: the heads learn the same thing wherever they train."""
    root, _ = tiny_world
    data = load_eval_datasets(str(root))
    cfg = EvaluateConfig(
        segmentation_variants=("linear",), segmentation_epochs=20, depth_heads=("linear", "dpt"), dpt_features=16,
        depth_epochs=20, head_batch_size=4,
    )  # fmt: skip
    kw = dict(side=28, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    runs = {}
    for device in ("cpu", "cuda"):
        model = vit_test.to(device)
        seg, _ = run_segmentation(model, data.segmentation, cfg, device=device, **kw)
        dep, _ = run_depth(model, data.depth, cfg, device=device, **kw)
        runs[device] = (seg, dep)
    vit_test.to("cpu")
    (seg_cpu, dep_cpu), (seg_gpu, dep_gpu) = runs["cpu"], runs["cuda"]
    assert seg_gpu["linear"][0]["pixel_acc"] == pytest.approx(seg_cpu["linear"][0]["pixel_acc"], abs=0.05)
    for head in ("linear", "dpt"):
        assert dep_gpu[head][0]["rmse"] == pytest.approx(dep_cpu[head][0]["rmse"], rel=0.1)


def test_mean_depth_map_by_hand() -> None:
    a = np.array([[2.0, 0.0], [4.0, 20.0]], np.float32)  # 0: invalid; 20: above the cap
    b = np.array([[4.0, 0.0], [8.0, 6.0]], np.float32)
    ref = mean_depth_map([a, b], 2, min_depth=1e-3, max_depth=10.0)
    # (2 + 4) / 2, no valid value (mean of all valid: (2 + 4 + 4 + 8 + 6) / 5), (4 + 8) / 2, 6 alone
    assert np.allclose(ref, [[3.0, 4.8], [6.0, 6.0]])
    with pytest.raises(ValueError, match="no training depth"):
        mean_depth_map([np.zeros((2, 2), np.float32)], 2, min_depth=1e-3, max_depth=10.0)


def test_mean_map_metrics_known_answers() -> None:
    train = [np.full((4, 4), 2.0, np.float32), np.full((4, 4), 4.0, np.float32)]  # mean map: 3 everywhere
    kw = dict(side=4, min_depth=1e-3, max_depth=10.0)
    perfect = mean_map_metrics(train, [np.full((6, 6), 3.0, np.float32)], **kw)  # other sizes are resized to
    assert perfect["rmse"] == pytest.approx(0.0, abs=1e-6) and perfect["delta1"] == 1.0
    off = mean_map_metrics(train, [np.full((4, 4), 6.0, np.float32), np.full((4, 4), 1.5, np.float32)], **kw)
    assert off["rmse"] == pytest.approx(2.25)  # per image: |3 - 6| = 3 and |3 - 1.5| = 1.5, averaged
    assert off["abs_rel"] == pytest.approx((0.5 + 1.0) / 2) and off["delta1"] == 0.0
    assert "num_images" not in off
