"""The core of the `embed` stage: every prepared image through a backbone, written as float16 shards with ids.

Run: `python -m components embed` (the stage wrapper in components/stages/embed.py); on several GPUs or nodes,
`torchrun --nproc_per_node 8 -m components embed` (each rank embeds every world_size-th shard).

Features (DINOv2 appendix A.3-A.4 compare images by the cosine similarity of one global vector, `embed.features`):
the backbone's normalised CLS token (`cls`); with the mean of its normalised patch tokens (`cls_mean`); or with the
mean patch token of each image quadrant (`cls_grid`, the default: the layout of a picture survives every edit that
makes a copy, while two different photos of one scene differ in it). Each block is L2-normalised (the four quadrants
together to norm 1, so CLS and grid weigh the same), then the whole vector. Preprocessing: bicubic resize of the whole
image to `image_size` x `image_size` (`full_frame`, the default: a copy is compared in full), or the release's
shorter-side resize to `image_size * 256 / 224` and centre crop; the preset's mean and std. Images are decoded by
components/images.py (every format Pillow reads, first frame).

Layout of the output folder:
```
<out>/<part>/shard-00000.npy           float16, (n, D), L2-normalised rows; renamed into place last, so its
                                       presence marks the shard complete
<out>/<part>/shard-00000.ids.parquet   `id` (the manifest uri) of each row, and the run's `fingerprint`
<out>/<part>/shard-00000.failures.parquet  `id`, `error` of the shard's images that could not be read or decoded
<out>/meta.json                        arch, weights, dim, normalized, fingerprint, counts, shard list
```
Parts: `pool`, `seeds`, `eval` (so the huge pool can be read on its own). Shard i of a part holds the part's manifest
rows [i * shard_size, (i + 1) * shard_size) in manifest order.

Resuming: a shard is complete once its .npy is renamed into place; a re-run skips complete shards whose ids file
records the same fingerprint (a hash of the embed config, the seed, the weights' bytes and the shard's manifest
rows: each one's uri and content hash), and recomputes any other. Shards of an older, larger plan are deleted
when the stage finishes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from components import exports, storage
from components.config import EmbedConfig
from components.images import decode_rgb
from components.jsonio import write_json
from components.log import get_logger
from components.parallel import mp_context
from components.runtime import cpu_threads, local_device

log = get_logger(__name__)

PARTS = ("pool", "seeds", "eval")
RANDOM_INIT = "random-init"
"""Prefix of the weights digest of a seeded random initialisation (`embed.weights: null`)."""
SHARD_PATTERN = "shard-{index:05d}"
META_FILE = "meta.json"
FORMAT_VERSION = 1


def part_of(source: str) -> str:
    """The output part of a manifest `source`: pool, seeds (seeds/<set>) or eval (eval/<task>)."""
    if source == "pool":
        return "pool"
    if source.startswith("seeds/"):
        return "seeds"
    if source.startswith("eval/"):
        return "eval"
    raise ValueError(f"unknown manifest source {source!r}: expected pool, seeds/<set> or eval/<task>")


# --------------------------------------------------------------------------------------------------------------------
# Plan: shards, their manifest rows, their fingerprints
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One output shard: a slice of one part of the manifest."""

    part: str
    index: int
    ids: tuple[str, ...]
    """Manifest uris, in order."""
    fingerprint: str

    @property
    def stem(self) -> str:
        return f"{self.part}/{SHARD_PATTERN.format(index=self.index)}"

    def paths(self, out_dir: Path) -> tuple[Path, Path, Path]:
        """(.npy, .ids.parquet, .failures.parquet) under `out_dir`."""
        base = out_dir / self.stem
        return base.with_suffix(".npy"), Path(f"{base}.ids.parquet"), Path(f"{base}.failures.parquet")


