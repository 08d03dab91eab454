"""The paper's benchmarks read from tiny copies of their publishers' layouts (benchmark_layouts.py writes them from
real photographs): the readers count images and classes and keep each publisher's conventions, bad folders stop with
an error naming the file, the revisited mAP and the AlexNet-normalised mCE match hand computations, and the
`benchmark` command runs every benchmark end to end with a seeded `vit_test`."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components.evaluation.benchmarks import BENCHMARKS, LayoutError
from components.evaluation.benchmarks.run import load_benchmark
from components.evaluation.datasets import load_depths, load_masks, read_rgb
from tests.evaluation import benchmark_layouts as layouts

ROOT = Path(__file__).resolve().parents[2]

FAST = {
    "evaluate.device": "cpu",
    "evaluate.image_size": 28,
    "evaluate.dense_image_size": 28,
    "evaluate.batch_size": 32,
    "evaluate.knn_k": [1, 2],
    "evaluate.knn_few_shot": [],
    "evaluate.linear_lrs": [1.0e-3, 1.0e-2],
    "evaluate.linear_n_blocks": [1],
    "evaluate.linear_avgpool": [False],
    "evaluate.linear_epochs": 3,
    "evaluate.logreg_num_c": 3,
    "evaluate.logreg_max_iter": 30,
    "evaluate.segmentation_variants": ["linear"],
    "evaluate.segmentation_epochs": 2,
    "evaluate.depth_heads": ["linear"],
    "evaluate.depth_epochs": 2,
    "evaluate.robustness_images_per_class": 1,
    "evaluate.num_workers": 0,
}
"""A recipe that runs each benchmark's protocol in about a second on the CPU (it learns little)."""

