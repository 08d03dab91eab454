"""Great Expectations gates between stages: validate a DataFrame, save the report, stop the pipeline on a failure.

A stage builds a small DataFrame that describes what it read or wrote (a manifest, one row per embedding, the logged
losses), picks a suite from the builders below and calls `run_gate`:

    result = run_gate("prepared_manifest", manifest, prepared_manifest_suite(min_side=64), out_dir, id_column="uri")

The gate writes the validation result to `out_dir/<name>.json` and a static Data Docs site to `out_dir/docs/`
(open `docs/index.html`), then raises `GateFailed` if any expectation failed. The exception's message names the
gate, each failed expectation with its arguments, the number of offending rows, a sample of their values and,
with `id_column`, the ids of those rows; `GateFailed.result` carries the paths so the caller can log them.

This is the only module that imports great_expectations, and it does so lazily (the import alone takes about 2.5 s,
mostly scipy, altair and sqlalchemy), so importing `components.gates` costs nothing. One in-memory GE context is
kept per process and per output folder: the gates of one stage share one Data Docs site whose index lists them all,
and nothing is written outside `out_dir`.

Semantics of GE worth knowing when writing a suite (GE 1.x, checked in tests/test_gates.py):
- `ExpectColumnValuesToBeBetween` counts NaN as *missing*, not unexpected: a NaN passes it. Pair it with
  `ExpectColumnValuesToNotBeNull` (see `expect_finite`). Infinity fails it only when the bound on that side is set.
- Column-map expectations pass vacuously on an empty frame: every suite here starts with a row-count expectation.
- Row-wise bounds (a value between per-row lower and upper columns) are `ExpectColumnPairValuesAToBeGreaterThanB`;
  a NaN on either side fails it.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
import shutil
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from components.jsonio import write_json
from components.log import get_logger

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.expectations import Expectation

FLOAT_MAX = float(np.finfo(np.float64).max)
"""Largest finite float64: `ExpectColumnValuesToBeBetween(-FLOAT_MAX, FLOAT_MAX)` fails exactly on +-inf."""

SHA256_PATTERN = r"^[0-9a-f]{64}$"
"""A lower-case hex SHA-256 digest, as the prepare stage writes it."""

log = get_logger(__name__)

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DATASOURCE = "gates"
_SITE = "gates"


class GateFailed(RuntimeError):  # noqa: N818 (the name the stages and the CLI catch)
    """A gate whose expectations did not all pass. `str(err)` is the readable report; `err.result` has the paths."""

    def __init__(self, result: GateResult) -> None:
        super().__init__(result.report())
        self.result = result

    def __reduce__(self) -> tuple[type[GateFailed], tuple[GateResult]]:
        # Prefect and multiprocessing pickle exceptions; the default would call GateFailed(message).
        return GateFailed, (self.result,)


@dataclass(frozen=True)
class Failure:
    """One failed expectation, reduced to what a person needs to find the offending rows."""

    expectation: str
    """GE's expectation type, e.g. `expect_column_values_to_be_between`."""
    kwargs: dict[str, Any]
    """The expectation's arguments (column, bounds, value set, row condition)."""
    unexpected_count: int | None = None
    """Number of rows that broke it (None for table- and aggregate-level expectations)."""
    element_count: int | None = None
    """Number of rows it looked at."""
    values: tuple[Any, ...] = ()
    """A sample of the offending values (GE's `partial_unexpected_list`)."""
    ids: tuple[Any, ...] = ()
    """The `id_column` values of the sampled offending rows (a tuple per row when there are several id columns)."""
    observed: Any = None
    """The observed value of an aggregate expectation (row count, mean, missing members of a set)."""
    error: str | None = None
    """The exception GE caught while computing it (a missing column, a type error)."""

    def describe(self, id_columns: Sequence[str] = ()) -> str:
        """One line: the expectation and its arguments, the count and samples of the offending rows."""
        args = ", ".join(f"{key}={_format_kwarg(value)}" for key, value in self.kwargs.items())
        parts = [f"{self.expectation}({args})"]
        if self.error is not None:
            parts.append(f"error: {self.error}")
        if self.unexpected_count is not None:
            of = f" of {self.element_count}" if self.element_count is not None else ""
            parts.append(f"{self.unexpected_count}{of} rows unexpected")
        if self.values:
            parts.append(f"values: {_format_sample(self.values, self.unexpected_count)}")
        if self.ids:
            label = ", ".join(id_columns) if id_columns else "rows"
            parts.append(f"{label}: {_format_sample(self.ids, self.unexpected_count)}")
        if self.observed is not None:
            parts.append(f"observed: {_format_value(self.observed)}")
        return "; ".join(parts)


