"""Loaders for the evaluation folder formats: which images, labels and targets each task uses.

The layout of one's own data (under the raw root, `data.raw`; the paper's benchmarks are read from their publishers'
layouts instead, by components/evaluation/benchmarks/):
```
eval/classification/{train,val,test}/<class>/<image>
eval/segmentation/{train,val}/images/<id>.<ext> + masks/<id>.png     8-bit class index per pixel, 255 = ignore
eval/segmentation/meta.json            optional: {"num_classes", "class_names", "ignore_index", "reduce_zero_label"}
eval/depth/{train,val}/images/<id>.<ext> + depth/<id>.png            16-bit PNG, metres = value / depth_scale
eval/depth/meta.json                   {"depth_scale"} and optionally {"min_depth", "max_depth", "eval_crop"}
eval/retrieval/{query,database}/<place>/<image>                      same <place> = positive
eval/retrieval/positions.csv           optional: path,x,y (path relative to eval/retrieval/), for distance positives
```
The images come from the prepared manifest (`source` eval/<task>, `split`, `label`), so only images that decoded
and passed the prepare stage's checks are evaluated; masks, depth maps and meta files are read from beside them
(the stage needs no raw-root parameter: the manifest's URIs locate everything). Without a
manifest (benchmarks, tests) the folders are listed directly. Everything is read through `components.storage`, so
the root may be a local folder or an `s3://` prefix.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from PIL import Image

from components import storage
from components.evaluation import items
from components.log import get_logger

log = get_logger(__name__)

TASK_SOURCES = ("eval/classification", "eval/segmentation", "eval/depth", "eval/retrieval")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
DENSE_TARGET_DIRS = {"segmentation": "masks", "depth": "depth"}
DEFAULT_IGNORE_INDEX = 255
DEFAULT_MAX_DEPTH = 10.0
"""Depth cap when neither params nor meta.json set one and the ground truth is empty (NYU's cap, metres)."""


# --------------------------------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSet:
    """Images of one split with an integer label each (class, place) or -1."""

    uris: tuple[str, ...]
    labels: np.ndarray
    """(N,) int64."""

    def __len__(self) -> int:
        return len(self.uris)

    def subset(self, index: Sequence[int] | np.ndarray) -> ImageSet:
        index = np.asarray(index, dtype=np.int64)
        return ImageSet(tuple(self.uris[i] for i in index), self.labels[index])


@dataclass(frozen=True)
class ClassificationData:
    class_names: tuple[str, ...]
    splits: dict[str, ImageSet]
    """train (memory bank, probe training), val (probe selection; may be empty), test (reported)."""
    test_classes: tuple[int, ...] | None = None
    """Classes the test set is scored over (ImageNet-A and -R: their 200 of ImageNet's 1000, the other scores left
    out); None: all."""
    corrupted: dict[tuple[str, int], ImageSet] | None = None
    """Released corrupted copies of the test set (ImageNet-C: (corruption, severity) -> images), read instead of
    rendering the corruptions; None: the robustness task renders them."""


@dataclass(frozen=True)
class DenseSplit:
    """Images and their per-pixel targets (masks, depth maps) of one split."""

    image_uris: tuple[str, ...]
    target_uris: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.image_uris)


@dataclass(frozen=True)
class SegmentationData:
    splits: dict[str, DenseSplit]
    num_classes: int | None
    """From meta.json; None: one more than the largest class index in the masks."""
    class_names: tuple[str, ...] = ()
    ignore_index: int = DEFAULT_IGNORE_INDEX
    reduce_zero_label: bool = False
    """ADE20K convention: mask value 0 means "other" (ignored) and class k is stored as k + 1."""
    label_map: np.ndarray | None = None
    """(256,) uint8 lookup applied to every stored value first (Cityscapes: labelIds -> train ids, 255 = ignore)."""


@dataclass(frozen=True)
class DepthData:
    splits: dict[str, DenseSplit]
    depth_scale: float
    """Stored value per metre (1000: millimetres)."""
    min_depth: float | None = None
    max_depth: float | None = None
    eval_crop: str | None = None
    """`nyu`, `garg` or `eigen` (metrics.EVAL_CROPS), or None."""


@dataclass(frozen=True)
class RetrievalData:
    query: ImageSet
    database: ImageSet
    place_names: tuple[str, ...]
    query_xy: np.ndarray | None = None
    """(Q, 2) positions from positions.csv, for positives by distance; None without that file."""
    database_xy: np.ndarray | None = None
    ground_truth: tuple[dict[str, np.ndarray], ...] | None = None
    """Revisited Oxford / Paris: per query, database indices `easy`, `hard` and `junk`; scored with the revisited
    Easy / Medium / Hard protocols (`metrics.revisited_map`) instead of identities."""


