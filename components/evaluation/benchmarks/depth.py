"""Monocular depth benchmarks read from their publishers' layouts: NYU-Depth v2 and KITTI (Eigen split).

```
nyu_depth_v2  <root>/nyu_depth_v2_labeled.mat   MATLAB 7.3 (HDF5): `images` 480 x 640 x 3 x 1449 uint8, `depths`
                                                480 x 640 x 1449 float metres (stored transposed, items.py)
              <root>/splits.mat                 `trainNdxs` (795) and `testNdxs` (654), 1-based frame numbers
kitti         <root>/kitti_eigen_train.txt, <root>/kitti_eigen_test.txt   lines `<rgb> <depth> [focal]` (the
              Eigen split as the depth toolbox DINOv2 used ships it; `None` for a frame without ground truth)
              <root>/input/<rgb>                 raw KITTI images (2011_09_26/..._sync/image_02/data/<frame>.png)
              <root>/gt_depth/<depth>            annotated depth (..._sync/proj_depth/groundtruth/image_02/<frame>.png):
                                                16-bit PNGs, metres = value / 256, 0 = no LiDAR point
```
Protocol settings the data fixes: NYU is scored on Eigen's crop (rows 45:471, columns 41:601) up to 10 m, KITTI on
Garg's crop up to 80 m, both from 1e-3 m. The reported split is the test split (654 NYU frames, the Eigen test frames
that have ground truth for KITTI); the heads train on the train split.
"""

from __future__ import annotations

import io

import numpy as np

from components import storage
from components.evaluation.benchmarks.common import (
    BenchmarkData,
    LayoutError,
    folder_exists,
    list_folder,
    read_lines,
    relative,
    require_file,
)
from components.evaluation.datasets import DenseSplit, DepthData, EvalDatasets
from components.evaluation.items import item_uri, mat_dataset

NYU_MAT = "nyu_depth_v2_labeled.mat"
NYU_SPLITS = "splits.mat"
NYU_MAX_DEPTH = 10.0
KITTI_MAX_DEPTH = 80.0
KITTI_DEPTH_SCALE = 256.0
MIN_DEPTH = 1e-3


def _split_indices(uri: str) -> dict[str, np.ndarray]:
    """trainNdxs / testNdxs of splits.mat (MATLAB v5, read with scipy; a v7.3 file with h5py)."""
    raw = storage.read_bytes(require_file(uri, "NYU's standard split (trainNdxs, testNdxs)"))
    if raw[:19] == b"MATLAB 7.3 MAT-file" or raw[:8] == b"\x89HDF\r\n\x1a\n":
        import h5py

        with h5py.File(io.BytesIO(raw), "r") as f:
            found = {k: np.asarray(f[k]).ravel() for k in ("trainNdxs", "testNdxs") if k in f}
    else:
        from scipy.io import loadmat

        mat = loadmat(io.BytesIO(raw))
        found = {k: np.asarray(mat[k]).ravel() for k in ("trainNdxs", "testNdxs") if k in mat}
    if set(found) != {"trainNdxs", "testNdxs"}:
        raise LayoutError(f"{uri}: expected the variables trainNdxs and testNdxs, found {sorted(found)}")
    return {k: v.astype(np.int64) for k, v in found.items()}


