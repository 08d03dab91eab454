"""The core of the `prepare` stage: scan the sources, decode and check every file, build the manifest and the rejects.

Run: `python -m components prepare` (the stage wrapper in components/stages/prepare.py calls `prepare` and
`write_outputs`).

The raw layout (a local folder or `s3://bucket/prefix`; bring your own data by mimicking it):
```
<root>/
  pool/...                               uncurated images, any nesting; may also hold .tar shards
  seeds/<seed_set>/<class>/*             curated seed sets (retrieval queries for curation)
  eval/classification/{train,val,test}/<class>/*
  eval/segmentation/{train,val}/images/<id>.png + masks/<id>.png   (8-bit class index, 0 = background, 255 = ignore)
  eval/depth/{train,val}/images/<id>.png + depth/<id>.png          (16-bit PNG, metres = value / depth_scale,
                                                                     0 = invalid; depth_scale in eval/depth/meta.json)
  eval/retrieval/{query,database}/<place>/*                         (same <place> = positive)
  ground_truth.json                      synthetic world only: everything planted
```
Every part is optional. Masks, depth maps, `eval/depth/meta.json` and files at the top level are not inputs; any
other file under pool/, seeds/ or eval/ is one. `data.extra_pool` adds pool sources: local folders (recursive),
`s3://bucket/prefix`es and `.tar` shards (local or on S3); `.tar` files found inside pool folders are shards too.
Tar shards must be uncompressed; each regular-file member is an input whose URI is
`<shard>.tar::<member name>@<offset>:<size>` (see components/storage.py), readable later without re-scanning.

Outputs:
    - manifest: `uri, sha256, width, height, source, split, label, decodable`, one row per usable image. `source` is
      `pool`, `seeds/<seed_set>` or `eval/<task>`; `split` is `pool`, `seed`, or the eval split (train, val, test,
      query, database); `label` is the class or place folder, the image id for segmentation and depth, empty for
      the pool.
    - rejects: `uri, source, reason, detail`, one row per input that is not usable. Reasons: `empty`, `not_an_image`
      (no image format recognised), `truncated`, `decode_error`, `too_small` (shorter side below `min_side`),
      `too_large` (header claims more than `max_pixels`, decided before decoding), `unreadable` (the bytes or the tar
      shard could not be read), `excluded_suffix` (the user narrowed `prepare.extensions` and the file's suffix is
      not in it), `misplaced` (a file where the layout expects a folder), and `exact_duplicate` (same sha256 as a
      kept file; the detail names it).

Which files are images: every format Pillow decodes, whatever the file is called (web pools hold `.gif`, `.ico`,
`.ppm`, mis-named and suffix-less files); a multi-frame file is its first frame (components/images.py). With
`prepare.extensions` set, only files with one of those suffixes are decoded (a filter that narrows, never widens).

URIs keep the spelling of their source: a relative raw root (`data/synthetic`, as in params.yaml) gives paths
relative to the working directory, the repository root under DVC, so a manifest stays valid in another clone.

Invariant: every input is exactly one manifest row or one rejects row. Sources are deduplicated in priority order
(eval, then seeds, then pool), so the evaluation copy of an image wins and a byte-identical pool copy is rejected.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image
from tqdm import tqdm

from components import storage
from components.config import PrepareConfig
from components.images import to_rgb
from components.log import get_logger
from components.parallel import adopt_environ, mp_context

log = get_logger(__name__)

MANIFEST_COLUMNS = ("uri", "sha256", "width", "height", "source", "split", "label", "decodable")
REJECT_COLUMNS = ("uri", "source", "reason", "detail")
MANIFEST_FILE = "manifest.parquet"
REJECTS_FILE = "rejects.parquet"

CLASSIFICATION_SPLITS = ("train", "val", "test")
DENSE_SPLITS = ("train", "val", "test")
RETRIEVAL_SPLITS = ("query", "database")
DENSE_TARGETS = {"segmentation": "masks", "depth": "depth"}
"""Folder of the per-pixel targets beside `images/` in each dense task; targets are not inputs."""

# Lower is processed first, so the first kept copy of some bytes is the evaluation one.
_PRIORITY = {"eval/classification": 0, "eval/segmentation": 1, "eval/depth": 2, "eval/retrieval": 3, "pool": 5}
_SEED_PRIORITY = 4


@dataclass(frozen=True)
class Input:
    """One file to check: where it is and where it belongs in the layout."""

    uri: str
    source: str
    split: str
    label: str


@dataclass(frozen=True)
class Check:
    """What decoding one file found: `reason` is empty for a usable image."""

    sha256: str = ""
    width: int = 0
    height: int = 0
    reason: str = ""
    detail: str = ""


# --------------------------------------------------------------------------------------------------------------------
# Checking one file
# --------------------------------------------------------------------------------------------------------------------


def check_image(data: bytes, *, min_side: int, max_pixels: int) -> Check:
    """Decodes an encoded image fully and says whether it is usable.

    The size is read from the header and bounded before any pixel is decoded, so a hostile header (a PNG claiming
    100000 x 100000) costs nothing; PIL's own decompression-bomb guard is caught and reported the same way.

    Args:
        data: The file's bytes.
        min_side: Shorter sides below this are `too_small`.
        max_pixels: Headers claiming more pixels are `too_large`.

    Returns:
        The sha256, width and height, and an empty reason if usable, else the reject reason and detail.
    """
    sha256 = hashlib.sha256(data).hexdigest()
    if not data:
        return Check(sha256, reason="empty", detail="0 bytes")
    try:
        with warnings.catch_warnings():
            # The warning band of PIL's bomb guard is below max_pixels only if the user raised max_pixels past it;
            # the bound that matters is ours, checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        return Check(sha256, reason="too_large", detail=f"PIL decompression-bomb guard: {err}")
    except Image.UnidentifiedImageError as err:
        # PIL also "cannot identify" a file whose format it knows but whose header is broken: say which.
        fmt = _magic_format(data)
        if fmt:
            return Check(sha256, reason="decode_error", detail=f"{fmt} signature but unreadable header: {err}")
        return Check(sha256, reason="not_an_image", detail=f"no image format recognised ({len(data)} bytes)")
    except Exception as err:  # a corrupt header can raise nearly anything (SyntaxError, struct.error, ...)
        return _decode_failure(sha256, err)
    with image:
        width, height = image.size
        if width * height > max_pixels:
            return Check(sha256, width, height, "too_large", f"{width}x{height} > max_pixels {max_pixels}")
        if min(width, height) < min_side:
            return Check(sha256, width, height, "too_small", f"{width}x{height}: shorter side < min_side {min_side}")
        try:
            image.load()  # decodes every pixel (of the first frame): truncation shows here, not at open
            to_rgb(image)  # downstream stages read this RGB picture; a mode that cannot convert is unusable
        except Exception as err:
            return _decode_failure(sha256, err, width, height)
    return Check(sha256, width, height)


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _magic_format(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), "")


def _decode_failure(sha256: str, err: Exception, width: int = 0, height: int = 0) -> Check:
    message = f"{type(err).__name__}: {err}"
    reason = "truncated" if "truncat" in message.lower() else "decode_error"
    return Check(sha256, width, height, reason, message)


def _check_uri(args: tuple[str, int, int]) -> Check:
    uri, min_side, max_pixels = args
    try:
        data = storage.read_bytes(uri)
    except Exception as err:  # an unreadable file is a reject, not a crash of the whole run
        return Check(reason="unreadable", detail=f"{type(err).__name__}: {err}")
    return check_image(data, min_side=min_side, max_pixels=max_pixels)


def _check_all(inputs: Sequence[Input], cfg: PrepareConfig, num_workers: int) -> Iterator[Check]:
    args = [(item.uri, cfg.min_side, cfg.max_pixels) for item in inputs]
    parallel = num_workers > 0 and len(args) > 1
    ctx = mp_context(preload=[__name__]) if parallel else None  # before tqdm, whose monitor thread would count
    bar = tqdm(total=len(args), desc="prepare: decoding", unit="file", mininterval=1.0, smoothing=0.1)
    with bar:
        if ctx is None:
            for a in args:
                yield _check_uri(a)
                bar.update()
            return
        workers = min(num_workers, len(args))
        chunk = max(1, min(64, len(args) // (workers * 8)))
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=adopt_environ, initargs=(dict(os.environ),))
        with pool as ex:
            for check in ex.map(_check_uri, args, chunksize=chunk):
                yield check
                bar.update()


# --------------------------------------------------------------------------------------------------------------------
# Scanning the sources
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Scan:
    inputs: list[Input]
    rejects: list[dict[str, str]]
    seen: set[str]
    extensions: frozenset[str] | None
    """Suffixes to decode (lower case); None decodes every file."""

    def add(self, item: Input) -> None:
        # The same file reached twice (e.g. an extra_pool folder inside the raw pool) is one input, not a duplicate.
        if item.uri in self.seen:
            log.warning("%s is reached by more than one source; counted once", item.uri)
            return
        self.seen.add(item.uri)
        suffix = storage.suffix(item.uri)
        if self.extensions is not None and suffix not in self.extensions:
            detail = f"suffix {suffix!r} not in prepare.extensions {sorted(self.extensions)}"
            self.reject(item, "excluded_suffix", detail)
        else:
            self.inputs.append(item)

    def reject(self, item: Input, reason: str, detail: str) -> None:
        self.rejects.append({"uri": item.uri, "source": item.source, "reason": reason, "detail": detail})

    def add_pool_file(self, uri: str) -> None:
        """A pool file; a `.tar` shard is expanded into its members (or rejected whole if it cannot be indexed)."""
        if not storage.is_tar_shard(uri):
            self.add(Input(uri, "pool", "pool", ""))
            return
        try:
            members = storage.list_tar_members(uri)
        except storage.StorageError as err:
            if uri not in self.seen:
                self.seen.add(uri)
                self.reject(Input(uri, "pool", "pool", ""), "unreadable", str(err))
            return
        for member in members:
            self.add(Input(member.uri, "pool", "pool", ""))


def _classify(rel: tuple[str, ...]) -> tuple[str, str, str] | str | None:
    """(source, split, label) of a file at relative path parts `rel`; a string is why it is misplaced; None: not an
    input (top-level files, unknown top-level folders, dense targets, meta.json)."""
    top = rel[0]
    if len(rel) == 1 or top not in ("pool", "seeds", "eval"):
        return None
    if top == "pool":
        return "pool", "pool", ""
    if top == "seeds":
        if len(rel) < 4:
            return "expected seeds/<seed_set>/<class>/<file>"
        return f"seeds/{rel[1]}", "seed", rel[2]
    task = rel[1] if len(rel) > 2 else ""
    if task == "classification":
        if len(rel) < 5 or rel[2] not in CLASSIFICATION_SPLITS:
            return "expected eval/classification/{train,val,test}/<class>/<file>"
        return "eval/classification", rel[2], rel[3]
    if task in DENSE_TARGETS:
        if rel == ("eval", task, "meta.json"):
            return None
        if len(rel) == 5 and rel[2] in DENSE_SPLITS and rel[3] == DENSE_TARGETS[task]:
            return None
        if len(rel) != 5 or rel[2] not in DENSE_SPLITS or rel[3] != "images":
            return f"expected eval/{task}/{{train,val}}/images/<id>.png (targets in {DENSE_TARGETS[task]}/)"
        return f"eval/{task}", rel[2], rel[4].rsplit(".", 1)[0]
    if task == "retrieval":
        if len(rel) < 5 or rel[2] not in RETRIEVAL_SPLITS:
            return "expected eval/retrieval/{query,database}/<place>/<file>"
        return "eval/retrieval", rel[2], rel[3]
    return "expected eval/{classification,segmentation,depth,retrieval}/..."


def _relative(uri: str, root: str) -> tuple[str, ...]:
    rel = uri[len(root) :].lstrip("/") if storage.is_s3(root) else os.path.relpath(uri, root)
    return tuple(rel.replace(os.sep, "/").split("/"))


def _scan_raw(scan: _Scan, raw: str) -> None:
    root = storage.normalize(raw)
    for uri in storage.list_files(root, recursive=True):
        rel = _relative(uri, root)
        where = _classify(rel)
        if where is None:
            continue
        if isinstance(where, str):
            source = "/".join(rel[:2]) if rel[0] == "eval" else rel[0]
            scan.seen.add(uri)
            scan.reject(Input(uri, source, "", ""), "misplaced", where)
        elif where[0] == "pool":
            scan.add_pool_file(uri)
        else:
            scan.add(Input(uri, *where))


def _scan_extra(scan: _Scan, source: str) -> None:
    if storage.is_tar_shard(source):
        if not storage.exists(source):
            raise storage.StorageNotFoundError(source, "no such tar shard (data.extra_pool)")
        scan.add_pool_file(source)
        return
    for uri in storage.list_files(storage.normalize(source), recursive=True):
        scan.add_pool_file(uri)


def scan_sources(
    raw: str, extra_pool: Sequence[str], extensions: Sequence[str] | None
) -> tuple[list[Input], list[dict]]:
    """Lists every input of the raw layout and the extra pool sources, in deduplication priority order.

    `extensions` narrows the inputs to those suffixes (others become `excluded_suffix` rejects); None keeps all.

    Raises:
        StorageNotFoundError: The raw root, or an extra pool folder, prefix or shard, does not exist.
        StorageError: A bucket cannot be reached.
    """
    wanted = None if extensions is None else frozenset(e.lower() for e in extensions)
    scan = _Scan([], [], set(), wanted)
    _scan_raw(scan, raw)
    for source in extra_pool:
        _scan_extra(scan, source)
    order = {item.uri: i for i, item in enumerate(scan.inputs)}
    scan.inputs.sort(key=lambda item: (_PRIORITY.get(item.source, _SEED_PRIORITY), order[item.uri]))
    return scan.inputs, scan.rejects


# --------------------------------------------------------------------------------------------------------------------
# The stage core
# --------------------------------------------------------------------------------------------------------------------


def prepare(
    *, raw: str, extra_pool: Sequence[str] = (), cfg: PrepareConfig, num_workers: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scans the sources, decodes every file in parallel and splits the inputs into usable images and rejects.

    All listing happens first: a missing folder or an unreachable bucket raises before any decoding.

    Args:
        raw: Root of the raw layout (local folder or `s3://bucket/prefix`).
        extra_pool: More pool sources (folders, prefixes, `.tar` shards).
        cfg: The `prepare` section.
        num_workers: Decoding processes; None takes `cfg.num_workers`; 0 decodes in this process.

    Returns:
        (manifest, rejects) with the columns of MANIFEST_COLUMNS and REJECT_COLUMNS.

    Raises:
        StorageNotFoundError: A source does not exist.
        StorageError: A bucket or endpoint cannot be reached.
        ValueError: The sources hold no file at all.
    """
    num_workers = cfg.num_workers if num_workers is None else num_workers
    inputs, rejects = scan_sources(raw, extra_pool, cfg.extensions)
    num_inputs = len(inputs) + len(rejects)
    if num_inputs == 0:
        raise ValueError(f"no input files under {raw!r} or data.extra_pool {list(extra_pool)!r}")
    log.info(
        "prepare: %d inputs (%d rejected while scanning) from %s + %d extra",
        num_inputs,
        len(rejects),
        raw,
        len(extra_pool),
    )

    rows: list[dict[str, Any]] = []
    kept: dict[str, str] = {}  # sha256 -> first kept uri (inputs arrive in priority order)
    for item, check in zip(inputs, _check_all(inputs, cfg, num_workers), strict=True):
        if check.reason:
            rejects.append({"uri": item.uri, "source": item.source, "reason": check.reason, "detail": check.detail})
        elif check.sha256 in kept:
            detail = f"same bytes as {kept[check.sha256]}"
            rejects.append({"uri": item.uri, "source": item.source, "reason": "exact_duplicate", "detail": detail})
        else:
            kept[check.sha256] = item.uri
            rows.append({
                "uri": item.uri, "sha256": check.sha256, "width": check.width, "height": check.height,
                "source": item.source, "split": item.split, "label": item.label, "decodable": True,
            })  # fmt: skip

    manifest = _frame(rows, MANIFEST_COLUMNS, {"width": "int64", "height": "int64", "decodable": "bool"})
    rejects_df = _frame(rejects, REJECT_COLUMNS, {})
    if len(manifest) + len(rejects_df) != num_inputs:  # the stage's contract; never let it fail silently
        raise RuntimeError(f"prepare lost inputs: {num_inputs} in, {len(manifest)} kept + {len(rejects_df)} rejected")
    log.info(
        "prepare: %d kept, %d rejected %s",
        len(manifest),
        len(rejects_df),
        dict(Counter(rejects_df["reason"])) if len(rejects_df) else {},
    )
    return manifest, rejects_df


