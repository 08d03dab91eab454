"""Run by tests/curation/test_sharded_ranks.py, alone or under torchrun: the distributed searches and k-means of
components/curation/sharded.py on one data set, rank 0's results saved to the .npz named on the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from components.curation import sharded  # noqa: E402
from components.curation.search import SearchParams  # noqa: E402
from components.runtime import barrier, join_process_group  # noqa: E402
from tests.curation.vectors import planted  # noqa: E402


def main(out: str) -> None:
    rank, world = join_process_group("gloo")
    ranks = sharded.Ranks.current()
    x, _ = planted(6000, dim=32, num_groups=300)
    vectors = sharded.in_memory(x, shard_size=1000, chunk_size=400)  # six shards, three per rank at two ranks
    params = SearchParams(kind="ivf_gemm", nlist=40, nprobe=6, chunk_size=400)
    src, dst, sim = sharded.self_edges(vectors, 8, 0.7, params, ranks=ranks)
    sims, ids = sharded.knn(x[:50] * 0.9 + x[50:100] * 0.1, vectors, 5, params, ranks=ranks)
    km = sharded.kmeans(vectors, 30, niter=8, seed=0, max_points_per_centroid=100, params=params, ranks=ranks)
    if rank == 0:
        np.savez(out, src=src, dst=dst, sim=sim, sims=sims, ids=ids, centroids=km.centroids, labels=km.labels,
                 similarity=km.similarity, searched=np.array(km.recomputed_share), world=np.array(world))  # fmt: skip
    barrier(world, last=True)  # the process group left before exit: gloo's threads must not outlive it


if __name__ == "__main__":
    main(sys.argv[1])