@dataclass(frozen=True)
class EvalDatasets:
    """What the raw layout holds for each task (None: the task has no data)."""

    classification: ClassificationData | None = None
    segmentation: SegmentationData | None = None
    depth: DepthData | None = None
    retrieval: RetrievalData | None = None
    counts: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------------------


def read_rgb(uri: str) -> Image.Image:
    """Decodes an image as RGB (EXIF orientation is not applied: evaluation sets store pixels as they are); an item
    URI (a CIFAR record, a NYU frame, a query crop: `components.evaluation.items`) is read from its container."""
    if items.is_item(uri):
        return items.read_item_rgb(uri)
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as img:
        return img.convert("RGB")


def read_mask(uri: str) -> np.ndarray:
    """(H, W) uint8 class indices of a segmentation mask (a palette PNG's indices, not its colours)."""
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{uri}: a mask must be a single-channel image of class indices, got mode {img.mode}")
        mask = np.asarray(img)
    if mask.max(initial=0) > 255:
        raise ValueError(f"{uri}: class indices above 255")
    return mask.astype(np.uint8)


def read_depth(uri: str, depth_scale: float) -> np.ndarray:
    """(H, W) float32 depth in metres; 0 where the sensor gave no value (item URIs: NYU's depths, see `items`)."""
    if items.is_item(uri):
        return items.read_item_depth(uri) / np.float32(depth_scale)
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as img:
        raw = np.asarray(img)
    if raw.ndim != 2:
        raise ValueError(f"{uri}: a depth map must be a single-channel (16-bit) image, got shape {raw.shape}")
    return raw.astype(np.float32) / np.float32(depth_scale)


def read_many(fn, uris: Sequence[str], num_threads: int = 4) -> list:  # noqa: ANN001 - any reader above
    """Applies a reader to many URIs with a small thread pool (decoding and S3 reads release the GIL)."""
    if len(uris) < 8 or num_threads <= 1:
        return [fn(u) for u in uris]
    with ThreadPoolExecutor(num_threads) as pool:
        return list(pool.map(fn, uris))


def _read_json(uri: str) -> dict | None:
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


# --------------------------------------------------------------------------------------------------------------------
# Listing the evaluation images
# --------------------------------------------------------------------------------------------------------------------


def _rows_from_folders(raw: str) -> pd.DataFrame:
    """The manifest's eval rows, rebuilt by listing the folders (no decoding checks): uri, source, split, label."""
    rows = []
    for source in TASK_SOURCES:
        task = source.split("/")[1]
        folder = storage.join(raw, source)
        try:
            uris = storage.list_files(folder, recursive=True)
        except storage.StorageNotFoundError:
            continue
        for uri in uris:
            rel = uri[len(folder) :].lstrip("/").replace(os.sep, "/").split("/")
            if storage.suffix(uri) not in IMAGE_SUFFIXES or len(rel) < 3:
                continue
            if task in DENSE_TARGET_DIRS:
                if rel[1] != "images":
                    continue
                label = rel[-1].rsplit(".", 1)[0]
            else:
                label = rel[1]
            rows.append({"uri": uri, "source": source, "split": rel[0], "label": label})
    return pd.DataFrame(rows, columns=["uri", "source", "split", "label"])


def task_root(rows: pd.DataFrame, source: str, raw: str | None) -> str:
    """The `<root>/eval/<task>` folder of a task: from its images' URIs (so meta files sit beside the images the
    manifest lists, wherever the raw root was), else under `raw`."""
    marker = f"/{source}/"
    for uri in rows["uri"]:
        padded = "/" + uri.replace(os.sep, "/")  # a root of "." gives URIs that start with eval/
        if marker in padded:
            return (padded.rsplit(marker, 1)[0] + marker.rstrip("/"))[1:]
    if raw is None:
        raise ValueError(f"cannot locate {source}: its URIs do not contain {marker!r} and no raw root is given")
    return storage.join(raw, source)


def _dense_target_uri(image_uri: str, image_id: str, target_dir: str) -> str:
    split_dir = os.path.dirname(os.path.dirname(image_uri))  # .../<split>/images/<file> -> .../<split>
    return storage.join(split_dir, target_dir, f"{image_id}.png")