@dataclass(frozen=True)
class GateResult:
    """What a gate found and where it saved it."""

    name: str
    success: bool
    num_rows: int
    num_expectations: int
    failures: tuple[Failure, ...]
    json_path: Path
    """The full validation result, as GE serialises it (non-finite floats written as strings)."""
    docs_index: Path
    """`index.html` of the Data Docs site under `out_dir/docs/`."""
    duration_s: float
    id_columns: tuple[str, ...] = field(default=())

    @property
    def docs_dir(self) -> Path:
        """The Data Docs site folder (log it whole: the index links pages below it)."""
        return self.docs_index.parent

    @property
    def artifacts(self) -> tuple[Path, Path]:
        """The JSON result and the Data Docs folder, for `mlflow.log_artifact(s)`."""
        return self.json_path, self.docs_dir

    @property
    def metrics(self) -> dict[str, float]:
        """Flat numbers to log next to the artifacts."""
        return {
            "success": float(self.success),
            "num_expectations": float(self.num_expectations),
            "num_failed": float(len(self.failures)),
            "num_rows": float(self.num_rows),
            "duration_s": self.duration_s,
        }

    def report(self) -> str:
        """A readable, multi-line summary: one line per failed expectation, then where the full report is."""
        if self.success:
            head = f"Gate '{self.name}' passed: {self.num_expectations} expectations on {self.num_rows} rows."
        else:
            head = (
                f"Gate '{self.name}' failed: {len(self.failures)} of {self.num_expectations} expectations "
                f"on {self.num_rows} rows."
            )
        lines = [head, *(f"  - {failure.describe(self.id_columns)}" for failure in self.failures)]
        lines.append(f"Result: {self.json_path}  Data Docs: {self.docs_index}")
        return "\n".join(lines)

    def raise_for_failure(self) -> None:
        """Raises `GateFailed` unless every expectation passed."""
        if not self.success:
            raise GateFailed(self)


# --------------------------------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------------------------------


def run_gate(
    name: str,
    df: pd.DataFrame,
    expectations: Sequence[Expectation],
    out_dir: str | Path,
    *,
    id_column: str | Sequence[str] | None = None,
    sample_size: int = 20,
    raise_on_failure: bool = True,
) -> GateResult:
    """Validates `df` against `expectations`, saves the result as JSON and Data Docs, and fails on any miss.

    Args:
        name: Gate name: file name of the JSON result and suite name in Data Docs (letters, digits, `_.-`).
        df: The frame to validate; not modified.
        expectations: GE 1.x expectation objects, e.g. from one of the `*_suite` builders. They are copied, so a
            list can be reused across gates.
        out_dir: Folder for `<name>.json` and `docs/`; created if missing. Gates of one stage share it.
        id_column: Column(s) that identify a row (`"uri"`, `"id"`); the report lists their values for the
            offending rows.
        sample_size: How many offending values (and ids) per expectation the report and JSON keep.
        raise_on_failure: Raise `GateFailed` on a failure (default); with False, return the failed result.

    Returns:
        The result, with the paths of the JSON file and the Data Docs index.

    Raises:
        GateFailed: Some expectation failed (and `raise_on_failure`); the files are written first.
        ValueError: A bad name, no expectations, or an `id_column` that `df` lacks.
    """
    start = time.perf_counter()
    id_columns = _check_gate_args(name, df, expectations, id_column)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    docs_dir = out_dir / "docs"
    json_path = out_dir / f"{name}.json"
    # A fresh RangeIndex makes GE's index labels row positions, whatever index the caller's frame has.
    frame = df.reset_index(drop=True)

    with _LOCK:  # GE's context and stores are not thread-safe; a gate is short, so gates run one at a time
        context = _context_for(docs_dir)
        ge_result = _validate(context, name, frame, expectations, sample_size)
        if id_columns:
            _attach_ids(ge_result, frame, id_columns)
        write_json(json_path, ge_result.to_json_dict())
        try:
            _build_docs(context, name, ge_result, docs_dir)
        except Exception as err:  # a rendering bug must not hide the verdict; the JSON has it all
            log.warning("gate %s: Data Docs not built (%s: %s)", name, type(err).__name__, err)

    result = GateResult(
        name=name,
        success=bool(ge_result.success),
        num_rows=len(df),
        num_expectations=len(ge_result.results),
        failures=tuple(_failure(r, id_columns) for r in ge_result.results if not r.success),
        json_path=json_path,
        docs_index=docs_dir / "index.html",
        duration_s=time.perf_counter() - start,
        id_columns=id_columns,
    )
    _log_result(result)
    if raise_on_failure:
        result.raise_for_failure()
    return result