def run_fingerprint(cfg: EmbedConfig, seed: int, weights_digest: str) -> str:
    """Hash of everything that changes the features of an image: the embed config, the seed, the weights' bytes.

    `batch_size`, `num_workers` and `shard_size` change how the work is cut, not the features, but shard_size does
    change which rows a shard holds; it is part of each shard's fingerprint through its ids.
    """
    relevant = cfg.model_dump(mode="json", exclude={"batch_size", "num_workers", "device"})
    payload = json.dumps(
        {"cfg": relevant, "seed": seed, "weights": weights_digest, "v": FORMAT_VERSION}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def plan_shards(manifest: pd.DataFrame, shard_size: int, run_fp: str) -> list[Shard]:
    """Cuts every part of the manifest into shards of `shard_size` rows (manifest order kept); each shard's
    fingerprint covers `run_fp` and its rows' `uri` and `sha256` (the prepared manifest's content hash)."""
    if manifest.empty:
        return []
    parts = manifest["source"].astype(str).map(part_of)
    hashes = manifest["sha256"].fillna("").astype(str) if "sha256" in manifest else pd.Series("", manifest.index)
    shards = []
    for part in PARTS:
        rows = parts == part
        uris, contents = manifest.loc[rows, "uri"].astype(str).tolist(), hashes[rows].tolist()
        for index, start in enumerate(range(0, len(uris), shard_size)):
            ids = tuple(uris[start : start + shard_size])
            # uri and content hash of every row: an image replaced under the same name is embedded again
            rows_key = "\n".join(f"{u}\t{h}" for u, h in zip(ids, contents[start : start + shard_size], strict=True))
            digest = hashlib.sha256((run_fp + "\n" + rows_key).encode()).hexdigest()[:16]
            shards.append(Shard(part, index, ids, digest))
    return shards


def read_shard_fingerprint(ids_path: Path) -> str | None:
    """The fingerprint recorded in a shard's ids file (parquet schema metadata), or None if unreadable."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(ids_path).metadata or {}
    except Exception:  # a truncated or foreign file: the shard is recomputed
        return None
    value = metadata.get(b"fingerprint")
    return value.decode() if value else None


def shard_is_complete(shard: Shard, out_dir: Path) -> bool:
    """True when the shard's .npy is in place and its ids file records this shard's fingerprint."""
    npy, ids_path, _ = shard.paths(out_dir)
    return npy.is_file() and ids_path.is_file() and read_shard_fingerprint(ids_path) == shard.fingerprint


# --------------------------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Embedder:
    """A backbone in eval mode with its preprocessing and the feature recipe."""

    model: torch.nn.Module
    transform: Any
    patch_size: int
    device: torch.device
    features: str
    amp: bool
    dim: int
    weights_digest: str

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images -> (B, D) float32 L2-normalised features."""
        images = images.to(self.device, non_blocking=True)
        use_amp = self.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = self.model.forward_features(images)
        cls = F.normalize(out["x_norm_clstoken"].float(), dim=-1)  # (B, D)
        if self.features == "cls":
            return cls
        tokens = out["x_norm_patchtokens"].float()  # (B, N, D), N = h * w patches
        if self.features == "cls_mean":
            return F.normalize(torch.cat([cls, F.normalize(tokens.mean(dim=1), dim=-1)], dim=-1), dim=-1)
        side_h, side_w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        grid = tokens.transpose(1, 2).reshape(len(tokens), -1, side_h, side_w)  # (B, D, h, w)
        quads = F.adaptive_avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # (B, 4, D): top-left, top-right, ...
        quads = F.normalize(quads, dim=-1).flatten(1) / 2.0  # (B, 4 D), norm 1
        return F.normalize(torch.cat([cls, quads], dim=-1), dim=-1)

    def embed_images(self, images: Sequence[Any], batch_size: int = 64) -> np.ndarray:
        """Decoded images (PIL) -> N-by-dim float32 features, exactly as the stage embeds files."""
        out = [np.zeros((0, self.dim), np.float32)]
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.transform(image.convert("RGB")) for image in images[start : start + batch_size]])
            out.append(self(batch).cpu().numpy().astype(np.float32))
        return np.concatenate(out)


def build_embedder(cfg: EmbedConfig, seed: int) -> Embedder:
    """The configured backbone, with official or own weights, or a seeded random initialisation."""
    from components.model import get_preset, load_official_weights
    from components.model.families import build_from_fields

    preset = get_preset(cfg.arch)
    torch.manual_seed(seed)  # the random init (weights null) is the same on every rank and every run
    model = build_from_fields(cfg.arch, patch_size=cfg.patch_size, num_register_tokens=cfg.num_register_tokens)
    if cfg.weights:
        state, digest = exports.read_weights(cfg.weights)
        load_official_weights(model, state)
    else:
        digest = f"{RANDOM_INIT}:{cfg.arch}:{seed}"
        log.warning("embed.weights is null: %s at a seeded random init (smoke runs only)", cfg.arch)
    device = local_device(cfg.device, key="embed.device")
    model = model.eval().to(device)
    width = model.embed_dim
    return Embedder(
        model=model,
        transform=image_transform(cfg, preset.mean, preset.std),
        patch_size=cfg.patch_size,
        device=device,
        features=cfg.features,
        amp=cfg.amp,
        dim=int(width) * FEATURE_BLOCKS[cfg.features],
        weights_digest=digest,
    )