def _image_set(rows: pd.DataFrame, names: Sequence[str]) -> ImageSet:
    index = {name: i for i, name in enumerate(names)}
    rows = rows.sort_values("uri")
    return ImageSet(tuple(rows["uri"]), np.asarray([index[n] for n in rows["label"]], dtype=np.int64))


def _classification(rows: pd.DataFrame) -> ClassificationData | None:
    if rows.empty or "train" not in set(rows["split"]):
        if not rows.empty:
            log.warning("classification: no train split; kNN and linear probes are skipped")
        return None
    names = tuple(sorted(set(rows.loc[rows["split"] == "train", "label"])))
    unknown = sorted(set(rows["label"]) - set(names))
    if unknown:
        log.warning("classification: classes %s have no train image; their images are left out", unknown)
        rows = rows[rows["label"].isin(names)]
    splits = {split: _image_set(rows[rows["split"] == split], names) for split in ("train", "val", "test")}
    if len(splits["test"]) == 0:
        log.warning("classification: no test split; the val split is reported instead")
        splits["test"] = splits["val"]
    return ClassificationData(names, splits)


def _dense_splits(rows: pd.DataFrame, target_dir: str) -> dict[str, DenseSplit]:
    splits = {}
    for split in ("train", "val"):
        part = rows[rows["split"] == split].sort_values("uri")
        targets = tuple(_dense_target_uri(u, i, target_dir) for u, i in zip(part["uri"], part["label"], strict=True))
        splits[split] = DenseSplit(tuple(part["uri"]), targets)
    return splits


def _segmentation(rows: pd.DataFrame, raw: str | None) -> SegmentationData | None:
    if rows.empty:
        return None
    meta = _read_json(storage.join(task_root(rows, "eval/segmentation", raw), "meta.json")) or {}
    splits = _dense_splits(rows, DENSE_TARGET_DIRS["segmentation"])
    if not len(splits["train"]) or not len(splits["val"]):
        log.warning("segmentation: needs both train and val images; skipped")
        return None
    return SegmentationData(
        splits=splits,
        num_classes=meta.get("num_classes"),
        class_names=tuple(meta.get("class_names", ())),
        ignore_index=int(meta.get("ignore_index", DEFAULT_IGNORE_INDEX)),
        reduce_zero_label=bool(meta.get("reduce_zero_label", False)),
    )


def _depth(rows: pd.DataFrame, raw: str | None) -> DepthData | None:
    if rows.empty:
        return None
    meta_uri = storage.join(task_root(rows, "eval/depth", raw), "meta.json")
    meta = _read_json(meta_uri)
    if meta is None or "depth_scale" not in meta:
        raise ValueError(f"{meta_uri}: missing, or without depth_scale; the depth maps cannot be read in metres")
    splits = _dense_splits(rows, DENSE_TARGET_DIRS["depth"])
    if not len(splits["train"]) or not len(splits["val"]):
        log.warning("depth: needs both train and val images; skipped")
        return None
    return DepthData(
        splits=splits,
        depth_scale=float(meta["depth_scale"]),
        min_depth=meta.get("min_depth"),
        max_depth=meta.get("max_depth"),
        eval_crop=meta.get("eval_crop"),
    )


def _positions(root: str, uris: Sequence[str]) -> np.ndarray | None:
    path = storage.join(root, "positions.csv")
    if not storage.exists(path):
        return None
    table = pd.read_csv(io.BytesIO(storage.read_bytes(path)))
    if not {"path", "x", "y"} <= set(table.columns):
        raise ValueError(f"{path}: expected columns path,x,y")
    xy = {str(p): (float(x), float(y)) for p, x, y in zip(table["path"], table["x"], table["y"], strict=True)}
    out = np.full((len(uris), 2), np.nan)
    for i, uri in enumerate(uris):
        rel = uri.replace(os.sep, "/").rsplit("/eval/retrieval/", 1)[-1]
        if rel in xy:
            out[i] = xy[rel]
    if np.isnan(out).any():
        raise ValueError(f"{path}: no position for {int(np.isnan(out[:, 0]).sum())} retrieval images")
    return out


def _retrieval(rows: pd.DataFrame, raw: str | None) -> RetrievalData | None:
    if rows.empty:
        return None
    root = task_root(rows, "eval/retrieval", raw)
    names = tuple(sorted(set(rows["label"])))
    query = _image_set(rows[rows["split"] == "query"], names)
    database = _image_set(rows[rows["split"] == "database"], names)
    if not len(query) or not len(database):
        log.warning("retrieval: needs both query and database images; skipped")
        return None
    return RetrievalData(
        query=query,
        database=database,
        place_names=names,
        query_xy=_positions(root, query.uris),
        database_xy=_positions(root, database.uris),
    )


