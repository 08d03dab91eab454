"""Tiny copies of the benchmarks' published layouts, written by the tests: real photographs (scikit-image's sample
images, cut and shrunk), in each publisher's folders, file formats and conventions (imported by name)."""

from __future__ import annotations

import csv
import pickle
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from tests.curation.real_photos import PHOTOS, photo

SIDE = 40


@cache
def _base(name: str) -> np.ndarray:
    return np.asarray(photo(name).convert("RGB"))


def picture(i: int, size: tuple[int, int] = (SIDE, SIDE)) -> Image.Image:
    """The i-th distinct picture: a corner of one of the photographs, resized to `size` (width, height)."""
    base = _base(PHOTOS[i % len(PHOTOS)])
    h, w = base.shape[:2]
    k = (i // len(PHOTOS)) % 4
    y, x = (k // 2) * h // 3, (k % 2) * w // 3
    return Image.fromarray(base[y : y + 2 * h // 3, x : x + 2 * w // 3]).resize(size, Image.Resampling.BILINEAR)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def class_mask(image: Image.Image, num_classes: int, offset: int = 0) -> np.ndarray:
    """(H, W) uint8 classes offset .. offset + num_classes - 1 from the picture's brightness (a real-looking mask)."""
    grey = np.asarray(image.convert("L"), np.float64)
    return (offset + np.minimum(grey / 256.0 * num_classes, num_classes - 1)).astype(np.uint8)


WNIDS = ("n01440764", "n01443537", "n01484850")


# --------------------------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------------------------


def imagenet(root: Path, *, per_class: int = 3, val_per_class: int = 2, flat_val: bool = True) -> Path:
    """train/<wnid>/, val/ flat + LOC_val_solution.csv + LOC_synset_mapping.txt (or val/<wnid>/)."""
    n = 0
    rows = []
    for c, wnid in enumerate(WNIDS):
        for j in range(per_class):
            save(picture(c + 3 * j), root / "train" / wnid / f"{wnid}_{j}.JPEG", format="JPEG")
        for j in range(val_per_class):
            n += 1
            name = f"ILSVRC2012_val_{n:08d}"
            where = root / "val" / (f"{name}.JPEG" if flat_val else f"{wnid}/{name}.JPEG")
            save(picture(c + 3 * (per_class + j)), where, format="JPEG")
            rows.append((name, f"{wnid} 1 2 30 40"))
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(WNIDS)))
    if flat_val:
        with open(root / "LOC_val_solution.csv", "w", newline="") as f:
            csv.writer(f).writerows([("ImageId", "PredictionString"), *rows])
    return root


def cifar(root: Path, num_classes: int, *, per_batch: int = 4) -> Path:
    """The python pickles of CIFAR-10 (5 data batches, test_batch, batches.meta) or CIFAR-100 (train, test, meta)."""
    root.mkdir(parents=True, exist_ok=True)
    key = b"labels" if num_classes == 10 else b"fine_labels"
    names = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
    if num_classes == 100:
        names = ("train", "test")
    i = 0
    for name in names:
        data, labels = [], []
        for j in range(per_batch):
            img = np.asarray(picture(i, (32, 32)))  # (32, 32, 3)
            data.append(img.transpose(2, 0, 1).reshape(-1))  # stored channel-major: R plane, G plane, B plane
            labels.append((j % 3) * (num_classes // 10 if num_classes == 100 else 1))
            i += 1
        batch = {b"data": np.stack(data), key: labels, b"filenames": [b"x"] * per_batch}
        (root / name).write_bytes(pickle.dumps(batch))
    meta_name, names_key = ("batches.meta", b"label_names") if num_classes == 10 else ("meta", b"fine_label_names")
    (root / meta_name).write_bytes(pickle.dumps({names_key: [f"class{c}".encode() for c in range(num_classes)]}))
    return root


PETS = (("Abyssinian", 1, 1), ("beagle", 3, 2), ("Bengal", 6, 1))


def pets(root: Path, *, trainval: int = 3, test: int = 2) -> Path:
    """images/<Breed>_<n>.jpg, annotations/trainval.txt and test.txt (`<image> <class id> <species> <breed id>`)."""
    lines: dict[str, list[str]] = {"trainval": ["# Image CLASS-ID SPECIES BREED ID"], "test": []}
    i = 0
    for breed, class_id, species in PETS:
        for j in range(trainval + test):
            name = f"{breed}_{j + 1}"
            save(picture(i), root / "images" / f"{name}.jpg", format="JPEG")
            i += 1
            lines["trainval" if j < trainval else "test"].append(f"{name} {class_id} {species} {j + 1}")
    for split, rows in lines.items():
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


FOODS = ("apple_pie", "bibimbap", "churros")


def food101(root: Path, *, train: int = 3, test: int = 2) -> Path:
    """images/<class>/<id>.jpg, meta/classes.txt, meta/train.txt, meta/test.txt."""
    rows: dict[str, list[str]] = {"train": [], "test": []}
    i = 0
    for food in FOODS:
        for j in range(train + test):
            save(picture(i), root / "images" / food / f"{100 + j}.jpg", format="JPEG")
            i += 1
            rows["train" if j < train else "test"].append(f"{food}/{100 + j}")
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "classes.txt").write_text("\n".join(FOODS) + "\n")
    for split, entries in rows.items():
        (root / "meta" / f"{split}.txt").write_text("\n".join(entries) + "\n")
    return root


def imagefolder(root: Path, *, train: int = 3, test: int = 2) -> Path:
    i = 0
    for c in ("cat", "dog"):
        for split, n in (("train", train), ("test", test)):
            for j in range(n):
                save(picture(i), root / split / c / f"{j}.png")
                i += 1
    return root


# --------------------------------------------------------------------------------------------------------------------
# Robustness
# --------------------------------------------------------------------------------------------------------------------


def imagenet_c(root: Path, *, corruptions: tuple[str, ...] = ("gaussian_noise", "fog"), severities=(1, 5)) -> Path:
    """<corruption>/<severity>/<wnid>/*.JPEG: the pictures with noise or haze of that severity (not the benchmark's
    own corruption code: any shift of the pictures serves)."""
    rng = np.random.default_rng(0)
    for name in corruptions:
        for sev in severities:
            for c, wnid in enumerate(WNIDS):
                for j in range(2):
                    x = np.asarray(picture(c + 3 * j), np.float64)
                    x = x + rng.normal(0, 12 * sev, x.shape) if "noise" in name else 0.5 * x + 0.5 * 255 * sev / 5
                    save(Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)),
                         root / name / str(sev) / wnid / f"{wnid}_{j}.JPEG", format="JPEG")  # fmt: skip
    return root


def shifted(root: Path, wnids: tuple[str, ...] = WNIDS[:2], *, per_class: int = 2, nested: str = "") -> Path:
    """ImageNet-A / -R / -Sketch: <wnid>/*.jpg (or <nested>/<wnid>/)."""
    for c, wnid in enumerate(wnids):
        for j in range(per_class):
            grey = picture(c + 3 * j).convert("L").convert("RGB")  # a sketch-like shift of the picture
            save(grey, root / nested / wnid / f"{j}.jpg", format="JPEG")
    return root


# --------------------------------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------------------------------


def revisited(root: Path, dataset: str = "roxford5k") -> tuple[Path, dict]:
    """jpg/<name>.jpg and gnd_<dataset>.pkl: 2 queries (cropped from 2 of the images) over 6 database images."""
    imlist = [f"landmark_{i:06d}" for i in range(6)]
    qimlist = ["landmark_q00000", "landmark_q00001"]
    for i, name in enumerate(imlist):
        save(picture(i % 3 + 3 * (i // 3), (64, 48)), root / "jpg" / f"{name}.jpg", format="JPEG")
    for i, name in enumerate(qimlist):
        save(picture(i, (64, 48)), root / "jpg" / f"{name}.jpg", format="JPEG")
    gnd = [
        {"bbx": [4.0, 2.0, 60.0, 44.0], "easy": [0], "hard": [3], "junk": [4]},
        {"bbx": [0.0, 0.0, 50.0, 40.0], "easy": [1, 4], "hard": [], "junk": []},
    ]
    truth = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    (root / f"gnd_{dataset}.pkl").write_bytes(pickle.dumps(truth))
    return root, truth


def amstertime(root: Path, pairs: int = 4) -> Path:
    for i in range(pairs):
        save(picture(i).convert("L").convert("RGB"), root / "old" / f"{i:04d}.jpg", format="JPEG")
        save(picture(i, (48, 40)), root / "new" / f"{i:04d}.png")
    return root


def pitts30k(root: Path, *, db: int = 6, queries: int = 3) -> Path:
    """pitts30k_test.mat (NetVLAD's dbStruct, MATLAB v5), database images under the root, queries_real/."""
    from scipy.io import savemat

    db_names = [f"000/000{i:03d}_pitch1_yaw{i % 12 + 1}.jpg" for i in range(db)]
    q_names = [f"000/000{i:03d}_pitch1_yaw1.jpg" for i in range(queries)]
    for i, n in enumerate(db_names):
        save(picture(i), root / n, format="JPEG")
    for i, n in enumerate(q_names):
        save(picture(i).transpose(Image.Transpose.FLIP_LEFT_RIGHT), root / "queries_real" / n, format="JPEG")
    utm_db = np.array([[585000.0 + 30 * i, 4477000.0] for i in range(db)]).T  # 2 x N, 30 m apart
    utm_q = np.array([[585000.0 + 30 * i + 5, 4477000.0] for i in range(queries)]).T

    def cell(names: list[str]) -> np.ndarray:
        out = np.empty((len(names), 1), dtype=object)
        for i, n in enumerate(names):
            out[i, 0] = n
        return out

    struct = {"whichSet": "test", "dbImageFns": cell(db_names), "utmDb": utm_db, "qImageFns": cell(q_names),
              "utmQ": utm_q, "numImages": db, "numQueries": queries, "posDistThr": 25.0, "posDistSqThr": 625.0,
              "nonTrivPosDistSqThr": 100.0}  # fmt: skip
    savemat(root / "pitts30k_test.mat", {"dbStruct": struct})
    return root


# --------------------------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------------------------


def ade20k(root: Path, *, train: int = 4, val: int = 2) -> Path:
    """ADEChallengeData2016/{images,annotations}/{training,validation}/: masks 0 ("other") and 1..150."""
    base = root / "ADEChallengeData2016"
    i = 0
    for split, n in (("training", train), ("validation", val)):
        for j in range(n):
            img = picture(i, (48, 40))
            name = f"ADE_{'train' if split == 'training' else 'val'}_{j + 1:08d}"
            save(img, base / "images" / split / f"{name}.jpg", format="JPEG")
            mask = class_mask(img, 4, offset=0) * 37  # 0 (other), 37, 74, 111: classes among 1..150
            save(Image.fromarray(mask), base / "annotations" / split / f"{name}.png")
            i += 1
    return root


VOC_PALETTE = [v for c in range(256) for v in ((c * 37) % 256, (c * 91) % 256, (c * 53) % 256)]


def voc2012(root: Path, *, train: int = 4, val: int = 2) -> Path:
    """VOCdevkit/VOC2012/: JPEGImages, SegmentationClass (palette PNGs, 255 borders), ImageSets/Segmentation."""
    base = root / "VOCdevkit" / "VOC2012"
    ids = {"train": [f"2007_{i:06d}" for i in range(train)], "val": [f"2008_{i:06d}" for i in range(val)]}
    i = 0
    for split, names in ids.items():
        for name in names:
            img = picture(i, (48, 40))
            save(img, base / "JPEGImages" / f"{name}.jpg", format="JPEG")
            mask = class_mask(img, 3) * 7  # background 0, classes 7 and 14
            mask[0, :] = 255  # an object border: ignored
            m = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())  # palette indices = classes
            m.putpalette(VOC_PALETTE)
            save(m, base / "SegmentationClass" / f"{name}.png")
            i += 1
        seg = base / "ImageSets" / "Segmentation"
        seg.mkdir(parents=True, exist_ok=True)
        (seg / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def cityscapes(root: Path, *, train: int = 4, val: int = 2) -> Path:
    """leftImg8bit/{train,val}/<city>/ and gtFine/.../*_gtFine_labelIds.png (plus the other gtFine files)."""
    i = 0
    for split, n in (("train", train), ("val", val)):
        city = "aachen" if split == "train" else "frankfurt"
        for j in range(n):
            stem = f"{city}_{j:06d}_000019"
            img = picture(i, (64, 32))
            save(img, root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            ids = np.array([7, 11, 23, 26], np.uint8)[class_mask(img, 4)]  # road, building, sky, car
            ids[-1, :] = 1  # ego vehicle: ignored
            save(Image.fromarray(ids), root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
            save(Image.fromarray(ids), root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png")
            i += 1
    return root


# --------------------------------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------------------------------


def nyu(root: Path, *, frames: int = 7, train: tuple[int, ...] = (1, 2, 4, 6), test: tuple[int, ...] = (3, 5, 7),
        size: tuple[int, int] = (64, 48)) -> Path:  # fmt: skip
    """nyu_depth_v2_labeled.mat (MATLAB 7.3: HDF5 with the 512-byte MATLAB header, arrays stored transposed) and
    splits.mat (MATLAB v5, 1-based trainNdxs / testNdxs)."""
    import h5py
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    w, h = size
    images = np.zeros((frames, 3, w, h), np.uint8)
    depths = np.zeros((frames, w, h), np.float32)
    for i in range(frames):
        img = np.asarray(picture(i, size))  # (H, W, 3)
        images[i] = img.transpose(2, 1, 0)  # MATLAB H x W x 3 x N, as HDF5 sees it: (N, 3, W, H)
        depths[i] = (1.0 + 8.0 * img.mean(axis=2) / 255.0).T  # metres, (W, H)
    path = root / "nyu_depth_v2_labeled.mat"
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("images", data=images)
        f.create_dataset("depths", data=depths)
    with open(path, "r+b") as f:  # MATLAB's header in the user block
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan 1 00:00:00 2024 HDF5 schema 1.00 .")
    savemat(root / "splits.mat", {"trainNdxs": np.array(train, np.float64)[:, None],
                                  "testNdxs": np.array(test, np.float64)[:, None]})  # fmt: skip
    return root


def kitti(root: Path, *, train: int = 4, test: int = 2, without_gt: int = 1) -> Path:
    """kitti_eigen_{train,test}.txt, input/<date>/<drive>/image_02/data/, gt_depth/<drive>/proj_depth/groundtruth/."""
    drive = "2011_09_26_drive_0001_sync"
    lines: dict[str, list[str]] = {"train": [], "test": []}
    rng = np.random.default_rng(0)
    i = 0
    for split, n in (("train", train), ("test", test + without_gt)):
        for j in range(n):
            frame = f"{i:010d}.png"
            rgb = f"2011_09_26/{drive}/image_02/data/{frame}"
            img = picture(i, (96, 32))
            save(img, root / "input" / rgb)
            if split == "test" and j >= test:
                lines[split].append(f"{rgb} None 721.5377")
            else:
                depth_path = f"{drive}/proj_depth/groundtruth/image_02/{frame}"
                metres = 5.0 + 60.0 * np.asarray(img.convert("L"), np.float64) / 255.0
                sparse = np.where(rng.random(metres.shape) < 0.3, np.round(metres * 256.0), 0).astype(np.uint16)
                save(Image.fromarray(sparse), root / "gt_depth" / depth_path)
                lines[split].append(f"{rgb} {depth_path} 721.5377")
            i += 1
    for split, rows in lines.items():
        (root / f"kitti_eigen_{split}.txt").write_text("\n".join(rows) + "\n")
    return root
