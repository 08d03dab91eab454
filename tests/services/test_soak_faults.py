"""Soak: the pipeline deployment runs while the S3, MLflow and Prefect servers are restarted at random moments.

    .venv/bin/python -m pytest tests/services/test_soak_faults.py -m slow

A copy of the tiny project (its DVC remote on the stack's S3) is deployed to the stack's Prefect server and its
pipeline deployment started through the API, as the UI's Run button does. Meanwhile a thread kills one server at a
time, at random moments (seeded), keeps it away for a random while and starts it again on the same ports and data.
When the flow run has ended, spill files left by stages whose end fell in an MLflow outage are replayed (as a user
would: `python -m components.tracking_queue replay .tracking/`). Then: every stage completed (DVC has nothing left to
run), every stage's MLflow run is FINISHED with its final metrics and every logged training step, every checkpoint
matches its digest, every export reads back, and no partial or temporary file is left anywhere in the project.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from tests.pipeline_utils import make_workspace
from tests.services.stack_utils import FLOW_RUN_TIMEOUT_S, client_env, git_env, prefect_call, run

pytestmark = [pytest.mark.services, pytest.mark.slow]
SEED = 27
PARTIAL_PATTERNS = (".tmp-*", "*.partial", ".*.export-partial", ".*.tmp*", "*.spool.jsonl", ".*.old")


class Chaos(threading.Thread):
    """Restarts one of the stack's servers at a time, at seeded random moments, until stopped."""

    def __init__(self, stack: Any, seed: int) -> None:
        super().__init__(daemon=True)
        self.stack, self.rng, self.stop_event = stack, random.Random(seed), threading.Event()
        self.restarts: list[tuple[str, float]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        s3, mlflow, prefect = self.stack.s3, self.stack.mlflow, self.stack.prefect
        servers = {
            "s3": (s3.stop, s3.start),
            "mlflow": (lambda: mlflow.stop(0), lambda: (mlflow.launch(), mlflow.wait())),
            "prefect": (lambda: prefect.stop(0), lambda: (prefect.launch(), prefect.wait())),
        }
        try:
            while not self.stop_event.wait(self.rng.uniform(10, 40)):
                name = self.rng.choice(sorted(servers))
                stop, start = servers[name]
                away = self.rng.uniform(2, 20)
                stop()
                time.sleep(away)
                start()
                self.restarts.append((name, away))
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err


def _run_deployment(stack: Any) -> Any:
    async def scenario(client: Any) -> Any:
        deployment = await client.read_deployment_by_name("dinov2-pipeline/pipeline")
        flow_run = await client.create_flow_run_from_deployment(deployment.id, parameters={})
        deadline = time.monotonic() + 2 * FLOW_RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                flow_run = await client.read_flow_run(flow_run.id)
            except Exception:  # noqa: BLE001 - the Prefect server is being restarted
                await asyncio.sleep(5)
                continue
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            await asyncio.sleep(3)
        return flow_run

    return prefect_call(stack, scenario)


def test_the_pipeline_survives_servers_restarted_at_random_moments(stack, tmp_path_factory):
    from mlflow.tracking import MlflowClient

    from components import exports
    from components.training.checkpoint import CheckpointManager

    project = make_workspace(tmp_path_factory.mktemp("soak") / "project", {"report.require_beats_baseline": False})
    env = client_env(stack)
    run([sys.executable, "-m", "dvc", "remote", "add", "-d", "stack", "s3://dinov2-dvc/soak"], project, env)
    run([sys.executable, "-m", "dvc", "remote", "modify", "stack", "endpointurl", stack.s3.endpoint], project, env)
    run(["git", "add", "-A"], project, git_env())
    run(["git", "commit", "-q", "-m", "S3 remote"], project, git_env())
    stack.deploy(project)

    chaos = Chaos(stack, SEED)
    chaos.start()
    try:
        flow_run = _run_deployment(stack)
    finally:
        chaos.stop_event.set()
        chaos.join()
    assert chaos.error is None, f"a server did not come back: {chaos.error}"
    assert chaos.restarts, "nothing was restarted"
    for server in (stack.s3, stack.mlflow, stack.prefect):
        assert server.process.running()
    assert flow_run.state.is_completed(), f"{flow_run.state!r} after restarts {chaos.restarts}"

    # what MLflow could not take before a stage ended is replayed, as a user would
    spool = project / ".tracking"
    if spool.is_dir() and list(spool.rglob("*.spool.jsonl")):
        out = subprocess.run(
            [sys.executable, "-m", "components.tracking_queue", "replay", str(spool)], cwd=project, env=env,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]

    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, env=env, text=True,
                            capture_output=True, timeout=300)  # fmt: skip
    assert json.loads(status.stdout or "{}") == {}, f"stages left to run: {status.stdout}"

    summary = json.loads((project / "reports" / "pipeline_summary.json").read_text())
    assert all(s["status"] == "completed" for s in summary["stages"].values()), summary["stages"]
    client = MlflowClient(tracking_uri=stack.mlflow.url)
    for stage in summary["stages"]:
        report = json.loads((project / "metrics" / f"{stage}.json").read_text())
        mlflow_run = client.get_run(report["mlflow_run_id"])
        assert mlflow_run.info.status == "FINISHED", stage
        assert "timing.process_s" in mlflow_run.data.metrics, stage  # the stage's last record arrived
        curve = project / "metrics" / f"{stage}_curve.csv"
        if curve.is_file():
            steps = [int(line.split(",")[0]) for line in curve.read_text().splitlines()[1:]]
            logged = sorted(m.step for m in client.get_metric_history(report["mlflow_run_id"], "loss"))
            assert logged == steps, stage

    partial = [p for pattern in PARTIAL_PATTERNS for p in project.rglob(pattern) if ".git" not in p.parts]
    assert not [p for p in partial if ".dvc" not in p.parts], partial
    for state in (project / "checkpoints").rglob("state.pt"):
        assert CheckpointManager.verify(state.parent) is None, state
    for descriptor in (project / "models").rglob("model.json"):
        export = exports.read_export(descriptor.parent)
        assert exports.read_weights(export.weights)[0]