def _check_gate_args(
    name: str, df: pd.DataFrame, expectations: Sequence[Expectation], id_column: str | Sequence[str] | None
) -> tuple[str, ...]:
    """The id columns of a gate, after checking its name, its expectations and that `df` has those columns."""
    if not _NAME_PATTERN.match(name):
        raise ValueError(f"gate name {name!r} must be letters, digits, '_', '.' or '-'")
    if not expectations:
        raise ValueError(f"gate {name!r} has no expectations")
    id_columns = (id_column,) if isinstance(id_column, str) else tuple(id_column or ())
    missing = [column for column in id_columns if column not in df.columns]
    if missing:
        raise ValueError(f"gate {name!r}: id_column {missing} not in the frame's columns {list(df.columns)}")
    return id_columns


def _log_result(result: GateResult) -> None:
    log.info(
        "gate %s %s: %d/%d expectations met on %d rows in %.2f s",
        result.name,
        "passed" if result.success else "FAILED",
        result.num_expectations - len(result.failures),
        result.num_expectations,
        result.num_rows,
        result.duration_s,
    )


_LOCK = threading.Lock()
_CONTEXTS: dict[Path, Any] = {}
"""One in-memory GE context per Data Docs folder, for the life of the process."""


@functools.cache
def _gx() -> ModuleType:
    """Imports great_expectations once, quietly: no usage statistics, no INFO chatter, no import-time warnings."""
    # GX 1.24 sends no usage statistics; earlier 1.x releases (allowed by pyproject) do unless this is false.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:  # leave a level someone set on purpose alone
        gx_logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # sre_constants/sre_parse, imported by GE's connectors
        import great_expectations as gx
    return gx


def _context_for(docs_dir: Path) -> Any:
    """The process's in-memory context for one output folder, with one Data Docs site there and no progress bars."""
    context = _CONTEXTS.get(docs_dir)
    if context is None:
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            data_docs_sites={
                _SITE: {
                    "class_name": "SiteBuilder",
                    "show_how_to_buttons": False,
                    "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                }
            },
            progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
            analytics_enabled=False,
        )
        context = _gx().get_context(mode="ephemeral", project_config=config)
        context.data_sources.add_pandas(_DATASOURCE)
        _CONTEXTS[docs_dir] = context
    return context


def _validate(
    context: Any, name: str, frame: pd.DataFrame, expectations: Sequence[Expectation], sample_size: int
) -> Any:
    """Runs the suite `name` on `frame`; the context keeps this result, not those of earlier runs of the gate.

    SUMMARY keeps a sample of the offending values and their index labels. GE could also look up id columns
    (`unexpected_index_column_names`), but it does so in Python for every offending row, about a minute for a
    million of them; `_attach_ids` looks up the sampled rows only.
    """
    gx = _gx()
    store = context.validation_results_store
    for key in store.list_keys():
        if key.expectation_suite_identifier.name == name:
            store.remove_key(key)
    # An expectation belongs to one suite: copies let a caller reuse its list (GE raises otherwise).
    suite = context.suites.add_or_update(
        gx.ExpectationSuite(name=name, expectations=[copy.copy(e) for e in expectations])
    )
    datasource = context.data_sources.get(_DATASOURCE)
    asset = next((a for a in datasource.assets if a.name == name), None) or datasource.add_dataframe_asset(name)
    batch = next(iter(asset.batch_definitions), None) or asset.add_batch_definition_whole_dataframe(name)
    validation = context.validation_definitions.add_or_update(
        validation=gx.ValidationDefinition(name=name, data=batch, suite=suite)
    )
    return validation.run(
        batch_parameters={"dataframe": frame},
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": sample_size},
    )


