"""Semantic segmentation benchmarks read from their publishers' layouts: ADE20K, Pascal VOC 2012, Cityscapes.

```
ade20k      <root>/images/{training,validation}/<id>.jpg + <root>/annotations/{training,validation}/<id>.png
            (ADEChallengeData2016/, or the folder holding it): 150 classes stored as 1..150, 0 = "other" (ignored)
voc2012     <root>/JPEGImages/<id>.jpg, <root>/SegmentationClass/<id>.png (palette PNGs: the palette index is the
            class, 255 = the ignored borders), <root>/ImageSets/Segmentation/{train,val}.txt (VOC2012/, or
            VOCdevkit/VOC2012/ under the root): 21 classes with the background
cityscapes  <root>/leftImg8bit/{train,val}/<city>/<id>_leftImg8bit.png + <root>/gtFine/{train,val}/<city>/
            <id>_gtFine_labelIds.png: the 34 label ids mapped to the 19 train ids of the benchmark, others ignored
```
The reported split is the publisher's val split (ADE20K's 2,000 validation images, VOC's 1,449, Cityscapes' 500);
the heads train on the train split. Every image needs its annotation and every annotation its image.
"""

from __future__ import annotations

import numpy as np

from components import storage
from components.evaluation.benchmarks.common import (
    BenchmarkData,
    LayoutError,
    folder_exists,
    is_image,
    list_folder,
    read_lines,
    relative,
    stem,
)
from components.evaluation.datasets import DenseSplit, EvalDatasets, SegmentationData

IGNORE = 255


def _pairs(images_root: str, targets_root: str, *, target_suffix: str = ".png", image_tag: str = "",
           target_tag: str = "") -> DenseSplit:  # fmt: skip
    """Images and their annotations matched by relative path and id; an image without annotation, or the
    reverse, is a LayoutError naming it."""

    def key(uri: str, root: str, tag: str) -> str:
        rel = relative(uri, root).rsplit(".", 1)[0]
        return rel[: -len(tag)] if tag and rel.endswith(tag) else rel

    images = {key(f, images_root, image_tag): f for f in list_folder(images_root, what="images") if is_image(f)}
    targets = {
        key(f, targets_root, target_tag): f
        for f in list_folder(targets_root, what="annotations")
        if f.endswith(target_suffix) and (not target_tag or stem(f).endswith(target_tag))
    }
    for a, b, other in ((images, targets, targets_root), (targets, images, images_root)):
        lonely = sorted(set(a) - set(b))
        if lonely:
            raise LayoutError(f"{a[lonely[0]]}: no counterpart under {other} ({len(lonely)} such files)")
    ids = sorted(images)
    return DenseSplit(tuple(images[i] for i in ids), tuple(targets[i] for i in ids))


def _benchmark(splits: dict[str, DenseSplit], num_classes: int, **extra: object) -> BenchmarkData:
    data = SegmentationData(splits=splits, num_classes=num_classes, **extra)  # type: ignore[arg-type]
    counts = {split: len(s) for split, s in splits.items()}
    return BenchmarkData(EvalDatasets(segmentation=data), counts, num_classes)


# --------------------------------------------------------------------------------------------------------------------
# ADE20K
# --------------------------------------------------------------------------------------------------------------------

ADE20K_CLASSES = 150


def read_ade20k(root: str, train_root: str | None = None) -> BenchmarkData:
    """ADE20K (SceneParsing, ADEChallengeData2016): 150 classes, 0 ignored."""
    nested = storage.join(root, "ADEChallengeData2016")
    if folder_exists(nested):
        root = nested
    splits = {
        ours: _pairs(storage.join(root, "images", theirs), storage.join(root, "annotations", theirs))
        for ours, theirs in (("train", "training"), ("val", "validation"))
    }
    return _benchmark(splits, ADE20K_CLASSES, reduce_zero_label=True)


# --------------------------------------------------------------------------------------------------------------------
# Pascal VOC 2012
# --------------------------------------------------------------------------------------------------------------------

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def read_voc2012(root: str, train_root: str | None = None) -> BenchmarkData:
    """Pascal VOC 2012 segmentation: the train and val lists of ImageSets/Segmentation, 21 classes, 255 ignored."""
    for nested in (storage.join(root, "VOCdevkit", "VOC2012"), storage.join(root, "VOC2012")):
        if folder_exists(nested):
            root = nested
            break
    images = {stem(f): f for f in list_folder(storage.join(root, "JPEGImages"), what="the JPEG images")}
    masks_root = storage.join(root, "SegmentationClass")
    masks = {stem(f): f for f in list_folder(masks_root, what="the palette PNG masks") if f.endswith(".png")}
    splits = {}
    for split in ("train", "val"):
        list_uri = storage.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        ids = read_lines(list_uri, f"the {split} image ids")
        for i in ids:
            if i not in images:
                raise LayoutError(f"{list_uri}: {i} has no image {storage.join(root, 'JPEGImages', i + '.jpg')}")
            if i not in masks:
                raise LayoutError(f"{list_uri}: {i} has no mask {storage.join(masks_root, i + '.png')}")
        splits[split] = DenseSplit(tuple(images[i] for i in ids), tuple(masks[i] for i in ids))
    return _benchmark(splits, len(VOC_CLASSES), class_names=VOC_CLASSES, ignore_index=IGNORE)


# --------------------------------------------------------------------------------------------------------------------
# Cityscapes
# --------------------------------------------------------------------------------------------------------------------

CITYSCAPES_TRAIN_IDS: dict[int, tuple[int, str]] = {
    7: (0, "road"), 8: (1, "sidewalk"), 11: (2, "building"), 12: (3, "wall"), 13: (4, "fence"), 17: (5, "pole"),
    19: (6, "traffic light"), 20: (7, "traffic sign"), 21: (8, "vegetation"), 22: (9, "terrain"), 23: (10, "sky"),
    24: (11, "person"), 25: (12, "rider"), 26: (13, "car"), 27: (14, "truck"), 28: (15, "bus"), 31: (16, "train"),
    32: (17, "motorcycle"), 33: (18, "bicycle"),
}  # fmt: skip
"""Label id -> (train id, name) of the 19 evaluated classes (cityscapesScripts' `labels.py`); every other id
(unlabeled, ego vehicle, ground, parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer, ...)
is ignored."""


def cityscapes_label_map() -> np.ndarray:
    """(256,) uint8: label id -> train id, 255 for the ignored ids."""
    lut = np.full(256, IGNORE, np.uint8)
    for label_id, (train_id, _) in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


def read_cityscapes(root: str, train_root: str | None = None) -> BenchmarkData:
    """Cityscapes fine annotations: labelIds mapped to the 19 train ids."""
    splits = {
        split: _pairs(
            storage.join(root, "leftImg8bit", split),
            storage.join(root, "gtFine", split),
            image_tag="_leftImg8bit",
            target_tag="_gtFine_labelIds",
        )  # fmt: skip
        for split in ("train", "val")
    }
    names = tuple(name for _, name in sorted(CITYSCAPES_TRAIN_IDS.values()))
    return _benchmark(splits, len(names), class_names=names, ignore_index=IGNORE, label_map=cityscapes_label_map())
