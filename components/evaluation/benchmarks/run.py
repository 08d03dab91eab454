"""One benchmark on one backbone: its data read and checked, its protocol's tasks run, its results named.

`load_benchmark` reads a publisher's folder through the registry's reader and checks that every image decodes
(the prepare stage's checks: undecodable images are left out and listed with their reason); `protocol_config` is the
`evaluate` section with the benchmark's tasks and fixed keys; `evaluate_benchmark` runs `runner.evaluate_model` on
it (the same task code as the demo's) and returns the results under the benchmark's result names. The benchmark
command (components/stages/benchmark.py) and the evaluate stage both go through here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from components.config import EvaluateConfig
from components.evaluation.benchmarks import Benchmark, BenchmarkData, get_benchmark
from components.evaluation.benchmarks.common import Reject, check_decodable, without
from components.evaluation.context import ModelResult
from components.evaluation.models import ModelSpec
from components.evaluation.robustness import finalize_robustness
from components.evaluation.runner import ImageCache, evaluate_model
from components.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class LoadedBenchmark:
    """A benchmark's data, read once and shared by every model evaluated on it."""

    name: str
    benchmark: Benchmark
    data: BenchmarkData
    rejects: tuple[Reject, ...]
    """Images that failed to decode (left out), with the prepare stage's reasons."""
    root: str
    train_root: str | None = None
    read_s: float = 0.0
    caches: dict[str, ImageCache] = field(default_factory=dict)
    """`images`: the decoded images shared by every model evaluated on the benchmark (made by the first)."""


def image_uris(data: BenchmarkData) -> list[str]:
    """Every image a benchmark reads (item URIs included), split by split."""
    d, uris = data.datasets, []
    if d.classification is not None:
        uris += [u for s in d.classification.splits.values() for u in s.uris]
        uris += [u for s in (d.classification.corrupted or {}).values() for u in s.uris]
    for dense in (d.segmentation, d.depth):
        if dense is not None:
            uris += [u for s in dense.splits.values() for u in s.image_uris]
    if d.retrieval is not None:
        uris += [*d.retrieval.query.uris, *d.retrieval.database.uris]
    return uris


def load_benchmark(name: str, root: str, train_root: str | None = None, *, check: bool = True) -> LoadedBenchmark:
    """Reads a benchmark from its publisher's layout and leaves out (and lists) images that do not decode.

    Raises:
        KeyError: An unknown benchmark name. LayoutError: The folder is not the benchmark's layout.
    """
    bench = get_benchmark(name)
    if bench.train_root and train_root is None:
        raise ValueError(f"benchmark {name} needs --train-root: an ImageNet-1k root whose train split trains the "
                         "classifier")  # fmt: skip
    start = time.perf_counter()
    data = bench.read(root, train_root)
    rejects = check_decodable(image_uris(data)) if check else []
    for r in rejects[:20]:
        log.warning("%s: %s (%s); left out", r.uri, r.reason, r.detail)
    if rejects:
        log.warning("%s: %d images do not decode and are left out", name, len(rejects))
        data = without(data, {r.uri for r in rejects})
    seconds = time.perf_counter() - start
    log.info("%s from %s: %s images%s (read in %.1f s)", name, root, data.num_images,
             f", {data.num_classes} classes" if data.num_classes else "", seconds)  # fmt: skip
    return LoadedBenchmark(name, bench, data, tuple(rejects), root, train_root, seconds)


def protocol_config(loaded: LoadedBenchmark, cfg: EvaluateConfig) -> EvaluateConfig:
    """The `evaluate` section with the benchmark's tasks and the keys its protocol and its data fix (validated;
    no figures: the report's figures stay the demo's)."""
    update = {"tasks": list(loaded.benchmark.tasks), **loaded.benchmark.settings, **loaded.data.settings,
              "num_figure_samples": 0}  # fmt: skip
    return EvaluateConfig.model_validate({**cfg.model_dump(mode="json"), **update})


def result_name(loaded: LoadedBenchmark, task_result: str) -> str:
    """The benchmark's name for one of its task results (`linear`, or `place_recognition` for Pittsburgh's)."""
    return loaded.benchmark.rename.get(task_result, task_result)


def evaluate_benchmark(
    model: nn.Module, spec: ModelSpec, loaded: LoadedBenchmark, cfg: EvaluateConfig, *, seed: int, device: str
) -> ModelResult:
    """The benchmark's protocol on one frozen backbone: results under the benchmark's result names, robustness
    already normalised (ImageNet-C: by AlexNet's errors)."""
    pcfg = protocol_config(loaded, cfg)
    cache = loaded.caches.setdefault("images", ImageCache(loaded.data.datasets, pcfg, seed))
    result = evaluate_model(model, spec, loaded.data.datasets, pcfg, cache, seed=seed, device=device)
    finalize_robustness([result], pcfg)
    result.tasks = {result_name(loaded, k): replace(t, task=result_name(loaded, k)) for k, t in result.tasks.items()}
    return result


def benchmark_record(loaded: LoadedBenchmark, result: ModelResult, pcfg: EvaluateConfig) -> dict[str, Any]:
    """What `<out>/<name>.json` holds: metrics per result, images per split, classes, rejects, timings."""
    protocol_keys = ("image_size", "dense_image_size", "knn_k", "linear_epochs", "logreg_num_c", "retrieval_scales",
                     "retrieval_positive_distance", "segmentation_variants", "depth_heads", "depth_max",
                     "robustness_baseline", "robustness_images_per_class")  # fmt: skip
    return {
        "benchmark": loaded.name,
        "table": loaded.benchmark.table,
        "model": result.spec.to_json(),
        "root": loaded.root,
        "train_root": loaded.train_root,
        "tasks": list(loaded.benchmark.tasks),
        "metrics": {name: t.metrics for name, t in result.tasks.items()},
        "num_images": loaded.data.num_images,
        "num_classes": loaded.data.num_classes,
        "rejected": [{"uri": r.uri, "reason": r.reason, "detail": r.detail} for r in loaded.rejects],
        "notes": loaded.data.notes,
        "protocol": {k: getattr(pcfg, k) for k in protocol_keys},
        "details": {name: t.details for name, t in result.tasks.items()},
        "seconds": {"read": round(loaded.read_s, 3), **{k: round(v, 3) for k, v in result.timing.items()}},
    }