# name -> (writer of the layout, folder, needs ImageNet as the train root, images per split, classes)
CASES = {
    "imagenet1k": (layouts.imagenet, "imagenet", False, {"train": 9, "test": 6}, 3),
    "cifar10": (lambda p: layouts.cifar(p, 10), "cifar-10-batches-py", False, {"train": 20, "test": 4}, 10),
    "cifar100": (lambda p: layouts.cifar(p, 100), "cifar-100-python", False, {"train": 4, "test": 4}, 100),
    "pets": (layouts.pets, "oxford-iiit-pet", False, {"train": 9, "test": 6}, 3),
    "food101": (layouts.food101, "food-101", False, {"train": 9, "test": 6}, 3),
    "imagefolder": (layouts.imagefolder, "folder", False, {"train": 6, "test": 4}, 2),
    "imagenet_c": (layouts.imagenet_c, "imagenet-c", True,
                   {"train": 9, "test": 6, "fog/1": 6, "fog/5": 6, "gaussian_noise/1": 6, "gaussian_noise/5": 6}, 3),
    "imagenet_a": (layouts.shifted, "imagenet-a", True, {"train": 9, "test": 4}, 2),
    "imagenet_r": (layouts.shifted, "imagenet-r", True, {"train": 9, "test": 4}, 2),
    "imagenet_sketch": (lambda p: layouts.shifted(p, nested="sketch"), "ImageNet-Sketch", True,
                        {"train": 9, "test": 4}, 2),
    "roxford5k": (lambda p: layouts.revisited(p)[0], "roxford5k", False, {"query": 2, "database": 6}, None),
    "rparis6k": (lambda p: layouts.revisited(p, "rparis6k")[0], "rparis6k", False, {"query": 2, "database": 6}, None),
    "amstertime": (layouts.amstertime, "amstertime", False, {"query": 4, "database": 4}, None),
    "pitts30k": (layouts.pitts30k, "Pittsburgh", False, {"query": 3, "database": 6}, None),
    "ade20k": (layouts.ade20k, "ade", False, {"train": 4, "val": 2}, 150),
    "voc2012": (layouts.voc2012, "voc", False, {"train": 4, "val": 2}, 21),
    "cityscapes": (layouts.cityscapes, "cityscapes", False, {"train": 4, "val": 2}, 19),
    "nyu_depth_v2": (layouts.nyu, "nyu", False, {"train": 4, "test": 3}, None),
    "kitti": (layouts.kitti, "kitti", False, {"train": 4, "test": 2}, None),
}  # fmt: skip
METRICS = {
    "imagenet1k": {"knn": "top1", "linear": "top1"},
    "cifar10": {"knn": "top1", "logreg": "top1"},
    "cifar100": {"knn": "top1", "logreg": "top1"},
    "pets": {"logreg": "top1"},
    "food101": {"logreg": "top1"},
    "imagefolder": {"linear": "top1"},
    "imagenet_c": {"robustness": "mce", "linear": "top1"},
    "imagenet_a": {"linear": "top1"},
    "imagenet_r": {"linear": "top1"},
    "imagenet_sketch": {"linear": "top1"},
    "roxford5k": {"retrieval_revisited": "map_hard"},
    "rparis6k": {"retrieval_revisited": "map_medium"},
    "amstertime": {"retrieval": "map"},
    "pitts30k": {"place_recognition": "recall@1"},
    "ade20k": {"segmentation_linear": "miou"},
    "voc2012": {"segmentation_linear": "miou"},
    "cityscapes": {"segmentation_linear": "miou"},
    "nyu_depth_v2": {"depth_linear": "rmse"},
    "kitti": {"depth_linear": "abs_rel"},
}
"""The protocol's headline metrics each benchmark must report."""


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every layout, written once for the module."""
    root = tmp_path_factory.mktemp("benchmarks")
    layouts.imagenet(root / "imagenet")
    for write, folder, _, _, _ in CASES.values():
        if not (root / folder).exists():
            write(root / folder)
    return root


def _load(bench_root: Path, name: str):
    _, folder, needs_imagenet, _, _ = CASES[name]
    return load_benchmark(name, str(bench_root / folder), str(bench_root / "imagenet") if needs_imagenet else None)


def test_every_registered_benchmark_has_a_layout_here_and_a_config_name():
    import typing

    from components.config import BenchmarkName

    assert set(CASES) == set(BENCHMARKS) == set(typing.get_args(BenchmarkName))
    assert {b.table for b in BENCHMARKS.values()} == {"classification", "robustness", "retrieval", "segmentation",
                                                      "depth"}  # fmt: skip
    for table in {b.table for b in BENCHMARKS.values()}:
        assert (ROOT / "infra" / "recipes" / f"paper_{table}.yaml").is_file()


@pytest.mark.parametrize("name", list(CASES))
def test_reader_counts_images_and_classes(bench_root: Path, name: str):
    loaded = _load(bench_root, name)
    assert loaded.data.num_images == CASES[name][3]
    assert loaded.data.num_classes == CASES[name][4]
    assert loaded.rejects == ()


# --------------------------------------------------------------------------------------------------------------------
# Each publisher's conventions
# --------------------------------------------------------------------------------------------------------------------


def test_imagenet_flat_val_takes_labels_from_the_solution_file(bench_root: Path):
    c = _load(bench_root, "imagenet1k").data.datasets.classification
    assert c.class_names == layouts.WNIDS
    assert c.splits["test"].labels.tolist() == [0, 0, 1, 1, 2, 2]  # val_00000001.. in the CSV's class order
    assert len(c.splits["val"]) == 0  # the probes hold out part of train


def test_imagenet_val_in_class_folders(tmp_path: Path):
    layouts.imagenet(tmp_path, flat_val=False)
    c = load_benchmark("imagenet1k", str(tmp_path)).data.datasets.classification
    assert c.splits["test"].labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_cifar_records_decode_to_the_pictures_written(bench_root: Path):
    c = _load(bench_root, "cifar10").data.datasets.classification
    uri = c.splits["train"].uris[5]  # data_batch_2's second record
    assert uri.endswith("data_batch_2::cifar:1")
    assert np.array_equal(np.asarray(read_rgb(uri)), np.asarray(layouts.picture(5, (32, 32))))
    assert c.splits["train"].labels[:4].tolist() == [0, 1, 2, 0]
    assert len(_load(bench_root, "cifar100").data.datasets.classification.class_names) == 100


def test_pets_and_food_classes_from_their_lists(bench_root: Path):
    pets = _load(bench_root, "pets").data.datasets.classification
    assert pets.class_names == ("Abyssinian", "beagle", "Bengal")  # by class id 1, 3, 6
    food = _load(bench_root, "food101").data.datasets.classification
    assert food.class_names == layouts.FOODS and food.splits["test"].labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_imagenet_c_reads_the_released_sets_and_a_r_score_over_their_classes(bench_root: Path):
    c = _load(bench_root, "imagenet_c").data.datasets.classification
    assert sorted(c.corrupted) == [("fog", 1), ("fog", 5), ("gaussian_noise", 1), ("gaussian_noise", 5)]
    assert c.corrupted[("fog", 5)].labels.tolist() == [0, 0, 1, 1, 2, 2]
    a = _load(bench_root, "imagenet_a").data.datasets.classification
    assert a.test_classes == (0, 1) and len(a.class_names) == 3
    assert _load(bench_root, "imagenet_sketch").data.datasets.classification.test_classes is None


def test_revisited_queries_are_cropped_to_their_box(bench_root: Path):
    r = _load(bench_root, "roxford5k").data.datasets.retrieval
    assert read_rgb(r.query.uris[0]).size == (56, 42)  # bbx 4, 2, 60, 44 of a 64 x 48 picture
    assert r.ground_truth[0]["hard"].tolist() == [3] and r.ground_truth[1]["easy"].tolist() == [1, 4]


def test_pittsburgh_positions_and_threshold_from_the_mat(bench_root: Path):
    loaded = _load(bench_root, "pitts30k")
    r = loaded.data.datasets.retrieval
    assert loaded.data.settings == {"retrieval_positive_distance": 25.0}
    assert r.query_xy.shape == (3, 2) and r.database_xy[1, 0] == pytest.approx(585030.0)
    assert r.query.uris[0].replace("\\", "/").endswith("queries_real/000/000000_pitch1_yaw1.jpg")


def test_segmentation_label_conventions(bench_root: Path):
    ade = _load(bench_root, "ade20k").data.datasets.segmentation
    (mask,) = load_masks(ade, "val")[:1]
    assert set(np.unique(mask)) <= {255, 36, 73, 110}  # 0 ("other") ignored, k stored as k + 1
    voc = _load(bench_root, "voc2012").data.datasets.segmentation
    assert set(np.unique(load_masks(voc, "train")[0])) <= {0, 7, 14, 255}  # palette indices, not colours
    city = _load(bench_root, "cityscapes").data.datasets.segmentation
    masks = load_masks(city, "train")
    assert set(np.unique(np.concatenate([m.ravel() for m in masks]))) <= {0, 2, 10, 13, 255}  # train ids
    assert (masks[0][-1] == 255).all()  # ego vehicle ignored


def test_nyu_frames_and_depths_from_the_matlab_file(bench_root: Path):
    loaded = _load(bench_root, "nyu_depth_v2")
    depth = loaded.data.datasets.depth
    assert depth.eval_crop == "nyu" and depth.max_depth == 10.0
    uri = depth.splits["val"].image_uris[0]  # testNdxs[0] = 3: the third frame
    assert uri.endswith("::mat:images/2")
    picture = np.asarray(layouts.picture(2, (64, 48)))
    assert np.array_equal(np.asarray(read_rgb(uri)), picture)  # (48, 64, 3): MATLAB's transposed layout undone
    d = load_depths(depth, "val")[0]
    assert d.shape == (48, 64)
    assert d == pytest.approx((1.0 + 8.0 * picture.mean(axis=2) / 255.0).astype(np.float32), abs=1e-5)


def test_kitti_depth_in_metres_garg_crop_and_frames_without_ground_truth(bench_root: Path):
    loaded = _load(bench_root, "kitti")
    depth = loaded.data.datasets.depth
    assert (depth.eval_crop, depth.max_depth, depth.depth_scale) == ("garg", 80.0, 256.0)
    assert loaded.data.notes == {"frames_without_ground_truth": {"train": 0, "test": 1}}
    d = load_depths(depth, "train")[0]
    assert d.max() <= 65.0 and d[d > 0].min() >= 5.0


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


def test_missing_split_file_is_named(tmp_path: Path):
    layouts.voc2012(tmp_path)
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(LayoutError, match=r"Segmentation/val.txt: missing; expected the val image ids"):
        load_benchmark("voc2012", str(tmp_path))
    layouts.imagenet(tmp_path / "in")
    (tmp_path / "in/LOC_val_solution.csv").unlink()
    with pytest.raises(LayoutError, match=r"LOC_val_solution.csv: missing"):
        load_benchmark("imagenet1k", str(tmp_path / "in"))


def test_annotation_without_image_is_named(tmp_path: Path):
    layouts.ade20k(tmp_path)
    image = tmp_path / "ADEChallengeData2016/images/validation/ADE_val_00000002.jpg"
    image.unlink()
    with pytest.raises(LayoutError, match=r"annotations/validation/ADE_val_00000002.png: no counterpart"):
        load_benchmark("ade20k", str(tmp_path))
    layouts.revisited(tmp_path / "rox")
    (tmp_path / "rox/jpg/landmark_000004.jpg").unlink()
    with pytest.raises(LayoutError, match=r"landmark_000004 has no image"):
        load_benchmark("roxford5k", str(tmp_path / "rox"))
    layouts.imagenet(tmp_path / "in")
    (tmp_path / "in/val/ILSVRC2012_val_00000003.JPEG").unlink()
    with pytest.raises(LayoutError, match=r"1 labelled images are not in .*val \(first: ILSVRC2012_val_00000003\)"):
        load_benchmark("imagenet1k", str(tmp_path / "in"))


def test_wrong_class_count_is_named(tmp_path: Path):
    layouts.cifar(tmp_path / "c", 10)
    (tmp_path / "c/batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x"] * 100}))
    with pytest.raises(LayoutError, match=r"batches.meta: 100 class names under label_names, expected 10"):
        load_benchmark("cifar10", str(tmp_path / "c"))
    layouts.ade20k(tmp_path / "ade")
    mask = tmp_path / "ade/ADEChallengeData2016/annotations/validation/ADE_val_00000001.png"
    Image.fromarray(np.full((40, 48), 200, np.uint8)).save(mask)
    ade = load_benchmark("ade20k", str(tmp_path / "ade")).data.datasets.segmentation
    with pytest.raises(ValueError, match=r"ADE_val_00000001.png: class index 199 in a mask of 150 classes"):
        load_masks(ade, "val")
    layouts.pets(tmp_path / "pets")
    with open(tmp_path / "pets/annotations/test.txt", "a") as f:
        f.write("Abyssinian_1 40 1 1\n")
    with pytest.raises(LayoutError, match=r"test.txt: class id 40 of Abyssinian_1 outside 1..37"):
        load_benchmark("pets", str(tmp_path / "pets"))
    layouts.nyu(tmp_path / "nyu", test=(3, 9))
    with pytest.raises(LayoutError, match=r"splits.mat: testNdxs holds frame numbers outside 1..7"):
        load_benchmark("nyu_depth_v2", str(tmp_path / "nyu"))


def test_robustness_benchmarks_need_imagenet(bench_root: Path):
    with pytest.raises(ValueError, match="imagenet_a needs --train-root"):
        load_benchmark("imagenet_a", str(bench_root / "imagenet-a"))
    with pytest.raises(KeyError, match="unknown benchmark 'ade2k'"):
        load_benchmark("ade2k", str(bench_root))


def test_undecodable_images_are_listed_with_their_reason_and_left_out(tmp_path: Path):
    layouts.food101(tmp_path)
    broken = tmp_path / "images/apple_pie/100.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated
    (tmp_path / "images/churros/104.jpg").write_bytes(b"not an image at all")
    loaded = load_benchmark("food101", str(tmp_path))
    assert {(Path(r.uri).name, r.reason) for r in loaded.rejects} == {("100.jpg", "truncated"),
                                                                       ("104.jpg", "not_an_image")}  # fmt: skip
    assert loaded.data.num_images == {"train": 8, "test": 5}
    assert str(broken) not in loaded.data.datasets.classification.splits["train"].uris


# --------------------------------------------------------------------------------------------------------------------
# Metrics by hand
# --------------------------------------------------------------------------------------------------------------------


def test_revisited_map_against_a_hand_computed_case():
    from components.evaluation.metrics import revisited_map

    # Query 1 ranks the database 1, 2, 3, 0, 4, 5; image 0 is easy, 2 hard, 1 junk.
    #   Medium (0 and 2 positive, 1 ignored): ranking 2, 3, 0, ... -> positives at ranks 0 and 2;
    #     AP = 1/2 (1 + 1)/2 + 1/2 (1/2 + 2/3)/2 = 0.5 + 0.291667 = 0.791667
    #   Easy (0 positive, 1 and 2 ignored): ranking 3, 0, ... -> rank 1: AP = (0/1 + 1/2)/2 = 0.25
    #   Hard (2 positive, 0 and 1 ignored): ranking 2, ... -> rank 0: AP = 1
    # Query 2 ranks image 5 first, its only (easy) positive: AP 1 for Easy and Medium; no positive under Hard.
    sim = np.array([[3.0, 6.0, 5.0, 4.0, 2.0, 1.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.9]])
    gnd = [{"easy": [0], "hard": [2], "junk": [1]}, {"easy": [5], "hard": [], "junk": []}]
    out = revisited_map(sim, gnd, ks=(1, 5))
    assert out["map_medium"] == pytest.approx((0.5 + (0.5 + 2 / 3) / 4 + 1.0) / 2)
    assert out["map_easy"] == pytest.approx((0.25 + 1.0) / 2)
    assert out["map_hard"] == pytest.approx(1.0) and out["num_queries_hard"] == 1
    assert out["mp@1_easy"] == pytest.approx((0.0 + 1.0) / 2)  # query 1's first (non-ignored) result is negative
    assert out["mp@5_medium"] == pytest.approx((2 / 3 + 1.0) / 2)  # up to the last positive's rank 3: 2 of 3


def test_mce_against_alexnets_table_by_hand():
    from components.evaluation import alexnet_c
    from components.evaluation.corruptions import CORRUPTIONS
    from components.evaluation.metrics import mean_corruption_error_against_means

    assert tuple(alexnet_c.MEAN_ERRORS) == CORRUPTIONS
    # Hendrycks & Dietterich's AlexNet errors for these two corruptions: 0.886428 and 0.819324.
    errors = {"gaussian_noise": [0.5, 0.6, 0.7, 0.8, 0.9], "fog": [0.2, 0.2, 0.2, 0.2, 0.2]}
    mce, ce = mean_corruption_error_against_means(errors, alexnet_c.MEAN_ERRORS)
    assert ce["gaussian_noise"] == pytest.approx(3.5 / (5 * 0.886428))
    assert ce["fog"] == pytest.approx(1.0 / (5 * 0.819324))
    assert mce == pytest.approx(100 * (0.789686 + 0.244103) / 2, abs=1e-4)
    # AlexNet itself scores 100.
    assert mean_corruption_error_against_means(
        {k: [v] * 5 for k, v in alexnet_c.MEAN_ERRORS.items()}, alexnet_c.MEAN_ERRORS
    )[0] == pytest.approx(100.0)


# --------------------------------------------------------------------------------------------------------------------
# The command, end to end
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random vit_test as an export folder (model.json + backbone.pth)."""
    import torch

    from components.model import build_backbone, save_official_weights

    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    save_official_weights(build_backbone("vit_test"), folder / "backbone.pth")
    (folder / "model.json").write_text(json.dumps({"arch": "vit_test", "role": "teacher", "name": "vit_test_seed0"}))
    return folder


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "fast.yaml"
    path.write_text(yaml.safe_dump(FAST))
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_benchmark_command_writes_the_protocols_metrics(name, bench_root, export, recipe, tmp_path, monkeypatch):
    from components.cli import main

    monkeypatch.setenv("DINOV2_TRACKING", "off")
    _, folder, needs_imagenet, counts, classes = CASES[name]
    argv = ["benchmark", "--name", name, "--root", str(bench_root / folder), "--model", str(export),
            "--out", str(tmp_path), "--recipe", str(recipe), "--params", str(ROOT / "params.yaml")]  # fmt: skip
    if needs_imagenet:
        argv += ["--train-root", str(bench_root / "imagenet")]
    assert main(argv) == 0
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["num_images"] == counts and record["num_classes"] == classes
    assert record["model"]["name"] == "vit_test_seed0" and record["protocol"]["image_size"] == 28
    for result, metric in METRICS[name].items():
        assert math.isfinite(record["metrics"][result][metric]), (result, metric)
    if name == "imagenet_c":
        assert record["details"]["robustness"]["baseline"] == "alexnet"
        assert record["details"]["robustness"]["num_severities"] == {"fog": 2, "gaussian_noise": 2}


