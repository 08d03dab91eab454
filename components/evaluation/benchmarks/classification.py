"""Classification benchmarks read from their publishers' layouts: ImageNet-1k, CIFAR-10 / -100, Oxford-IIIT Pets,
Food-101 and any ImageFolder.

```
imagenet1k   <root>/train/<wnid>/*.JPEG
             <root>/val/<wnid>/*.JPEG, or <root>/val/*.JPEG flat with <root>/LOC_val_solution.csv (ImageId,
             PredictionString: the first token is the wnid) and <root>/LOC_synset_mapping.txt (`<wnid> <names>`,
             one line per class: the class list and order)
cifar10      <root>/data_batch_{1..5}, test_batch, batches.meta     (cifar-10-batches-py/, python pickles)
cifar100     <root>/train, test, meta                               (cifar-100-python/, the 100 fine labels)
pets         <root>/annotations/{trainval,test}.txt (`<image> <class id> <species> <breed id>`), <root>/images/
food101      <root>/meta/{classes,train,test}.txt (`<class>/<id>`), <root>/images/<class>/<id>.jpg
imagefolder  <root>/train/<class>/*, and <root>/test/<class>/* and/or <root>/val/<class>/* (val is reported when
             there is no test)
```
The reported split is the publisher's test split (ImageNet: the 50,000 val images); the probes select their
hyperparameters on a held-out tenth of train (the splits carry no separate val), as DINOv2's linear evaluation.
"""

from __future__ import annotations

import csv
import io
import pickle

from components import storage
from components.evaluation.benchmarks.common import (
    BenchmarkData,
    LayoutError,
    class_folders,
    classification,
    folder_exists,
    image_set,
    is_image,
    labelled_set,
    list_folder,
    read_lines,
    relative,
    require_file,
    stem,
)
from components.evaluation.datasets import ImageSet
from components.evaluation.items import cifar_batch, item_uri

# --------------------------------------------------------------------------------------------------------------------
# ImageNet-1k
# --------------------------------------------------------------------------------------------------------------------

SYNSET_MAPPING = "LOC_synset_mapping.txt"
VAL_SOLUTION = "LOC_val_solution.csv"


def imagenet_classes(root: str) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    """(wnids in class order, train images per wnid) of an ImageNet root: the order of LOC_synset_mapping.txt when
    present (every train folder must be one of its synsets, every synset must have one), else the sorted folders."""
    train = class_folders(storage.join(root, "train"), what="ImageNet's train/<wnid>/<image>")
    mapping_uri = storage.join(root, SYNSET_MAPPING)
    if not storage.exists(mapping_uri):
        return tuple(sorted(train)), train
    wnids = tuple(line.split()[0] for line in read_lines(mapping_uri, "the synset mapping"))
    if len(set(wnids)) != len(wnids):
        raise LayoutError(f"{mapping_uri}: a synset is listed twice")
    missing = [w for w in wnids if w not in train]
    if missing:
        raise LayoutError(f"{storage.join(root, 'train')}: no folder for {len(missing)} of the {len(wnids)} synsets of "
                          f"{SYNSET_MAPPING} (first: {missing[0]}); expected train/<wnid>/ for each")  # fmt: skip
    extra = sorted(set(train) - set(wnids))
    if extra:
        raise LayoutError(f"{storage.join(root, 'train', extra[0])}: not a synset of {mapping_uri} "
                          f"({len(wnids)} classes)")  # fmt: skip
    return wnids, train


