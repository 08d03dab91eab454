"""The `curate` stage: deduplicate the pool, remove evaluation leakage, retrieve and balance; the curated manifest.

Run: python -m components curate --prepared data/prepared --embeddings data/embeddings --out data/curated
     --metrics metrics/curate.json

Outputs (written into `<out>.partial/` and renamed into place only after every gate passed, so a failed run never
leaves a manifest that looks complete): `manifest.parquet` (the prepared columns plus provenance, see
components/curation/curate.py), `report.json` (calibration curves and thresholds, counts at each step, duplicate-group
sizes, leakage removed, the removed images, per-source and per-cluster counts, images without an embedding, warnings),
`removed.parquet` (every removed pool image, the image it duplicates, the similarity and how it was decided),
`calibration.csv` and `plots/calibration.png` (precision and recall against the threshold, per comparison),
`missing.parquet` (manifest rows with no embedding and why), `gates/` (Great Expectations results) and `grids/`
(duplicate groups with each image's similarity and verification, removed leaks, retrieved neighbours). Report, plot,
grids and gates are logged to MLflow, and the calibration curves as step metrics (step = threshold x 1000).

Calibration and verification re-embed planted copies with the embed stage's model: the `embed` section must be the
one that made the embeddings (their fingerprint is compared), and the model is built again here.

Several ranks: `torchrun --nproc_per_node R [--nnodes N --rdzv-*] -m components curate ...`, or `curate.nproc_per_node`
above 1 (the stage relaunches itself under torchrun, as the training stages do). Every rank reads the embeddings
through memory maps, indexes the pool shards it owns and exchanges its results with the others over gloo
(components/curation/sharded.py); rank 0 gates, writes the outputs and logs. The output is the one a single process
writes. The folder `<out>.partial/work/` keeps every finished per-shard result with a fingerprint of its inputs, so a
run that was killed (one rank or all) resumes where it stopped, on any number of ranks; it is removed once the
outputs are in place.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components import gates, storage
from components.config import PipelineConfig
from components.curation.calibrate import Calibration
from components.curation.curate import REMOVED_COLUMNS, CurationResult, ImageAccess, curate, leak_bound
from components.curation.sharded import Ranks, WorkCache
from components.embedding import (
    EmbeddingRows,
    build_embedder,
    load_failures,
    open_embeddings,
    read_meta,
    run_fingerprint,
)
from components.images import decode_rgb
from components.jsonio import write_json
from components.log import get_logger
from components.runtime import barrier, join_process_group
from components.stages.common import needs_launcher, relaunch
from components.stages.embed import read_prepared
from components.stages.shell import StageRun, stage_run
from components.synthetic import is_synthetic_world

log = get_logger(__name__)

TILE = 72


def align(manifest: pd.DataFrame, ids: Sequence[str], x: Any) -> tuple[pd.DataFrame, Any, pd.DataFrame]:
    """Manifest rows that have an embedding (with their rows of x, in manifest order) and those that have none.

    Rows of lazily read embeddings (`EmbeddingRows`) stay unread: a view in manifest order."""
    position = pd.Series(np.arange(len(ids)), index=pd.Index(ids, dtype=object))
    position = position[~position.index.duplicated()]
    found = manifest["uri"].isin(position.index).to_numpy()
    kept = manifest[found].reset_index(drop=True)
    rows = position.loc[kept["uri"]].to_numpy()
    feats = x.view(rows) if isinstance(x, EmbeddingRows) else np.asarray(x[rows])
    return kept, feats, manifest[~found].reset_index(drop=True)


CAPTION = 14


def _tile(uri: str) -> object:
    from PIL import Image

    try:
        tile = decode_rgb(storage.read_bytes(uri))
        tile.thumbnail((TILE, TILE))
        return tile
    except Exception:  # a grid is illustration: an unreadable image becomes a grey tile
        return Image.new("RGB", (TILE, TILE), (128, 128, 128))


def image_grid(rows: Sequence[Sequence[str | tuple[str, str]]], path: Path, max_cols: int = 10) -> Path | None:
    """A PNG with one row of thumbnails per group (first image = the kept / query one), or None if empty.

    An entry is a URI, or (URI, caption): the caption is written under the thumbnail (e.g. "0.93 v41": similarity
    to the kept image and 41 verified inliers; "emb": accepted on the embedding).
    """
    from PIL import Image, ImageDraw

    rows = [[e if isinstance(e, tuple) else (e, "") for e in list(r)[:max_cols]] for r in rows if len(r)]
    if not rows:
        return None
    cols = max(len(r) for r in rows)
    captioned = any(caption for row in rows for _, caption in row)
    cell_h = TILE + 4 + (CAPTION if captioned else 0)
    canvas = Image.new("RGB", (cols * (TILE + 4), len(rows) * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        for j, (uri, caption) in enumerate(row):
            canvas.paste(_tile(uri), (j * (TILE + 4) + 2, i * cell_h + 2))
            if caption:
                draw.text((j * (TILE + 4) + 2, i * cell_h + TILE + 3), caption, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def calibration_plot(calibrations: dict[str, Calibration], path: Path) -> Path | None:
    """Precision and recall of "similarity >= t" against t for each calibrated comparison, with the thresholds."""
    if not calibrations:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(calibrations), figsize=(5.5 * len(calibrations), 4), squeeze=False)
    for ax, (name, cal) in zip(axes[0], calibrations.items(), strict=True):
        ax.plot(cal.curve.thresholds, cal.curve.precision, label="precision (embedding only)")
        ax.plot(cal.curve.thresholds, cal.curve.recall, label="recall (embedding only)")
        ax.axhline(cal.target, color="grey", linestyle=":", label=f"target {cal.target}")
        if cal.accept is not None:
            ax.axvline(cal.accept, color="black", linestyle="--", label=f"accept {cal.accept:.3f}")
        if cal.verify != "off":
            ax.axvline(cal.candidate, color="tab:red", linestyle="--", label=f"candidate {cal.candidate:.3f}")
        ax.set_title(f"{name}: rule precision {cal.precision:.3f}, recall {cal.recall:.3f}")
        ax.set_xlabel("cosine similarity threshold")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, loc="lower left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _access(cfg: PipelineConfig, meta: dict) -> ImageAccess | None:
    """The embed stage's model again, for planted copies; None when neither calibration nor verification runs."""
    cur = cfg.curate
    if cur.calibration_images == 0 and cur.verify == "off":
        return None
    embedder = build_embedder(cfg.embed, cfg.seed)
    expected = run_fingerprint(cfg.embed, cfg.seed, embedder.weights_digest)
    if meta.get("fingerprint") != expected:
        raise ValueError(
            f"the embeddings were made with another model or embed config (fingerprint {meta.get('fingerprint')}, "
            f"params.yaml embed gives {expected}): calibration must embed planted copies with the same model; "
            "run the embed stage again"
        )
    return ImageAccess(embed=embedder.embed_images, workers=cur.verify_workers or None)


