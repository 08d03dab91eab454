"""The embed stage under torchrun on 2 CPU ranks (gloo) writes the same shards as one rank.

Slow (two stage processes and a torchrun launch: about 30 s of CPU): `pytest -m slow`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from components.config import PrepareConfig
from components.embedding import read_meta
from components.prepare import prepare
from tests.curation.test_stages import FAST

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _params(tmp: Path) -> Path:
    """params.yaml with the stage tests' small embedding settings (shards of 16: several per rank)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in FAST.items():
        section, name = key.split(".")
        params[section][name] = value
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _embed(tmp: Path, name: str, prepared: Path, params: Path, ranks: int) -> Path:
    out = tmp / name
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    paths = ["--prepared", str(prepared), "--out", str(out), "--metrics", str(tmp / f"{name}.json")]
    command = [*(launcher if ranks > 1 else [sys.executable]), "-m", "components", "embed", *paths]
    command += ["--params", str(params)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "DINOV2_TRACKING": "off", "OMP_NUM_THREADS": "1"}  # fmt: skip
    subprocess.run(command, check=True, env=env, cwd=ROOT, timeout=300)
    return out


def test_two_ranks_write_the_shards_of_one(tiny_world: tuple[Path, dict], tmp_path: Path) -> None:
    params = _params(tmp_path)
    manifest, _ = prepare(raw=str(tiny_world[0]), cfg=PrepareConfig(num_workers=0), num_workers=0)
    (tmp_path / "prepared").mkdir()
    manifest.to_parquet(tmp_path / "prepared" / "manifest.parquet", index=False)
    one = _embed(tmp_path, "one", tmp_path / "prepared", params, 1)
    two = _embed(tmp_path, "two", tmp_path / "prepared", params, 2)
    meta_one, meta_two = read_meta(one), read_meta(two)
    assert meta_one["fingerprint"] == meta_two["fingerprint"] and meta_one["counts"] == meta_two["counts"]
    assert [s["file"] for s in meta_one["shards"]] == [s["file"] for s in meta_two["shards"]]
    assert len(meta_one["shards"]) >= 4  # both ranks had shards to write
    for shard in meta_one["shards"]:
        ids = shard["file"].replace(".npy", ".ids.parquet")
        assert pd.read_parquet(one / ids)["id"].tolist() == pd.read_parquet(two / ids)["id"].tolist()
        np.testing.assert_allclose(
            np.load(one / shard["file"]).astype(np.float32), np.load(two / shard["file"]).astype(np.float32), atol=2e-3
        )
    metrics = json.loads((tmp_path / "two.json").read_text())
    assert metrics["world_size"] == 2 and metrics["counts"]["total"] == len(manifest)
