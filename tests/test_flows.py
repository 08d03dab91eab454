"""The Prefect flows over the DVC pipeline, under Prefect's test harness, on a tiny copy of the project.

Covers: a deployment run started through the Prefect API (the UI's Run button) completes with one task run per
stage and leaves an MLflow parent run with a nested run per stage; a second run skips everything and DVC finds
nothing to do; a failing gate stops every downstream stage; bad params fail before any stage starts.

To keep the default test run short, the deployment here runs the pipeline up to `curate` (the `stage` parameter:
that stage and everything it depends on); tests/services runs the whole pipeline through a real Prefect server and
worker.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from components.config import ConfigError
from tests.pipeline_utils import make_workspace, stage_env

pytestmark = pytest.mark.timeout(900)

UP_TO = "curate"
EXPECTED_STAGES = ["synth", "prepare", "embed", "curate"]


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def tiny_run(prefect_api, tmp_path_factory):
    """One deployment run of the whole tiny pipeline, started through the API and served by a Runner."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.runner import Runner

    from flows.pipeline import pipeline

    ws = make_workspace(tmp_path_factory.mktemp("pipeline"))

    async def scenario() -> tuple:
        runner = Runner(name="test-runner", query_seconds=1, limit=1)
        deployment_id = await runner.add_flow(pipeline, name="tiny", parameters={"workdir": str(ws), "stage": UP_TO})
        server = asyncio.create_task(runner.start())
        try:
            async with get_client() as client:
                flow_run = await client.create_flow_run_from_deployment(deployment_id)
                deadline = time.monotonic() + 840
                while time.monotonic() < deadline:
                    flow_run = await client.read_flow_run(flow_run.id)
                    if flow_run.state is not None and flow_run.state.is_final():
                        break
                    await asyncio.sleep(2)
                task_runs = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
                )
        finally:
            await runner.stop()
            server.cancel()
        return flow_run, task_runs

    flow_run, task_runs = asyncio.run(scenario())
    return ws, flow_run, task_runs


def test_expected_stages_are_dvc_order():
    order = list(yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"])
    assert order[: len(EXPECTED_STAGES)] == EXPECTED_STAGES


def test_deployment_run_through_the_api_completes_with_a_task_per_stage(tiny_run):
    ws, flow_run, task_runs = tiny_run
    assert flow_run.state.is_completed(), flow_run.state
    names = sorted(tr.name for tr in task_runs)
    assert names == sorted(EXPECTED_STAGES)
    assert all(tr.state.is_completed() for tr in task_runs)


def test_pipeline_summary_and_mlflow_runs(tiny_run):
    from mlflow.tracking import MlflowClient

    ws, _, _ = tiny_run
    summary = json.loads((ws / "reports" / "pipeline_summary.json").read_text())
    assert list(summary["stages"]) == EXPECTED_STAGES
    for name, stage in summary["stages"].items():
        assert stage["status"] == "completed", name
        assert stage["duration_s"] > 0
        assert stage["headline"]["name"], name
    assert summary["orchestration_overhead_s"] >= 0

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags.get("prefect_flow_run_id")
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_stage = {run.data.tags["stage"]: run for run in children}
    assert sorted(by_stage) == sorted(EXPECTED_STAGES)
    for name, run in by_stage.items():
        assert run.info.status == "FINISHED", name
        assert run.data.metrics, f"{name} logged no metrics"
        assert run.data.params, f"{name} logged no params"
        assert client.list_artifacts(run.info.run_id), f"{name} logged no artifacts"
        assert run.data.tags.get("git_commit"), f"{name} has no git commit tag"
        assert any(k.startswith("dvc.out.") for k in run.data.tags), f"{name} has no DVC hash tags"


def test_second_run_skips_everything_and_dvc_has_nothing_to_do(tiny_run, prefect_api):
    from flows.pipeline import pipeline

    ws, _, _ = tiny_run
    summary = pipeline(workdir=str(ws), stage=UP_TO)
    assert {s["status"] for s in summary["stages"].values()} == {"skipped"}
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", UP_TO],
        cwd=ws,
        env=stage_env(ws),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0
    assert "up to date" in status.stdout


def test_bad_override_fails_before_any_stage(prefect_api, tmp_path):
    from flows.pipeline import pipeline

    ws = make_workspace(tmp_path / "ws")
    params_before = (ws / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=r"optim.base_lr = -1"):
        pipeline(workdir=str(ws), overrides={"optim.base_lr": -1})
    assert not (ws / "data").exists()
    assert (ws / "params.yaml").read_text() == params_before


def test_failing_gate_stops_downstream_stages(prefect_api, tmp_path):
    """A corrupt embedding checkpoint (NaN weights) gives NaN embeddings: the embed gate fails, nothing after runs."""
    from components.model import build_backbone, save_official_weights
    from flows.pipeline import pipeline

    model = build_backbone("vit_test")
    with torch.no_grad():
        model.norm.weight.fill_(float("nan"))
    weights = save_official_weights(model, tmp_path / "corrupt.pth")
    ws = make_workspace(tmp_path / "ws", {"embed.weights": str(weights)})
    with pytest.raises(Exception, match="embed"):
        pipeline(workdir=str(ws))
    assert (ws / "data" / "prepared" / "manifest.parquet").exists()  # upstream kept
    assert not (ws / "data" / "curated").exists()
    assert not (ws / "models").exists()
    gate_reports = list((ws / "data").rglob("embeddings*.json"))
    assert gate_reports, "the failed gate's report was not saved"
    # The failed run is summarised too: what ran, the stage that failed, what never ran.
    summary = json.loads((ws / "reports" / "pipeline_summary.json").read_text())
    order = list(yaml.safe_load((ws / "dvc.yaml").read_text())["stages"])
    after = order[order.index("embed") + 1 :]
    assert {s: v["status"] for s, v in summary["stages"].items()} == {
        "synth": "completed", "prepare": "completed", "embed": "failed", **dict.fromkeys(after, "not run")
    }  # fmt: skip
