"""Command `benchmark`: one model on one of the paper's benchmarks, read straight from its publisher's layout.

Run: `python -m components benchmark --name <name> --root <folder> [--train-root <folder>] --model <export folder |
model.json | hub name | arch=weights> --out <dir> [--recipe infra/recipes/paper_<table>.yaml]` (the benchmark names
and layouts: components/evaluation/benchmarks/, docs/evaluation.md). Not a DVC stage: its inputs are datasets outside
the repository; the evaluate stage runs the same benchmarks from params.yaml's `evaluate.benchmarks`.

Outputs under --out:
```
<name>.json            {"benchmark", "table", "model", "metrics": {result: {metric: value}}, "num_images": {split: n},
                        "num_classes", "rejected": [{"uri", "reason", "detail"}], "notes", "protocol", "details",
                        "seconds"}
<name>.config.yaml     the resolved config (the recipe applied)
```
Logged to MLflow like a stage (its own run, nested under $DINOV2_PARENT_RUN_ID when set): the `seed` and `evaluate`
params, every metric as `<name>.<result>.<metric>`, the images per split, the JSON as an artifact, the data as an
MLflow dataset.
"""

from __future__ import annotations

import time
from pathlib import Path

from components.config import PipelineConfig
from components.evaluation.benchmarks.run import (
    benchmark_record,
    evaluate_benchmark,
    image_uris,
    load_benchmark,
    protocol_config,
)
from components.evaluation.metrics import mlflow_key
from components.evaluation.models import build_model, model_from_reference
from components.evaluation.outputs import write_json
from components.log import get_logger
from components.runtime import resolve_device
from components.stages.shell import stage_run
from components.tracking import DatasetRecord, dataset_digest

log = get_logger(__name__)


def run_benchmark(
    cfg: PipelineConfig, *, name: str, root: str, model: str, out: str, train_root: str | None = None
) -> dict:
    """Evaluates `model` on the benchmark `name` read from `root` and writes `<out>/<name>.json`; returns the record."""
    if not name or not root or not model or not out:
        raise ValueError("benchmark needs --name, --root, --model and --out")
    start = time.perf_counter()
    spec = model_from_reference(model)
    loaded = load_benchmark(name, root, train_root)
    out_dir = Path(out)
    with stage_run("benchmark", cfg, config_out=out_dir / f"{name}.config.yaml", metrics_out=None) as run:
        uris = image_uris(loaded.data)  # the images read, in order: the dataset's identity
        run.log_dataset(DatasetRecord(name, root, dataset_digest(uris, [""] * len(uris)), len(uris), "evaluation"))
        run.set_tags({"benchmark": name, "benchmark.root": root, "benchmark.model": spec.name})
        device = resolve_device(cfg.evaluate.device, key="evaluate.device")
        backbone = build_model(spec, seed=cfg.seed).to(device)
        result = evaluate_benchmark(backbone, spec, loaded, cfg.evaluate, seed=cfg.seed, device=device)
        result.timing["total"] = time.perf_counter() - start
        record = benchmark_record(loaded, result, protocol_config(loaded, cfg.evaluate))
        path = write_json(out_dir / f"{name}.json", record)
        metrics = {mlflow_key(f"{name}.{r}.{m}"): v for r, ms in record["metrics"].items() for m, v in ms.items()}
        metrics.update({f"{name}.num_images.{s}": float(n) for s, n in loaded.data.num_images.items()})
        run.log_metrics(metrics)
        run.log_artifact(path, artifact_path="benchmarks")
    for result_name, ms in record["metrics"].items():
        log.info("%s %s: %s", name, result_name, ", ".join(f"{k} {v:.4g}" for k, v in ms.items()))
    log.info("%s done in %.1f s: %s", name, time.perf_counter() - start, path)
    return record
