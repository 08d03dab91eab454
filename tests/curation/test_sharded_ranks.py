"""Two ranks compute what one does: the kNN graph (`ivf_gemm`), top-k searches and k-means of
components/curation/sharded.py under torchrun (2 CPU ranks, gloo) against the same code in one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("sharded_worker.py")


def _run(out: Path, ranks: int) -> dict[str, np.ndarray]:
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={ranks}"]  # fmt: skip
    proc = subprocess.run([*launcher, str(WORKER), str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


def test_two_ranks_search_and_cluster_what_one_does(tmp_path: Path) -> None:
    one = _run(tmp_path / "one.npz", 1)
    two = _run(tmp_path / "two.npz", 2)
    assert int(two["world"]) == 2 and int(one["world"]) == 1
    assert len(one["src"]) > 500  # the graph has edges to compare
    for key in ("src", "dst", "sim", "sims", "ids", "centroids", "labels", "similarity", "searched"):
        np.testing.assert_array_equal(one[key], two[key], err_msg=key)