def read_nyu_depth_v2(root: str, train_root: str | None = None) -> BenchmarkData:
    """NYU-Depth v2 labelled frames: the standard 795 / 654 split, Eigen crop, 10 m cap."""
    mat_uri = require_file(storage.join(root, NYU_MAT), "NYU-Depth v2's labelled set (MATLAB 7.3)")
    images, depths = mat_dataset(mat_uri, "images"), mat_dataset(mat_uri, "depths")
    if images.ndim != 4 or images.shape[1] != 3 or depths.ndim != 3:
        raise LayoutError(f"{mat_uri}: images {images.shape} / depths {depths.shape}; expected (N, 3, W, H) and "
                          "(N, W, H), MATLAB's H x W x 3 x N and H x W x N")  # fmt: skip
    num = images.shape[0]
    if depths.shape[0] != num or depths.shape[1:] != images.shape[2:]:
        raise LayoutError(f"{mat_uri}: {num} images of {images.shape[2:]} but depths {depths.shape}")
    splits_uri = storage.join(root, NYU_SPLITS)
    idx = _split_indices(splits_uri)
    for key, values in idx.items():
        if values.size == 0 or values.min() < 1 or values.max() > num:
            raise LayoutError(f"{splits_uri}: {key} holds frame numbers outside 1..{num} (the .mat's frames)")
    if np.intersect1d(idx["trainNdxs"], idx["testNdxs"]).size:
        raise LayoutError(f"{splits_uri}: trainNdxs and testNdxs share frames")

    def split(values: np.ndarray) -> DenseSplit:
        frames = [int(v) - 1 for v in values]  # MATLAB's 1-based numbers
        return DenseSplit(tuple(item_uri(mat_uri, "mat", f"images/{i}") for i in frames),
                          tuple(item_uri(mat_uri, "mat", f"depths/{i}") for i in frames))  # fmt: skip

    data = DepthData(splits={"train": split(idx["trainNdxs"]), "val": split(idx["testNdxs"])}, depth_scale=1.0,
                     min_depth=MIN_DEPTH, max_depth=NYU_MAX_DEPTH, eval_crop="nyu")  # fmt: skip
    counts = {"train": len(data.splits["train"]), "test": len(data.splits["val"])}
    return BenchmarkData(EvalDatasets(depth=data), counts, settings={"depth_max": NYU_MAX_DEPTH})


KITTI_SPLIT_FILES = {"train": "kitti_eigen_train.txt", "test": "kitti_eigen_test.txt"}


def read_kitti(root: str, train_root: str | None = None) -> BenchmarkData:
    """KITTI, Eigen split with the annotated depth: Garg crop, 80 m cap."""
    inputs, gt = storage.join(root, "input"), storage.join(root, "gt_depth")
    for folder, what in ((inputs, "the raw KITTI images"), (gt, "the annotated depth (proj_depth/groundtruth)")):
        if not folder_exists(folder):
            raise LayoutError(f"{folder}: missing; expected {what}")
    have_rgb = {relative(f, inputs) for f in list_folder(inputs, what="the raw KITTI images")}
    have_depth = {relative(f, gt) for f in list_folder(gt, what="the annotated depth")}
    splits, without_gt = {}, {}
    for split, name in KITTI_SPLIT_FILES.items():
        list_uri = storage.join(root, name)
        rgbs, targets, missing = [], [], 0
        for line in read_lines(list_uri, f"the Eigen {split} split"):
            parts = line.split()
            if len(parts) < 2:
                raise LayoutError(f"{list_uri}: line {line!r} is not `<rgb> <depth> [focal]`")
            rgb, depth = parts[0], parts[1]
            if rgb not in have_rgb:
                raise LayoutError(f"{list_uri}: {rgb} has no image {storage.join(inputs, rgb)}")
            if depth == "None":
                missing += 1  # the split lists the frame, the annotated depth has none: not scored
                continue
            if depth not in have_depth:
                raise LayoutError(f"{list_uri}: {depth} has no depth map {storage.join(gt, depth)}")
            rgbs.append(storage.join(inputs, rgb))
            targets.append(storage.join(gt, depth))
        splits["val" if split == "test" else "train"] = DenseSplit(tuple(rgbs), tuple(targets))
        without_gt[split] = missing
    data = DepthData(splits=splits, depth_scale=KITTI_DEPTH_SCALE, min_depth=MIN_DEPTH, max_depth=KITTI_MAX_DEPTH,
                     eval_crop="garg")  # fmt: skip
    counts = {"train": len(splits["train"]), "test": len(splits["val"])}
    notes = {"frames_without_ground_truth": without_gt} if any(without_gt.values()) else {}
    return BenchmarkData(EvalDatasets(depth=data), counts, settings={"depth_max": KITTI_MAX_DEPTH}, notes=notes)