def _flat_val(root: str, files: list[str], wnids: tuple[str, ...]) -> ImageSet:
    solution_uri = require_file(storage.join(root, VAL_SOLUTION), "the val labels (ImageId,PredictionString)")
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(solution_uri).decode("utf-8"))))
    if rows and not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise LayoutError(f"{solution_uri}: expected the columns ImageId,PredictionString, got {list(rows[0])}")
    label = {r["ImageId"]: r["PredictionString"].split()[0] for r in rows if r["PredictionString"].split()}
    index = {w: i for i, w in enumerate(wnids)}
    by_id = {stem(f): f for f in files}
    orphans = sorted(set(label) - set(by_id))
    if orphans:
        raise LayoutError(f"{solution_uri}: {len(orphans)} labelled images are not in {storage.join(root, 'val')} "
                          f"(first: {orphans[0]})")  # fmt: skip
    unlabelled = sorted(set(by_id) - set(label))
    if unlabelled:
        raise LayoutError(f"{by_id[unlabelled[0]]}: no label in {solution_uri} ({len(unlabelled)} such images)")
    unknown = sorted({w for w in label.values() if w not in index})
    if unknown:
        raise LayoutError(f"{solution_uri}: synsets {unknown[:3]} are not among the {len(wnids)} train classes")
    ids = sorted(by_id)
    return image_set([by_id[i] for i in ids], [index[label[i]] for i in ids])


def imagenet_val(root: str, wnids: tuple[str, ...]) -> ImageSet:
    """ImageNet's val images (the reported split), in class folders or flat with LOC_val_solution.csv."""
    val_root = storage.join(root, "val")
    files = [f for f in list_folder(val_root, what="ImageNet's val images") if is_image(f)]
    depths = {len(relative(f, val_root).split("/")) for f in files}
    if not files:
        raise LayoutError(f"{val_root}: no images; expected val/<wnid>/<image> or val/<image> + {VAL_SOLUTION}")
    if depths == {1}:
        return _flat_val(root, files, wnids)
    if depths == {2}:
        return labelled_set(class_folders(val_root, what="val/<wnid>/<image>"), wnids, where=val_root)
    raise LayoutError(f"{val_root}: mixes flat images and class folders; expected one of the two")


def read_imagenet1k(root: str, train_root: str | None = None) -> BenchmarkData:
    """ImageNet-1k: train/ (probes and kNN bank), val/ (reported)."""
    wnids, train = imagenet_classes(root)
    return classification(wnids, labelled_set(train, wnids, where=root), imagenet_val(root, wnids))


# --------------------------------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------------------------------

CIFAR = {
    10: (("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"), ("test_batch",),
         "batches.meta", b"label_names", "cifar-10-batches-py"),
    100: (("train",), ("test",), "meta", b"fine_label_names", "cifar-100-python"),
}  # fmt: skip
"""Classes -> (train batches, test batches, meta file, its class-name key, the folder the archive unpacks to)."""


def _cifar_set(root: str, batches: tuple[str, ...], num_classes: int) -> ImageSet:
    uris, labels = [], []
    for name in batches:
        uri = require_file(storage.join(root, name), f"a CIFAR-{num_classes} python batch")
        _, y = cifar_batch(uri)
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise LayoutError(f"{uri}: label {int(y.max())} outside CIFAR-{num_classes}'s {num_classes} classes")
        uris += [item_uri(uri, "cifar", i) for i in range(len(y))]
        labels += y.tolist()
    return image_set(uris, labels)


def read_cifar(root: str, num_classes: int) -> BenchmarkData:
    """CIFAR-10 or CIFAR-100 from the python pickles (root: the unpacked folder, or the folder holding it)."""
    train_batches, test_batches, meta_name, names_key, folder = CIFAR[num_classes]
    if not storage.exists(storage.join(root, meta_name)) and storage.exists(storage.join(root, folder, meta_name)):
        root = storage.join(root, folder)
    meta_uri = require_file(storage.join(root, meta_name), f"CIFAR-{num_classes}'s class names ({names_key.decode()})")
    meta = pickle.loads(storage.read_bytes(meta_uri), encoding="bytes")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, [])]
    if len(names) != num_classes:
        raise LayoutError(f"{meta_uri}: {len(names)} class names under {names_key.decode()}, expected {num_classes}")
    return classification(names, _cifar_set(root, train_batches, num_classes), _cifar_set(root, test_batches,
                                                                                          num_classes))  # fmt: skip


def read_cifar10(root: str, train_root: str | None = None) -> BenchmarkData:
    return read_cifar(root, 10)


def read_cifar100(root: str, train_root: str | None = None) -> BenchmarkData:
    return read_cifar(root, 100)


