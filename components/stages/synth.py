"""The `synth` stage: renders the embedded synthetic image world.

Run: python -m components synth --out data/synthetic --metrics metrics/synth.json
"""

from __future__ import annotations

import shutil
from pathlib import Path

from components.config import PipelineConfig
from components.stages.shell import stage_run
from components.synthetic import render_world


def replace_dir(staging: Path, final: Path) -> None:
    """Moves a finished staging folder into place, so that a failed run never leaves a half-written output."""
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)


def run_synth(cfg: PipelineConfig, *, out: str, metrics: str) -> None:
    out_dir = Path(out)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with stage_run("synth", cfg, config_out=staging / "config.yaml", metrics_out=Path(metrics)) as run:
        truth = render_world(cfg.synthetic, cfg.seed, staging)
        counts = truth.get("counts", {})
        replace_dir(staging, out_dir)
        run.log_artifact(out_dir / "ground_truth.json", artifact_path="synthetic")
        run.record({"counts": counts})
        run.set_headline("images", float(sum(v for v in counts.values() if isinstance(v, int | float))))
