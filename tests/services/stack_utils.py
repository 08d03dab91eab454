"""Helpers of the service tests: running commands, a client environment for the stack, Prefect API calls.

The fixtures that start the stack and run the pipeline through it are in conftest.py beside this file.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.pipeline_utils import ROOT

ARTIFACTS_DIR = ROOT / "test-artifacts"
"""Screenshots and other evidence the tests keep (git-ignored)."""
FLOW_RUN_TIMEOUT_S = 540
DVC_REMOTE = "stack"
RUN_PARAMETERS: dict[str, Any] = {}
"""Parameters of the deployment run: none, so the whole pipeline runs on the project's tiny params.yaml
(`{"stage": "pretrain"}` runs that stage and the stages it needs)."""
SECOND_RUN_PARAMETERS: dict[str, Any] = {
    "overrides": {"report.candidate_roles": ["teacher"]},
}
"""The second deployment run: another final model (the teacher, not the best of teacher and student), so the two
pipeline runs differ in what they register and in its metrics; only the report stage reads these keys."""


@contextmanager
def started(service: Any, name: str) -> Iterator[Any]:
    """Starts `service` (an `infra.services` server or stack), fails the test when it cannot start (after stopping what
    did start), and stops it when the block ends."""
    from infra.services import ServiceError

    try:
        service.start()
    except ServiceError as err:
        service.stop()
        pytest.fail(f"{name} did not start: {err}")
    try:
        yield service
    finally:
        service.stop()


@dataclass
class PipelineRun:
    """What one deployment run of the tiny pipeline left behind."""

    project: Path
    deployment: Any
    flow_run: Any
    task_runs: list[Any]
    stages: list[str]
    """The stages the run executed, in order."""


def git_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.invalid")
    env.update(GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.invalid")
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Runs a command, failing the test with its output when it fails."""
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited with {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def client_env(stack: Any) -> dict[str, str]:
    """This process' environment pointed at the stack only (no AWS_/MLFLOW_/PREFECT_ settings of the caller)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_"))}
    env.update(stack.client_env())
    # No ~/.aws files of the machine running the tests (an empty file: DVC's aiobotocore refuses /dev/null).
    empty = Path(stack.state_dir) / "aws-empty-config"
    empty.touch()
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(empty)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def prefect_call(stack: Any, coro_fn: Any) -> Any:
    """Runs `await coro_fn(client)` with a Prefect client of the stack's server, in a thread of its own.

    A thread, because Playwright's sync API keeps an event loop running in this one; an explicit API URL, because a
    settings context would not follow the coroutine into that thread.
    """
    from prefect.client.orchestration import PrefectClient

    async def main() -> Any:
        async with PrefectClient(api=stack.prefect.api_url) as client:
            return await coro_fn(client)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()