FEATURE_BLOCKS = {"cls": 1, "cls_mean": 2, "cls_grid": 5}
"""Width of each feature choice, in backbone widths."""


def image_transform(cfg: EmbedConfig, mean: Sequence[float], std: Sequence[float]) -> Any:
    """The embed stage's preprocessing: the whole frame squeezed to a square, or the release's resize and crop."""
    from torchvision.transforms import InterpolationMode, v2

    from components.model import eval_transform

    if not cfg.full_frame:
        return eval_transform(cfg.image_size, mean=mean, std=std)
    side = (cfg.image_size, cfg.image_size)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(side, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
            v2.ToPureTensor(),
        ]
    )


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Images by URI through `storage.read_bytes`; an unreadable image yields zeros and its error, not an exception."""

    def __init__(self, uris: Sequence[str], transform: Any, image_size: int) -> None:
        self.uris = list(uris)
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            return self.transform(decode_rgb(storage.read_bytes(self.uris[index]))), index, ""
        except Exception as err:  # deleted, truncated or unreadable since prepare: reported per image
            return torch.zeros(3, self.image_size, self.image_size), index, f"{type(err).__name__}: {err}"[:500]


def _worker_init(_: int) -> None:
    # Decoding workers need one thread each; more only fight the forward pass for the same cores.
    torch.set_num_threads(1)


def _batches(uris: Sequence[str], embedder: Embedder, cfg: EmbedConfig) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(features, errors) per batch, in order; rows with an error have zero features."""
    dataset = ImageDataset(uris, embedder.transform, cfg.image_size)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        pin_memory=embedder.device.type == "cuda",
        multiprocessing_context=mp_context() if cfg.num_workers > 0 else None,
        worker_init_fn=_worker_init if cfg.num_workers > 0 else None,
        persistent_workers=False,
    )
    batches = iter(loader)  # workers start here, before any progress-bar thread exists (fork stays safe)
    return ((embedder(images), list(errors)) for images, _, errors in batches)


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


