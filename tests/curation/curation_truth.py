"""Scores curation against the synthetic world's ground truth (components/synthetic.py `ground_truth.json`).

Planted duplicate groups: each `near_duplicates` entry (original + copies), and the pool leaks of one evaluation
image together (they are near-copies of each other). Exact copies are rejected by prepare, so only the members that
reached the manifest count. A pair is "found" when both members end up in one duplicate group.

Run as a script to calibrate thresholds for an embeddings folder (prints recall/precision per threshold):
    python tests/curation/curation_truth.py --world data/synthetic --prepared data/prepared --embeddings data/embeddings
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np


def relative(uri: str, root: str | Path) -> str:
    """A manifest uri relative to the world's root, as ground_truth.json spells paths."""
    root = str(root).rstrip("/") + "/"
    return uri[len(root) :] if uri.startswith(root) else uri


def planted_groups(truth: dict[str, Any], present: set[str]) -> list[list[str]]:
    """Planted duplicate groups (relative paths present in the manifest), leaks of one eval image grouped."""
    groups = []
    for group in truth.get("near_duplicates", []):
        members = [group["original"], *(c["path"] for c in group["copies"])]
        groups.append([m for m in members if m in present])
    by_eval: dict[str, list[str]] = {}
    for leak in truth.get("leaks", []):
        if leak["path"] in present:
            by_eval.setdefault(leak["eval_path"], []).append(leak["path"])
    groups.extend(by_eval.values())
    return [g for g in groups if len(g) > 1]


def pairs_of(groups: list[list[Any]]) -> set[tuple[Any, Any]]:
    return {(a, b) if a < b else (b, a) for g in groups for i, a in enumerate(g) for b in g[i + 1 :]}


def score_groups(labels: dict[str, int], truth_groups: list[list[str]]) -> dict[str, float]:
    """Pair recall and precision of predicted groups (`labels`: relative path -> group id) against the truth."""
    true_pairs = pairs_of(truth_groups)
    by_label: dict[int, list[str]] = {}
    for path, label in labels.items():
        by_label.setdefault(label, []).append(path)
    predicted = pairs_of([g for g in by_label.values() if len(g) > 1])
    found = len(true_pairs & predicted)
    return {
        "true_pairs": len(true_pairs),
        "predicted_pairs": len(predicted),
        "recall": found / len(true_pairs) if true_pairs else 1.0,
        "precision": found / len(predicted) if predicted else 1.0,
    }


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from components.config import CurateConfig
    from components.curation.curate import whiten
    from components.curation.dedup import self_deduplicate
    from components.embedding import load_embeddings
    from components.stages.curate import align
    from components.stages.embed import read_prepared

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", required=True)
    parser.add_argument("--prepared", required=True)
    parser.add_argument("--embeddings", required=True)
    parser.add_argument("--whiten", action="store_true")
    args = parser.parse_args()
    truth = json.loads((Path(args.world) / "ground_truth.json").read_text())
    manifest, x, _ = align(read_prepared(args.prepared), *load_embeddings(args.embeddings))
    pool = np.flatnonzero(manifest["source"].eq("pool").to_numpy())
    if args.whiten:
        x = whiten(x, pool)
    paths = [relative(u, args.world) for u in manifest["uri"].iloc[pool]]
    groups = planted_groups(truth, set(paths))
    pixels = np.ones(len(pool), np.int64)
    for threshold in np.round(np.arange(0.5, 1.0, 0.02), 3):
        result = self_deduplicate(x[pool], pixels, k=CurateConfig().dedup_k, threshold=float(threshold))
        print(threshold, json.dumps(score_groups(dict(zip(paths, result.labels.tolist(), strict=True)), groups)))


if __name__ == "__main__":
    main()
