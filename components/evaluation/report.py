"""The comparison report: tables, figures and the quality gate.

Inputs are the evaluate stage's files (metrics.csv, models.json, the per-task JSONs and samples/*.npz); nothing here
runs a backbone. Outputs (the report stage writes them under reports/comparison/):
- `table.md`, `table.html`: one row per model (best candidate first), one column per task's headline metric, the
  best value of each column in bold, then every metric of every task;
- figures (PNG): PCA of patch features shown as RGB (the paper's Figure 1: a first PCA over all patches separates
  foreground from background by thresholding the first component, a second PCA on the foreground patches maps three
  components to RGB), retrieval neighbours, segmentation and depth predictions beside the ground truth (and the
  Mask2Former protocol's beside the linear head's), robustness by severity, kNN accuracy against k;
- the quality gate: the best candidate (by `report.gate_metric`) must reach `gate_min` and, optionally, beat the
  baseline on every task's headline metric; checked by Great Expectations (components/gates.py);
- the registry entry is made by the report stage through the tracking seam (components/stages/report.py): each
  candidate logged as a servable MLflow model, the best registered as a new version of `report.registered_model`; the
  `champion` alias moves to it only when the gate passes.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.evaluation.metrics import headline_pairs, metric_spec
from components.log import get_logger

log = get_logger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# Reading the evaluate stage's outputs
# --------------------------------------------------------------------------------------------------------------------


def load_evaluation(evals: str | Path) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """(long metrics frame, evaluated models) from the evaluate stage's folder."""
    evals = Path(evals)
    frame = pd.read_csv(evals / "metrics.csv")
    models = json.loads((evals / "models.json").read_text())
    return frame, models


def load_task(evals: str | Path, model: str, task: str) -> dict[str, Any] | None:
    path = Path(evals) / model / f"{task}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_samples(evals: str | Path, model: str) -> dict[str, np.ndarray]:
    path = Path(evals) / "samples" / f"{model}.npz"
    if not path.is_file():
        return {}
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


# --------------------------------------------------------------------------------------------------------------------
# Ranking, tables
# --------------------------------------------------------------------------------------------------------------------


def higher_is_better(metric: str) -> bool:
    return metric_spec(metric).higher_is_better is not False


def metric_value(frame: pd.DataFrame, model: str, task_metric: str) -> float:
    """The value of `<task>.<metric>` for a model (NaN when absent)."""
    task, _, metric = task_metric.partition(".")
    rows = frame[(frame["model"] == model) & (frame["task"] == task) & (frame["metric"] == metric)]
    return float(rows["value"].iloc[0]) if len(rows) else math.nan


def rank_candidates(
    frame: pd.DataFrame, models: Sequence[Mapping[str, Any]], gate_metric: str, roles: Sequence[str]
) -> list[str]:
    """Names of the models whose role may be registered, best first by `gate_metric` (models without it left out)."""
    metric = gate_metric.partition(".")[2]
    sign = 1.0 if higher_is_better(metric) else -1.0
    scored = [(metric_value(frame, m["name"], gate_metric), m["name"]) for m in models if m["role"] in roles]
    scored = [(v, n) for v, n in scored if math.isfinite(v)]
    return [n for _, n in sorted(scored, key=lambda item: (-sign * item[0], item[1]))]


def headline_table(frame: pd.DataFrame, models: Sequence[Mapping[str, Any]], order: Sequence[str]) -> pd.DataFrame:
    """One row per model (in `order`, then the rest), columns arch, role and `<task>.<headline metric>`."""
    names = [*order, *(m["name"] for m in models if m["name"] not in order)]
    info = {m["name"]: m for m in models}
    pairs = headline_pairs(frame["task"])
    columns = [f"{t}.{m}" for t, m in pairs if ((frame["task"] == t) & (frame["metric"] == m)).any()]
    rows = []
    for name in names:
        row: dict[str, Any] = {"model": name, "arch": info[name]["arch"], "role": info[name]["role"]}
        row.update({c: metric_value(frame, name, c) for c in columns})
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "arch", "role", *columns])


