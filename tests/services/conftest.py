"""One real service stack per session, and one pipeline run through it, shared by the tests in this folder.

    .venv/bin/python -m pytest tests/services -m services

`stack` runs MLflow, a Prefect server and a process worker (infra.services, the code behind `make services`) on free
ports of 127.0.0.1 in a temporary state folder, around the session's SeaweedFS (`seaweedfs` in tests/conftest.py).
`pipeline_run` registers prefect.yaml's deployments from a tiny copy of the project, starts the pipeline deployment
through the Prefect API (what the UI's Run button does), and waits for the worker to finish it; the tests then look
at what it left in Prefect, MLflow, S3 and DVC. `second_pipeline_run` runs the deployment again with the teacher as
the only candidate of the report stage (so DVC re-runs that stage alone): two pipeline runs to compare.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pipeline_utils import make_workspace
from tests.services.stack_utils import (
    DVC_REMOTE,
    FLOW_RUN_TIMEOUT_S,
    RUN_PARAMETERS,
    SECOND_RUN_PARAMETERS,
    PipelineRun,
    client_env,
    git_env,
    prefect_call,
    run,
    started,
)


@pytest.fixture(scope="session")
def stack(seaweedfs: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """MLflow, Prefect server and worker on free ports, sharing the session's SeaweedFS."""
    from infra.services import Ports, Stack, StackConfig

    config = StackConfig(state_dir=tmp_path_factory.mktemp("services"), ports=Ports.free(), worker_query_seconds=1.0)
    services = Stack(config, s3=seaweedfs)
    with started(services, "the service stack"):
        yield services


@pytest.fixture(scope="session")
def project(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny copy of the project in its own git + DVC repository, with an S3 DVC remote, deployed to Prefect."""
    # The gate asks only for a finite kNN accuracy: two CPU steps do not reliably beat a random init on every task,
    # and the registry tests need a `champion`. No figures: tests/evaluation checks them, nothing here reads them.
    report = {"report.require_beats_baseline": False, "report.figures": False}
    path = make_workspace(tmp_path_factory.mktemp("stack") / "project", report)
    env = client_env(stack)
    dvc = [sys.executable, "-m", "dvc"]
    # The remote's URL and endpoint are committed (a fresh clone finds them); credentials stay in the environment.
    run([*dvc, "remote", "add", "-d", DVC_REMOTE, "s3://dinov2-dvc/tests"], path, env)
    run([*dvc, "remote", "modify", DVC_REMOTE, "endpointurl", stack.s3.endpoint], path, env)
    run(["git", "add", "-A"], path, git_env())
    run(["git", "commit", "-q", "-m", "S3 remote"], path, git_env())
    stack.deploy(path)
    return path


def _deployment_run(stack: Any, project: Path, parameters: dict[str, Any]) -> PipelineRun:
    """The pipeline deployment, started through the Prefect API with `parameters` and run to the end by the worker."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import stage_order, upstream_of

    stage = parameters.get("stage")
    with contextlib.chdir(project):  # DVC resolves a stage name against the working directory's dvc.yaml
        stages = upstream_of(project, stage) if stage else stage_order(project)

    async def scenario(client: Any) -> tuple[Any, Any, list[Any]]:
        deployment = await client.read_deployment_by_name("dinov2-pipeline/pipeline")
        flow_run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        deadline = time.monotonic() + FLOW_RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            flow_run = await client.read_flow_run(flow_run.id)
            if flow_run.state is not None and flow_run.state.is_final():
                break
            await asyncio.sleep(2)
        task_runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        return deployment, flow_run, task_runs

    deployment, flow_run, task_runs = prefect_call(stack, scenario)
    if not (flow_run.state and flow_run.state.is_completed()):
        tail = stack.worker.process.log_tail(6000)
        pytest.fail(f"the deployment run ended {flow_run.state!r}; worker log tail:\n{tail}")
    return PipelineRun(project, deployment, flow_run, task_runs, stages)


@pytest.fixture(scope="session")
def pipeline_run(stack: Any, project: Path) -> PipelineRun:
    """The pipeline deployment, started through the Prefect API and run to the end by the stack's worker."""
    return _deployment_run(stack, project, RUN_PARAMETERS)


@pytest.fixture(scope="session")
def second_pipeline_run(stack: Any, project: Path, pipeline_run: PipelineRun) -> PipelineRun:
    """The deployment again, the teacher the only candidate (DVC re-runs `report` alone)."""
    return _deployment_run(stack, project, SECOND_RUN_PARAMETERS)
