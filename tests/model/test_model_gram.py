"""Gram anchoring's loss: against its definition written out here (per image, over the batch, negatives removed) and
equal to the DINOv3 release's `GramLoss` on recorded inputs.

`gram_release.pt` was recorded with the release's `dinov3/loss/gram_loss.py` (facebookresearch/dinov3), loaded on
its own by a script outside the project: under `torch.manual_seed(0)`, student features (3, 16, 32) and teacher
features (the student's plus 0.7 x noise), flat features (20, 32) and their teacher (plus 0.5 x noise); for each
setting, `GramLoss(apply_norm=True, img_level=..., remove_neg=...)(student, teacher, img_level=...)` and the
gradient of that loss with respect to the student features. The file holds those inputs and outputs only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components.model import GramLoss, gram_loss

FIXTURE = Path(__file__).with_name("gram_release.pt")


def naive_gram_loss(student, teacher, *, img_level, remove_neg):
    """The definition, entry by entry: cosine similarity of every pair of patches (of one image, or of the batch),
    negatives set to 0 when asked, the mean squared difference over every pair."""

    def cos(a, b):
        return float(a @ b) / (float(a.norm()) * float(b.norm()))

    if img_level:
        groups = list(zip(student, teacher, strict=True))
    else:
        groups = [(student.flatten(0, -2), teacher.flatten(0, -2))]
    total, count = 0.0, 0
    for s, t in groups:
        n = s.shape[0]
        for i in range(n):
            for j in range(n):
                gs, gt = cos(s[i], s[j]), cos(t[i], t[j])
                if remove_neg:
                    gs, gt = max(gs, 0.0), max(gt, 0.0)
                total += (gs - gt) ** 2
                count += 1
    return total / count


@pytest.mark.parametrize("img_level", [True, False])
@pytest.mark.parametrize("remove_neg", [False, True])
def test_gram_loss_matches_its_definition(img_level, remove_neg):
    torch.manual_seed(1)
    student = torch.randn(2, 6, 5, dtype=torch.float64)
    teacher = torch.randn(2, 6, 5, dtype=torch.float64)
    got = gram_loss(student, teacher, img_level=img_level, remove_neg=remove_neg)
    want = naive_gram_loss(student, teacher, img_level=img_level, remove_neg=remove_neg)
    assert abs(float(got) - want) < 1e-6, (float(got), want)


def test_per_image_and_batch_gram_differ_by_the_cross_image_pairs():
    """Over the batch, the cross-image pairs count too: the two settings give different values on the same input,
    and equal ones for a batch of one image."""
    torch.manual_seed(2)
    student, teacher = torch.randn(3, 8, 4), torch.randn(3, 8, 4)
    assert abs(float(gram_loss(student, teacher)) - float(gram_loss(student, teacher, img_level=False))) > 1e-4
    one_s, one_t = student[:1], teacher[:1]
    assert torch.allclose(gram_loss(one_s, one_t), gram_loss(one_s, one_t, img_level=False))


def test_gram_loss_is_zero_for_the_same_features_and_scale_invariant():
    torch.manual_seed(3)
    x = torch.randn(2, 10, 6)
    assert float(gram_loss(x, x)) == 0.0
    assert float(gram_loss(x * 3.0, x)) < 1e-12  # normalised: a feature's norm does not matter
    assert float(gram_loss(x, torch.randn(2, 10, 6))) > 1e-3


def test_gram_loss_is_float32_and_differentiable_from_bfloat16():
    torch.manual_seed(4)
    student = torch.randn(2, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    loss = gram_loss(student, torch.randn(2, 5, 8, dtype=torch.bfloat16))
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad is not None and torch.isfinite(student.grad.float()).all()


def test_bad_shapes_name_both():
    with pytest.raises(ValueError, match=r"student \(2, 5, 8\) != teacher \(2, 4, 8\)"):
        gram_loss(torch.zeros(2, 5, 8), torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match=r"img_level needs \(B, N, D\) features, got \(10, 8\)"):
        gram_loss(torch.zeros(10, 8), torch.zeros(10, 8), img_level=True)


@pytest.mark.parametrize(
    "case",
    [
        "img_level=True,remove_neg=False,flat=False",
        "img_level=True,remove_neg=True,flat=False",
        "img_level=False,remove_neg=False,flat=False",
        "img_level=False,remove_neg=True,flat=False",
        "img_level=False,remove_neg=False,flat=True",
        "img_level=False,remove_neg=True,flat=True",
    ],
)
def test_gram_loss_equals_the_release(case):
    recorded = torch.load(FIXTURE, weights_only=True)
    options = dict(item.split("=") for item in case.split(","))
    img_level, remove_neg, flat = (options[k] == "True" for k in ("img_level", "remove_neg", "flat"))
    prefix = "flat_" if flat else ""
    student = recorded[f"{prefix}student"].clone().requires_grad_(True)
    loss = GramLoss(img_level=img_level, remove_neg=remove_neg)(student, recorded[f"{prefix}teacher"])
    loss.backward()
    want = recorded["cases"][case]
    got = float(loss.detach())
    assert abs(got - float(want["loss"])) < 1e-5, (got, float(want["loss"]))
    assert torch.allclose(student.grad, want["grad"], atol=1e-6, rtol=1e-4)
