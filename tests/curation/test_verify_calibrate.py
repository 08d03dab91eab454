"""Planted copies, local-feature verification, the calibration curve and thresholds, the copy decision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import CurateConfig
from components.curation import calibrate
from components.curation.copies import COPY_KINDS, disjoint_halves, plant_copy
from components.curation.pairs import Thresholds, decide_pairs
from components.curation.verify import verify_pairs

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    out = []
    for name in ("astronaut", "coffee"):
        image = Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
        image.thumbnail((192, 192))
        out.append(image)
    return out


def test_every_kind_of_copy(photos: list[Image.Image]) -> None:
    rng = np.random.default_rng(0)
    image = photos[0]
    for kind in COPY_KINDS:
        copy = plant_copy(image, kind, rng)
        assert copy.mode == "RGB" and copy.size[0] >= 16, kind
    for _ in range(20):
        w, h = plant_copy(image, "crop", rng).size
        assert 0.69 <= w * h / (image.size[0] * image.size[1]) <= 0.96
    left, right = disjoint_halves(image)
    assert left.size == right.size and left.size[0] == image.size[0] // 2
    with pytest.raises(ValueError, match="unknown copy kind"):
        plant_copy(image, "mirror", rng)


def test_verification_tells_copies_from_look_alikes(photos: list[Image.Image], tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    astronaut, coffee = photos
    copies = [plant_copy(astronaut, kind, rng) for kind in COPY_KINDS]
    left, right = disjoint_halves(astronaut)
    sources: list = [astronaut, *copies, left, right, coffee, str(tmp_path / "deleted.jpg")]
    pairs = [(0, 1 + i) for i in range(len(COPY_KINDS))] + [(7, 8), (0, 9), (1, 9), (0, 10)]
    result = verify_pairs(np.array(pairs), sources, workers=2)
    assert result.verified[: len(COPY_KINDS)].sum() >= len(COPY_KINDS) - 1  # at most one kind missed on one photo
    assert not result.verified[len(COPY_KINDS) :].any()  # halves, another photo, an unreadable file
    assert list(result.errors) == [10] and "no such file" in result.errors[10]
    cost = result.cost()
    assert cost["pairs"] == len(pairs) and cost["images"] == 11 and cost["unreadable_images"] == 1
    assert cost["ms_per_pair"] > 0 and cost["cpu_ms_per_pair"] > 0


def test_curve_and_thresholds() -> None:
    pos = np.array([0.99, 0.95, 0.9, 0.8, 0.6])
    neg = np.array([0.85, 0.5, 0.4, 0.3])
    curve = calibrate.pr_curve(pos, neg)
    assert curve.thresholds.tolist() == sorted(np.r_[pos, neg].tolist(), reverse=True)
    assert curve.at(0.9) == (1.0, 0.6) and curve.at(0.8) == (0.8, 0.8) and curve.at(2.0) == (1.0, 0.0)
    assert calibrate.accept_threshold(curve, 0.98) == 0.9  # the lowest threshold whose precision stays >= target
    assert calibrate.accept_threshold(curve, 0.8) == 0.9  # 0.85 has precision 0.75: below, whatever lies lower
    assert calibrate.accept_threshold(curve, 0.75) == 0.6  # 5 of 6 at 0.6
    assert calibrate.accept_threshold(calibrate.pr_curve(pos[:1] * 0 + 0.1, neg), 0.98) is None
    assert calibrate.candidate_threshold(pos, 0.8) == 0.8 and calibrate.candidate_threshold(pos, 1.0) == 0.6
    sims, verified = np.array([0.95, 0.7, 0.7, 0.3]), np.array([False, True, False, True])
    assert calibrate.decide(sims, verified, accept=0.9, candidate=0.5, verify="auto").tolist() == [1, 1, 0, 0]
    assert calibrate.decide(sims, verified, accept=0.9, candidate=0.5, verify="on").tolist() == [0, 1, 0, 0]
    assert calibrate.decide(sims, verified, accept=0.9, candidate=0.5, verify="off").tolist() == [1, 0, 0, 0]


def test_calibration_report_and_fixed_threshold() -> None:
    data = calibrate.CalibrationSet(
        pos_sims=np.array([0.99, 0.97, 0.7, 0.6]),
        pos_kinds=np.array(["jpeg", "crop", "crop", "rotate"], dtype=object),
        pos_verified=np.array([True, True, True, False]),
        neg_sims=np.array([0.9, 0.65, 0.2]),
        neg_verified=np.array([False, False, False]),
        neg_kind=np.array(["neighbour", "neighbour", "halves"], dtype=object),
        probable_pool_duplicates=2,
    )
    cal = calibrate.calibrate("dedup", data, target=0.98, candidate_recall=0.75, verify="auto", fixed_accept=None,
                              fixed_candidate=None)  # fmt: skip
    assert cal.accept == pytest.approx(0.97) and cal.candidate == pytest.approx(0.7)
    assert cal.recall == 0.75 and cal.precision == 1.0 and cal.recall_per_kind == {"jpeg": 1, "crop": 1, "rotate": 0}
    report = cal.report()
    assert report["accept_threshold_source"] == "calibrated" and report["probable_pool_duplicates"] == 2
    fixed = calibrate.calibrate("dedup", data, target=0.98, candidate_recall=0.75, verify="off", fixed_accept=0.5,
                                fixed_candidate=None)  # fmt: skip
    assert fixed.accept == 0.5 and fixed.report()["accept_threshold_source"] == "params.yaml"
    assert fixed.precision == pytest.approx(4 / 6)  # the override's measured precision: the gate's figure


def test_decide_pairs_budget_and_symmetry(photos: list[Image.Image], tmp_path: Path) -> None:
    uris = []
    for i, image in enumerate([photos[0], plant_copy(photos[0], "jpeg", np.random.default_rng(0)), photos[1]]):
        uris.append(str(tmp_path / f"{i}.png"))
        image.save(uris[-1])
    src, dst = np.array([0, 1, 0, 2, 1]), np.array([1, 0, 2, 0, 2])
    sim = np.array([0.7, 0.7, 0.6, 0.6, 0.95], np.float32)
    limits = Thresholds(accept=0.9, candidate=0.5)
    out = decide_pairs(src, dst, sim, thresholds=limits, verify="auto", verify_k=8, max_pairs=10,
                       sources=(uris, uris), symmetric=True)  # fmt: skip
    assert out.stats["candidates"] == 3 and out.stats["accepted_on_embedding"] == 1 and out.stats["verified"] == 2
    decided = {(int(a), int(b)): m for a, b, m in zip(out.src, out.dst, out.method, strict=True)}
    assert decided == {(0, 1): "local_features", (1, 2): "embedding"}
    capped = decide_pairs(src, dst, sim, thresholds=limits, verify="on", verify_k=8, max_pairs=1,
                          sources=(uris, uris), symmetric=True)  # fmt: skip
    assert capped.stats["verified"] == 1 and capped.stats["over_budget"] == 2  # the least similar are kept
    with pytest.raises(ValueError, match="needs the images"):
        decide_pairs(src, dst, sim, thresholds=limits, verify="on", verify_k=8, max_pairs=5, sources=None,
                     symmetric=True)  # fmt: skip


def test_calibration_off_needs_fixed_thresholds() -> None:
    with pytest.raises(ValueError, match="calibration_images 0"):
        CurateConfig(calibration_images=0)
    CurateConfig(calibration_images=0, dedup_threshold=0.8, eval_threshold=0.7, verify="off")
