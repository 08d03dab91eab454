"""The paper's benchmarks read from the layouts their publishers ship: a registry of reader + protocol setting.

Run one: `python -m components benchmark --name ade20k --root /data/ADEChallengeData2016 --model models/pretrain
--out metrics/benchmarks [--recipe infra/recipes/paper_segmentation.yaml]`; in the pipeline, params.yaml's
`evaluate.benchmarks: {ade20k: /data/ADEChallengeData2016, ...}` runs them in the evaluate stage for every model.

A benchmark is a reader (one small module per dataset family: classification, robustness, retrieval,
segmentation, depth) that turns the publisher's folder into the `EvalDatasets` the protocols read, and the tasks
of `runner.TASKS` it runs (kNN, linear, logistic regression, retrieval, the segmentation and depth heads,
robustness), with the few `evaluate` keys its protocol fixes; everything else (resolution, epochs, head variants)
is params.yaml's `evaluate` section, set per paper table by the recipes in infra/recipes/. Results are the tasks'
own (`linear`, `segmentation_ms`, `retrieval_revisited`, ...), named `<benchmark>-<result>` beside the demo's in
the evaluate stage's tables. docs/evaluation.md lists each benchmark's layout, protocol and paper table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from components.evaluation.benchmarks import classification, depth, retrieval, robustness, segmentation
from components.evaluation.benchmarks.common import BenchmarkData, LayoutError

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkData", "LayoutError", "get_benchmark"]

Reader = Callable[[str, str | None], BenchmarkData]


@dataclass(frozen=True)
class Benchmark:
    """An entry of the registry: how to read the publisher's layout and which protocol scores it."""

    read: Reader
    """(root, train root or None) -> the benchmark's data; raises `LayoutError` on a folder that is not the layout."""
    tasks: tuple[str, ...]
    """Tasks of `runner.TASKS` that make the protocol (the paper's heads for this benchmark)."""
    table: str
    """The paper table the benchmark belongs to: classification, robustness, retrieval, segmentation or depth (its
    recipe is infra/recipes/paper_<table>.yaml)."""
    layout: str
    """What `--root` holds, in a line."""
    settings: dict[str, Any] = field(default_factory=dict)
    """`evaluate` keys the protocol fixes, whatever params.yaml says."""
    rename: dict[str, str] = field(default_factory=dict)
    """Result names of this benchmark that differ from the task's (Pittsburgh's retrieval is `place_recognition`)."""
    train_root: bool = False
    """Needs `--train-root` (an ImageNet-1k root: the robustness sets are scored by ImageNet's classifiers)."""


_CLASSIFY = ("knn", "linear")
_SMALL = ("knn", "logreg")  # DINOv2's protocol for the smaller classification sets: logistic regression
_SHIFT = ("knn", "linear")

BENCHMARKS: dict[str, Benchmark] = {
    "imagenet1k": Benchmark(classification.read_imagenet1k, _CLASSIFY, "classification",
                            "train/<wnid>/, val/<wnid>/ or val/ + LOC_val_solution.csv + LOC_synset_mapping.txt"),
    "cifar10": Benchmark(classification.read_cifar10, _SMALL, "classification",
                         "cifar-10-batches-py/: data_batch_1..5, test_batch, batches.meta"),
    "cifar100": Benchmark(classification.read_cifar100, _SMALL, "classification",
                          "cifar-100-python/: train, test, meta"),
    "pets": Benchmark(classification.read_pets, _SMALL, "classification",
                      "images/, annotations/trainval.txt, annotations/test.txt"),
    "food101": Benchmark(classification.read_food101, _SMALL, "classification",
                         "images/<class>/, meta/classes.txt, meta/train.txt, meta/test.txt"),
    "imagefolder": Benchmark(classification.read_imagefolder, _CLASSIFY, "classification",
                             "train/<class>/, test/<class>/ and/or val/<class>/"),
    "imagenet_c": Benchmark(robustness.read_imagenet_c, ("linear", "robustness"), "robustness",
                            "<corruption>/<severity>/<wnid>/", settings={"robustness_baseline": "alexnet",
                            "robustness_classifier": "linear"}, train_root=True),  # fmt: skip
    "imagenet_a": Benchmark(robustness.read_imagenet_a, _SHIFT, "robustness", "<wnid>/ (200 classes)",
                            train_root=True),
    "imagenet_r": Benchmark(robustness.read_imagenet_r, _SHIFT, "robustness", "<wnid>/ (200 classes)",
                            train_root=True),
    "imagenet_sketch": Benchmark(robustness.read_imagenet_sketch, _SHIFT, "robustness",
                                 "<wnid>/ or sketch/<wnid>/ (1000 classes)", train_root=True),
    "roxford5k": Benchmark(retrieval.read_roxford5k, ("retrieval",), "retrieval", "jpg/, gnd_roxford5k.pkl"),
    "rparis6k": Benchmark(retrieval.read_rparis6k, ("retrieval",), "retrieval", "jpg/, gnd_rparis6k.pkl"),
    "amstertime": Benchmark(retrieval.read_amstertime, ("retrieval",), "retrieval", "old/, new/ (pairs by name)"),
    "pitts30k": Benchmark(retrieval.read_pitts30k, ("retrieval",), "retrieval",
                          "pitts30k_test.mat, database images, queries_real/", rename={"retrieval":
                          "place_recognition"}),  # fmt: skip
    "ade20k": Benchmark(segmentation.read_ade20k, ("segmentation",), "segmentation",
                        "ADEChallengeData2016/: images/{training,validation}/, annotations/{training,validation}/"),
    "voc2012": Benchmark(segmentation.read_voc2012, ("segmentation",), "segmentation",
                         "VOC2012/: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/{train,val}.txt"),
    "cityscapes": Benchmark(segmentation.read_cityscapes, ("segmentation",), "segmentation",
                            "leftImg8bit/{train,val}/<city>/, gtFine/{train,val}/<city>/*_labelIds.png"),
    "nyu_depth_v2": Benchmark(depth.read_nyu_depth_v2, ("depth",), "depth", "nyu_depth_v2_labeled.mat, splits.mat"),
    "kitti": Benchmark(depth.read_kitti, ("depth",), "depth",
                       "kitti_eigen_{train,test}.txt, input/<raw drives>, gt_depth/<proj_depth groundtruth>"),
}  # fmt: skip
"""Benchmark name (`--name`, the keys of `evaluate.benchmarks`) -> reader and protocol."""


def get_benchmark(name: str) -> Benchmark:
    """The registry's entry, or a KeyError listing the known names."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
