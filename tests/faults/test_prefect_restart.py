"""A Prefect server that goes away mid-flow: the stages go on and the flow run ends Completed once it is back.

`python -m flows.pipeline --stage synth` runs against a Prefect server the test starts on 127.0.0.1; the server is
killed as soon as the flow run is running and kept away for longer than Prefect's default client retries last (about
a minute), then started again on the same port and database. Prefect 3.9 reports task runs as events (dropped while
the server is away; the task goes on), so what must survive is the flow run's own end: with the flow's retry budget
(`FLOW_CLIENT_RETRIES`) it waits for the server instead of crashing, and the stage's outputs are complete.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.services import free_port
from infra.services.stack import PrefectServer
from tests.pipeline_utils import make_workspace

pytestmark = [pytest.mark.services, pytest.mark.slow]  # a 75 s outage of a real Prefect server: minutes
OUTAGE_S = 75  # longer than Prefect's default retries (2 + 4 + 8 + 16 + 32 s)


def _flow_runs(server: PrefectServer) -> list[tuple[str, str]]:
    import httpx

    response = httpx.post(f"{server.api_url}/flow_runs/filter", json={"limit": 10}, timeout=5)
    response.raise_for_status()
    return [(r["id"], r["state_type"]) for r in response.json()]


def test_a_flow_outlives_a_prefect_server_restart(tmp_path):
    server = PrefectServer(tmp_path / "prefect-state", host="127.0.0.1", port=free_port())
    workspace = make_workspace(tmp_path / "project")
    server.launch()
    try:
        server.wait(300)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.update(PREFECT_API_URL=server.api_url, PREFECT_HOME=str(tmp_path / "client"), DINOV2_TRACKING="off")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        log = tmp_path / "flow.log"
        flow = subprocess.Popen(
            [sys.executable, "-m", "flows.pipeline", "--stage", "synth", "--workdir", str(workspace)], cwd=workspace,
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while not any(state == "RUNNING" for _, state in _flow_runs(server)):
            assert flow.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the flow run never started"
            time.sleep(0.5)
        server.stop(timeout_s=0)  # killed: the flow's stage runs on without it
        time.sleep(OUTAGE_S)
        assert flow.poll() is None, f"the flow gave up while the server was away:\n{log.read_text()[-3000:]}"
        server.launch()
        server.wait(300)
        assert flow.wait(timeout=600) == 0, log.read_text()[-4000:]
        assert [state for _, state in _flow_runs(server)] == ["COMPLETED"]
        assert (workspace / "metrics" / "synth.json").is_file() and (workspace / "dvc.lock").is_file()
        assert "synth" in (workspace / "dvc.lock").read_text()
    finally:
        server.stop(timeout_s=0)