def task_tables(frame: pd.DataFrame, order: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Every metric of every task: {task: model x metric}."""
    out = {}
    for task, part in frame.groupby("task", sort=False):
        wide = part.pivot_table(index="model", columns="metric", values="value", aggfunc="first")
        ranked = [m for m in order if m in wide.index] + [m for m in wide.index if m not in order]
        out[str(task)] = wide.loc[ranked].reset_index()
    return out


def reference_notes(evals: str | Path, models: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, str]:
    """{task: a line under its table} for tasks whose details carry an image-blind reference (depth's mean map)."""
    notes = {}
    for task in tasks:
        for model in models:
            ref = ((load_task(evals, model["name"], task) or {}).get("details") or {}).get("mean_map")
            if ref:
                notes[task] = (
                    f"Image-blind reference, the train split's mean depth map: RMSE {_fmt(ref['rmse'])}, "
                    f"AbsRel {_fmt(ref['abs_rel'])}, delta1 {_fmt(ref['delta1'])}. A head that reads depth from the "
                    "image beats it."
                )
                break
    return notes


def _best_per_column(df: pd.DataFrame) -> dict[str, Any]:
    best = {}
    for column in df.columns:
        name = column.rpartition(".")[2]
        try:
            spec = metric_spec(name)
        except KeyError:
            continue
        values = pd.to_numeric(df[column], errors="coerce")
        if spec.higher_is_better is None or values.isna().all():
            continue
        best[column] = values.max() if spec.higher_is_better else values.min()
    return best


def _fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table; the best value of each metric column in bold."""
    best = _best_per_column(df)
    head = "| " + " | ".join(df.columns) + " |"
    rule = "| " + " | ".join("---:" if c in best else "---" for c in df.columns) + " |"
    lines = [head, rule]
    for _, row in df.iterrows():
        cells = []
        for c in df.columns:
            text = _fmt(row[c])
            cells.append(f"**{text}**" if c in best and row[c] == best[c] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_html(df: pd.DataFrame) -> str:
    """An HTML table; the best value of each metric column in bold."""
    best = _best_per_column(df)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for _, row in df.iterrows():
        cells = []
        for c in df.columns:
            text = html.escape(_fmt(row[c]))
            cells.append(f"<td><b>{text}</b></td>" if c in best and row[c] == best[c] else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


_LEGEND = (
    "Higher is better for accuracies, mAP, Recall@k, mIoU, pixel accuracy and delta; lower is better for errors, "
    "RMSE, AbsRel, SqRel, log10, RMSE log and mCE (percent of the baseline's corruption error). Best in bold."
)


def write_tables(
    out: Path,
    headline: pd.DataFrame,
    tasks: Mapping[str, pd.DataFrame],
    gate: Mapping[str, Any],
    notes: Mapping[str, str] | None = None,
) -> None:
    """table.md and table.html: the headline comparison, the gate's verdict, then every task's metrics (and note)."""
    notes = notes or {}
    verdict = "passed" if gate.get("passed") else "failed"
    md = ["# Frozen-feature evaluation", "", _LEGEND, "", to_markdown(headline), ""]
    md += [f"Quality gate: **{verdict}** (best candidate: {gate.get('candidate') or 'none'}).", ""]
    page = [
        "<!doctype html><html><head><meta charset='utf-8'><title>DINOv2 evaluation</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}</style></head><body>",
        "<h1>Frozen-feature evaluation</h1>",
        f"<p>{html.escape(_LEGEND)}</p>",
        to_html(headline),
        f"<p>Quality gate: <b>{verdict}</b> (best candidate: {html.escape(str(gate.get('candidate') or 'none'))}).</p>",
    ]
    for task, df in tasks.items():
        md += [f"## {task}", "", to_markdown(df), ""]
        page += [f"<h2>{html.escape(task)}</h2>", to_html(df)]
        if task in notes:
            md += [notes[task], ""]
            page.append(f"<p>{html.escape(notes[task])}</p>")
    page.append("</body></html>")
    (out / "table.md").write_text("\n".join(md) + "\n")
    (out / "table.html").write_text("\n".join(page) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# PCA of patch features (the paper's Figure 1)
# --------------------------------------------------------------------------------------------------------------------


def patch_pca_rgb(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Patch features of several images as RGB, as in DINOv2's Figure 1.

    A first PCA over every patch of every image; its first component, thresholded at 0, separates foreground from
    background (the sign is chosen so that the side holding most border patches is the background). A second PCA
    over the foreground patches only gives three components, each min-max scaled to [0, 1] over all images, shown as
    RGB; background patches are black.

    Args:
        tokens: (S, h, w, D) patch features of S images.

    Returns:
        (rgb (S, h, w, 3) in [0, 1], foreground (S, h, w) bool).
    """
    s, h, w, d = tokens.shape
    x = tokens.reshape(-1, d).astype(np.float64)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    first = (x @ vt[0]).reshape(s, h, w)
    border = np.ones((h, w), bool)
    border[1:-1, 1:-1] = False
    if (first[:, border] > 0).mean() > 0.5:  # most border patches positive: positive is the background
        first = -first
    fg = first > 0
    rgb = np.zeros((s, h, w, 3))
    if fg.sum() >= 3:
        xf = tokens[fg].astype(np.float64)  # (F, D)
        xf = xf - xf.mean(axis=0)
        _, _, vt_fg = np.linalg.svd(xf, full_matrices=False)
        comps = xf @ vt_fg[:3].T  # (F, <=3)
        lo, hi = comps.min(axis=0), comps.max(axis=0)
        comps = (comps - lo) / np.where(hi > lo, hi - lo, 1.0)
        rgb[fg, : comps.shape[1]] = comps
    return rgb, fg


# --------------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------------


def _figure(rows: int, cols: int, cell: float = 1.6) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(cols * cell, rows * cell), dpi=100, layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _upsample(a: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour upsampling of an (h, w, ...) map to (size, size, ...) for display."""
    rows = (np.arange(size) * a.shape[0] // size).clip(0, a.shape[0] - 1)
    cols = (np.arange(size) * a.shape[1] // size).clip(0, a.shape[1] - 1)
    return a[rows][:, cols]


def segmentation_palette(num_classes: int) -> np.ndarray:
    """(256, 3) uint8 colours: 0 dark grey (background), classes from tab20, the ignore index 255 black."""
    from matplotlib import colormaps

    palette = np.zeros((256, 3), np.uint8)
    tab = colormaps["tab20"](np.linspace(0, 1, 20))[:, :3]
    for k in range(1, 255):
        palette[k] = (tab[(k - 1) % 20] * 255).astype(np.uint8)
    palette[0] = (64, 64, 64)
    return palette


def figure_pca(samples: Mapping[str, Mapping[str, np.ndarray]], path: Path) -> Path | None:
    """Rows: the input images, then one row per model with its patch-feature PCA as RGB."""
    models = [m for m, s in samples.items() if "pca_tokens" in s]
    if not models:
        return None
    images = samples[models[0]]["pca_images"]
    k, side = len(images), images.shape[1]
    fig, axes = _figure(len(models) + 1, k)
    for j in range(k):
        axes[0, j].imshow(images[j])
    axes[0, 0].set_ylabel("image", fontsize=8)
    for i, name in enumerate(models, start=1):
        rgb, _ = patch_pca_rgb(samples[name]["pca_tokens"].astype(np.float32))
        for j in range(k):
            axes[i, j].imshow(_upsample(rgb[j], side))
        axes[i, 0].set_ylabel(name, fontsize=8)
    fig.suptitle("PCA of patch features (first component thresholded; 3 components as RGB)", fontsize=9)
    fig.savefig(path)
    return path


def figure_retrieval(samples: Mapping[str, np.ndarray], model: str, path: Path) -> Path | None:
    """Queries and their top neighbours; green frame: a positive, red: a negative."""
    if "retrieval_queries" not in samples or not len(samples["retrieval_queries"]):
        return None
    queries, neighbors, positive = (samples[k] for k in ("retrieval_queries", "retrieval_neighbors",
                                                          "retrieval_positive"))  # fmt: skip
    fig, axes = _figure(len(queries), 1 + neighbors.shape[1])
    for i, q in enumerate(queries):
        axes[i, 0].imshow(q)
        axes[i, 0].set_ylabel("query", fontsize=8)
        for j in range(neighbors.shape[1]):
            ax = axes[i, j + 1]
            ax.imshow(neighbors[i, j])
            colour = "tab:green" if positive[i, j] else "tab:red"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
    fig.suptitle(f"{model}: retrieval neighbours (green: same place)", fontsize=9)
    fig.savefig(path)
    return path


def _segmentation_grid(
    samples: Mapping[str, Mapping[str, np.ndarray]], columns: Sequence[tuple[str, str, str]], path: Path
) -> Path:
    """Per sample (row): image, ground truth, then one column per (model, sample key, title)."""
    ref = samples[columns[0][0]]
    palette = segmentation_palette(int(ref["seg_num_classes"]))
    k = len(ref["seg_images"])
    fig, axes = _figure(k, 2 + len(columns))
    for i in range(k):
        axes[i, 0].imshow(ref["seg_images"][i])
        axes[i, 1].imshow(palette[ref["seg_gt"][i]])
        for j, (name, key, _) in enumerate(columns):
            axes[i, 2 + j].imshow(palette[samples[name][key][i]])
    for j, title in enumerate(["image", "ground truth", *(title for _, _, title in columns)]):
        axes[0, j].set_title(title, fontsize=7)
    fig.savefig(path)
    return path


def figure_segmentation(samples: Mapping[str, Mapping[str, np.ndarray]], path: Path) -> Path | None:
    """Per sample: image, ground truth, each model's prediction (its last linear head)."""
    columns = [(m, "seg_pred", m) for m, s in samples.items() if "seg_pred" in s]
    return _segmentation_grid(samples, columns, path) if columns else None


def figure_segmentation_m2f(samples: Mapping[str, Mapping[str, np.ndarray]], path: Path) -> Path | None:
    """Per sample: image, ground truth, then for each model with a Mask2Former prediction its linear head's
    prediction and the Mask2Former one."""
    columns = [
        (m, key, f"{m}\n{title}")
        for m, s in samples.items()
        if "seg_pred_m2f" in s
        for key, title in (("seg_pred", "linear head"), ("seg_pred_m2f", "Mask2Former"))
        if key in s
    ]
    return _segmentation_grid(samples, columns, path) if columns else None


def figure_depth(samples: Mapping[str, Mapping[str, np.ndarray]], path: Path) -> Path | None:
    """Per sample: image, ground truth, each model's prediction, on one colour scale per row (near = bright)."""
    models = [m for m, s in samples.items() if "depth_pred" in s]
    if not models:
        return None
    ref = samples[models[0]]
    lo, hi = (float(v) for v in ref["depth_range"])
    k = len(ref["depth_images"])
    fig, axes = _figure(k, 2 + len(models))
    for i in range(k):
        gt = ref["depth_gt"][i].astype(np.float32)
        axes[i, 0].imshow(ref["depth_images"][i])
        axes[i, 1].imshow(np.where(gt > 0, gt, np.nan), cmap="magma_r", vmin=lo, vmax=hi)
        for j, name in enumerate(models):
            axes[i, 2 + j].imshow(samples[name]["depth_pred"][i].astype(np.float32), cmap="magma_r", vmin=lo, vmax=hi)
    for j, title in enumerate(["image", "ground truth", *models]):
        axes[0, j].set_title(title, fontsize=8)
    fig.savefig(path)
    return path


def _plot_figure(width: float = 6.0, height: float = 3.5) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.subplots()


def figure_robustness(errors: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """Top-1 error against severity, averaged over corruptions, one line per model (clean error at severity 0)."""
    if not errors:
        return None
    fig, ax = _plot_figure()
    for model, task in errors.items():
        details = task["details"]
        sev = details["severities"]
        mean = np.mean([v for v in details["errors"].values()], axis=0)
        clean = task["metrics"].get("clean_error", math.nan)
        ax.plot([0, *sev], [clean, *mean], marker="o", label=model)
    ax.set_xlabel("severity (0: clean)")
    ax.set_ylabel("top-1 error, mean over corruptions")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.savefig(path)
    return path


def figure_knn(knn: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """kNN top-1 against k, one line per model."""
    if not knn:
        return None
    fig, ax = _plot_figure()
    for model, task in knn.items():
        ks = sorted(int(k[len("top1_k") :]) for k in task["metrics"] if k.startswith("top1_k"))
        ax.plot(ks, [task["metrics"][f"top1_k{k}"] for k in ks], marker="o", label=model)
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("kNN top-1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.savefig(path)
    return path


def render_figures(evals: Path, models: Sequence[Mapping[str, Any]], out: Path) -> list[Path]:
    """Every figure the evaluation's samples allow; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    names = [m["name"] for m in models]
    samples = {n: load_samples(evals, n) for n in names}
    written = [
        figure_pca(samples, out / "pca_patch_features.png"),
        figure_segmentation(samples, out / "segmentation.png"),
        figure_segmentation_m2f(samples, out / "segmentation_m2f.png"),
        figure_depth(samples, out / "depth.png"),
        figure_robustness({n: t for n in names if (t := load_task(evals, n, "robustness"))}, out / "robustness.png"),
        figure_knn({n: t for n in names if (t := load_task(evals, n, "knn"))}, out / "knn_k.png"),
    ]
    written += [figure_retrieval(samples[n], n, out / f"retrieval_{n}.png") for n in names]
    return [p for p in written if p is not None]


# --------------------------------------------------------------------------------------------------------------------
# Quality gate
# --------------------------------------------------------------------------------------------------------------------


def quality_gate_frame(
    frame: pd.DataFrame,
    candidate: str,
    *,
    gate_metric: str,
    gate_min: float,
    baseline: str | None,
) -> pd.DataFrame:
    """The rows the quality gate checks (value within [lower, upper]) for the best candidate.

    - `gate_metric` against `gate_min` (at least it, or at most it for a lower-is-better metric);
    - with a baseline: every task's headline metric strictly better than the baseline's (`lower` is the next float
      above the baseline's value, or `upper` the next one below).
    """
    rows = []
    task, _, metric = gate_metric.partition(".")
    value = metric_value(frame, candidate, gate_metric)
    if higher_is_better(metric):
        rows.append((task, metric, value, gate_min, math.inf))
    else:
        rows.append((task, metric, value, -math.inf, gate_min))
    if baseline is not None:
        for t, m in headline_pairs(frame["task"]):
            mine, theirs = metric_value(frame, candidate, f"{t}.{m}"), metric_value(frame, baseline, f"{t}.{m}")
            if not (math.isfinite(mine) and math.isfinite(theirs)):
                continue
            if higher_is_better(m):
                rows.append((f"{t}_vs_{baseline}", m, mine, float(np.nextafter(theirs, math.inf)), math.inf))
            else:
                rows.append((f"{t}_vs_{baseline}", m, mine, -math.inf, float(np.nextafter(theirs, -math.inf))))
    return pd.DataFrame(
        [{"model": candidate, "task": t, "metric": m, "value": v, "lower": lo, "upper": hi} for t, m, v, lo, hi in rows]
    )