def _frame(rows: list[dict[str, Any]], columns: Sequence[str], dtypes: dict[str, str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(columns))
    types = {c: dtypes.get(c, "str") for c in columns}
    return frame.astype(types)


def summarize(manifest: pd.DataFrame, rejects: pd.DataFrame) -> dict[str, int]:
    """Flat counts for metrics: kept and rejected totals, kept per source, rejected per reason."""
    counts = {"num_inputs": len(manifest) + len(rejects), "num_kept": len(manifest), "num_rejected": len(rejects)}
    counts.update({f"kept.{k}": int(v) for k, v in manifest["source"].value_counts().sort_index().items()})
    counts.update({f"rejected.{k}": int(v) for k, v in rejects["reason"].value_counts().sort_index().items()})
    return counts


def write_outputs(manifest: pd.DataFrame, rejects: pd.DataFrame, out_dir: str | Path) -> tuple[str, str]:
    """Writes `manifest.parquet` and `rejects.parquet` into `out_dir` (a local folder or S3 prefix).

    Both tables are serialised in memory first; each file is then written atomically (temporary name, rename).
    A stale manifest is removed before anything is written and the manifest is written last, so its presence means
    a complete output: a failed run never leaves a pair of files that look complete.

    Returns:
        The URIs of the manifest and of the rejects.
    """
    out = str(out_dir)
    manifest_uri, rejects_uri = storage.join(out, MANIFEST_FILE), storage.join(out, REJECTS_FILE)
    blobs = {}
    for name, frame in (("manifest", manifest), ("rejects", rejects)):
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        blobs[name] = buf.getvalue()
    if not storage.is_s3(manifest_uri):
        Path(manifest_uri).unlink(missing_ok=True)
    storage.write_bytes(rejects_uri, blobs["rejects"])
    storage.write_bytes(manifest_uri, blobs["manifest"])
    return manifest_uri, rejects_uri
