"""Stage `evaluate`: every backbone's frozen features on the paper's benchmarks.

Run: `python -m components evaluate --prepared data/prepared --pretrained models/pretrain
--final models/pretrain_highres --distilled models/distill --out metrics/eval --metrics metrics/evaluate.json` (what
dvc.yaml runs, `--final` being `pipeline.pretrained_model`; the tasks and protocols are params.yaml's `evaluate`
section).

Benchmarks: each entry of `evaluate.benchmarks` (name -> its publisher's folder, components/evaluation/benchmarks/) is
read once and run for every model with its own protocol; its results sit beside the demo's tasks as
`<benchmark>-<result>` (`ade20k-segmentation_ms`, `roxford5k-retrieval_revisited`).

Models: every export under --final (the `teacher`), --pretrained (beside it as `teacher_pretrain` when --final is
another folder: the high-resolution phase's effect) and --distilled (components/evaluation/models.py), a seeded random
initialisation of the teacher's preset (`random_init`), and `evaluate.extra_models`. Outputs under --out:
```
<model>/<task>.json      {"model", "task", "metrics": {...}, "details": {...}, "seconds"}
metrics.csv              long table: model, task, metric, value, lower, upper (the gate's frame; the report reads it)
summary.json             {"models": {model: {"<task>.<metric>": value}}, "headline": {...}, "timing": {...}}
models.json              the evaluated models (name, arch, role, weights, descriptor)
plots/headline.csv       one row per model, one column per task's headline metric (DVC plots)
samples/<model>.npz      images, patch tokens and predictions behind the report's figures
gates/                   the evaluation-metrics gate's result and Data Docs
config.yaml              the resolved config
```
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components import storage
from components.config import PipelineConfig
from components.evaluation.benchmarks.run import LoadedBenchmark, evaluate_benchmark, image_uris, load_benchmark
from components.evaluation.context import ModelResult
from components.evaluation.datasets import load_eval_datasets
from components.evaluation.metrics import BENCHMARK_SEP, metric_spec, mlflow_key
from components.evaluation.models import (
    ModelSpec,
    build_model,
    discover_models,
    extra_model,
    random_baseline,
    unique_names,
)
from components.evaluation.outputs import clear_output, write_json
from components.evaluation.report import headline_table
from components.evaluation.robustness import finalize_robustness
from components.evaluation.runner import ImageCache, evaluate_model, long_frame_rows
from components.log import get_logger
from components.model.families import overrides_from_fields
from components.runtime import resolve_device
from components.stages.shell import StageRun, stage_run

log = get_logger(__name__)

NOT_OURS = ("baseline", "official")
"""Roles of models that the pipeline did not train."""


INTERMEDIATE = "intermediate"
"""The role of the pretrain stage's export when a later export (the high-resolution phase's) is the final model: it
is evaluated beside it, and never a registry candidate."""


def model_specs(cfg: PipelineConfig, pretrained: str, distilled: str, final: str | None = None) -> list[ModelSpec]:
    """The discovered backbones, the random-init baseline and the extra models, with unique names.

    `final` is the pretrained model the pipeline goes on with (`pipeline.pretrained_model`); when it is another export
    than `pretrained` (the high-resolution phase's), it is the `teacher` and the pretrain export is evaluated beside
    it as `teacher_pretrain` (role `intermediate`), so that the phase's effect shows in every table.
    """
    specs = discover_models([pretrained])
    finals = discover_models([final]) if final and storage.normalize(final) != storage.normalize(pretrained) else []
    if finals:
        specs = finals + [
            replace(s, name="teacher_pretrain", role=INTERMEDIATE) if s.role == "teacher" else s for s in specs
        ]
    specs += discover_models([distilled])
    if cfg.evaluate.random_baseline:
        teacher = next((s for s in specs if s.role == "teacher"), None)
        m = cfg.model
        # The `model` section describes the teacher it trained; a teacher of another preset brings its own geometry.
        fields = (
            {} if teacher is not None and teacher.arch != m.arch else m.model_dump(exclude={"arch", "drop_path_rate"})
        )
        overrides = overrides_from_fields(teacher.arch if teacher is not None else m.arch, **fields)
        specs.append(random_baseline(teacher, m.arch, overrides))
    specs += [extra_model(entry) for entry in cfg.evaluate.extra_models]
    return unique_names(specs)


def write_results(out: Path, results: list[ModelResult]) -> pd.DataFrame:
    """Writes every output file but the gate's; returns the long metrics frame."""
    for r in results:
        for task, t in r.tasks.items():
            write_json(out / r.spec.name / f"{task}.json", t.to_json(r.spec.name))
        if r.samples:
            (out / "samples").mkdir(parents=True, exist_ok=True)
            np.savez_compressed(out / "samples" / f"{r.spec.name}.npz", **r.samples)
    frame = pd.DataFrame(long_frame_rows(results, metric_spec), columns=["model", "task", "metric", "value", "lower",
                                                                         "upper"])  # fmt: skip
    frame.to_csv(out / "metrics.csv", index=False)
    write_json(out / "models.json", [r.spec.to_json() for r in results])
    summary = {
        "models": {
            r.spec.name: {f"{task}.{m}": v for task, t in r.tasks.items() for m, v in t.metrics.items()}
            for r in results
        },  # fmt: skip
        "headline": headline_of(frame, results),
        "timing": {r.spec.name: {k: round(v, 3) for k, v in r.timing.items()} for r in results},
    }
    write_json(out / "summary.json", summary)
    plots = pd.DataFrame(
        [
            {"model": name, **{k.replace(".", "_"): v for k, v in row.items()}}
            for name, row in summary["headline"].items()
        ]
    )
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plots.to_csv(out / "plots" / "headline.csv", index=False)
    return frame


def headline_of(frame: pd.DataFrame, results: list[ModelResult]) -> dict[str, dict[str, float]]:
    """{model: {"<task>.<headline metric>": value}} over the tasks each model has (the report's headline table)."""
    table = headline_table(frame, [r.spec.to_json() for r in results], order=[r.spec.name for r in results])
    columns = [c for c in table.columns if c not in ("model", "arch", "role")]
    return {row["model"]: {c: row[c] for c in columns if math.isfinite(row[c])} for row in table.to_dict("records")}


def _log_eval_sets(run: StageRun, manifest: pd.DataFrame, raw: str) -> None:
    """Each evaluation set (the prepared manifest's `eval/<task>` rows) as an MLflow dataset of the run."""
    from components import storage
    from components.tracking import DatasetRecord, dataset_columns, dataset_digest

    if "source" not in manifest.columns:
        return
    rows = manifest[manifest["source"].astype(str).str.startswith("eval/")]
    for source, part in rows.groupby("source", sort=True):
        hashes = part["sha256"].astype(str).tolist() if "sha256" in part.columns else [""] * len(part)
        digest = dataset_digest(part["uri"].astype(str).tolist(), hashes)
        where = storage.join(raw, str(source))
        run.log_dataset(DatasetRecord(str(source), where, digest, len(part), "evaluation", dataset_columns(part)))


def _log_benchmark_set(run: StageRun, loaded: LoadedBenchmark) -> None:
    """A benchmark's images as an MLflow dataset of the run (its identity: the images read, in order)."""
    from components.tracking import DatasetRecord, dataset_digest

    uris = image_uris(loaded.data)
    run.log_dataset(DatasetRecord(loaded.name, loaded.root, dataset_digest(uris, [""] * len(uris)), len(uris),
                                  "evaluation"))  # fmt: skip


def load_benchmarks(cfg: PipelineConfig) -> list[LoadedBenchmark]:
    """Every benchmark of `evaluate.benchmarks`, read and checked before any model is built."""
    out = []
    for name, source in cfg.evaluate.benchmarks.items():
        root, train_root = (source, None) if isinstance(source, str) else (source.root, source.train_root)
        out.append(load_benchmark(name, root, train_root))
    return out


def add_benchmarks(
    result: ModelResult, model: Any, benchmarks: list[LoadedBenchmark], cfg: PipelineConfig, *, device: str
) -> None:
    """Runs each benchmark on the model and adds its results to the model's as `<benchmark>-<result>`."""
    for loaded in benchmarks:
        start = time.perf_counter()
        bench = evaluate_benchmark(model, result.spec, loaded, cfg.evaluate, seed=cfg.seed, device=device)
        for name, task in bench.tasks.items():
            key = f"{loaded.name}{BENCHMARK_SEP}{name}"
            result.tasks[key] = replace(task, task=key, details={**task.details, "num_images": loaded.data.num_images,
                                                                 "num_classes": loaded.data.num_classes})  # fmt: skip
        result.timing[loaded.name] = time.perf_counter() - start


def run_evaluate(
    cfg: PipelineConfig,
    *,
    prepared: str,
    pretrained: str,
    distilled: str,
    out: str,
    metrics: str,
    final: str | None = None,
) -> None:
    """Evaluates every model on every configured task and writes the outputs listed in the module docstring;
    `final` defaults to `pipeline.pretrained_model`."""
    final = final or cfg.pipeline.pretrained_model
    from components import gates

    out_dir = Path(out)
    clear_output(out_dir, markers=("metrics.csv", "models.json", "config.yaml"))
    with stage_run("evaluate", cfg, config_out=out_dir / "config.yaml", metrics_out=Path(metrics)) as run:
        manifest_path = Path(prepared) / "manifest.parquet"
        manifest = pd.read_parquet(manifest_path) if manifest_path.is_file() else None
        if manifest is None:
            log.warning("%s not found; listing the evaluation folders under %s instead", manifest_path, cfg.data.raw)
        data = load_eval_datasets(cfg.data.raw, manifest)
        if manifest is not None:
            _log_eval_sets(run, manifest, cfg.data.raw)
        benchmarks = load_benchmarks(cfg)
        for loaded in benchmarks:
            _log_benchmark_set(run, loaded)
        specs = model_specs(cfg, pretrained, distilled, final)
        if not specs:
            raise ValueError(f"no model to evaluate: no model.json under {pretrained} or {distilled}, "
                             "evaluate.random_baseline is false and evaluate.extra_models is empty")  # fmt: skip
        device = resolve_device(cfg.evaluate.device, key="evaluate.device")
        log.info("evaluating %d models on %s: %s", len(specs), device, ", ".join(s.name for s in specs))
        cache = ImageCache(data, cfg.evaluate, cfg.seed)
        results = []
        for spec in specs:
            start = time.perf_counter()
            model = build_model(spec, seed=cfg.seed).to(device)
            result = evaluate_model(model, spec, data, cfg.evaluate, cache, seed=cfg.seed, device=device)
            add_benchmarks(result, model, benchmarks, cfg, device=device)
            result.timing["total"] = time.perf_counter() - start
            log.info("%s (%s, %s) evaluated in %.1f s", spec.name, spec.arch, spec.role, result.timing["total"])
            results.append(result)
            del model
        finalize_robustness(results, cfg.evaluate)
        frame = write_results(out_dir, results)
        run.gate(
            "evaluation_metrics", frame, gates.evaluation_metrics_suite(), out_dir / "gates",
            id_column=list(gates.EVAL_ID_COLUMNS),
        )  # fmt: skip
        run.log_metrics({mlflow_key(f"{r.model}.{r.task}.{r.metric}"): r.value for r in frame.itertuples()})
        for name in ("metrics.csv", "summary.json", "models.json", "plots", "samples"):
            if (out_dir / name).exists():
                run.log_artifact(out_dir / name, artifact_path=f"eval/{name}" if (out_dir / name).is_dir() else "eval")
        headline = headline_of(frame, results)
        # The stage's headline: the best kNN top-1 among the pipeline's own models (not baselines, not official).
        ours = [headline[r.spec.name].get("knn.top1", math.nan) for r in results if r.spec.role not in NOT_OURS]
        best = max((v for v in ours if math.isfinite(v)), default=math.nan)
        run.record({
            "num_models": len(results),
            "models": headline,
            "task_s": {r.spec.name: {k: round(v, 3) for k, v in r.timing.items()} for r in results},
            "corruption_render_s": round(cache.render_s, 3),
        })  # fmt: skip
        if math.isfinite(best):
            run.set_headline("knn_top1", best)
