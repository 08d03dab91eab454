"""Evaluation datasets (folder formats, manifest), frozen features and model discovery."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components.evaluation import datasets as D
from components.evaluation.features import (
    center_crop,
    dense_block_indices,
    extract_features,
    extract_patch_maps,
    load_images,
    patch_multiple,
)
from components.evaluation.models import (
    BASELINE_NAME,
    ModelSpec,
    build_model,
    discover_models,
    extra_model,
    random_baseline,
    read_descriptor,
    unique_names,
)

# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------


def test_synthetic_world_by_folders(tiny_world) -> None:
    root, truth = tiny_world
    data = D.load_eval_datasets(str(root))
    cls = data.classification
    assert cls is not None and len(cls.class_names) == 3
    assert [len(cls.splits[s]) for s in ("train", "val", "test")] == [9, 3, 6]
    assert sorted(np.bincount(cls.splits["train"].labels).tolist()) == [3, 3, 3]
    seg, depth, ret = data.segmentation, data.depth, data.retrieval
    assert len(seg.splits["train"]) == len(truth["segmentation"]["splits"]["train"])
    assert all(Path(u).is_file() for u in seg.splits["val"].target_uris)  # masks found beside the images
    masks = D.load_masks(seg, "train")
    assert D.num_segmentation_classes(seg, masks) <= 4  # background + 3 classes
    assert depth.depth_scale == truth["depth"]["depth_scale"]
    d = D.load_depths(depth, "val")[0]
    assert d.dtype == np.float32 and d[d > 0].min() > 0 and d.max() < 100
    assert len(ret.query) == 2 and len(ret.database) == 2 and ret.query_xy is None


def test_manifest_rows_decide_which_images(tiny_world) -> None:
    root, _ = tiny_world
    rows = D._rows_from_folders(str(root))
    dropped = rows[rows["source"] == "eval/classification"]["uri"].iloc[0]
    manifest = rows[rows["uri"] != dropped].assign(decodable=True, sha256="x", width=48, height=48)
    data = D.load_eval_datasets(None, manifest)  # no raw root: meta files are found beside the listed images
    assert sum(len(s) for s in data.classification.splits.values()) == 17
    assert dropped not in data.classification.splits["train"].uris
    assert data.depth is not None and data.counts["retrieval"] == 4


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_real_dataset_conventions(tmp_path: Path) -> None:
    """ADE20K-style masks (reduce_zero_label), a depth cap in meta.json, retrieval positions."""
    rgb = np.zeros((8, 8, 3), np.uint8)
    for split in ("train", "val"):
        _write_png(tmp_path / f"eval/segmentation/{split}/images/a.png", rgb)
        _write_png(tmp_path / f"eval/segmentation/{split}/masks/a.png", np.array([[0, 1], [2, 255]], np.uint8))
        _write_png(tmp_path / f"eval/depth/{split}/images/a.png", rgb)
        _write_png(tmp_path / f"eval/depth/{split}/depth/a.png", np.array([[0, 1000], [2500, 65535]], np.uint16))
    (tmp_path / "eval/segmentation/meta.json").write_text(json.dumps({"reduce_zero_label": True, "num_classes": 2}))
    (tmp_path / "eval/depth/meta.json").write_text(
        json.dumps({"depth_scale": 1000, "max_depth": 10, "eval_crop": "nyu"})
    )
    for split, place in (("query", "p0"), ("database", "p0"), ("database", "p1")):
        _write_png(tmp_path / f"eval/retrieval/{split}/{place}/v.png", rgb)
    (tmp_path / "eval/retrieval/positions.csv").write_text(
        "path,x,y\nquery/p0/v.png,0,0\ndatabase/p0/v.png,3,4\ndatabase/p1/v.png,100,0\n"
    )
    data = D.load_eval_datasets(str(tmp_path))
    mask = D.load_masks(data.segmentation, "train")[0]
    assert mask.tolist() == [[255, 0], [1, 255]]  # 0 -> ignore, k -> k - 1, 255 stays ignored
    assert D.num_segmentation_classes(data.segmentation, [mask]) == 2
    depths = D.load_depths(data.depth, "train")
    assert np.allclose(depths[0], [[0.0, 1.0], [2.5, 65.535]])
    assert D.depth_range(data.depth, depths, 1e-3, None) == (1e-3, 10.0)  # meta.json's cap
    assert D.depth_range(data.depth, depths, 1e-3, 80.0) == (1e-3, 80.0)  # params win
    assert data.depth.eval_crop == "nyu"
    assert data.retrieval.database_xy.tolist() == [[3.0, 4.0], [100.0, 0.0]]
    (tmp_path / "eval/depth/meta.json").unlink()
    with pytest.raises(ValueError, match="depth_scale"):
        D.load_eval_datasets(str(tmp_path))


# --------------------------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------------------------


def test_image_features_match_the_model_api(vit_test) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (5, 28, 28, 3), dtype=np.uint8)
    feats = extract_features(vit_test, images, n_blocks=4, batch_size=2)
    assert feats.cls.shape == (5, 2, 64)  # 4 last blocks clipped to the depth of 2
    from components.evaluation.features import IMAGENET_MEAN, IMAGENET_STD, normalize

    with torch.no_grad():
        out = vit_test.forward_features(normalize(images, IMAGENET_MEAN, IMAGENET_STD, "cpu"))
    assert torch.allclose(feats.output, out["x_norm_clstoken"], atol=1e-5)
    assert torch.allclose(feats.patch_mean, out["x_norm_patchtokens"].mean(1), atol=1e-5)
    assert feats.linear_input(4, True).shape == (5, 3 * 64) and feats.linear_input(1, False).shape == (5, 64)
    two = extract_features(vit_test, images, scales=(1.0, 0.5))
    half = extract_features(vit_test, images, scales=(0.5,))
    assert torch.allclose(two.output, (feats.output + half.output) / 2, atol=1e-5)


def test_patch_maps_and_block_choice(vit_test) -> None:
    images = np.zeros((3, 42, 28, 3), np.uint8)
    ((maps, cls),) = extract_patch_maps(vit_test, images, blocks=[1])
    assert maps.shape == (3, 64, 3, 2) and cls.shape == (3, 64)
    pairs = extract_patch_maps(vit_test, images, blocks=[0, 0, 1, 1])  # repeats allowed
    assert len(pairs) == 4 and torch.equal(pairs[0][0], pairs[1][0])
    assert dense_block_indices(12, 4) == [2, 5, 8, 11] and dense_block_indices(40, 4) == [9, 19, 29, 39]
    assert dense_block_indices(24, 4) == [5, 11, 17, 23] and dense_block_indices(2, 4) == [0, 0, 1, 1]


def test_preprocessing_sizes(tiny_world) -> None:
    img = Image.new("RGB", (100, 60))
    assert center_crop(img, 56).shape == (56, 56, 3)
    assert patch_multiple(60, 14) == 56 and patch_multiple(10, 14) == 14
    root, _ = tiny_world
    uris = D.load_eval_datasets(str(root)).classification.splits["test"].uris[:2]
    assert load_images(uris, 28).shape == (2, 28, 28, 3)


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


def test_descriptors_and_extra_models(tmp_path: Path) -> None:
    teacher = tmp_path / "pretrain" / "model.json"
    teacher.parent.mkdir()
    teacher.write_text(json.dumps({"arch": "vit_test", "patch_size": 14, "img_size": 224, "role": "teacher",
                                   "heads": "heads.pth", "iterations": 3}))  # fmt: skip
    student = tmp_path / "distill" / "vit_test" / "model.json"
    student.parent.mkdir(parents=True)
    student.write_text(json.dumps({"arch": "vit_test", "role": "student", "weights": "w.safetensors"}))
    specs = discover_models([str(tmp_path / "pretrain"), str(tmp_path / "distill"), str(tmp_path / "missing")])
    assert [s.name for s in specs] == ["teacher", "student_vit_test"]
    assert specs[0].weights == str(tmp_path / "pretrain" / "backbone.pth")  # the default file name
    assert specs[0].overrides == {"patch_size": 14, "img_size": 224}  # heads / iterations are not overrides
    assert specs[1].weights.endswith("distill/vit_test/w.safetensors")
    official = extra_model("vit_small=/ckpt/dinov2_vits14_pretrain.pth")
    assert (official.name, official.arch, official.role) == ("dinov2_vits14_pretrain", "vit_small", "official")
    assert extra_model(str(student)).role == "student"
    with pytest.raises(ValueError, match="model.json path or"):
        extra_model("just-a-path.pth")
    names = [s.name for s in unique_names([specs[0], specs[0], specs[0]])]
    assert names == ["teacher", "teacher_2", "teacher_3"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"arch": "vit_test", "overrides": {"nope": 1}}))
    with pytest.raises(ValueError, match="unknown backbone overrides"):
        read_descriptor(bad)


def test_build_model_loads_weights_strictly_and_seeds_the_baseline(tmp_path: Path) -> None:
    from components.model import build_backbone, save_official_weights

    torch.manual_seed(5)
    source = build_backbone("vit_test")
    save_official_weights(source, tmp_path / "backbone.pth")
    spec = ModelSpec(name="m", arch="vit_test", role="teacher", weights=str(tmp_path / "backbone.pth"))
    loaded = build_model(spec, seed=0)
    assert all(
        torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    baseline = random_baseline(spec, "vit_tiny", {})
    assert (baseline.name, baseline.arch, baseline.weights) == (BASELINE_NAME, "vit_test", None)
    a, b = build_model(baseline, seed=3), build_model(baseline, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    # The config's layerscale_init reaches the baseline (the teacher's file cannot record it); its own keys win.
    with_ls = random_baseline(replace(spec, overrides={"patch_size": 16}), "vit_tiny",
                              {"patch_size": 14, "layerscale_init": 0.5})  # fmt: skip
    assert with_ls.overrides == {"patch_size": 16, "layerscale_init": 0.5}
    assert float(build_model(with_ls, seed=0).blocks[0].ls1.gamma[0]) == 0.5
    wrong = ModelSpec(name="w", arch="vit_tiny", role="teacher", weights=str(tmp_path / "backbone.pth"))
    with pytest.raises(Exception, match="shape mismatch|missing key|unexpected key"):
        build_model(wrong, seed=0)


def test_manifest_dataframe_columns_are_checked() -> None:
    with pytest.raises(ValueError, match="lacks columns"):
        D.load_eval_datasets(None, pd.DataFrame({"uri": []}))