def _write_ids(path: Path, ids: Sequence[str], fingerprint: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": pa.array(list(ids), type=pa.string())})
    pq.write_table(table.replace_schema_metadata({"fingerprint": fingerprint}), path)


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to a temporary name
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def write_shard(shard: Shard, out_dir: Path, features: np.ndarray, errors: Sequence[str]) -> tuple[int, int]:
    """Writes one shard; returns (embedded, failed).

    Its three files are written aside first (a disk that fills up, or any OS error, raises a `StorageError` naming
    the shard, the bytes needed and free, and leaves the shard's previous files as they were); then the old .npy,
    the mark of a complete shard, is removed, the failures and ids files are renamed into place, and the new .npy
    last: at any moment the shard is either complete and consistent, or has no .npy and is recomputed.
    """
    npy, ids_path, failures_path = shard.paths(out_dir)
    ok = np.array([not e for e in errors], dtype=bool)
    ids = [i for i, good in zip(shard.ids, ok, strict=True) if good]
    failed = pd.DataFrame(
        {"id": [i for i, good in zip(shard.ids, ok, strict=True) if not good], "error": [e for e in errors if e]}
    )
    kept = np.ascontiguousarray(features[ok], dtype=np.float16)
    npy.parent.mkdir(parents=True, exist_ok=True)
    temps = {path: npy.with_name(f".{path.name}.tmp{path.suffix}") for path in (failures_path, ids_path, npy)}
    needed = kept.nbytes + sum(len(i) for i in shard.ids) + 4096
    try:
        with storage.named_write_errors(
            npy, what=f"embedding shard {shard.stem}", needed=needed,
            kept="its partial files are removed and its previous files are as they were",
        ):  # fmt: skip
            failed.to_parquet(temps[failures_path], index=False)
            _write_ids(temps[ids_path], ids, shard.fingerprint)
            _write_npy(temps[npy], kept)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    npy.unlink(missing_ok=True)
    for path, tmp in temps.items():  # the .npy last
        os.replace(tmp, path)
    return int(ok.sum()), int((~ok).sum())


@dataclass
class EmbedStats:
    """What one rank did."""

    shards_total: int = 0
    shards_skipped: int = 0
    shards_written: int = 0
    images_embedded: int = 0
    images_failed: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images_embedded / self.seconds if self.seconds > 0 else 0.0


def embed_shards(
    shards: Sequence[Shard],
    embedder: Embedder,
    cfg: EmbedConfig,
    out_dir: str | Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> EmbedStats:
    """Embeds this rank's incomplete shards (every world_size-th, from `rank`) and writes them.

    One DataLoader streams all pending images of the rank in order; shards are cut from the stream and written as
    soon as they fill, so a crash loses at most the shard being filled.
    """
    out_dir = Path(out_dir)
    mine = [s for i, s in enumerate(shards) if i % world_size == rank]
    pending = [s for s in mine if not shard_is_complete(s, out_dir)]
    stats = EmbedStats(shards_total=len(mine), shards_skipped=len(mine) - len(pending))
    if stats.shards_skipped:
        log.info("embed: %d of %d shards already complete, skipped", stats.shards_skipped, len(mine))
    if not pending:
        return stats
    uris = [uri for s in pending for uri in s.ids]
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if embedder.device.type == "cpu":
        torch.set_num_threads(cpu_threads(0, cfg.num_workers))
    try:
        _embed_stream(pending, uris, embedder, cfg, out_dir, stats, progress and rank == 0)
    finally:
        torch.set_num_threads(threads)
    stats.seconds = time.perf_counter() - start
    return stats


def _embed_stream(
    pending: Sequence[Shard],
    uris: Sequence[str],
    embedder: Embedder,
    cfg: EmbedConfig,
    out_dir: Path,
    stats: EmbedStats,
    progress: bool,
) -> None:
    from tqdm import tqdm

    stream = _batches(uris, embedder, cfg)
    bar = tqdm(total=len(uris), unit="images", desc="embed", disable=not progress, smoothing=0.1)  # shows images/s
    queue = iter(pending)
    shard = next(queue)
    buf: list[np.ndarray] = []
    errs: list[str] = []
    filled = 0
    for feats, errors in stream:
        feats_np = feats.cpu().numpy()
        offset = 0
        while offset < len(errors):
            take = min(len(shard.ids) - filled, len(errors) - offset)
            buf.append(feats_np[offset : offset + take])
            errs.extend(errors[offset : offset + take])
            filled += take
            offset += take
            if filled == len(shard.ids):
                done, failed = write_shard(shard, out_dir, np.concatenate(buf), errs)
                stats.shards_written += 1
                stats.images_embedded += done
                stats.images_failed += failed
                for uri, err in zip(shard.ids, errs, strict=True):
                    if err:
                        log.warning("embed: %s not embedded: %s", uri, err)
                buf, errs, filled = [], [], 0
                shard = next(queue, None)
                if shard is None:
                    break
        bar.update(len(errors))
    bar.close()


def finalize(
    shards: Sequence[Shard], embedder: Embedder, cfg: EmbedConfig, out_dir: str | Path, run_fp: str
) -> dict[str, Any]:
    """After every rank finished: delete stale shards, write meta.json, return it."""
    out_dir = Path(out_dir)
    wanted = {
        str(out_dir / f"{s.stem}{suffix}") for s in shards for suffix in (".npy", ".ids.parquet", ".failures.parquet")
    }
    for part in PARTS:
        folder = out_dir / part
        # Shards of an older, larger plan, and temporary files of a run that was killed mid-write.
        stale = [*folder.glob("shard-*"), *folder.glob(".shard-*.tmp*")] if folder.is_dir() else []
        for path in stale:
            if str(path) not in wanted:
                path.unlink()
    entries, counts, failed = [], {p: 0 for p in PARTS}, 0
    for s in shards:
        npy, ids_path, failures_path = s.paths(out_dir)
        if not shard_is_complete(s, out_dir):
            raise RuntimeError(f"shard {s.stem} is not complete after every rank finished")
        num = len(pd.read_parquet(ids_path, columns=["id"]))
        num_failed = len(pd.read_parquet(failures_path)) if failures_path.is_file() else 0
        counts[s.part] += num
        failed += num_failed
        entries.append({"part": s.part, "index": s.index, "file": f"{s.stem}.npy", "num": num, "failed": num_failed})
    meta = {
        "version": FORMAT_VERSION,
        "arch": cfg.arch,
        "weights": cfg.weights,
        "weights_digest": embedder.weights_digest,
        "image_size": cfg.image_size,
        "features": cfg.features,
        "full_frame": cfg.full_frame,
        "random_weights": embedder.weights_digest.startswith(RANDOM_INIT),
        "dim": embedder.dim,
        "dtype": "float16",
        "normalized": True,
        "fingerprint": run_fp,
        "counts": counts,
        "failed": failed,
        "shards": entries,
    }
    write_json(out_dir / META_FILE, meta, indent=1)
    return meta


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------


def read_meta(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no embeddings here (run the embed stage first)")
    return json.loads(path.read_text())


def load_embeddings(out_dir: str | Path, parts: Sequence[str] = PARTS) -> tuple[list[str], np.ndarray]:
    """(ids, N-by-D float16 array) of the given parts, in shard order, read through memory maps."""
    out_dir = Path(out_dir)
    meta = read_meta(out_dir)
    ids: list[str] = []
    arrays: list[np.ndarray] = []
    for entry in meta["shards"]:
        if entry["part"] not in parts:
            continue
        npy = out_dir / entry["file"]
        arrays.append(np.load(npy, mmap_mode="r"))
        ids.extend(pd.read_parquet(out_dir / entry["file"].replace(".npy", ".ids.parquet"))["id"].tolist())
    dim = int(meta["dim"])
    x = np.concatenate(arrays, axis=0) if arrays else np.zeros((0, dim), np.float16)
    if len(ids) != len(x):
        raise ValueError(f"{out_dir}: {len(ids)} ids for {len(x)} embeddings")
    return ids, x


class EmbeddingRows:
    """The shards of some parts as one N-by-D float16 array that reads only the rows asked for.

    Every read maps the shard files it touches and unmaps them after, so a process holds the rows it asked for, never
    whole shards: the curate stage's ranks each read their share of the pool this way.
    """

    def __init__(self, files: Sequence[Path], counts: Sequence[int], dim: int, index: np.ndarray | None = None) -> None:
        self.files = list(files)
        self.counts = list(counts)
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.index = index
        """Row i of this view is row index[i] of the shards (None: the shards' own order)."""
        self.shape = (int(len(index) if index is not None else self.offsets[-1]), int(dim))
        self.dtype = np.dtype(np.float16)
        self.ndim = 2

    def view(self, rows: np.ndarray) -> EmbeddingRows:
        """The rows `rows` of this array as an array of their own (nothing is read)."""
        rows = np.asarray(rows, np.int64)
        return EmbeddingRows(self.files, self.counts, self.shape[1], self.index[rows] if self.index is not None
                             else rows)  # fmt: skip

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        """Rows of a slice (step 1) or of an integer array (any order), as a float16 array."""
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step != 1:
                raise ValueError("only contiguous slices of embeddings are read")
            rows = np.arange(start, stop)
        rows = np.asarray(rows, np.int64)
        if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= len(self))):
            raise IndexError(f"rows out of range 0 .. {len(self) - 1}")
        if self.index is not None:
            rows = self.index[rows]
        out = np.empty((len(rows), self.shape[1]), np.float16)
        file_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for f in np.unique(file_of).tolist():
            mine = file_of == f
            mapped = np.load(self.files[f], mmap_mode="r")
            out[mine] = mapped[rows[mine] - self.offsets[f]]
            del mapped
        return out


def open_embeddings(out_dir: str | Path, parts: Sequence[str] = PARTS) -> tuple[list[str], EmbeddingRows]:
    """(ids, lazily read N-by-D float16 rows) of the given parts, in shard order; `load_embeddings` without reading
    the vectors."""
    out_dir = Path(out_dir)
    meta = read_meta(out_dir)
    ids: list[str] = []
    files, counts = [], []
    for entry in meta["shards"]:
        if entry["part"] not in parts:
            continue
        shard_ids = pd.read_parquet(out_dir / entry["file"].replace(".npy", ".ids.parquet"))["id"].tolist()
        files.append(out_dir / entry["file"])
        counts.append(len(shard_ids))
        ids.extend(shard_ids)
    rows = EmbeddingRows(files, counts, int(meta["dim"]))
    for path, count in zip(files, counts, strict=True):
        shape = np.load(path, mmap_mode="r").shape
        if shape != (count, rows.shape[1]):
            raise ValueError(f"{path}: shape {shape}, but its ids file lists {count} rows of width {rows.shape[1]}")
    return ids, rows


def load_failures(out_dir: str | Path) -> pd.DataFrame:
    """Every image the embed stage could not read, with the error (`id`, `error`)."""
    out_dir = Path(out_dir)
    meta = read_meta(out_dir)
    frames = [
        pd.read_parquet(out_dir / entry["file"].replace(".npy", ".failures.parquet"))
        for entry in meta["shards"]
        if entry.get("failed")
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"id": [], "error": []})