def load_eval_datasets(raw: str | None = None, manifest: pd.DataFrame | None = None) -> EvalDatasets:
    """Collects every task's images and targets.

    Args:
        raw: Root of the raw layout (local folder or s3:// prefix); needed only without a manifest.
        manifest: The prepared manifest; its rows with an `eval/<task>` source are the images used, and masks, depth
            maps and meta files are read beside them. None lists the folders under `raw` instead (no decoding
            checks).

    Returns:
        One entry per task; a task without data is None.
    """
    if manifest is None:
        if raw is None:
            raise ValueError("load_eval_datasets needs a manifest or a raw root")
        rows = _rows_from_folders(raw)
    else:
        missing = {"uri", "source", "split", "label"} - set(manifest.columns)
        if missing:
            raise ValueError(f"the manifest lacks columns {sorted(missing)}")
        rows = manifest[manifest["source"].isin(TASK_SOURCES)][["uri", "source", "split", "label"]]
        if "decodable" in manifest.columns:
            rows = rows[manifest.loc[rows.index, "decodable"].astype(bool)]
    rows = rows.astype({"label": str, "split": str})
    by_source = {source: rows[rows["source"] == source] for source in TASK_SOURCES}
    data = EvalDatasets(
        classification=_classification(by_source["eval/classification"]),
        segmentation=_segmentation(by_source["eval/segmentation"], raw),
        depth=_depth(by_source["eval/depth"], raw),
        retrieval=_retrieval(by_source["eval/retrieval"], raw),
        counts={source.split("/")[1]: int(len(part)) for source, part in by_source.items()},
    )
    log.info("evaluation images: %s", ", ".join(f"{k} {v}" for k, v in data.counts.items()))
    return data


# --------------------------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------------------------


def load_masks(data: SegmentationData, split: str) -> list[np.ndarray]:
    """The split's masks as class indices: `label_map` applied, then `reduce_zero_label` (0 -> ignore, k -> k - 1).

    Raises:
        ValueError: A mask holds a class index at or above `num_classes` (other than the ignore index), naming it.
    """
    uris = data.splits[split].target_uris
    masks = read_many(read_mask, uris)
    if data.label_map is not None:
        masks = [data.label_map[m] for m in masks]
    if data.reduce_zero_label:
        out = []
        for m in masks:
            m = m.astype(np.int16) - 1
            m[m < 0] = data.ignore_index
            m[m == data.ignore_index - 1] = data.ignore_index  # the ignore value itself stays ignored
            out.append(m.astype(np.uint8))
        masks = out
    if data.num_classes is not None:
        for uri, m in zip(uris, masks, strict=True):
            bad = m[(m != data.ignore_index) & (m >= data.num_classes)]
            if bad.size:
                raise ValueError(f"{uri}: class index {int(bad.max())} in a mask of {data.num_classes} classes "
                                 f"(0..{data.num_classes - 1}, {data.ignore_index} = ignore)")  # fmt: skip
    return masks


def num_segmentation_classes(data: SegmentationData, masks: Sequence[np.ndarray]) -> int:
    """C: meta.json's `num_classes`, else one more than the largest index in the masks (ignore left out)."""
    if data.num_classes is not None:
        return int(data.num_classes)
    largest = max(int(m[m != data.ignore_index].max(initial=0)) for m in masks)
    return largest + 1


def load_depths(data: DepthData, split: str) -> list[np.ndarray]:
    """The split's depth maps in metres (0 = invalid)."""
    return read_many(lambda uri: read_depth(uri, data.depth_scale), data.splits[split].target_uris)


def depth_range(data: DepthData, depths: Sequence[np.ndarray], min_depth: float, max_depth: float | None) -> tuple:
    """(min, max) depth caps: params first, then meta.json, then the largest training depth rounded up."""
    lo = data.min_depth if data.min_depth is not None else min_depth
    if max_depth is not None:
        hi = max_depth
    elif data.max_depth is not None:
        hi = float(data.max_depth)
    else:
        largest = max((float(d.max(initial=0.0)) for d in depths), default=0.0)
        hi = float(math.floor(largest) + 1) if largest > 0 else DEFAULT_MAX_DEPTH  # strictly above the data
    if not hi > lo:
        raise ValueError(f"depth caps must satisfy min < max, got {lo} and {hi}")
    return float(lo), float(hi)
