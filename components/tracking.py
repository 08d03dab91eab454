"""The tracking seam: MLflow runs behind a small interface, with a no-op twin.

One parent run per pipeline run (opened by the Prefect flow) and one nested run per stage. A stage process finds its
parent through the `DINOV2_PARENT_RUN_ID` environment variable, which the flow sets for the `dvc repro` it starts; a
stage started on its own (CLI or plain `dvc repro`) opens a top-level run. Only rank 0 of a distributed stage logs.

Tracking URI: `MLFLOW_TRACKING_URI` when set, else a SQLite file `mlflow.db` in the working directory, with artifacts
under `mlartifacts/`. `DINOV2_TRACKING=off` turns tracking off (a `NullTracker`). The Model Registry is reached
here too (`register_model`: a new version of a registered model, and its alias).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from components.log import get_logger, is_main_process

PARENT_RUN_ENV = "DINOV2_PARENT_RUN_ID"
FLOW_RUN_ENV = "DINOV2_PREFECT_FLOW_RUN_ID"
TRACKING_SWITCH_ENV = "DINOV2_TRACKING"

log = get_logger(__name__)


def tracking_uri(root: Path | None = None) -> str:
    """The MLflow tracking URI: the environment's, else a SQLite file in `root` (default: the working directory)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(root or Path.cwd()).resolve() / 'mlflow.db'}"


def tracking_enabled() -> bool:
    return os.environ.get(TRACKING_SWITCH_ENV, "on").lower() not in {"off", "0", "false"} and is_main_process()


def git_commit(root: Path | None = None) -> str | None:
    """The checkout's HEAD commit, or None outside a git repository."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def dvc_lock_hashes(stage: str, lock_path: Path = Path("dvc.lock")) -> dict[str, str]:
    """MLflow tags with the md5 of each dep and out of `stage`, as dvc.lock records them after a run."""
    if not lock_path.is_file():
        return {}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    entry = (lock.get("stages") or {}).get(stage) or {}
    tags = {}
    for kind in ("deps", "outs"):
        for item in entry.get(kind) or []:
            digest = item.get("md5") or item.get("etag") or item.get("hash")
            if digest:
                tags[f"dvc.{kind[:-1]}.{item['path']}"] = str(digest)
    return tags


class Tracker:
    """What stages log: params, step metrics, artifacts and tags. This base class drops everything."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Logs parameters (values stringified, long ones truncated by the backend)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Logs scalar metrics at an optional step."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Logs a file or a whole folder."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Sets run tags."""


NullTracker = Tracker


class MlflowTracker(Tracker):
    """A Tracker writing to one MLflow run through `MlflowClient` (no global fluent state, thread-safe)."""

    def __init__(self, client: Any, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path or path.name)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            if value is not None:
                self.client.set_tag(self.run_id, str(key), str(value))


def mlflow_client(root: Path | None = None) -> Any:
    """An MlflowClient on the configured tracking URI."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(root))


def ensure_experiment(client: Any, name: str, root: Path | None = None) -> str:
    """The experiment's id, created on first use (artifacts beside the SQLite file when no server is configured)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if "MLFLOW_TRACKING_URI" not in os.environ:
        location = ((root or Path.cwd()).resolve() / "mlartifacts").as_uri()
    # the model-training layout of the MLflow UI (not its GenAI one)
    tags = {"mlflow.experimentKind": "custom_model_development"}
    try:
        return client.create_experiment(name, artifact_location=location, tags=tags)
    except Exception:  # another process created it between our two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextmanager
def start_run(
    name: str,
    experiment: str,
    *,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    root: Path | None = None,
) -> Iterator[Tracker]:
    """Opens an MLflow run (nested under `parent_run_id` when given) and closes it FINISHED or FAILED."""
    if not tracking_enabled():
        yield Tracker()
        return
    client = mlflow_client(root)
    experiment_id = ensure_experiment(client, experiment, root)
    run_tags = {"mlflow.runName": name}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=name, tags=run_tags)
    tracker = MlflowTracker(client, run.info.run_id)
    tracker.set_tags({"git_commit": git_commit(root), **(tags or {})})
    try:
        yield tracker
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")


def register_model(
    *,
    name: str,
    run_id: str,
    artifact_path: str,
    tags: Mapping[str, Any],
    description: str,
    alias: str,
    move_alias: bool,
    root: Path | None = None,
) -> dict[str, Any]:
    """Registers `runs:/<run_id>/<artifact_path>` as a new version of `name`; moves `alias` to it if `move_alias`.

    Returns:
        {"name", "version", "source", "alias", "alias_moved", "previous_alias_version"}.
    """
    from mlflow.exceptions import MlflowException

    client = mlflow_client(root)
    try:
        client.create_registered_model(name, description="DINOv2 backbones from the pipeline's report stage")
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    previous = None
    with contextlib.suppress(MlflowException):  # no version holds the alias yet
        previous = client.get_model_version_by_alias(name, alias).version
    source = f"runs:/{run_id}/{artifact_path}"
    version = client.create_model_version(
        name, source=source, run_id=run_id, tags={k: str(v) for k, v in tags.items()}, description=description
    )
    if move_alias:
        client.set_registered_model_alias(name, alias, version.version)
    return {
        "name": name,
        "version": int(version.version),
        "source": source,
        "alias": alias,
        "alias_moved": bool(move_alias),
        "previous_alias_version": int(previous) if previous is not None else None,
    }
