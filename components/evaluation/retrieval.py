"""Instance retrieval and place recognition on frozen features.

Queries and database images are embedded with the model's CLS output (optionally averaged over scales, as DINO's
multi-scale retrieval), L2-normalised, and ranked by cosine similarity. Positives are the database images of the
query's identity (place, landmark, object) or, with positions and a threshold, every database image within that
distance (25 m in Pitts30k / MSLS). mAP and Recall@k follow `metrics.retrieval_metrics`; with a revisited ground
truth (Revisited Oxford / Paris: easy, hard and junk images per query) the scores are the Easy / Medium / Hard mAP and
mP@k of `metrics.revisited_map`, reported as `retrieval_revisited`. At the sizes evaluated here
an exact matrix product is the whole search; the project's faiss module is meant for the curation-scale indexes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from components.evaluation.metrics import (
    positives_by_distance,
    positives_by_label,
    retrieval_metrics,
    revisited_map,
)

if TYPE_CHECKING:
    from components.evaluation.context import TaskContext, TaskOutputs


def evaluate_retrieval(
    query: Tensor,
    database: Tensor,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    *,
    ks: Sequence[int] = (1, 5, 10),
    query_xy: np.ndarray | None = None,
    database_xy: np.ndarray | None = None,
    positive_distance: float | None = None,
    num_neighbors: int = 5,
    ground_truth: Sequence[dict[str, np.ndarray]] | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """mAP and Recall@k of queries against a database.

    Args:
        query, database: (Q, D) and (M, D) features.
        query_labels, database_labels: Identities; positives share one (unless distances are used).
        ks: k of Recall@k.
        query_xy, database_xy, positive_distance: Positions and threshold; when all three are given, positives are
            the database images within the threshold instead.
        num_neighbors: Top results per query kept in the details (for the report's figure).
        ground_truth: Per query, database indices `easy`, `hard` and `junk` (the revisited benchmarks); when given,
            the metrics are `metrics.revisited_map`'s and positives (for the neighbours) are the Medium protocol's.

    Returns:
        (metrics `map`, `recall@k`; details: how positives were defined, top neighbours and whether each is positive).
    """
    q = F.normalize(query.float(), dim=1)
    db = F.normalize(database.float(), dim=1)
    similarity = (q @ db.T).numpy()  # (Q, M)
    by_distance = positive_distance is not None and query_xy is not None and database_xy is not None
    if ground_truth is not None:
        metrics = revisited_map(similarity, ground_truth, ks)
        counts = {k: int(metrics.pop(k)) for k in [k for k in metrics if k.startswith("num_queries_")]}
        positives = np.zeros(similarity.shape, bool)
        for i, gnd in enumerate(ground_truth):
            positives[i, np.concatenate([gnd["easy"], gnd["hard"]]).astype(np.int64)] = True
        order = np.argsort(-similarity, axis=1, kind="stable")[:, :num_neighbors]
        details = {
            "positives": "revisited easy / medium / hard, junk ignored",
            **counts,
            "num_queries": int(similarity.shape[0]),
            "num_database": int(db.shape[0]),
            "neighbors": order.tolist(),
            "neighbor_is_positive": np.take_along_axis(positives, order, axis=1).tolist(),
        }
        return metrics, details
    if by_distance:
        positives = positives_by_distance(query_xy, database_xy, positive_distance)
    else:
        positives = positives_by_label(query_labels, database_labels)
    metrics = retrieval_metrics(similarity, positives, ks)
    num_queries = metrics.pop("num_queries")
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :num_neighbors]
    details = {
        "positives": f"distance <= {positive_distance}" if by_distance else "same identity",
        "num_queries": int(num_queries),
        "num_database": int(db.shape[0]),
        "neighbors": order.tolist(),
        "neighbor_is_positive": np.take_along_axis(positives, order, axis=1).tolist(),
    }
    return metrics, details


def retrieval_task(ctx: TaskContext) -> TaskOutputs:
    """The `retrieval` task: queries against the database at `retrieval_scales`; the first queries and their
    neighbours are kept for the report's figure."""
    r, cfg, cache, side = ctx.data.retrieval, ctx.cfg, ctx.cache, ctx.side
    assert r is not None
    kw = dict(n_blocks=1, scales=cfg.retrieval_scales, **ctx.extract_kwargs)
    q = cache.features(ctx.model, "retrieval", "query", side, **kw).output
    db = cache.features(ctx.model, "retrieval", "database", side, **kw).output
    ctx.num_extracted += (len(r.query) + len(r.database)) * len(cfg.retrieval_scales)
    metrics, details = evaluate_retrieval(
        q, db, r.query.labels, r.database.labels, ks=cfg.retrieval_ks, query_xy=r.query_xy,
        database_xy=r.database_xy, positive_distance=cfg.retrieval_positive_distance, ground_truth=r.ground_truth,
    )  # fmt: skip
    k = min(cfg.num_figure_samples, len(r.query))
    neighbors = np.asarray(details["neighbors"][:k], dtype=np.int64)  # (k, 5)
    ctx.result.samples.update({
        "retrieval_queries": cache.subset("retrieval", "query", side, np.arange(k)),
        "retrieval_neighbors": cache.subset("retrieval", "database", side, neighbors)
        if k else np.zeros((0, 0, side, side, 3), np.uint8),
        "retrieval_positive": np.asarray(details["neighbor_is_positive"][:k], dtype=bool),
    })  # fmt: skip
    return {"retrieval" if r.ground_truth is None else "retrieval_revisited": (metrics, details)}
