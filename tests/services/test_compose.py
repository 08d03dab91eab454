"""The compose files agree with the local stack: ports, bucket names, environment names, no secrets in the file.

    .venv/bin/python -m pytest tests/services/test_compose.py

Docker is not needed: the files are parsed (and checked with `docker compose config` where Docker is installed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.services import BUCKETS, MLFLOW_BUCKET, WORK_POOL, Ports
from tests.pipeline_utils import ROOT

COMPOSE_DIR = ROOT / "infra" / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
CLIENT_ENV = {
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "PREFECT_API_URL",
}
"""What `Stack.client_env` gives a client of the local stack; the compose worker must get the same names."""


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _host_ports(service: dict[str, Any]) -> dict[int, str]:
    """{container port: host address} of a service's published ports."""
    out = {}
    for spec in service.get("ports", []):
        host, host_port, container_port = str(spec).split(":")
        assert host_port == container_port, spec
        out[int(container_port)] = host
    return out


def _text(value: Any) -> str:
    return value if isinstance(value, str) else " ".join(map(str, value))


def test_compose_has_every_service(compose: dict[str, Any]) -> None:
    assert {"postgres", "s3", "mlflow", "prefect-server", "prefect-worker"} <= set(compose["services"])
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = COMPOSE_DIR / build["context"]
            assert (context / build["dockerfile"]).is_file(), f"{name}: missing {build['dockerfile']}"


def test_compose_ports_match_the_local_stack_and_bind_loopback(compose: dict[str, Any]) -> None:
    defaults = Ports()
    services = compose["services"]
    assert _host_ports(services["s3"])[defaults.s3] == "127.0.0.1"
    assert _host_ports(services["s3"])[defaults.seaweedfs_filer] == "127.0.0.1"
    assert _host_ports(services["mlflow"]) == {defaults.mlflow: "127.0.0.1"}
    assert _host_ports(services["prefect-server"]) == {defaults.prefect: "127.0.0.1"}
    assert not _host_ports(services["postgres"])  # reachable from the other containers only
    assert f"-s3.port={defaults.s3}" in _text(services["s3"]["command"])
    assert f"--port={defaults.mlflow}" in _text(services["mlflow"]["command"])
    assert str(defaults.prefect) in _text(services["prefect-server"]["command"])


def test_compose_uses_the_local_stack_names(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["buckets"]["environment"]["DINOV2_BUCKETS"].split() == list(BUCKETS)
    assert f"--artifacts-destination=s3://{MLFLOW_BUCKET}/artifacts" in services["mlflow"]["command"]
    assert f"--pool {WORK_POOL}" in _text(services["prefect-worker"]["command"])
    assert WORK_POOL in _text(services["deploy"]["command"])
    assert set(services["prefect-worker"]["environment"]) >= CLIENT_ENV
    # The worker's MLflow host must pass MLflow's DNS-rebinding check.
    allowed = next(a for a in services["mlflow"]["command"] if a.startswith("--allowed-hosts="))
    assert "mlflow:5000" in allowed


def test_compose_holds_no_secret(compose: dict[str, Any]) -> None:
    """Every credential is a `${VAR}` reference to .env or the environment, never a literal."""
    secret_names = re.compile(r"(SECRET|PASSWORD|ACCESS_KEY)")
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if secret_names.search(key):
                assert str(value).startswith("${"), f"{name}: {key} is a literal"
    for url in re.findall(r"postgres(?:ql)?(?:\+asyncpg)?://[^\s\"']+", COMPOSE.read_text()):
        assert "${DINOV2_POSTGRES_PASSWORD}" in url, url
    example = (COMPOSE_DIR / ".env.example").read_text()
    assert "change-me" in example  # placeholders only
    assert "/infra/compose/.env" in (ROOT / ".gitignore").read_text()


def test_compose_config_is_valid_where_docker_is_installed(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode:
        pytest.skip("docker compose is not installed: the files were parsed only")
    env_file = tmp_path / ".env"
    env_file.write_text((COMPOSE_DIR / ".env.example").read_text())
    out = subprocess.run(
        [docker, "compose", "--env-file", str(env_file), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
