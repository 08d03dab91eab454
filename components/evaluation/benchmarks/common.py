"""What every benchmark reader shares: the strict listing helpers, the layout error, and the decode check.

A reader turns a publisher's folder into `EvalDatasets` (the same data classes the demo's layout gives), so that the
protocols run unchanged. Readers are strict: a missing split file, an annotation without its image, an image without
its annotation or a class index outside the benchmark's classes raises `LayoutError`, naming the file and what was
expected; nothing is skipped silently. Images that fail to decode are not a layout error: `check_decodable` lists
them with the prepare stage's reasons (`components.prepare.check_image`) and the benchmark leaves them out, counted
and written beside its results.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from components import storage
from components.evaluation.datasets import (
    IMAGE_SUFFIXES,
    ClassificationData,
    DenseSplit,
    EvalDatasets,
    ImageSet,
    RetrievalData,
)


class LayoutError(ValueError):
    """A folder that is not the benchmark's layout; the message names the file and what was expected."""


@dataclass(frozen=True)
class BenchmarkData:
    """A benchmark's data as the protocols read it, and what the reader counted."""

    datasets: EvalDatasets
    num_images: dict[str, int]
    """Images per split (`train`, `val`, `test`, `query`, `database`, `<corruption>/<severity>`)."""
    num_classes: int | None = None
    """Classes (classification, segmentation); None for retrieval and depth."""
    settings: dict[str, Any] = field(default_factory=dict)
    """`evaluate` keys that the data itself fixes (Pittsburgh's 25 m positive distance, from its .mat)."""
    notes: dict[str, Any] = field(default_factory=dict)
    """What the reader wants reported beside the metrics (frames without ground truth, ...)."""


def list_folder(uri: str, *, what: str, recursive: bool = True) -> list[str]:
    """Files under a folder (sorted), or a LayoutError naming the folder and `what` it should hold."""
    try:
        return sorted(storage.list_files(uri, recursive=recursive))
    except storage.StorageNotFoundError:
        raise LayoutError(f"{uri}: missing; expected {what}") from None


def folder_exists(uri: str) -> bool:
    """True for a local folder or an S3 prefix with objects under it."""
    if not storage.is_s3(uri):
        return os.path.isdir(uri)
    try:
        return bool(storage.list_files(uri, recursive=True))
    except storage.StorageNotFoundError:
        return False


def require_file(uri: str, what: str) -> str:
    """`uri` when it exists, else a LayoutError naming it and `what` it is."""
    if not storage.exists(uri):
        raise LayoutError(f"{uri}: missing; expected {what}")
    return uri


def read_text(uri: str, what: str) -> str:
    return storage.read_bytes(require_file(uri, what)).decode("utf-8")


def read_lines(uri: str, what: str) -> list[str]:
    """Non-empty, stripped lines of a text file (a LayoutError when it is missing)."""
    return [line.strip() for line in read_text(uri, what).splitlines() if line.strip()]


def is_image(uri: str) -> bool:
    return storage.suffix(uri) in IMAGE_SUFFIXES


def stem(uri: str) -> str:
    return storage.basename(uri).rsplit(".", 1)[0]


def relative(uri: str, root: str) -> str:
    """`uri`'s path below `root`, with `/` separators."""
    return uri[len(root) :].lstrip("/").replace(os.sep, "/")


def class_folders(split_root: str, *, what: str) -> dict[str, list[str]]:
    """{class folder: its image files} of `<split_root>/<class>/<image>` (files directly under the split refused)."""
    out: dict[str, list[str]] = {}
    for uri in list_folder(split_root, what=what):
        rel = relative(uri, split_root).split("/")
        if not is_image(uri):
            continue
        if len(rel) != 2:
            raise LayoutError(f"{uri}: expected {split_root}/<class>/<image> ({what})")
        out.setdefault(rel[0], []).append(uri)
    if not out:
        raise LayoutError(f"{split_root}: no images; expected {what}")
    return out


def image_set(uris: Sequence[str], labels: Sequence[int]) -> ImageSet:
    return ImageSet(tuple(uris), np.asarray(labels, dtype=np.int64))


def labelled_set(by_class: dict[str, list[str]], names: Sequence[str], *, where: str) -> ImageSet:
    """An ImageSet of class folders labelled by their index in `names` (a folder not in `names` is an error)."""
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(by_class) - set(index))
    if unknown:
        raise LayoutError(f"{where}: class folders {unknown[:5]} are not among the benchmark's {len(names)} classes")
    pairs = sorted((uri, index[c]) for c, uris in by_class.items() for uri in uris)
    return image_set([u for u, _ in pairs], [y for _, y in pairs])