def test_bad_layout_exits_with_the_error(bench_root, export, tmp_path, monkeypatch, capsys):
    from components.cli import EXIT_BAD_INPUT, main

    monkeypatch.setenv("DINOV2_TRACKING", "off")
    argv = ["benchmark", "--name", "ade20k", "--root", str(bench_root / "voc"), "--model", str(export),
            "--out", str(tmp_path), "--params", str(ROOT / "params.yaml")]  # fmt: skip
    assert main(argv) == EXIT_BAD_INPUT
    assert "images/training: missing; expected images" in capsys.readouterr().err


@pytest.mark.slow  # 13 s: MLflow's SQLite store is created and migrated
def test_benchmark_is_logged_to_mlflow(bench_root, export, recipe, tmp_path, monkeypatch):
    from components.cli import main
    from components.tracking import mlflow_client

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DINOV2_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("DINOV2_TRACKING", raising=False)
    argv = ["benchmark", "--name", "roxford5k", "--root", str(bench_root / "roxford5k"), "--model", str(export),
            "--out", "out", "--recipe", str(recipe), "--params", str(ROOT / "params.yaml")]  # fmt: skip
    assert main(argv) == 0
    client = mlflow_client()
    (run,) = client.search_runs([client.get_experiment_by_name("dinov2").experiment_id])
    assert run.data.tags["stage"] == "benchmark" and run.data.tags["benchmark"] == "roxford5k"
    record = json.loads((tmp_path / "out/roxford5k.json").read_text())
    assert run.data.metrics["roxford5k.retrieval_revisited.map_medium"] == pytest.approx(
        record["metrics"]["retrieval_revisited"]["map_medium"]
    )
    assert run.data.metrics["roxford5k.num_images.database"] == 6.0
    assert run.data.params["evaluate.image_size"] == "28"


