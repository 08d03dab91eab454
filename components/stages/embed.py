"""The `embed` stage: every prepared image through the configured backbone, as float16 shards with ids.

Run: python -m components embed --prepared data/prepared --out data/embeddings --metrics metrics/embed.json
Several GPUs or nodes: torchrun --nproc_per_node 8 -m components embed ... (each rank embeds every world_size-th
shard into the same folder, which must be shared between nodes; rank 0 waits for all, then writes meta.json, runs
the gate and logs).

Resumable: the output folder is `persist: true` in dvc.yaml, so DVC leaves finished shards in place; a shard is reused
only when its recorded fingerprint (config, seed, weights, its manifest rows) matches, so a changed model or config
recomputes it (see components/embedding.py).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from components import gates, storage
from components.config import PipelineConfig
from components.embedding import (
    RANDOM_INIT,
    Embedder,
    build_embedder,
    embed_shards,
    finalize,
    load_embeddings,
    load_failures,
    plan_shards,
    run_fingerprint,
)
from components.log import get_logger
from components.runtime import barrier, join_process_group
from components.stages.shell import stage_run
from components.synthetic import is_synthetic_world

log = get_logger(__name__)


def read_prepared(prepared: str | Path) -> pd.DataFrame:
    """The prepared manifest's usable rows (`decodable`), in manifest order."""
    path = Path(prepared) / "manifest.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no prepared manifest (run the prepare stage first)")
    manifest = pd.read_parquet(path)
    if "decodable" in manifest.columns:
        manifest = manifest[manifest["decodable"].astype(bool)]
    return manifest.reset_index(drop=True)


def warn_random_weights(embedder: Embedder, manifest: pd.DataFrame) -> bool:
    """Warns (and returns True) when a random initialisation embeds a pool that is not the synthetic world."""
    pool = manifest.loc[manifest["source"] == "pool", "uri"].head(50).tolist()
    if not embedder.weights_digest.startswith(RANDOM_INIT) or not pool or is_synthetic_world(pool):
        return False
    log.warning(
        "embed: embed.weights is null, so these features come from a RANDOM initialisation, and the pool is not the "
        "synthetic world: they barely tell real photographs apart (curation then leans on local-feature "
        "verification); set embed.weights to a trained checkpoint such as a DINOv2 backbone"
    )
    return True


def run_embed(cfg: PipelineConfig, *, prepared: str, out: str, metrics: str) -> None:
    """Embeds the prepared manifest into `out` (shards, ids, meta.json, failures.parquet, gate results)."""
    out_dir = Path(out)
    rank, world = join_process_group()
    manifest = read_prepared(prepared)
    if rank != 0:  # workers embed their slice; rank 0 alone tracks, finalises and gates
        embedder = build_embedder(cfg.embed, cfg.seed)
        shards = plan_shards(
            manifest, cfg.embed.shard_size, run_fingerprint(cfg.embed, cfg.seed, embedder.weights_digest)
        )
        embed_shards(shards, embedder, cfg.embed, out_dir, rank=rank, world_size=world)
        barrier(world)  # rank 0 finalises after this one
        barrier(world, last=True)
        return
    with stage_run("embed", cfg, config_out=out_dir / "config.yaml", metrics_out=Path(metrics)) as run:
        embedder = build_embedder(cfg.embed, cfg.seed)
        warn_random_weights(embedder, manifest)
        run_fp = run_fingerprint(cfg.embed, cfg.seed, embedder.weights_digest)
        shards = plan_shards(manifest, cfg.embed.shard_size, run_fp)
        run.set_tags({"embed.fingerprint": run_fp, "embed.device": str(embedder.device), "embed.world_size": world})
        stats = embed_shards(shards, embedder, cfg.embed, out_dir, rank=0, world_size=world)
        barrier(world)
        meta = finalize(shards, embedder, cfg.embed, out_dir, run_fp)
        failures = load_failures(out_dir)
        with (
            storage.named_write_errors(out_dir / "failures.parquet", what="the embed stage's failures.parquet"),
            storage.atomic_path(out_dir / "failures.parquet") as tmp,
        ):
            failures.to_parquet(tmp, index=False)
        if len(failures):
            log.warning("embed: %d images could not be read (see %s)", len(failures), out_dir / "failures.parquet")
            run.log_artifact(out_dir / "failures.parquet", artifact_path="embed")

        ids, x = load_embeddings(out_dir)
        run.gate(
            "embeddings",
            gates.embedding_frame(ids, x),
            gates.embeddings_suite(dim=meta["dim"], normalized=True, num_rows=len(manifest) - len(failures)),
            out_dir / "gates",
            id_column="id",
        )
        run.log_artifact(out_dir / "meta.json", artifact_path="embed")
        run.record(
            {
                "counts": {**meta["counts"], "failed": len(failures), "total": len(ids)},
                "dim": meta["dim"],
                # skipped / written count rank 0's shards (every world_size-th one)
                "shards": {"total": len(shards), "skipped": stats.shards_skipped, "written": stats.shards_written},
                "world_size": world,
                "images_per_s": round(stats.images_per_s, 2),
            }
        )
        run.set_headline("embedded_images", float(len(ids)))
    barrier(world, last=True)
