"""Images and depth maps that are not files of their own: a record inside a publisher's container, or a crop.

Some benchmarks ship their pictures inside one file (CIFAR's pickled batches, NYU-Depth v2's MATLAB 7.3 file) or
evaluate a part of a picture (Revisited Oxford and Paris crop each query to its `bbx`). Such an item is named by an
item URI, `<container>::<kind>:<key>`, that the evaluation readers (`datasets.read_rgb`, `datasets.read_depth`) open
through this module, so every protocol reads them as it reads files, and nothing is converted or copied to disk:
```
<cifar-10-batches-py>/data_batch_1::cifar:137        the 138th image of a CIFAR batch (32 x 32 RGB)
<nyu>/nyu_depth_v2_labeled.mat::mat:images/12        NYU frame 13's RGB image (HDF5 dataset `images`)
<nyu>/nyu_depth_v2_labeled.mat::mat:depths/12        its depth map in metres (HDF5 dataset `depths`)
<roxford5k>/jpg/all_souls_000013.jpg::crop:136,34,648,955    the query's box (x1, y1, x2, y2 in pixels)
```
A container is a local path or an s3:// URI; containers are opened once per process and kept (a few, least recently
used first out). MATLAB 7.3 files are HDF5 (read with h5py) and store arrays transposed: MATLAB's 480 x 640 x 3 x
1449 `images` is (1449, 3, 640, 480) here, hence the transposes below.
"""

from __future__ import annotations

import functools
import io
import pickle
import threading
from typing import Any

import numpy as np
from PIL import Image

from components import storage

SEPARATOR = "::"
KINDS = ("cifar", "mat", "crop")

_H5_LOCK = threading.Lock()
"""HDF5 reads from the loader's threads are serialised (the library is not thread-safe for one file handle)."""


def item_uri(container: str, kind: str, key: str | int) -> str:
    """`<container>::<kind>:<key>` (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown item kind {kind!r}; known: {', '.join(KINDS)}")
    return f"{container}{SEPARATOR}{kind}:{key}"


def split_item(uri: str) -> tuple[str, str, str] | None:
    """(container, kind, key) of an item URI; None for a plain file or a tar member (`<shard>.tar::...`)."""
    if SEPARATOR not in uri or storage.is_tar_member(uri):
        return None
    container, _, rest = uri.rpartition(SEPARATOR)
    kind, sep, key = rest.partition(":")
    if not sep or kind not in KINDS:
        return None
    return container, kind, key


def is_item(uri: str) -> bool:
    return split_item(uri) is not None


# --------------------------------------------------------------------------------------------------------------------
# Containers (opened once per process)
# --------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def cifar_batch(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) of a CIFAR python batch (`data_batch_*`, `test_batch`,
    `train`, `test`): `labels` in CIFAR-10, `fine_labels` in CIFAR-100."""
    batch = pickle.loads(storage.read_bytes(uri), encoding="bytes")
    if not isinstance(batch, dict) or b"data" not in batch:
        raise ValueError(f"{uri}: not a CIFAR python batch (expected a pickled dict with b'data')")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{uri}: b'data' has shape {data.shape}, expected (N, 3072)")
    key = b"fine_labels" if b"fine_labels" in batch else b"labels"
    if key not in batch:
        raise ValueError(f"{uri}: no b'labels' (CIFAR-10) nor b'fine_labels' (CIFAR-100)")
    labels = np.asarray(batch[key], dtype=np.int64)
    if len(labels) != len(data):
        raise ValueError(f"{uri}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # (N, 32, 32, 3): stored channel-major


@functools.lru_cache(maxsize=4)
def mat_file(uri: str) -> Any:
    """An open h5py file of a MATLAB 7.3 .mat (an S3 object is read into memory once)."""
    import h5py

    source: Any = uri if not storage.is_s3(uri) else io.BytesIO(storage.read_bytes(uri))
    try:
        return h5py.File(source, "r")
    except OSError as err:
        raise ValueError(f"{uri}: not a MATLAB 7.3 (HDF5) file: {err}") from None


def mat_dataset(uri: str, name: str) -> Any:
    """The HDF5 dataset `name` of a MATLAB 7.3 file, or a ValueError naming the file and what it holds."""
    f = mat_file(uri)
    if name not in f:
        raise ValueError(f"{uri}: no variable {name!r} (it holds {', '.join(sorted(f.keys()))})")
    return f[name]


# --------------------------------------------------------------------------------------------------------------------
# Reading items
# --------------------------------------------------------------------------------------------------------------------


def _index(uri: str, key: str) -> int:
    try:
        return int(key)
    except ValueError:
        raise ValueError(f"{uri}: item key {key!r} is not an index") from None


def _mat_record(uri: str, container: str, key: str) -> np.ndarray:
    name, _, index = key.rpartition("/")
    dataset = mat_dataset(container, name)
    i = _index(uri, index)
    if not 0 <= i < dataset.shape[0]:
        raise ValueError(f"{uri}: index {i} outside {name}'s {dataset.shape[0]} records")
    with _H5_LOCK:
        return np.asarray(dataset[i])


def read_item_rgb(uri: str) -> Image.Image:
    """The RGB picture of an item URI."""
    parts = split_item(uri)
    if parts is None:
        raise ValueError(f"{uri}: not an item URI")
    container, kind, key = parts
    if kind == "cifar":
        images, _ = cifar_batch(container)
        i = _index(uri, key)
        if not 0 <= i < len(images):
            raise ValueError(f"{uri}: index {i} outside the batch's {len(images)} images")
        return Image.fromarray(images[i])
    if kind == "mat":
        record = _mat_record(uri, container, key)  # (3, W, H): MATLAB's H x W x 3, transposed
        if record.ndim != 3 or record.shape[0] != 3:
            raise ValueError(f"{uri}: expected a (3, W, H) image record, got shape {record.shape}")
        return Image.fromarray(np.ascontiguousarray(record.transpose(2, 1, 0)).astype(np.uint8))  # (H, W, 3)
    box = [float(v) for v in key.split(",")]
    if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(f"{uri}: crop box {key!r} is not x1,y1,x2,y2 with x1 < x2 and y1 < y2")
    from components.images import decode_rgb

    image = decode_rgb(storage.read_bytes(container))
    return image.crop(tuple(round(v) for v in box))


def read_item_depth(uri: str) -> np.ndarray:
    """(H, W) float32 depth of an item URI (NYU's `depths`, in metres)."""
    parts = split_item(uri)
    if parts is None or parts[1] != "mat":
        raise ValueError(f"{uri}: not a depth item (expected <file>.mat::mat:depths/<index>)")
    container, _, key = parts
    record = _mat_record(uri, container, key)  # (W, H): MATLAB's H x W, transposed
    if record.ndim != 2:
        raise ValueError(f"{uri}: expected a (W, H) depth record, got shape {record.shape}")
    return np.ascontiguousarray(record.T).astype(np.float32)  # (H, W)