def _attach_ids(suite_result: Any, frame: pd.DataFrame, id_columns: Sequence[str]) -> None:
    """Replaces each sampled offending row's index label by its id and domain values, as GE itself would."""
    for result in suite_result.results:
        details = result.result or {}
        labels = details.get("partial_unexpected_index_list")
        if not labels or not all(isinstance(label, int | np.integer) for label in labels):
            continue
        kwargs = result.expectation_config.kwargs
        domain = [kwargs.get("column"), kwargs.get("column_A"), kwargs.get("column_B"), *kwargs.get("column_list", ())]
        columns = [c for c in dict.fromkeys([*domain, *id_columns]) if c is not None and c in frame.columns]
        rows = frame.loc[list(labels), columns].to_dict("records")
        details["partial_unexpected_index_list"] = [{k: _plain(v) for k, v in row.items()} for row in rows]
        details["unexpected_index_column_names"] = list(id_columns)


def _build_docs(context: Any, name: str, suite_result: Any, docs_dir: Path) -> None:
    """Rebuilds the folder's Data Docs site with the gate's latest result, showing the sampled ids.

    GE's renderer shows ids only from `unexpected_index_list`, which GE fills in COMPLETE mode alone; the result
    the site is built from carries the SUMMARY sample there (the JSON file keeps GE's SUMMARY result as it is).
    """
    suite_result = copy.deepcopy(suite_result)
    for result in suite_result.results:
        details = result.result or {}
        if details.get("unexpected_index_column_names") and details.get("partial_unexpected_index_list"):
            details["unexpected_index_list"] = details["partial_unexpected_index_list"]
    store = context.validation_results_store
    for key in store.list_keys():
        if key.expectation_suite_identifier.name == name:
            store.set(key, suite_result)
    # The site mirrors out_dir, one page per gate: the page of an earlier run of this gate goes.
    shutil.rmtree(docs_dir / "validations" / name, ignore_errors=True)
    context.build_data_docs(site_names=[_SITE])
    _prune_static_assets(docs_dir)


def _failure(result: Any, id_columns: Sequence[str]) -> Failure:
    config = result.expectation_config
    details = result.result or {}
    ids = []
    for row in details.get("partial_unexpected_index_list") or []:
        if isinstance(row, Mapping):
            values = tuple(_plain(row.get(column)) for column in id_columns)
            ids.append(values[0] if len(values) == 1 else values)
        else:  # without id columns GE gives the frame's index labels
            ids.append(_plain(row))
    observed = details.get("observed_value")
    if details.get("partial_missing_list"):  # expect_column_distinct_values_to_contain_set and friends
        observed = {"missing": [_plain(v) for v in details["partial_missing_list"]]}
    return Failure(
        expectation=config.type,
        kwargs={key: _plain(value) for key, value in config.kwargs.items() if key != "batch_id"},
        unexpected_count=details.get("unexpected_count"),
        element_count=details.get("element_count"),
        values=tuple(_plain(v) for v in details.get("partial_unexpected_list") or []),
        ids=tuple(ids),
        observed=_plain(observed),
        error=_exception_message(result.exception_info),
    )


def _exception_message(info: Any) -> str | None:
    """GE reports a caught exception either flat or keyed by the metric that raised it."""
    if not isinstance(info, Mapping):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    messages = [
        str(inner.get("exception_message"))
        for inner in info.values()
        if isinstance(inner, Mapping) and inner.get("raised_exception")
    ]
    return "; ".join(dict.fromkeys(messages)) or None