def classification(
    names: Sequence[str], train: ImageSet, test: ImageSet, val: ImageSet | None = None, **extra: Any
) -> BenchmarkData:
    """BenchmarkData of a classification benchmark (empty val: the probes hold out part of train)."""
    val = val if val is not None else image_set([], [])
    splits = {"train": train, "val": val, "test": test}
    data = ClassificationData(tuple(names), splits, **extra)
    counts = {split: len(s) for split, s in splits.items() if len(s)}
    if data.corrupted:
        counts.update({f"{c}/{s}": len(images) for (c, s), images in sorted(data.corrupted.items())})
    return BenchmarkData(EvalDatasets(classification=data), counts, len(names))


# --------------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reject:
    uri: str
    reason: str
    detail: str


def _check(uri: str, min_side: int, max_pixels: int) -> Reject | None:
    from components.evaluation.items import is_item
    from components.prepare import check_image

    if is_item(uri):  # records inside a container are checked by reading them
        from components.evaluation.datasets import read_rgb

        try:
            read_rgb(uri)
        except Exception as err:  # noqa: BLE001 - any failure to read is the reason
            return Reject(uri, "decode_error", f"{type(err).__name__}: {err}")
        return None
    try:
        data = storage.read_bytes(uri)
    except OSError as err:
        return Reject(uri, "unreadable", str(err))
    check = check_image(data, min_side=min_side, max_pixels=max_pixels)
    return Reject(uri, check.reason, check.detail) if check.reason else None


def check_decodable(
    uris: Iterable[str], *, min_side: int = 1, max_pixels: int = 400_000_000, num_threads: int = 8
) -> list[Reject]:
    """The images among `uris` that cannot be used, each with the prepare stage's reason (`empty`, `not_an_image`,
    `truncated`, `decode_error`, `too_large`, `unreadable`)."""
    uris = list(dict.fromkeys(uris))
    with ThreadPoolExecutor(max(1, min(num_threads, len(uris)))) as pool:
        found = pool.map(lambda u: _check(u, min_side, max_pixels), uris)
        return [r for r in found if r is not None]


def without(data: BenchmarkData, rejected: set[str]) -> BenchmarkData:
    """The benchmark's data with rejected images (and their targets) left out, the counts updated."""
    if not rejected:
        return data
    d = data.datasets
    counts = dict(data.num_images)

    def keep_set(s: ImageSet, key: str) -> ImageSet:
        index = [i for i, u in enumerate(s.uris) if u not in rejected]
        if key in counts:
            counts[key] = len(index)
        return s.subset(index)

    def keep_dense(s: DenseSplit, key: str) -> DenseSplit:
        pairs = [(i, t) for i, t in zip(s.image_uris, s.target_uris, strict=True) if i not in rejected]
        if key in counts:
            counts[key] = len(pairs)
        return DenseSplit(tuple(i for i, _ in pairs), tuple(t for _, t in pairs))

    changes: dict[str, Any] = {}
    if d.classification is not None:
        c = d.classification
        splits = {k: keep_set(v, k) for k, v in c.splits.items()}
        corrupted = {k: keep_set(v, f"{k[0]}/{k[1]}") for k, v in c.corrupted.items()} if c.corrupted else None
        changes["classification"] = replace(c, splits=splits, corrupted=corrupted)
    for task in ("segmentation", "depth"):
        dense = getattr(d, task)
        if dense is not None:
            changes[task] = replace(dense, splits={k: keep_dense(v, k) for k, v in dense.splits.items()})
    if d.retrieval is not None:
        r = d.retrieval
        q_keep = [i for i, u in enumerate(r.query.uris) if u not in rejected]
        db_keep = [i for i, u in enumerate(r.database.uris) if u not in rejected]
        new_index = np.full(len(r.database), -1, np.int64)
        new_index[db_keep] = np.arange(len(db_keep))
        gnd = None
        if r.ground_truth is not None:  # database indices renumbered, rejected database images dropped
            gnd = tuple(
                {k: new_index[v][new_index[v] >= 0] for k, v in r.ground_truth[i].items()} for i in q_keep
            )  # fmt: skip
        counts["query"], counts["database"] = len(q_keep), len(db_keep)
        changes["retrieval"] = replace(
            r, query=r.query.subset(q_keep), database=r.database.subset(db_keep), ground_truth=gnd,
            query_xy=None if r.query_xy is None else r.query_xy[q_keep],
            database_xy=None if r.database_xy is None else r.database_xy[db_keep],
        )  # fmt: skip
    return replace(data, datasets=replace(d, **changes), num_images=counts)


def retrieval(query: ImageSet, database: ImageSet, names: Sequence[str] = (), **extra: Any) -> BenchmarkData:
    """BenchmarkData of a retrieval benchmark."""
    data = RetrievalData(query=query, database=database, place_names=tuple(names), **extra)
    return BenchmarkData(EvalDatasets(retrieval=data), {"query": len(query), "database": len(database)})


def bytes_io(uri: str, what: str) -> io.BytesIO:
    return io.BytesIO(storage.read_bytes(require_file(uri, what)))