# --------------------------------------------------------------------------------------------------------------------
# Oxford-IIIT Pets, Food-101, ImageFolder
# --------------------------------------------------------------------------------------------------------------------

PETS_CLASSES = 37


def read_pets(root: str, train_root: str | None = None) -> BenchmarkData:
    """Oxford-IIIT Pets: annotations/trainval.txt (train) and test.txt (reported), 37 breeds."""
    images = {stem(f): f for f in list_folder(storage.join(root, "images"), what="the pet photographs") if is_image(f)}
    rows: dict[str, list[tuple[str, int]]] = {}
    breeds: dict[int, str] = {}
    for split in ("trainval", "test"):
        uri = storage.join(root, "annotations", f"{split}.txt")
        for line in read_lines(uri, f"the {split} split list"):
            if line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) < 2 or not parts[1].isdigit():
                raise LayoutError(f"{uri}: line {line!r} is not `<image> <class id> <species> <breed id>`")
            name, class_id = parts[0], int(parts[1])
            if not 1 <= class_id <= PETS_CLASSES:
                raise LayoutError(f"{uri}: class id {class_id} of {name} outside 1..{PETS_CLASSES}")
            if name not in images:
                raise LayoutError(f"{uri}: {name} has no image {storage.join(root, 'images', name + '.jpg')}")
            breed = name.rsplit("_", 1)[0]
            if breeds.setdefault(class_id, breed) != breed:
                raise LayoutError(f"{uri}: class id {class_id} is both {breeds[class_id]} and {breed}")
            rows.setdefault(split, []).append((images[name], class_id))
    ids = sorted(breeds)
    index = {c: i for i, c in enumerate(ids)}
    sets = {s: image_set([u for u, _ in r], [index[c] for _, c in r]) for s, r in rows.items()}
    if "trainval" not in sets or "test" not in sets:
        raise LayoutError(f"{storage.join(root, 'annotations')}: trainval.txt and test.txt must list images")
    return classification([breeds[c] for c in ids], sets["trainval"], sets["test"])


def read_food101(root: str, train_root: str | None = None) -> BenchmarkData:
    """Food-101: meta/train.txt (train) and meta/test.txt (reported) over meta/classes.txt."""
    names = read_lines(storage.join(root, "meta", "classes.txt"), "Food-101's class list")
    index = {n: i for i, n in enumerate(names)}
    images_root = storage.join(root, "images")
    files = {relative(f, images_root).rsplit(".", 1)[0]: f for f in list_folder(images_root, what="the food photos")}
    sets = {}
    for split in ("train", "test"):
        uri = storage.join(root, "meta", f"{split}.txt")
        uris, labels = [], []
        for entry in read_lines(uri, f"the {split} split list"):
            cls = entry.split("/")[0]
            if cls not in index:
                raise LayoutError(f"{uri}: class {cls!r} of {entry} is not in meta/classes.txt ({len(names)} classes)")
            if entry not in files:
                raise LayoutError(f"{uri}: {entry} has no image {storage.join(images_root, entry + '.jpg')}")
            uris.append(files[entry])
            labels.append(index[cls])
        sets[split] = image_set(uris, labels)
    return classification(names, sets["train"], sets["test"])


def read_imagefolder(root: str, train_root: str | None = None) -> BenchmarkData:
    """Any ImageFolder: train/<class>/ (train), test/<class>/ (reported; val/ when there is no test/), val/ (probe
    selection when test/ exists)."""
    train = class_folders(storage.join(root, "train"), what="train/<class>/<image>")
    names = tuple(sorted(train))
    found = {s: folder_exists(storage.join(root, s)) for s in ("val", "test")}
    if not any(found.values()):
        raise LayoutError(f"{root}: neither test/ nor val/; expected test/<class>/<image> (or val/) to report")

    def split(name: str) -> ImageSet:
        folder = storage.join(root, name)
        return labelled_set(class_folders(folder, what=f"{name}/<class>/<image>"), names, where=folder)

    test = split("test") if found["test"] else split("val")
    val = split("val") if found["test"] and found["val"] else None
    return classification(names, labelled_set(train, names, where=root), test, val)
