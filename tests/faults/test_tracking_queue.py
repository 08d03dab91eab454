"""The tracking queue without a server: a client that fails, stalls and comes back, in a second or two per test.

A real MLflow server killed and restarted under a logging run: test_tracking_server.py.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import mlflow.entities  # noqa: F401 - imported here, not in the queue's first delivery (a stall of its own)
import pytest

from components.tracking import MlflowTracker
from components.tracking_queue import QueuedTracker, Spool, main, replay


class FlakyClient:
    """Stands in for `MlflowClient`: records what arrives; `down` refuses (like a stopped server after the client's
    retries), `stall` holds a call until released (like a server that stopped answering)."""

    tracking_uri = "flaky:///"  # not http: records go through this client (a server gets REST calls)

    def __init__(self) -> None:
        self.down = False
        self.stall = threading.Event()
        self.stall.set()
        self.metrics: list[Any] = []
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[str, str | None, str]] = []
        self.terminated: list[tuple[str, int]] = []

    def _check(self) -> None:
        self.stall.wait()
        if self.down:
            from mlflow.exceptions import MlflowException

            raise MlflowException("API request to http://127.0.0.1:1/api failed with exception Connection refused")

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        self._check()
        self.metrics += list(metrics)
        self.params.update({p.key: p.value for p in params})
        self.tags.update({t.key: t.value for t in tags})

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self._check()
        self.artifacts.append((Path(path).name, artifact_path, Path(path).read_text()))

    def log_artifacts(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self._check()
        files = sorted(f for f in Path(path).rglob("*") if f.is_file())
        self.artifacts.append((Path(path).name, artifact_path, "|".join(f.read_text() for f in files)))

    def set_terminated(self, run_id: str, status: str, end_time: int | None = None) -> None:
        self._check()
        self.terminated.append((status, end_time))


def _tracker(tmp_path: Path, client: FlakyClient, **kwargs: Any) -> QueuedTracker:
    kwargs.setdefault("stall_s", 3.0)
    return QueuedTracker(
        MlflowTracker(client, "run1"), tmp_path / "spool" / f"x-run1{'.spool.jsonl'}", probe=lambda: not client.down,
        **kwargs,
    )  # fmt: skip


def _wait(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_records_arrive_in_order_with_their_steps_and_times(tmp_path):
    client = FlakyClient()
    tracker = _tracker(tmp_path, client)
    before = int(time.time() * 1000)
    tracker.log_params({"lr": 0.1})
    for step in range(1, 51):
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    (tmp_path / "curve.csv").write_text("step,loss\n1,1.0\n")
    tracker.log_artifact(tmp_path / "curve.csv", "plots")
    (tmp_path / "new.csv").write_text("replaced after logging\n")  # as the stages write: aside, then renamed
    (tmp_path / "new.csv").replace(tmp_path / "curve.csv")  # the file delivered is the one logged
    tracker.terminate("FINISHED")
    assert tracker.close() is None
    assert [m.step for m in client.metrics] == list(range(1, 51))
    assert all(before <= m.timestamp <= int(time.time() * 1000) for m in client.metrics)
    assert client.params == {"lr": "0.1"} and client.artifacts == [("curve.csv", "plots", "step,loss\n1,1.0\n")]
    assert client.terminated[0][0] == "FINISHED"
    assert not list((tmp_path / "spool").glob("*")) or not any((tmp_path / "spool").rglob("*.jsonl"))


def test_a_file_rewritten_in_place_after_logging_is_delivered_as_logged(tmp_path):
    """Great Expectations rewrites its Data Docs pages in place on every gate: the queue delivers each file as it was
    when logged (a hard link would change with it, and a file shrinking while it is uploaded stalls the upload)."""
    client = FlakyClient()
    client.stall.clear()  # nothing is delivered until both files have been rewritten
    tracker = _tracker(tmp_path, client, stall_s=60)
    page, docs = tmp_path / "report.html", tmp_path / "docs"
    page.write_text("first gate")
    (docs / "validations").mkdir(parents=True)
    (docs / "validations" / "a.html").write_text("first gate")
    tracker.log_artifact(page, "gates")
    tracker.log_artifact(docs, "gates/docs")
    for written in (page, docs / "validations" / "a.html"):
        with open(written, "w") as f:  # in place: same inode, truncated, then rewritten
            f.write("second")
    client.stall.set()
    tracker.terminate("FINISHED")
    assert tracker.close() is None
    assert client.artifacts == [("report.html", "gates", "first gate"), ("docs", "gates/docs", "first gate")]


def test_a_large_artifact_is_linked_not_copied(tmp_path, monkeypatch):
    import components.tracking_queue as queue

    monkeypatch.setattr(queue, "LINK_MIN_BYTES", 8)
    client = FlakyClient()
    client.stall.clear()
    tracker = _tracker(tmp_path, client, stall_s=60)
    small, large = tmp_path / "small.json", tmp_path / "model.bin"
    small.write_text("{}")
    large.write_text("0123456789")
    tracker.log_artifact(small)
    tracker.log_artifact(large)
    kept = {p.name: p for p in tracker.spool.files.rglob("*") if p.is_file()}
    assert kept["model.bin"].stat().st_ino == large.stat().st_ino
    assert kept["small.json"].stat().st_ino != small.stat().st_ino
    client.stall.set()
    tracker.terminate("FINISHED")
    assert tracker.close() is None and len(client.artifacts) == 2


def test_an_outage_never_blocks_logging_warns_twice_and_delivers_everything_in_order(tmp_path, caplog):
    client = FlakyClient()
    tracker = _tracker(tmp_path, client)
    caplog.set_level(logging.WARNING, logger="dinov2")
    tracker.log_metrics({"loss": 1.0}, step=1)
    _wait(lambda: len(client.metrics) == 1)
    client.down = True
    slowest = 0.0
    for step in range(2, 40):
        start = time.perf_counter()
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
        slowest = max(slowest, time.perf_counter() - start)
    _wait(lambda: tracker.away)
    assert slowest < 0.05  # logging returns at once while the server is away
    spool = tracker.spool.path
    _wait(lambda: spool.is_file() and sum(1 for _ in Spool(spool).records()) == 38)  # spilled, nothing lost
    client.down = False
    _wait(lambda: len(client.metrics) == 39, 20)
    assert [m.step for m in client.metrics] == list(range(1, 40))
    assert tracker.close() is None
    assert not spool.exists()
    messages = [r.getMessage() for r in caplog.records if "tracking" in r.name]
    gone = [m for m in messages if "unreachable" in m]
    back = [m for m in messages if "is back" in m]
    assert len(gone) == 1 and len(back) == 1, messages
    assert "record(s) queued" in gone[0] and str(spool) in gone[0]
    assert "delivering 38 queued record(s)" in back[0]


def test_a_stalled_server_counts_as_away(tmp_path, caplog):
    client = FlakyClient()
    tracker = _tracker(tmp_path, client, stall_s=0.3)
    caplog.set_level(logging.WARNING, logger="dinov2")
    client.stall.clear()
    tracker.log_metrics({"loss": 1.0}, step=1)
    _wait(lambda: tracker.away)
    assert any("no answer for" in r.getMessage() for r in caplog.records)
    tracker.log_metrics({"loss": 0.5}, step=2)
    client.stall.set()
    _wait(lambda: len(client.metrics) == 2)
    assert tracker.close() is None and not tracker.away


def test_an_outage_longer_than_the_run_leaves_a_spill_file_that_replays(tmp_path, caplog, monkeypatch):
    client = FlakyClient()
    tracker = _tracker(tmp_path, client)
    caplog.set_level(logging.WARNING, logger="dinov2")
    tracker.log_params({"seed": 0})
    _wait(lambda: client.params)
    client.down = True
    for step in range(1, 21):
        tracker.log_metrics({"loss": float(step)}, step=step)
    (tmp_path / "m.json").write_text("{}")
    tracker.log_artifact(tmp_path / "m.json", "metrics")
    tracker.terminate("FINISHED")
    start = time.monotonic()
    spool = tracker.close(wait_s=30)
    assert time.monotonic() - start < 2  # the run does not wait for an absent server
    assert spool is not None and spool.is_file()
    assert any("python -m components.tracking_queue replay" in r.getMessage() for r in caplog.records)
    # later: the server is back, and the command delivers what the run left
    client.down = False
    import mlflow.tracking

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", lambda tracking_uri: client)
    assert main(["replay", str(spool.parent)]) == 0
    assert [m.step for m in client.metrics] == list(range(1, 21))
    assert client.artifacts == [("m.json", "metrics", "{}")] and client.terminated[0][0] == "FINISHED"
    assert not spool.exists() and not Spool(spool).files.exists()


def test_replay_resumes_after_the_records_already_delivered(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "s-run1.spool.jsonl", {"tracking_uri": "flaky:///", "run_id": "run1"})
    spool.append([{"seq": i, "kind": "metrics", "time_ms": 1000 + i, "step": i, "values": {"a": i}} for i in range(5)])
    spool.mark_delivered(2)
    client = FlakyClient()
    import mlflow.tracking

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", lambda tracking_uri: client)
    assert replay(spool.path) == 2
    assert [(m.step, m.timestamp) for m in client.metrics] == [(3, 1003), (4, 1004)]


def test_a_record_mlflow_refuses_is_dropped_with_a_warning_and_delivery_goes_on(tmp_path, caplog):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    client = FlakyClient()
    refuse = {"lr"}
    original = client.log_batch

    def log_batch(run_id, metrics=(), params=(), tags=()):
        if any(p.key in refuse for p in params):
            raise MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE)
        original(run_id, metrics, params, tags)

    client.log_batch = log_batch
    caplog.set_level(logging.WARNING, logger="dinov2")
    tracker = _tracker(tmp_path, client)
    tracker.log_params({"lr": 1})
    tracker.log_metrics({"loss": 1.0}, step=3)
    assert tracker.close() is None
    assert [m.step for m in client.metrics] == [3]
    assert any("params lr dropped" in r.getMessage() for r in caplog.records)


def test_a_full_memory_queue_spills_to_its_file(tmp_path):
    client = FlakyClient()
    client.stall.clear()  # the server takes nothing for now
    tracker = _tracker(tmp_path, client, max_in_memory=5, stall_s=60)
    for step in range(12):
        tracker.log_metrics({"loss": 1.0}, step=step)
    assert tracker.spool.path.is_file()
    client.stall.set()
    assert tracker.close() is None
    assert [m.step for m in client.metrics] == list(range(12))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_metrics_survive_the_spill_file(tmp_path, value):
    spool = Spool(tmp_path / "s-r.spool.jsonl", {"tracking_uri": "x", "run_id": "r"})
    spool.append([{"seq": 0, "kind": "metrics", "time_ms": 1, "step": 1, "values": {"loss": value}}])
    (record,) = spool.records()
    assert str(record["values"]["loss"]) == str(value)


def test_a_slow_server_that_still_answers_gets_the_run_end_at_close(tmp_path):
    """A delivery that stalls past `stall_s` counts the server away; at the run's end a server that answers its probe
    is slow, not gone: close waits for it, so the run ends FINISHED in MLflow rather than in the spill file."""
    client = FlakyClient()
    tracker = _tracker(tmp_path, client, stall_s=0.2)
    client.stall.clear()  # every call hangs: a loaded server
    tracker.log_metrics({"loss": 1.0}, step=1)
    _wait(lambda: tracker.away)
    tracker.terminate("FINISHED")
    threading.Timer(1.0, client.stall.set).start()  # it answers again a second later
    assert tracker.close(wait_s=10.0) is None
    assert [status for status, _ in client.terminated] == ["FINISHED"] and len(client.metrics) == 1


class SlowClient(FlakyClient):
    """A loaded server: it answers every call, each after `delay_s`."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def _check(self) -> None:
        time.sleep(self.delay_s)
        super()._check()


def test_close_waits_for_a_loaded_server_while_it_keeps_taking_records(tmp_path):
    """A run's artifacts taken one by one by a loaded server can outlast `wait_s` in all: close waits as long as
    records keep arriving (up to `wait_s` between two), so the run ends FINISHED, not in the spill file."""
    client = SlowClient(delay_s=0.15)
    tracker = _tracker(tmp_path, client)
    for i in range(12):
        artifact = tmp_path / f"a{i}.txt"
        artifact.write_text(str(i))
        tracker.log_artifact(artifact)
    tracker.terminate("FINISHED")
    start = time.monotonic()
    assert tracker.close(wait_s=0.5) is None  # about 1.9 s of deliveries, never 0.5 s without one
    assert time.monotonic() - start > 0.5
    assert len(client.artifacts) == 12 and [status for status, _ in client.terminated] == ["FINISHED"]