def test_evaluate_stage_adds_benchmarks_beside_the_demo_tasks(bench_root, export):
    """`evaluate.benchmarks` runs each benchmark for each model; the headline table shows its columns."""
    import pandas as pd

    from components.config import load_config
    from components.evaluation.context import ModelResult
    from components.evaluation.metrics import metric_spec
    from components.evaluation.models import build_model, read_descriptor
    from components.evaluation.report import headline_table
    from components.evaluation.runner import long_frame_rows
    from components.stages.evaluate import add_benchmarks, load_benchmarks

    sources = {
        "voc2012": str(bench_root / "voc"),
        "imagenet_a": {"root": str(bench_root / "imagenet-a"), "train_root": str(bench_root / "imagenet")},
    }
    cfg = load_config(ROOT / "params.yaml", {**FAST, "evaluate.benchmarks": sources})
    spec = read_descriptor(export)
    result = ModelResult(spec)
    add_benchmarks(result, build_model(spec, seed=0), load_benchmarks(cfg), cfg, device="cpu")
    assert {"voc2012-segmentation_linear", "imagenet_a-linear", "imagenet_a-knn"} <= set(result.tasks)
    assert result.tasks["voc2012-segmentation_linear"].details["num_classes"] == 21
    frame = pd.DataFrame(long_frame_rows([result], metric_spec))
    table = headline_table(frame, [spec.to_json()], order=[spec.name])
    assert {"voc2012-segmentation_linear.miou", "imagenet_a-linear.top1", "imagenet_a-knn.top1"} <= set(table.columns)


def test_model_reference_forms(export, tmp_path, monkeypatch):
    from components.evaluation.models import model_from_reference

    assert model_from_reference(str(export)).arch == "vit_test"
    assert model_from_reference(str(export / "model.json")).name == "vit_test_seed0"
    spec = model_from_reference(f"dinov2_vits14_reg={export / 'backbone.pth'}")
    assert (spec.arch, spec.overrides["num_register_tokens"]) == ("vit_small", 4)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"hub/checkpoints/dinov2_vits14_pretrain.pth: the released weights"):
        model_from_reference("dinov2_vits14")


def test_item_uris_are_not_tar_members(tmp_path: Path):
    from components.evaluation.items import cifar_batch, item_uri, split_item

    assert split_item(item_uri("/d/data_batch_1", "cifar", 3)) == ("/d/data_batch_1", "cifar", "3")
    assert split_item("/d/shard.tar::a/b.jpg@512:100") is None
    assert split_item("/d/a.jpg") is None
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="data_batch_1: not a CIFAR python batch"):
        cifar_batch(str(tmp_path / "data_batch_1"))
