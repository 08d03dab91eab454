"""The local stack itself: loopback-only servers, `status`, and the start/stop twin commands of the CLI.

.venv/bin/python -m pytest tests/services/test_stack.py
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from infra.services import Ports, S3Credentials, Stack, StackConfig

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket a server process (or its children) listens on."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    out = set()
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        out |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return out


def test_every_server_listens_on_loopback_only(stack: Stack) -> None:
    rows = stack.status()
    assert [r["service"] for r in rows if r["running"]] == ["s3", "mlflow", "prefect", "worker"]
    for row in rows:
        sockets = _listening(row["pid"])
        assert all(ip in ("127.0.0.1", "::1") for ip, _ in sockets), (row["service"], sockets)
    ports = {port for row in rows for _, port in _listening(row["pid"])}
    assert {stack.config.ports.mlflow, stack.config.ports.prefect, stack.s3.ports.s3} <= ports
    for url in (stack.s3.endpoint, stack.mlflow.url, stack.prefect.url):
        assert url.startswith("http://127.0.0.1:")


def test_worker_runs_flows_with_the_stack_settings(stack: Stack) -> None:
    env = psutil.Process(stack.worker.process.pid()).environ()
    for key, value in stack.client_env().items():
        assert env.get(key) == value, key
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # the venv's dvc and python


def _cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.services", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_start_reports_urls_and_stop_ends_everything(tmp_path: Path) -> None:
    """`python -m infra.services start|status|stop` (what `make services` / `make services-stop` run), here with S3
    only (the session's `stack` covers the other servers), on free ports, from a folder that is not a project."""
    ports = Ports.free()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_", "DINOV2_"))}
    env.update({f"DINOV2_{name.upper()}_PORT": str(port) for name, port in ports.__dict__.items()})
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # `infra` from the checkout
    state = tmp_path / "state"
    try:
        started = _cli("--state-dir", str(state), "start", "--services", "s3", cwd=tmp_path, env=env)
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"http://127.0.0.1:{ports.s3}" in started.stdout
        assert f"source {state}/env" in started.stdout

        # Generated credentials: in 0600 files only, never on the terminal.
        creds = S3Credentials.resolve(state)
        assert creds.secret_key not in started.stdout + started.stderr
        assert creds.secret_key not in repr(creds)
        for name in ("env", "s3-credentials.json"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
        assert f"export AWS_SECRET_ACCESS_KEY={creds.secret_key}" in (state / "env").read_text()

        status = _cli("--state-dir", str(state), "status", cwd=tmp_path, env=env)
        assert status.returncode == 3  # MLflow and Prefect were not asked for
        assert "s3       running" in status.stdout and "mlflow   stopped" in status.stdout
        pids = [Stack.from_state(state).s3.process.pid()]
        assert all(pids)
        client = Stack(StackConfig(state_dir=state, ports=ports)).s3.client()
        assert {"dinov2-data", "dinov2-dvc", "dinov2-mlflow"} <= {b["Name"] for b in client.list_buckets()["Buckets"]}
    finally:
        stopped = _cli("--state-dir", str(state), "stop", cwd=tmp_path, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == "stopped s3"
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    again = _cli("--state-dir", str(state), "stop", cwd=tmp_path, env=env)
    assert again.stdout.strip() == "nothing was running"


def test_s3_requires_the_configured_credentials(stack: Any) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    intruder = boto3.session.Session().client(
        "s3",
        endpoint_url=stack.s3.endpoint,
        region_name="us-east-1",
        aws_access_key_id="intruder",
        aws_secret_access_key="wrong-secret",
        config=Config(retries={"total_max_attempts": 1}),
    )
    with pytest.raises(ClientError) as err:
        intruder.list_objects_v2(Bucket="dinov2-data")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
