"""The `prepare` stage: every source file decoded and checked; a manifest of usable images and the rejects.

Run: python -m components prepare --raw data/synthetic --out data/prepared --metrics metrics/prepare.json
"""

from __future__ import annotations

from pathlib import Path

from components import gates
from components.config import PipelineConfig
from components.prepare import prepare, summarize, write_outputs
from components.stages.shell import stage_run


def run_prepare(cfg: PipelineConfig, *, raw: str | None, out: str, metrics: str) -> None:
    out_dir = Path(out)
    with stage_run("prepare", cfg, config_out=out_dir / "config.yaml", metrics_out=Path(metrics)) as run:
        # Listing fails on a missing folder or an unreachable bucket before anything is decoded or written.
        manifest, rejects = prepare(raw=raw or cfg.data.raw, extra_pool=cfg.data.extra_pool, cfg=cfg.prepare)
        run.gate(
            "prepared_manifest",
            manifest,
            gates.prepared_manifest_suite(min_side=cfg.prepare.min_side),
            out_dir / "gates",
            id_column="uri",
        )
        write_outputs(manifest, rejects, out_dir)
        counts = summarize(manifest, rejects)
        run.log_artifact(out_dir / "rejects.parquet", artifact_path="prepare")
        run.record({"counts": counts})
        run.set_headline("usable_images", float(len(manifest)))