def _prune_static_assets(docs_dir: Path) -> None:
    """Deletes the site's static files no page refers to.

    GE copies ~4 MB of fonts and animated GIFs into every site although its pages inline their CSS and load the
    rest from CDNs; each stage logs its site to MLflow, so the unused files would be stored once per stage and run.
    """
    static = docs_dir / "static"
    if not static.is_dir():
        return
    pages = "\n".join(p.read_text(errors="ignore") for p in docs_dir.rglob("*") if p.suffix in (".html", ".css"))
    for path in static.rglob("*"):
        if path.is_file() and path.suffix != ".css" and path.name not in pages:
            path.unlink()
    for folder in sorted((p for p in static.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def _plain(value: Any) -> Any:
    """numpy scalars to Python scalars, recursively, so reports print `1.5` rather than `np.float64(1.5)`."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


def _format_value(value: Any, max_chars: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def _format_sample(sample: Sequence[Any], total: int | None) -> str:
    text = "[" + ", ".join(_format_value(v) for v in sample) + "]"
    more = (total or 0) - len(sample)
    return f"{text} (+{more} more)" if more > 0 else text


def _format_kwarg(value: Any) -> str:
    if isinstance(value, Mapping) and {"column", "operator", "parameter"} <= value.keys():  # a row condition
        column = value["column"].get("name") if isinstance(value["column"], Mapping) else value["column"]
        return f"({column} {value['operator']} {value['parameter']!r})"
    return _format_value(value)


# --------------------------------------------------------------------------------------------------------------------
# Suites: one builder per gate of the pipeline; the stage builds the frame
# --------------------------------------------------------------------------------------------------------------------


def expect_finite(column: str) -> list[Expectation]:
    """Every value of `column` is a finite number: neither null/NaN nor +-inf.

    Two expectations, because `ExpectColumnValuesToBeBetween` counts NaN as missing (it passes) and only
    `ExpectColumnValuesToNotBeNull` catches it; the bounds +-`FLOAT_MAX` catch exactly the infinities.
    """
    E = _gx().expectations
    return [
        E.ExpectColumnValuesToNotBeNull(column=column),
        E.ExpectColumnValuesToBeBetween(column=column, min_value=-FLOAT_MAX, max_value=FLOAT_MAX),
    ]


def prepared_manifest_suite(
    *, min_side: int, max_side: int | None = None, unique_within: str | None = None
) -> list[Expectation]:
    """The prepare stage's manifest: every row usable, big enough, distinct, complete.

    Frame: one row per image with columns `uri`, `sha256`, `width`, `height`, `source`, `split` and `decodable`
    (whether the image decoded). Use `id_column="uri"`.

    Args:
        min_side: Smallest allowed width and height, in pixels.
        max_side: Largest allowed width and height (None: no bound).
        unique_within: A column (e.g. `source`) within which `sha256` must be unique; None: unique overall.
    """
    E = _gx().expectations
    columns = ("uri", "sha256", "width", "height", "source", "split", "decodable")
    sha_unique = (
        E.ExpectColumnValuesToBeUnique(column="sha256")
        if unique_within is None
        else E.ExpectCompoundColumnsToBeUnique(column_list=["sha256", unique_within])
    )
    return [
        E.ExpectTableRowCountToBeBetween(min_value=1),
        *(E.ExpectColumnValuesToNotBeNull(column=column) for column in columns),
        E.ExpectColumnValuesToBeUnique(column="uri"),
        sha_unique,
        E.ExpectColumnValuesToMatchRegex(column="sha256", regex=SHA256_PATTERN),
        E.ExpectColumnValuesToBeBetween(column="width", min_value=min_side, max_value=max_side),
        E.ExpectColumnValuesToBeBetween(column="height", min_value=min_side, max_value=max_side),
        E.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True]),
    ]


def embedding_frame(ids: Sequence[Any], embeddings: np.ndarray, *, chunk_rows: int = 65536) -> pd.DataFrame:
    """Per-embedding statistics for `embeddings_suite`: columns `id`, `norm`, `num_nonfinite`, `dim`.

    Computed in float32 chunk by chunk, so float16 shards neither overflow when squared nor get copied whole.

    Args:
        ids: One id per row of `embeddings`.
        embeddings: N-by-D array.
        chunk_rows: Rows converted to float32 at a time.
    """
    import pandas as pd

    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be N-by-D, got shape {embeddings.shape}")
    if len(ids) != embeddings.shape[0]:
        raise ValueError(f"{len(ids)} ids for {embeddings.shape[0]} embeddings")
    norms = np.empty(embeddings.shape[0], dtype=np.float64)
    num_nonfinite = np.empty(embeddings.shape[0], dtype=np.int64)
    for start in range(0, embeddings.shape[0], chunk_rows):
        chunk = np.asarray(embeddings[start : start + chunk_rows], dtype=np.float32)  # (n, D)
        with np.errstate(over="ignore", invalid="ignore"):
            norms[start : start + len(chunk)] = np.linalg.norm(chunk, axis=1)
        num_nonfinite[start : start + len(chunk)] = (~np.isfinite(chunk)).sum(axis=1)
    return pd.DataFrame({"id": list(ids), "norm": norms, "num_nonfinite": num_nonfinite, "dim": embeddings.shape[1]})


def embeddings_suite(
    *, dim: int, normalized: bool, norm_tol: float = 1e-2, num_rows: int | None = None
) -> list[Expectation]:
    """Embeddings: finite, the expected shape, unit norm when normalized.

    Frame: `embedding_frame(ids, embeddings)`. Use `id_column="id"`.

    Args:
        dim: Expected embedding width D.
        normalized: Whether the embeddings are L2-normalized (then every norm is within `norm_tol` of 1).
        norm_tol: Allowed deviation of a normalized norm from 1 (float16 storage rounds it by ~1e-3).
        num_rows: Expected number of embeddings (e.g. the manifest's row count); None: any positive number.
    """
    E = _gx().expectations
    norm_min, norm_max = (1.0 - norm_tol, 1.0 + norm_tol) if normalized else (0.0, FLOAT_MAX)
    row_count = (
        E.ExpectTableRowCountToEqual(value=num_rows)
        if num_rows is not None
        else E.ExpectTableRowCountToBeBetween(min_value=1)
    )
    return [
        row_count,
        E.ExpectColumnValuesToNotBeNull(column="id"),
        E.ExpectColumnValuesToBeUnique(column="id"),
        E.ExpectColumnValuesToBeInSet(column="num_nonfinite", value_set=[0]),
        E.ExpectColumnValuesToBeInSet(column="dim", value_set=[dim]),
        E.ExpectColumnValuesToNotBeNull(column="norm"),
        E.ExpectColumnValuesToBeBetween(column="norm", min_value=norm_min, max_value=norm_max),
    ]


def curated_manifest_suite(*, max_eval_similarity: float) -> list[Expectation]:
    """The curated set: no near-duplicate of an evaluation image (no leakage), no duplicates left.

    Frame: one row per curated image with `uri`, `max_eval_similarity` (its highest cosine similarity to any
    evaluation image) and `dup_group_size` (how many curated images share its near-duplicate group, itself
    included). Use `id_column="uri"`.

    Args:
        max_eval_similarity: Leakage threshold; every curated image must be strictly below it.
    """
    E = _gx().expectations
    return [
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectColumnValuesToNotBeNull(column="uri"),
        E.ExpectColumnValuesToBeUnique(column="uri"),
        E.ExpectColumnValuesToNotBeNull(column="max_eval_similarity"),
        E.ExpectColumnValuesToBeBetween(column="max_eval_similarity", max_value=max_eval_similarity, strict_max=True),
        E.ExpectColumnValuesToBeInSet(column="dup_group_size", value_set=[1]),
    ]


def calibration_suite() -> list[Expectation]:
    """Copy-detection calibration: the decision rule's precision on planted copies reaches its target.

    Frame: one row per calibrated comparison (`comparison`: dedup, eval) with `precision` (of the rule the stage
    applies, on planted copies against distinct pairs), `target` (params.yaml `curate.dedup_precision`) and
    `planted_copies`. Use `id_column="comparison"`.
    """
    E = _gx().expectations
    return [
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectColumnValuesToNotBeNull(column="comparison"),
        *expect_finite("precision"),
        E.ExpectColumnValuesToBeBetween(column="planted_copies", min_value=1),
        E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="precision", column_B="target", or_equal=True),
    ]


def source_share_frame(sources: Iterable[str], expected: Iterable[str] = ()) -> pd.DataFrame:
    """Per-source counts and shares for `source_shares_suite`: columns `source`, `num_images`, `share`.

    Args:
        sources: The `source` column of a manifest.
        expected: Sources that get a row even when absent (share 0), so a bound on them is checked.
    """
    import pandas as pd

    counts = pd.Series(list(sources), dtype=object).value_counts(dropna=False)  # a null source stays null: flagged
    absent = [source for source in dict.fromkeys(expected) if source not in counts.index]
    counts = pd.concat([counts, pd.Series(0, index=pd.Index(absent, dtype=object))])
    total = int(counts.sum())
    return pd.DataFrame(
        {
            "source": counts.index.to_numpy(dtype=object),
            "num_images": counts.to_numpy(dtype=np.int64),
            "share": counts.to_numpy(dtype=np.float64) / max(total, 1),
        }
    )


def source_shares_suite(bounds: Mapping[str, tuple[float, float]]) -> list[Expectation]:
    """Source proportions of a curated set: each bounded source present, its share in [min, max].

    Frame: `source_share_frame(manifest.source, expected=bounds)`. Use `id_column="source"`. The bounds live in
    the suite (one expectation per source, with a row condition), so Data Docs shows them.

    Args:
        bounds: Source name to (min_share, max_share), shares in [0, 1].
    """
    from great_expectations.expectations.row_conditions import Column

    E = _gx().expectations
    for source, (low, high) in bounds.items():
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"share bounds for source {source!r} must satisfy 0 <= min <= max <= 1, got {low, high}")
    return [
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectColumnValuesToNotBeNull(column="source"),
        E.ExpectColumnValuesToBeUnique(column="source"),
        E.ExpectColumnDistinctValuesToContainSet(column="source", value_set=sorted(bounds)),
        *expect_finite("share"),
        *(
            E.ExpectColumnValuesToBeBetween(
                column="share", min_value=low, max_value=high, row_condition=Column("source") == source
            )
            for source, (low, high) in bounds.items()
        ),
    ]


def training_metrics_suite(columns: Sequence[str], *, step_column: str = "step") -> list[Expectation]:
    """Logged training metrics: every loss finite at every step.

    Frame: one row per logged step, a `step` column and one column per metric. Use `id_column="step"`.

    Args:
        columns: The metric columns that must be finite (losses, learning rate, gradient norm...).
        step_column: The step column: present, unique and non-negative.
    """
    E = _gx().expectations
    if not columns:
        raise ValueError("training_metrics_suite needs at least one metric column")
    return [
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectColumnValuesToNotBeNull(column=step_column),
        E.ExpectColumnValuesToBeUnique(column=step_column),
        E.ExpectColumnValuesToBeBetween(column=step_column, min_value=0),
        *(expectation for column in columns for expectation in expect_finite(column)),
    ]


EVAL_ID_COLUMNS = ("model", "task", "metric")
"""The columns that name a row of the evaluation-metrics frame; pass them as `id_column`."""


def evaluation_metrics_suite() -> list[Expectation]:
    """Evaluation metrics: each value finite and within its own valid range.

    Frame: long format, one row per (model, task, metric) with `value` and its valid range `lower`, `upper` set by
    the stage that knows the metric (accuracy [0, 1], RMSE [0, inf]). Use `id_column=EVAL_ID_COLUMNS`. Row-wise
    bounds are column-pair expectations (`value >= lower`, `upper >= value`), which also fail on a NaN.
    """
    E = _gx().expectations
    return [
        E.ExpectTableRowCountToBeBetween(min_value=1),
        *(E.ExpectColumnValuesToNotBeNull(column=column) for column in (*EVAL_ID_COLUMNS, "lower", "upper")),
        E.ExpectCompoundColumnsToBeUnique(column_list=list(EVAL_ID_COLUMNS)),
        *expect_finite("value"),
        E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="value", column_B="lower", or_equal=True),
        E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="upper", column_B="value", or_equal=True),
    ]
