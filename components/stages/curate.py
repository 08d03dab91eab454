"""The `curate` stage: deduplicate the pool, remove evaluation leakage, retrieve and balance; the curated manifest.

Run: python -m components curate --prepared data/prepared --embeddings data/embeddings --out data/curated
     --metrics metrics/curate.json

Outputs (written into `<out>.partial/` and renamed into place only after every gate passed, so a failed run never
leaves a manifest that looks complete): `manifest.parquet` (the prepared columns plus provenance, see
components/curation/curate.py), `report.json` (counts at each step, duplicate-group sizes, leakage removed, per-source
and per-cluster counts, images without an embedding), `missing.parquet` (manifest rows with no embedding and why),
`gates/` (Great Expectations results) and `grids/` (duplicate groups, removed leaks, retrieved neighbours; logged to
MLflow).
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from components import gates, storage
from components.config import PipelineConfig
from components.curation.curate import curate
from components.embedding import load_embeddings, load_failures, read_meta
from components.log import get_logger
from components.stage import stage_run
from components.stages.embed import read_prepared

log = get_logger(__name__)

TILE = 72


def align(manifest: pd.DataFrame, ids: Sequence[str], x: np.ndarray) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """Manifest rows that have an embedding (with their rows of x, in manifest order) and those that have none."""
    position = pd.Series(np.arange(len(ids)), index=pd.Index(ids, dtype=object))
    position = position[~position.index.duplicated()]
    found = manifest["uri"].isin(position.index).to_numpy()
    kept = manifest[found].reset_index(drop=True)
    rows = position.loc[kept["uri"]].to_numpy()
    return kept, np.asarray(x[rows]), manifest[~found].reset_index(drop=True)


def _tile(uri: str) -> object:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as image:
            tile = image.convert("RGB")
            tile.thumbnail((TILE, TILE))
            return tile
    except Exception:  # a grid is illustration: an unreadable image becomes a grey tile
        return Image.new("RGB", (TILE, TILE), (128, 128, 128))


def image_grid(rows: Sequence[Sequence[str]], path: Path, max_cols: int = 10) -> Path | None:
    """A PNG with one row of thumbnails per group (first image = the kept / query one), or None if empty."""
    from PIL import Image

    rows = [list(r)[:max_cols] for r in rows if len(r)]
    if not rows:
        return None
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cols * (TILE + 4), len(rows) * (TILE + 4)), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, uri in enumerate(row):
            tile = _tile(uri)
            canvas.paste(tile, (j * (TILE + 4) + 2, i * (TILE + 4) + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=1, default=float) + "\n")


def run_curate(cfg: PipelineConfig, *, prepared: str, embeddings: str, out: str, metrics: str) -> None:
    """Curates the prepared pool with the embed stage's features; see the module docstring for the outputs."""
    out_dir = Path(out)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with stage_run("curate", cfg, config_out=staging / "config.yaml", metrics_out=Path(metrics)) as run:
        manifest = read_prepared(prepared)
        meta = read_meta(embeddings)
        ids, x = load_embeddings(embeddings)
        # The input gate: a NaN or non-unit row (a broken checkpoint, a hand-made folder) stops here, naming its id.
        run.gate(
            "embeddings_input",
            gates.embedding_frame(ids, x),
            gates.embeddings_suite(dim=int(meta["dim"]), normalized=True),
            staging / "gates",
            id_column="id",
        )
        kept, feats, missing = align(manifest, ids, x)
        failures = load_failures(embeddings).set_index("id")["error"] if meta.get("failed") else pd.Series(dtype=str)
        missing = missing.assign(
            reason=[failures.get(u, "no embedding (not in the embed stage's output)") for u in missing["uri"]]
        )
        missing.to_parquet(staging / "missing.parquet", index=False)
        for row in missing.itertuples():
            log.warning("curate: %s has no embedding and is left out (%s)", row.uri, row.reason)

        result = curate(manifest=kept, embeddings=feats, cfg=cfg.curate, seed=cfg.seed)
        report = result.report
        report["counts"]["manifest"] = len(manifest)
        report["counts"]["missing_embedding"] = len(missing)
        report["missing_embedding"] = missing[["uri", "reason"]].head(100).to_dict(orient="records")
        report["embeddings"] = {k: meta.get(k) for k in ("arch", "weights", "dim", "mean_patch", "fingerprint")}
        curated = result.manifest

        run.gate(
            "curated_manifest",
            curated,
            gates.curated_manifest_suite(max_eval_similarity=cfg.curate.eval_threshold),
            staging / "gates",
            id_column="uri",
        )
        bounds = {k: tuple(v) for k, v in cfg.curate.source_share_bounds.items()}
        if bounds:
            run.gate(
                "curated_sources",
                gates.source_share_frame(curated["source"], expected=bounds),
                gates.source_shares_suite(bounds),
                staging / "gates",
                id_column="source",
            )

        curated.to_parquet(staging / "manifest.parquet", index=False)
        _write_json(staging / "report.json", report)
        grids = [
            image_grid(result.duplicate_groups, staging / "grids" / "duplicate_groups.png"),
            image_grid([[e, p] for e, p, _ in result.leak_examples], staging / "grids" / "removed_leaks.png"),
            image_grid([[s, *n] for s, n in result.retrieved_examples], staging / "grids" / "retrieved_neighbours.png"),
        ]
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)

        run.log_artifact(out_dir / "report.json", artifact_path="curate")
        for grid in grids:
            if grid is not None:
                run.log_artifact(out_dir / "grids" / grid.name, artifact_path="curate/grids")
        counts = report["counts"]
        run.record(
            {
                "counts": counts,
                "dedup": {k: report["dedup"][k] for k in ("edges", "duplicate_groups", "removed_duplicates")},
                "eval_dedup": {k: report["eval_dedup"][k] for k in ("pool_images_removed", "seed_images_removed")},
                "per_source": report["per_source"],
            }
        )
        run.set_headline("curated_images", float(len(curated)))