def random_weights_warning(meta: dict, pool_uris: Sequence[str]) -> str | None:
    """A warning when the embeddings come from a random initialisation and the pool is not the synthetic world."""
    if not meta.get("random_weights", meta.get("weights") is None) or is_synthetic_world(pool_uris):
        return None
    return (
        f"the embedding model ({meta.get('arch')}) has random weights (embed.weights: null) and the pool is not the "
        "synthetic world: its features barely tell photographs apart, so copies are found by local-feature "
        "verification alone and recall is lower; set embed.weights to a trained checkpoint (e.g. a DINOv2 backbone)"
    )


WORK_FORMAT = 1
"""Version of the per-shard results kept under `<out>.partial/work/` (part of their fingerprint)."""


def work_fingerprint(cfg: PipelineConfig, meta: dict, kept: pd.DataFrame) -> str:
    """What every kept per-shard result depends on: the curate config (not how many ranks run it), the seed, the
    embeddings (their fingerprint and shards) and the manifest rows curated (uri, content, size, source)."""
    columns = [c for c in ("uri", "sha256", "width", "height", "source") if c in kept.columns]
    rows = hashlib.sha256(pd.util.hash_pandas_object(kept[columns], index=False).to_numpy().tobytes()).hexdigest()
    payload = {
        "v": WORK_FORMAT,
        "curate": cfg.curate.model_dump(mode="json", exclude={"nproc_per_node", "verify_workers"}),
        "seed": cfg.seed,
        "embeddings": [meta.get("fingerprint"), meta.get("shards")],
        "rows": rows,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def run_curate(cfg: PipelineConfig, *, prepared: str, embeddings: str, out: str, metrics: str) -> None:
    """Curates the prepared pool with the embed stage's features; see the module docstring for the outputs.

    A disk that fills up (or another OS error of a write) stops the stage with a `StorageError` naming it; the
    partial outputs are removed (the finished per-shard results of `work/` stay for the rerun) and the previous
    curated set is as it was.
    """
    paths = {"prepared": prepared, "embeddings": embeddings, "out": out, "metrics": metrics}
    if needs_launcher(cfg, cfg.curate.nproc_per_node):
        relaunch("curate", cfg, paths, cfg.curate.nproc_per_node)
        return
    rank, world = join_process_group("gloo")  # the exchanges are of CPU data, with or without GPUs
    out_dir = Path(out)
    staging = out_dir.with_name(out_dir.name + ".partial")
    if rank == 0:
        _clear_staging(staging)
    barrier(world)
    kept_note = f"the partial outputs in {staging} are removed and {out_dir} is as it was"
    try:
        with storage.named_write_errors(staging, what="the curate stage's outputs", kept=kept_note):
            _curate(cfg, prepared=prepared, embeddings=embeddings, out_dir=out_dir, staging=staging,
                    metrics=metrics, rank=rank, world=world)  # fmt: skip
    except storage.StorageError:
        _clear_staging(staging)
        raise
    barrier(world, last=True)


def _curate(
    cfg: PipelineConfig, *, prepared: str, embeddings: str, out_dir: Path, staging: Path, metrics: str, rank: int,
    world: int,
) -> None:  # fmt: skip
    manifest = read_prepared(prepared)
    meta = read_meta(embeddings)
    ids, x = open_embeddings(embeddings)
    kept, feats, missing = align(manifest, ids, x)
    work = WorkCache(staging / "work", work_fingerprint(cfg, meta, kept))
    if rank != 0:  # the other ranks search their shards; rank 0 alone gates, writes and tracks
        curate(manifest=kept, embeddings=feats, cfg=cfg.curate, seed=cfg.seed, access=_access(cfg, meta),
               ranks=Ranks.current(), work=work)  # fmt: skip
        return
    with stage_run("curate", cfg, config_out=staging / "config.yaml", metrics_out=Path(metrics)) as run:
        # The input gate: a NaN or non-unit row (a broken checkpoint, a hand-made folder) stops here, naming its id.
        run.gate(
            "embeddings_input",
            gates.embedding_frame(ids, x),
            gates.embeddings_suite(dim=int(meta["dim"]), normalized=True),
            staging / "gates",
            id_column="id",
        )
        missing = _report_missing(missing, embeddings, meta, staging)
        warning = random_weights_warning(meta, kept.loc[kept["source"] == "pool", "uri"].head(50).tolist())
        if warning:
            log.warning("curate: %s", warning)
        result = curate(manifest=kept, embeddings=feats, cfg=cfg.curate, seed=cfg.seed, access=_access(cfg, meta),
                        ranks=Ranks.current(), work=work)  # fmt: skip
        assert result is not None  # rank 0 gets the result
        report = result.report
        report["warnings"] = [warning] if warning else []
        report["counts"]["manifest"] = len(manifest)
        report["counts"]["missing_embedding"] = len(missing)
        report["missing_embedding"] = missing[["uri", "reason"]].head(100).to_dict(orient="records")
        report["embeddings"] = {
            k: meta.get(k)
            for k in ("arch", "weights", "random_weights", "dim", "features", "image_size", "fingerprint")
        }
        report["ranks"] = world
        report["removed_images"] = result.removed.head(REPORT_REMOVED).to_dict(orient="records")
        _gate_outputs(run, cfg, result, staging)
        _write_outputs(result, staging)
        shutil.rmtree(staging / "work", ignore_errors=True)  # every result is in the outputs now
        storage.replace_folder(staging, out_dir)
        _log_outputs(run, result, out_dir)


def _clear_staging(staging: Path) -> None:
    """An empty staging folder, but for the finished per-shard results of an earlier run (`work/`)."""
    staging.mkdir(parents=True, exist_ok=True)
    for entry in staging.iterdir():
        if entry.name == "work":
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


REPORT_REMOVED = 1000
"""Removed images listed in report.json itself; removed.parquet lists them all."""


def _report_missing(missing: pd.DataFrame, embeddings: str, meta: dict, staging: Path) -> pd.DataFrame:
    """Manifest rows with no embedding, with the embed stage's reason, written to `missing.parquet` and logged."""
    failures = load_failures(embeddings).set_index("id")["error"] if meta.get("failed") else pd.Series(dtype=str)
    missing = missing.assign(
        reason=[failures.get(u, "no embedding (not in the embed stage's output)") for u in missing["uri"]]
    )
    missing.to_parquet(staging / "missing.parquet", index=False)
    for row in missing.itertuples():
        log.warning("curate: %s has no embedding and is left out (%s)", row.uri, row.reason)
    return missing


def calibration_frame(calibrations: dict[str, Calibration]) -> pd.DataFrame:
    """One row per calibrated comparison: the decision rule's precision on planted copies and its target."""
    return pd.DataFrame(
        {
            "comparison": list(calibrations),
            "precision": [c.precision for c in calibrations.values()],
            "recall": [c.recall for c in calibrations.values()],
            "target": [c.target for c in calibrations.values()],
            "planted_copies": [len(c.data.pos_sims) for c in calibrations.values()],
        }
    )


def _gate_outputs(run: StageRun, cfg: PipelineConfig, result: CurationResult, staging: Path) -> None:
    if result.calibrations:
        run.gate(
            "calibration",
            calibration_frame(result.calibrations),
            gates.calibration_suite(),
            staging / "gates",
            id_column="comparison",
        )
    run.gate(
        "curated_manifest",
        result.manifest,
        gates.curated_manifest_suite(max_eval_similarity=leak_bound(cfg.curate, result.report)),
        staging / "gates",
        id_column="uri",
    )
    bounds = {k: tuple(v) for k, v in cfg.curate.source_share_bounds.items()}
    if bounds:
        run.gate(
            "curated_sources",
            gates.source_share_frame(result.manifest["source"], expected=bounds),
            gates.source_shares_suite(bounds),
            staging / "gates",
            id_column="source",
        )


def _write_outputs(result: CurationResult, staging: Path) -> None:
    result.manifest.to_parquet(staging / "manifest.parquet", index=False)
    result.removed.reindex(columns=list(REMOVED_COLUMNS)).to_parquet(staging / "removed.parquet", index=False)
    curves = [pd.DataFrame(c.curve.sampled(1000)).assign(comparison=name) for name, c in result.calibrations.items()]
    if curves:
        pd.concat(curves, ignore_index=True).to_csv(staging / "calibration.csv", index=False)
    calibration_plot(result.calibrations, staging / "plots" / "calibration.png")
    write_json(staging / "report.json", result.report)
    grids = staging / "grids"
    image_grid(result.duplicate_groups, grids / "duplicate_groups.png")
    image_grid([[(e, "evaluation"), (p, f"{s:.2f}")] for e, p, s in result.leak_examples], grids / "removed_leaks.png")
    image_grid([[s, *n] for s, n in result.retrieved_examples], grids / "retrieved_neighbours.png")


def _log_outputs(run: StageRun, result: CurationResult, out_dir: Path) -> None:
    run.log_artifact(out_dir / "report.json", artifact_path="curate")
    run.log_artifact(out_dir / "removed.parquet", artifact_path="curate")
    for folder in ("grids", "plots"):
        for image in sorted((out_dir / folder).glob("*.png")):
            run.log_artifact(image, artifact_path=f"curate/{folder}")
    for name, cal in result.calibrations.items():
        # One point per step (threshold x 1000): the lowest threshold of each step, the curve seen from below.
        points = {int(round(p["threshold"] * 1000)): p for p in cal.curve.sampled(51)}
        for step, point in sorted(points.items()):
            run.log_metrics(
                {f"calibration.{name}.precision": point["precision"], f"calibration.{name}.recall": point["recall"]},
                step=step,
            )
    report = result.report
    run.record(
        {
            "counts": report["counts"],
            "dedup": {k: report["dedup"][k] for k in ("edges", "duplicate_groups", "removed_duplicates")},
            "eval_dedup": {k: report["eval_dedup"][k] for k in ("pool_images_removed", "seed_images_removed")},
            "calibration": {
                name: {
                    "accept_threshold": c.accept if c.accept is not None else float("nan"),
                    "candidate_threshold": c.candidate,
                    "expected_precision": c.precision,
                    "expected_recall": c.recall,
                }
                for name, c in result.calibrations.items()
            },
            "verification": {
                name: report[key]["pairs"].get("verification", {})
                for name, key in (("dedup", "dedup"), ("eval", "eval_dedup"))
            },
            "per_source": report["per_source"],
        }
    )
    run.set_headline("curated_images", float(len(result.manifest)))
