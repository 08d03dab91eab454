"""A real MLflow server on 127.0.0.1, killed and restarted while a run logs through the tracking seam.

The server (`mlflow server`, SQLite backend, artifacts served from a local folder) is started by the test on a free
port and killed with SIGKILL, as a crashed or restarted tracking host would be. Logging must never wait; every
metric must arrive in order with the step and time it was logged at: delivered by the run when the server comes back
while it lives, replayed from the spill file by `python -m components.tracking_queue replay` when it does not.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.services import ServiceProcess, free_port

pytestmark = pytest.mark.services
ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240  # a loaded 2-core machine takes up to a minute to start `mlflow server`


class Server:
    """`mlflow server` on a fixed port, to be killed and started again on it."""

    def __init__(self, state: Path) -> None:
        self.state, self.port = state, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = ServiceProcess("mlflow", state, stop_timeout_s=0)

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers",
            "1", "--backend-store-uri", f"sqlite:///{self.state / 'mlflow.db'}", "--serve-artifacts",
            "--artifacts-destination", (self.state / "artifacts").as_uri(),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.process.start(cmd, env, cwd=self.state)
        self.process.wait_ready(self.answers, START_TIMEOUT_S)

    def answers(self) -> bool:
        from components.tracking_queue import server_answers

        return server_answers(self.url)

    def kill(self) -> None:
        self.process.stop(timeout_s=0)  # SIGTERM and SIGKILL at once: a crash, not a shutdown


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("mlflow-server"))
    s.start()
    yield s
    s.kill()


@pytest.fixture
def tracked(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process pointed at the server, spill files under tmp_path/spool; returns the spool folder."""
    if not server.process.running():
        server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("DINOV2_TRACKING_SPOOL", str(tmp_path / "spool"))
    monkeypatch.delenv("DINOV2_TRACKING", raising=False)
    return tmp_path / "spool"


def _history(server: Server, run_id: str, key: str = "loss") -> list[tuple[int, int, float]]:
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient(tracking_uri=server.url).get_metric_history(run_id, key)
    return sorted((m.step, m.timestamp, m.value) for m in metrics)


def _log_steps(tracker, first: int, last: int, logged: dict[int, tuple[int, int]], pause_s: float = 0.05) -> float:
    """Logs `loss` for steps first..last; returns the slowest call's seconds."""
    slowest = 0.0
    for step in range(first, last + 1):
        before = int(time.time() * 1000)
        start = time.perf_counter()
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
        slowest = max(slowest, time.perf_counter() - start)
        logged[step] = (before, int(time.time() * 1000))
        time.sleep(pause_s)
    return slowest


def test_a_server_killed_and_restarted_mid_run_costs_no_wait_and_no_metric(server, tracked, caplog):
    from components.tracking import start_run

    caplog.set_level(logging.WARNING, logger="dinov2")
    logged: dict[int, tuple[int, int]] = {}
    with start_run("killed-mid-run", "faults") as tracker:
        run_id = tracker.run_id
        _log_steps(tracker, 1, 20, logged)
        assert tracker.flush(timeout_s=60)
        server.kill()
        slowest = _log_steps(tracker, 21, 60, logged)
        restarted = time.monotonic()
        server.start()
        slowest = max(slowest, _log_steps(tracker, 61, 80, logged))
        assert slowest < 0.2, f"a logging call waited {slowest:.2f} s"
        assert tracker.flush(timeout_s=60), "the queue did not drain once the server was back"
        caught_up = time.monotonic() - restarted
    history = _history(server, run_id)
    assert [s for s, _, _ in history] == list(range(1, 81))  # every step, once
    assert all(logged[s][0] <= ts <= logged[s][1] for s, ts, _ in history)  # the times they were logged at
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("dinov2.tracking")]
    assert len([m for m in messages if "unreachable" in m]) == 1, messages
    assert len([m for m in messages if "is back" in m]) == 1, messages
    assert not list(tracked.glob("*.spool.jsonl")), "delivered: no spill file left"
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=server.url).get_run(run_id).info.status == "FINISHED"
    assert caught_up < START_TIMEOUT_S


def test_an_outage_longer_than_the_run_is_replayed_from_the_spill_file(server, tracked, tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    from components.tracking import start_run

    caplog.set_level(logging.WARNING, logger="dinov2")
    logged: dict[int, tuple[int, int]] = {}
    curve = tmp_path / "curve.csv"
    curve.write_text("step,loss\n")
    with start_run("outlived", "faults") as tracker:
        run_id = tracker.run_id
        _log_steps(tracker, 1, 10, logged)
        assert tracker.flush(timeout_s=60)
        server.kill()
        _log_steps(tracker, 11, 30, logged)
        tracker.log_artifact(curve, "plots")
        ended = time.monotonic()
    assert time.monotonic() - ended < 3, "the end of the run waited for the absent server"
    spills = list(tracked.glob("*.spool.jsonl"))
    assert len(spills) == 1 and any("tracking_queue replay" in r.getMessage() for r in caplog.records)
    server.start()
    out = subprocess.run(
        [sys.executable, "-m", "components.tracking_queue", "replay", str(tracked)], cwd=ROOT, capture_output=True,
        text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "delivered to run" in out.stdout
    history = _history(server, run_id)
    assert [s for s, _, _ in history] == list(range(1, 31))
    assert all(logged[s][0] <= ts <= logged[s][1] for s, ts, _ in history)
    run = MlflowClient(tracking_uri=server.url).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [a.path for a in MlflowClient(tracking_uri=server.url).list_artifacts(run_id, "plots")] == [
        "plots/curve.csv"
    ]
    assert not spills[0].exists()
