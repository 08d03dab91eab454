"""Tracking that never makes training wait: a queue in front of MLflow, spilled to a file while the server is away.

    python -m components.tracking_queue replay .tracking/          # deliver what runs left behind, in order
    python -m components.tracking_queue replay FILE.spool.jsonl --tracking-uri http://127.0.0.1:5000

A `QueuedTracker` takes a stage's params, step metrics, tags, datasets and artifacts and returns at once; one
background thread delivers them to the MLflow run in the order they were logged, metrics with their original step
and timestamp (taken when they were logged, not when they arrive). While the server answers, records wait in memory.
When a delivery fails with a connection or server error, or gets no answer for `stall_s` seconds, the server counts as
away: one warning says so with the number of queued records, every queued record goes to the spill file and so does
every new one (memory stays bounded, and a killed process loses nothing); the thread probes the server (`/health`)
with growing pauses and, once it answers, one warning says so and the file is delivered from where it stopped, then
removed. A queue longer than `max_in_memory` records spills too.

A run that ends while the server is away does not wait for it: the spill file stays, and one warning names it and
the replay command above. An MLflow error that retrying cannot fix (a 4xx answer: a bad value) drops that record with
a warning naming it, and delivery goes on.

MLflow's own asynchronous logging (`mlflow.config.enable_async_logging`, `synchronous=False`) was not used: its queue
is unbounded and in memory only, its ten worker threads deliver batches out of order, a batch that fails after the
client's retries is logged as an error and dropped, and the process waits at exit for a server that may not return.

The spill file (`<spool dir>/<run name>-<run id>.spool.jsonl`, JSON lines): a header (tracking URI, run id), then one
record per line: `seq` (order), `kind` (`params`, `metrics`, `tags`, `dataset`, `artifact`, `terminate`), `time_ms`
and the payload. `<file>.delivered` holds the `seq` of the last record delivered from it; an artifact is kept under
`<file stem>.files/<seq>/` from the moment it is logged, so the file delivered is the one logged even if the stage
writes the same name again later: a copy, or a hard link for a file of `LINK_MIN_BYTES` or more (checkpoints and
tables, which the stages write aside and rename: the linked file never changes). Smaller files are copied because
libraries rewrite theirs in place (Great Expectations' Data Docs, on every gate): a linked file rewritten while it is
uploaded sends fewer bytes than announced, and the server waits for the rest. Spill files live in `.tracking/` of
the working directory (`DINOV2_TRACKING_SPOOL` moves it), outside every DVC output: a replay must not change an
output's hash.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from components.log import get_logger
from components.tracking import DatasetRecord, MlflowTracker, PyfuncModel, Tracker

log = get_logger(__name__)

SPOOL_ENV = "DINOV2_TRACKING_SPOOL"
DEFAULT_SPOOL_DIR = ".tracking"
SPOOL_SUFFIX = ".spool.jsonl"
SPOOL_FORMAT = 1

MAX_IN_MEMORY = 10_000
"""Records held in memory before the queue spills to its file (a record is one `log_*` call: a few KB at most)."""
STALL_S = 10.0
"""A delivery without an answer for this long counts as the server being away (MLflow's client keeps retrying)."""
CLOSE_WAIT_S = 60.0
"""How long the end of a run waits for a reachable server to take the records still queued."""
MAX_PROBE_PAUSE_S = 10.0
MAX_TRIES_WHILE_UP = 5
"""Tries of one record while the server answers its health probe, before the record is dropped with a warning."""


def spool_dir(root: Path | None = None) -> Path:
    """Where spill files go: `DINOV2_TRACKING_SPOOL`, else `.tracking/` under `root` (default: the working dir)."""
    configured = os.environ.get(SPOOL_ENV)
    return Path(configured) if configured else (root or Path.cwd()) / DEFAULT_SPOOL_DIR


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------------------------------------------------
# The spill file
# --------------------------------------------------------------------------------------------------------------------


class Spool:
    """One run's spill file: a header line and records in order, the mark of the last delivered record, and the files
    of its artifacts.

    Args:
        path: the `.spool.jsonl` file.
        header: what the header line records (tracking URI, run id, run name); written when the file is created.
    """

    def __init__(self, path: Path, header: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.header = dict(header or {})

    @property
    def mark(self) -> Path:
        return self.path.with_name(self.path.name + ".delivered")

    @property
    def files(self) -> Path:
        return self.path.with_name(self.path.name.removesuffix(SPOOL_SUFFIX) + ".files")

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Appends records (the header first when the file is new), flushed to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with open(self.path, "a", encoding="utf-8") as f:
            if new:
                f.write(json.dumps({"kind": "header", "format": SPOOL_FORMAT, **self.header}) + "\n")
            for record in records:
                f.write(json.dumps(record, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_from(self, offset: int) -> tuple[dict[str, Any] | None, int]:
        """The record starting at byte `offset` and the offset after it; (None, offset) at the end (or before a line
        still being written)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                line = f.readline()
        except FileNotFoundError:
            return None, offset
        if not line.endswith(b"\n"):
            return None, offset
        return json.loads(line), offset + len(line)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record after the header, in order (a torn last line, from a process killed mid-write, is skipped)."""
        offset = 0
        while True:
            record, offset = self.read_from(offset)
            if record is None:
                return
            if record.get("kind") != "header":
                yield record

    def read_header(self) -> dict[str, Any]:
        record, _ = self.read_from(0)
        if record is None or record.get("kind") != "header":
            raise ValueError(f"{self.path}: not a tracking spill file (no header line)")
        return record

    def delivered(self) -> int:
        """The `seq` of the last record delivered from this file (-1: none)."""
        try:
            return int(self.mark.read_text().strip())
        except (OSError, ValueError):
            return -1

    def mark_delivered(self, seq: int) -> None:
        tmp = self.mark.with_name(self.mark.name + ".tmp")
        tmp.write_text(f"{seq}\n")
        os.replace(tmp, self.mark)

    def remove(self) -> None:
        """Removes the file, its mark and its artifacts' files (everything in it was delivered)."""
        self.path.unlink(missing_ok=True)
        self.mark.unlink(missing_ok=True)
        shutil.rmtree(self.files, ignore_errors=True)


LINK_MIN_BYTES = 64 * 2**20
"""Artifacts this large are hard-linked into the queue rather than copied (see the module's docstring)."""


def _keep(source: Path, target: Path) -> None:
    """`target` as the queue's own copy of the file or folder `source` (see `_keep_file`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_keep_file)
    else:
        _keep_file(source, target)


def _keep_file(source: str | Path, target: str | Path) -> None:
    """A copy of `source`, or a hard link when it is `LINK_MIN_BYTES` or larger (a copy on another filesystem)."""
    if os.path.getsize(source) >= LINK_MIN_BYTES:
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copy2(source, target)


# --------------------------------------------------------------------------------------------------------------------
# Delivery
# --------------------------------------------------------------------------------------------------------------------


REQUEST_TIMEOUT_S = 30
"""How long one delivery to a tracking server may take before it counts as failed (then the queue's own probes and
pauses take over: MLflow's client would retry a refused connection for minutes inside one call)."""


def deliver(target: MlflowTracker, record: Mapping[str, Any], files: Path) -> None:
    """Delivers one record to its MLflow run, with its original step and timestamp.

    Metrics, params, tags and the run's end go to a tracking server as MLflow REST calls tried once (the queue
    decides when to try again); datasets and artifacts, and everything for a local store, go through `target`'s
    client."""
    from mlflow.entities import Metric, Param, RunTag

    client, run_id, kind = target.client, target.run_id, record["kind"]
    rest = str(client.tracking_uri).startswith(("http://", "https://"))
    if kind in ("metrics", "params", "tags"):
        if kind == "metrics":
            step, ts = int(record["step"]), int(record["time_ms"])
            items: list[Any] = [Metric(k, float(v), ts, step) for k, v in record["values"].items()]
        else:
            entity = Param if kind == "params" else RunTag
            items = [entity(k, v) for k, v in record["values"].items()]
        size = 1000 if kind == "metrics" else 100  # MLflow's limits per batch
        for i in range(0, len(items), size):
            batch = items[i : i + size]
            if rest:
                _post(str(client.tracking_uri), "runs/log-batch", {"run_id": run_id, kind: [_entity(e) for e in batch]})
            else:
                client.log_batch(run_id, **{kind: batch})
    elif kind == "terminate":
        end = {"status": record["status"], "end_time": int(record["time_ms"])}
        if rest:
            _post(str(client.tracking_uri), "runs/update", {"run_id": run_id, **end})
        else:
            client.set_terminated(run_id, **end)
    elif kind == "dataset":
        MlflowTracker(client, run_id).log_dataset(DatasetRecord(**record["dataset"]))
    elif kind == "artifact":
        path = files / record["file"]
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=record["artifact_path"])
        else:
            client.log_artifact(run_id, str(path), artifact_path=record["artifact_path"])
    else:
        raise ValueError(f"unknown tracking record kind {kind!r}")


def _entity(item: Any) -> dict[str, Any]:
    """A metric, param or tag as MLflow's REST API takes it (non-finite values spelled as protobuf's JSON does)."""
    if hasattr(item, "step"):
        value = item.value
        if not math.isfinite(value):
            value = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return {"key": item.key, "value": value, "timestamp": item.timestamp, "step": item.step}
    return {"key": item.key, "value": item.value}


def _post(uri: str, endpoint: str, body: Mapping[str, Any]) -> None:
    """One MLflow REST call, tried once (`mlflow.utils.rest_utils`: the client's authentication and error mapping)."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    path = f"/api/2.0/mlflow/{endpoint}"
    response = http_request(
        get_default_host_creds(uri), path, "POST", max_retries=0, backoff_factor=0, timeout=REQUEST_TIMEOUT_S,
        json=dict(body),
    )  # fmt: skip
    verify_rest_response(response, path)


def is_permanent(err: BaseException) -> bool:
    """True for an MLflow answer that retrying cannot change (a 4xx: a bad value, a deleted run)."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return 400 <= status < 500 and status not in (408, 429)
    return isinstance(err, ValueError | TypeError | KeyError | FileNotFoundError)


def server_answers(uri: str, timeout_s: float = 2.0) -> bool:
    """Whether an MLflow server answers its health check (always True for a local store: no server to wait for)."""
    if not uri.startswith(("http://", "https://")):
        return True
    import requests

    try:
        return requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).ok
    except requests.RequestException:
        return False


def _describe(record: Mapping[str, Any]) -> str:
    kind = record["kind"]
    if kind in ("metrics", "params", "tags"):
        keys = sorted(record["values"])
        shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        step = f" at step {record['step']}" if kind == "metrics" else ""
        return f"{kind} {shown}{step}"
    if kind == "artifact":
        return f"artifact {record['file']}"
    return kind


# --------------------------------------------------------------------------------------------------------------------
# The queue
# --------------------------------------------------------------------------------------------------------------------


class QueuedTracker(Tracker):
    """A `Tracker` whose calls return at once; records reach `target`'s run from a background thread, in order.

    Args:
        target: the MLflow run the records go to.
        spool: the run's spill file (`spool_dir() / f"{name}-{run_id}.spool.jsonl"`).
        max_in_memory: records held in memory before the queue spills to the file.
        stall_s: seconds without an answer after which the server counts as away.
        probe: whether the server answers (default: its `/health`); called between tries while it is away.
    """

    def __init__(
        self,
        target: MlflowTracker,
        spool: Path,
        *,
        max_in_memory: int = MAX_IN_MEMORY,
        stall_s: float = STALL_S,
        probe: Any = None,
    ) -> None:
        self.target, self.run_id = target, target.run_id
        self.uri = str(target.client.tracking_uri)
        self.spool = Spool(spool, {"tracking_uri": self.uri, "run_id": self.run_id})
        self.max_in_memory, self.stall_s = max_in_memory, stall_s
        self._probe = probe or (lambda: server_answers(self.uri))
        self._cond = threading.Condition()
        self._memory: deque[dict[str, Any]] = deque()
        self._spilling = False  # records go to the spill file (and are read back from it) until it is drained
        self._offset = 0  # where the worker reads the spill file
        self._next_seq = 0
        self._delivered = -1  # seq of the last record delivered
        self._away_since: float | None = None
        self._inflight_since: float | None = None
        self._closing = self._abandoned = False
        self._spill_failed = False
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name=f"tracking-{self.run_id}", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name=f"tracking-watch-{self.run_id}", daemon=True)
        self._worker.start()
        self._watchdog.start()

    # -- what stages call (returns at once) ----------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._put("params", values={str(k): str(v)[:6000] for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._put("metrics", values={str(k): float(v) for k, v in metrics.items()}, step=int(step or 0))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        values = {str(k): str(v) for k, v in tags.items() if v is not None}
        if values:
            self._put("tags", values=values)

    def log_dataset(self, dataset: DatasetRecord) -> None:
        fields = {k: getattr(dataset, k) for k in ("name", "source", "digest", "num_rows", "context")}
        self._put("dataset", dataset={**fields, "columns": dict(dataset.columns)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queues a file or folder: copied (or linked, when large) into the queue's files now, uploaded later."""
        path = Path(path)
        if not path.exists():
            return
        folder = (artifact_path or path.name) if path.is_dir() else artifact_path
        with self._cond:  # the seq taken and the record queued at once: records stay in seq order
            name = f"{self._next_seq}/{path.name}"
            try:
                _keep(path, self.spool.files / name)
            except OSError as err:
                log.warning("tracking: %s not queued for MLflow (%s)", path, err)
                return
            self._put("artifact", file=name, artifact_path=folder)

    def terminate(self, status: str) -> None:
        """Queues the run's end (FINISHED or FAILED) with this moment as its end time."""
        self._put("terminate", status=status)

    # -- calls that need an answer (synchronous, after what was queued before them) ------------------------------

    def log_model(self, name: str, model: PyfuncModel, *, tags: Mapping[str, Any]) -> str | None:
        self.flush()
        return self.target.log_model(name, model, tags=tags)

    def register_model(
        self, name: str, model_uri: str, *, tags: Mapping[str, Any], description: str, alias: str, move_alias: bool
    ) -> dict[str, Any] | None:
        self.flush()
        return self.target.register_model(
            name, model_uri, tags=tags, description=description, alias=alias, move_alias=move_alias
        )

    def url(self) -> str | None:
        return self.target.url()

    # -- state ---------------------------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Records logged and not yet delivered."""
        with self._cond:
            return self._next_seq - 1 - self._delivered

    @property
    def away(self) -> bool:
        return self._away_since is not None

    def flush(self, timeout_s: float | None = None) -> bool:
        """Waits until everything queued so far is delivered; False when `timeout_s` passed first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            last = self._next_seq - 1
            while self._delivered < last and self._worker.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.5 if left is None else min(left, 0.5))
            return self._delivered >= last

    def close(self, wait_s: float = CLOSE_WAIT_S) -> Path | None:
        """Ends the queue: waits for a reachable server to take what is queued as long as it keeps taking records (up
        to `wait_s` without a delivery: a loaded server taking a run's artifacts one by one is waited for), never for
        an absent one.

        Returns:
            The spill file holding what was not delivered (named in a warning with the replay command), or None.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = time.monotonic() + wait_s
        delivered = self._delivered
        while self._worker.is_alive() and time.monotonic() < deadline:
            if self.away and not self._probe():  # gone, not merely slow: what is left stays in the spill file
                break
            self._worker.join(0.5)
            if self._delivered > delivered:  # progress: the server answers, give it another `wait_s`
                delivered, deadline = self._delivered, time.monotonic() + wait_s
        with self._cond:
            left = self._next_seq - 1 - self._delivered
            if self._worker.is_alive():  # away, or too slow: what is left stays in the spill file
                self._abandoned = True
                self._spill_memory()
                self._cond.notify_all()
        self._stop.set()
        if not self._worker.is_alive():
            shutil.rmtree(self.spool.files, ignore_errors=True)  # every artifact's file was delivered
            return None
        log.warning(
            "tracking: %d record(s) of MLflow run %s not delivered (server %s %s); they are kept in %s: deliver them "
            "with `python -m components.tracking_queue replay %s`",
            left, self.run_id, self.uri, "away" if self.away else "too slow", self.spool.path, self.spool.path,
        )  # fmt: skip
        return self.spool.path

    # -- internals -----------------------------------------------------------------------------------------------

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _put(self, kind: str, **payload: Any) -> None:
        with self._cond:
            if self._abandoned:
                log.warning("tracking: %s logged after the run's end is dropped", kind)
                return
            record = {"seq": self._take_seq(), "kind": kind, "time_ms": _now_ms(), **payload}
            if not self._spilling and len(self._memory) >= self.max_in_memory:
                log.warning(
                    "tracking: %d records queued for MLflow server %s; further ones spill to %s",
                    len(self._memory), self.uri, self.spool.path,
                )  # fmt: skip
                self._spill_memory()
            if self._spilling and not self._spill_failed:
                try:
                    self.spool.append([record])
                except OSError as err:
                    self._spill_failed = True
                    log.warning("tracking: cannot write %s (%s): records are kept in memory", self.spool.path, err)
                    self._memory.append(record)
            else:
                self._memory.append(record)
            self._cond.notify_all()

    def _spill_memory(self) -> None:
        """Moves the records in memory to the spill file; from now on records are read from it (lock held)."""
        pending = [r for r in self._memory if r["seq"] > self._delivered]
        if self._spill_failed:
            return
        try:
            self.spool.append(pending)
        except OSError as err:
            self._spill_failed = True
            log.warning("tracking: cannot write %s (%s): records are kept in memory", self.spool.path, err)
            return
        if not self._spilling:
            self._spilling, self._offset = True, 0
        self._memory.clear()

    def _next(self) -> tuple[dict[str, Any], bool] | None:
        """The next record to deliver and whether it comes from the spill file; None when the queue is closed."""
        with self._cond:
            while True:
                if self._abandoned:
                    return None
                if self._spilling:
                    record, end = self.spool.read_from(self._offset)
                    if record is not None:
                        self._offset = end
                        if record.get("kind") == "header" or record["seq"] <= self._delivered:
                            continue
                        return record, True
                    if not self._memory:  # drained: back to memory
                        self._spilling, self._offset, self._spill_failed = False, 0, False
                        self.spool.remove()
                        continue
                while self._memory and self._memory[0]["seq"] <= self._delivered:
                    self._memory.popleft()
                if self._memory:
                    return self._memory[0], False
                if self._closing:
                    return None
                self._cond.wait(1.0)

    def _run(self) -> None:
        while (item := self._next()) is not None:
            record, spooled = item
            if not self._deliver(record):
                return  # closed while the server is away: the record stays in the spill file
            with self._cond:
                if self._abandoned:
                    return  # the spill file belongs to a later replay now
                self._delivered = record["seq"]
                if record["kind"] == "artifact":
                    shutil.rmtree(self.spool.files / str(record["seq"]), ignore_errors=True)
                if spooled:
                    self.spool.mark_delivered(record["seq"])
                self._cond.notify_all()

    def _deliver(self, record: dict[str, Any]) -> bool:
        """Delivers one record, waiting out an absent server; False when the queue was closed meanwhile."""
        tries_while_up, pause = 0, 1.0
        while True:
            self._inflight_since = time.monotonic()
            try:
                deliver(self.target, record, self.spool.files)
            except Exception as err:  # noqa: BLE001 - a failed delivery must never reach training
                self._inflight_since = None
                if is_permanent(err) or tries_while_up >= MAX_TRIES_WHILE_UP:
                    log.warning("tracking: %s dropped, MLflow refused it: %s", _describe(record), _short(err))
                    return True
                self._went_away(_short(err))
                while not self._probe():
                    if self._stop.wait(pause) or self._abandoned:
                        return False
                    pause = min(2 * pause, MAX_PROBE_PAUSE_S)
                if self._abandoned:
                    return False
                tries_while_up += 1
                continue
            self._inflight_since = None
            if self._away_since is not None:
                self._came_back()
            return True

    def _went_away(self, reason: str) -> None:
        with self._cond:
            if self._away_since is not None or self._abandoned:
                return
            self._away_since = time.monotonic()
            self._spill_memory()
            queued = self._next_seq - 1 - self._delivered
        log.warning(
            "tracking: MLflow server %s unreachable (%s); training goes on, %d record(s) queued and spilled to %s",
            self.uri, reason, queued, self.spool.path,
        )  # fmt: skip

    def _came_back(self) -> None:
        with self._cond:
            away_s = time.monotonic() - (self._away_since or time.monotonic())
            self._away_since = None
            queued = self._next_seq - 1 - self._delivered
        log.warning(
            "tracking: MLflow server %s is back after %.0f s; delivering %d queued record(s) in order",
            self.uri, away_s, queued,
        )  # fmt: skip

    def _watch(self) -> None:
        """Declares the server away when a delivery has waited `stall_s` for an answer (MLflow's client retries
        a refused connection for minutes before it gives up)."""
        while not self._stop.wait(0.5):
            since = self._inflight_since
            if since is not None and self._away_since is None and time.monotonic() - since > self.stall_s:
                self._went_away(f"no answer for {self.stall_s:.0f} s")


def _short(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text if len(text) <= 300 else text[:300] + "..."


# --------------------------------------------------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------------------------------------------------


def spool_files(paths: Sequence[str | Path]) -> list[Path]:
    """The spill files named by `paths` (files, or folders searched recursively), oldest first."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += p.rglob(f"*{SPOOL_SUFFIX}")
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such spill file or folder")
    return sorted(set(found), key=lambda f: (f.stat().st_mtime, str(f)))


def replay(path: Path, *, tracking_uri: str | None = None) -> int:
    """Delivers the records of one spill file not yet delivered, in order, then removes it.

    Args:
        path: the `.spool.jsonl` file.
        tracking_uri: the MLflow server; default: the one the file records.

    Returns:
        The number of records delivered.

    Raises:
        MlflowException: the server refused a record or could not be reached (the file keeps what is left; run the
            command again).
    """
    from mlflow.tracking import MlflowClient

    spool = Spool(path)
    header = spool.read_header()
    uri = tracking_uri or header["tracking_uri"]
    target = MlflowTracker(MlflowClient(tracking_uri=uri), header["run_id"])
    done, count = spool.delivered(), 0
    for record in spool.records():
        if record["seq"] <= done:
            continue
        try:
            deliver(target, record, spool.files)
        except Exception as err:
            if not is_permanent(err):
                raise
            log.warning("replay: %s dropped, MLflow refused it: %s", _describe(record), _short(err))
        spool.mark_delivered(record["seq"])
        count += 1
    spool.remove()
    return count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.tracking_queue", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("replay", help="deliver spill files into MLflow, in order, with their original steps and times")
    p.add_argument("paths", nargs="+", help="spill files (*.spool.jsonl) or folders holding them (.tracking/)")
    p.add_argument("--tracking-uri", help="the MLflow server (default: the one each file records)")
    args = parser.parse_args(argv)
    try:
        files = spool_files(args.paths)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not files:
        print("nothing to replay: no *.spool.jsonl under " + ", ".join(args.paths))
        return 0
    for f in files:
        header = Spool(f).read_header()
        count = replay(f, tracking_uri=args.tracking_uri)
        uri = args.tracking_uri or header["tracking_uri"]
        print(f"{f}: {count} record(s) delivered to run {header['run_id']} at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
