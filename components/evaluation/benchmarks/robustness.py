"""Robustness benchmarks: ImageNet-C, -A, -R and -Sketch, each scored by the classifiers trained on ImageNet-1k.

`--train-root` is an ImageNet-1k root (`classification.read_imagenet1k`'s layout): its train split trains the linear
probe (and is kNN's bank); the probe is selected on a held-out tenth of it. Then:
```
imagenet_c       <root>/<corruption>/<severity>/<wnid>/*.JPEG    the released corrupted val images (15 corruptions
                 x 5 severities); the clean ImageNet val is the test split (its error is `clean_error`), mCE is
                 normalised by AlexNet's published errors (components/evaluation/alexnet_c.py)
imagenet_a       <root>/<wnid>/*.jpg     200 classes: scored over those 200 of the probe's 1000 (the usual protocol)
imagenet_r       <root>/<wnid>/*.jpg     200 classes, the same
imagenet_sketch  <root>/<wnid>/*.JPEG or <root>/sketch/<wnid>/*.JPEG   all 1000 classes
```
Folders of ImageNet-C's four extra corruptions (speckle_noise, gaussian_blur, spatter, saturate) are not part of
mCE: they are listed in the results' notes and not evaluated.
"""

from __future__ import annotations

from components import storage
from components.evaluation.benchmarks.classification import imagenet_classes, imagenet_val
from components.evaluation.benchmarks.common import (
    BenchmarkData,
    LayoutError,
    class_folders,
    classification,
    folder_exists,
    labelled_set,
    list_folder,
    relative,
)
from components.evaluation.corruptions import CORRUPTIONS
from components.evaluation.datasets import ImageSet

IMAGENET_C_EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")


def _needs_train_root(name: str, train_root: str | None) -> str:
    if train_root is None:
        raise LayoutError(f"{name}: needs --train-root, an ImageNet-1k root (train/<wnid>/) to train the classifier")
    return train_root


def read_imagenet_c(root: str, train_root: str | None = None) -> BenchmarkData:
    """ImageNet-C from its folders, the classifiers from ImageNet-1k (`train_root`)."""
    imagenet = _needs_train_root("imagenet_c", train_root)
    wnids, train = imagenet_classes(imagenet)
    folders = sorted({relative(f, root).split("/")[0] for f in list_folder(root, what="<corruption>/<severity>/")})
    unknown = [f for f in folders if f not in CORRUPTIONS and f not in IMAGENET_C_EXTRA]
    if unknown:
        raise LayoutError(f"{storage.join(root, unknown[0])}: not an ImageNet-C corruption; expected folders named "
                          f"after the 15 corruptions ({', '.join(CORRUPTIONS[:3])}, ...)")  # fmt: skip
    present = [c for c in CORRUPTIONS if c in folders]
    if not present:
        raise LayoutError(f"{root}: no corruption folder; expected <corruption>/<severity>/<wnid>/<image>")
    corrupted: dict[tuple[str, int], ImageSet] = {}
    for name in present:
        folder = storage.join(root, name)
        severities = sorted({relative(f, folder).split("/")[0] for f in list_folder(folder, what="<severity>/")})
        for sev in severities:
            if sev not in ("1", "2", "3", "4", "5"):
                raise LayoutError(f"{storage.join(folder, sev)}: not a severity; expected the folders 1 to 5")
            sev_root = storage.join(folder, sev)
            by_class = class_folders(sev_root, what="<wnid>/<image>")
            corrupted[(name, int(sev))] = labelled_set(by_class, wnids, where=sev_root)
    data = classification(wnids, labelled_set(train, wnids, where=imagenet), imagenet_val(imagenet, wnids),
                          corrupted=corrupted)  # fmt: skip
    extra = [f for f in folders if f in IMAGENET_C_EXTRA]
    notes = {"not_evaluated": extra, "reason": "ImageNet-C's extra corruptions are not part of mCE"} if extra else {}
    return BenchmarkData(data.datasets, data.num_images, data.num_classes, notes=notes)


def _shifted(name: str, test_root: str, train_root: str | None, *, subset: bool) -> BenchmarkData:
    """A test set of ImageNet classes in wnid folders, the classifiers from ImageNet-1k; `subset`: scored over the
    classes it holds only (ImageNet-A / -R's 200)."""
    imagenet = _needs_train_root(name, train_root)
    wnids, train = imagenet_classes(imagenet)
    by_class = class_folders(test_root, what="<wnid>/<image>")
    test = labelled_set(by_class, wnids, where=test_root)
    index = {w: i for i, w in enumerate(wnids)}
    classes = tuple(sorted(index[w] for w in by_class))
    data = classification(wnids, labelled_set(train, wnids, where=imagenet), test,
                          test_classes=classes if subset else None)  # fmt: skip
    notes = {"train_classes": len(wnids), "scored_over": len(classes) if subset else len(wnids)}
    return BenchmarkData(data.datasets, data.num_images, len(classes), notes=notes)


def read_imagenet_a(root: str, train_root: str | None = None) -> BenchmarkData:
    return _shifted("imagenet_a", root, train_root, subset=True)


def read_imagenet_r(root: str, train_root: str | None = None) -> BenchmarkData:
    return _shifted("imagenet_r", root, train_root, subset=True)


def read_imagenet_sketch(root: str, train_root: str | None = None) -> BenchmarkData:
    nested = storage.join(root, "sketch")
    return _shifted("imagenet_sketch", nested if folder_exists(nested) else root, train_root, subset=False)
