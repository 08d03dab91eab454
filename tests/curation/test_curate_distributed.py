"""The curate stage on several ranks: the same output as one process, and a run that resumes its finished shards.

The stage runs twice on the tiny world's embeddings (pool shards of 8 images, so both ranks own several): once in
one process, once with `curate.nproc_per_node: 2` (the stage relaunches itself under torchrun: 2 CPU ranks, gloo),
with whitening, calibration, verification and both retrieval methods on. The curated manifest, the removed images and
every report figure but the measured costs are equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from components.config import CurateConfig
from components.curation import pairs as pairs_module
from components.curation import sharded
from components.curation.curate import curate
from tests.curation.test_curate import BASE, world
from tests.curation.test_stages import FAST

ROOT = Path(__file__).resolve().parents[2]
SHARDS = {"curate.shard_size": 8, "curate.calibration_images": 24, "curate.index": "ivf_gemm", "curate.nlist": 4}
"""Shards of 8 images, searched with the index the stage picks at scale (`ivf_gemm`: trained once, its cells shared
by every shard), so that both rank counts run the distributed path of a large pool."""
COSTS = {"wall_s", "cpu_s", "ms_per_pair", "cpu_ms_per_pair", "workers", "ranks"}
"""Report entries that measure how the run went (time, threads, ranks), not what it found."""


def _params(tmp: Path, **overrides: Any) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in {**FAST, **SHARDS, **overrides}.items():
        section, name = key.split(".")
        params[section][name] = value
    path = tmp / f"params-{len(list(tmp.glob('params-*')))}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _curate(tmp: Path, name: str, prep: Path, emb: Path, params: Path, *, launcher: list[str] | None = None) -> Path:
    out = tmp / name
    command = [*(launcher or [sys.executable, "-m"]), "components", "curate", "--prepared", str(prep),
               "--embeddings", str(emb), "--out", str(out), "--metrics", str(tmp / f"{name}.json"),
               "--params", str(params)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "DINOV2_TRACKING": "off", "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    (tmp / f"{name}.log").write_text(proc.stderr)
    if proc.returncode:
        raise AssertionError(f"curate {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return out


def _figures(report: Any) -> Any:
    """The report without its measured costs."""
    if isinstance(report, dict):
        return {k: _figures(v) for k, v in report.items() if k not in COSTS}
    if isinstance(report, list):
        return [_figures(v) for v in report]
    return report


def _assert_same_output(one: Path, two: Path) -> None:
    pd.testing.assert_frame_equal(pd.read_parquet(one / "manifest.parquet"), pd.read_parquet(two / "manifest.parquet"))
    pd.testing.assert_frame_equal(pd.read_parquet(one / "removed.parquet"), pd.read_parquet(two / "removed.parquet"))
    report_one = json.loads((one / "report.json").read_text())
    report_two = json.loads((two / "report.json").read_text())
    assert _figures(report_one) == _figures(report_two)


def test_two_ranks_curate_what_one_does(tiny_embedded: tuple[Path, Path], tmp_path: Path) -> None:
    prep, emb = tiny_embedded
    one = _curate(tmp_path, "one", prep, emb, _params(tmp_path))
    two = _curate(tmp_path, "two", prep, emb, _params(tmp_path, **{"curate.nproc_per_node": 2}))
    _assert_same_output(one, two)
    report = json.loads((two / "report.json").read_text())
    assert report["ranks"] == 2 and json.loads((one / "report.json").read_text())["ranks"] == 1
    assert report["counts"]["pool"] > 4 * SHARDS["curate.shard_size"]  # several shards for each rank
    assert report["removed"]["count"] > 0 and report["calibration"]["dedup"]["planted_copies"] == 24
    assert report["retrieval"]["per_seed_set"]["synthetic"]["cluster"] > 0
    assert "relaunching under torchrun" in (tmp_path / "two.log").read_text()
    assert not (tmp_path / "two.partial").exists()  # the work folder went with the staging folder


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the name of every chunk that is computed (not loaded from the work folder)."""
    computed: list[str] = []
    original = sharded.WorkCache.save

    def save(self: sharded.WorkCache, name: str, inputs: str, arrays: dict) -> None:
        computed.append(name)
        original(self, name, inputs, arrays)

    monkeypatch.setattr(sharded.WorkCache, "save", save)
    return computed


def test_a_killed_run_resumes_its_finished_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The core with a work folder: a run that dies in verification after the kNN graph of every shard was written
    resumes without searching again, and ends where an uninterrupted run ends."""
    manifest, x, _, _ = world(num_pool=300)
    cfg = CurateConfig(**{**BASE, "shard_size": 64, "verify": "auto", "candidate_threshold": 0.3})
    clean = curate(manifest=manifest, embeddings=x, cfg=cfg, seed=0, access=_no_images(), ranks=sharded.LOCAL)
    work = sharded.WorkCache(tmp_path / "work", "run-1")
    computed = _counting(monkeypatch)

    def dies(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(pairs_module, "verify_pairs", dies)
        with pytest.raises(RuntimeError, match="killed"):
            curate(manifest=manifest, embeddings=x, cfg=cfg, seed=0, access=_no_images(), work=work)
    finished = sorted(n for n in computed if n.startswith("dedup/edges"))
    assert finished == [f"dedup/edges/{s:05d}" for s in range(5)]  # 300 images: 5 shards of 64
    stamps = {n: work.path(n).stat().st_mtime_ns for n in finished}
    computed.clear()
    resumed = curate(manifest=manifest, embeddings=x, cfg=cfg, seed=0, access=_no_images(), work=work)
    assert not [n for n in computed if n.startswith(("dedup/edges", "whitening"))]  # loaded, not searched again
    assert {n: work.path(n).stat().st_mtime_ns for n in finished} == stamps
    assert any(n.startswith("dedup/verify") for n in computed)  # what had not finished runs now
    pd.testing.assert_frame_equal(resumed.manifest, clean.manifest)
    pd.testing.assert_frame_equal(resumed.removed, clean.removed)
    assert _figures(resumed.report) == _figures(clean.report)
    # Another run's fingerprint reuses nothing.
    computed.clear()
    curate(manifest=manifest, embeddings=x, cfg=cfg, seed=0, access=_no_images(),
           work=sharded.WorkCache(tmp_path / "work", "run-2"))  # fmt: skip
    assert set(finished) <= set(computed)


def _no_images() -> Any:
    """Image access for a core test without images: every pair verifies as distinct (decode fails are not copies)."""
    from components.curation.curate import ImageAccess

    return ImageAccess(embed=lambda images: np.zeros((len(images), 32), np.float32), workers=1)
