"""The tracking seam: MLflow runs behind a small interface, with a no-op twin.

One parent run per pipeline run (opened by the Prefect flow) and one nested run per stage. A stage process finds its
parent through the `DINOV2_PARENT_RUN_ID` environment variable, which the flow sets for the `dvc repro` it starts; a
stage started on its own (CLI or plain `dvc repro`) opens a top-level run. Only rank 0 of a distributed stage logs.

Tracking URI: `MLFLOW_TRACKING_URI` when set, else a SQLite file `mlflow.db` in the working directory, with artifacts
under `mlartifacts/`. `DINOV2_TRACKING=off` turns tracking off (a `NullTracker`).

Tracking never makes a stage wait: `start_run` hands out a `components.tracking_queue.QueuedTracker`, which returns
at once and delivers from a background thread, in order, spilling to a file while the server is away (that module's
docstring says how, and how to replay what a run could not deliver). Only opening a run waits for the server.

Besides params, metrics, artifacts and tags, a run records the datasets it read (`log_dataset`: MLflow dataset inputs
with their digest, source and row count) and the models it produced (`log_model`: MLflow pyfunc models, logged
models of the run), and registers a model version (`register_model`, moving an alias). Nothing else in the project
talks to MLflow's tracking server or registry.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from components.log import get_logger, is_main_process

PARENT_RUN_ENV = "DINOV2_PARENT_RUN_ID"
FLOW_RUN_ENV = "DINOV2_PREFECT_FLOW_RUN_ID"
TRACKING_SWITCH_ENV = "DINOV2_TRACKING"

log = get_logger(__name__)


@dataclass(frozen=True)
class DatasetRecord:
    """A dataset a run read, as MLflow shows it (`Tracker.log_dataset`)."""

    name: str
    """`curated`, `eval/classification`, ..."""
    source: str
    """Where it was read from: a local path or an s3:// URI."""
    digest: str
    """Its identity (changes whenever its content does)."""
    num_rows: int
    """Rows (images) in it."""
    context: str
    """What the run did with it: `training`, `evaluation`."""
    columns: Mapping[str, str] = field(default_factory=dict)
    """Its schema: column name -> MLflow type (`string`, `long`, `double`, `boolean`, `binary`)."""


@dataclass(frozen=True)
class PyfuncModel:
    """An MLflow pyfunc model built from code (`Tracker.log_model`; components/serving.py makes them)."""

    model_code: Path
    """The Python file that builds the model (it calls `mlflow.models.set_model`)."""
    artifacts: Mapping[str, str]
    """Artifact name -> local file or folder, copied into the model."""
    code_paths: Sequence[str]
    """Local packages copied into the model and put on `sys.path` when it loads."""
    signature: Any
    """Its `mlflow.models.ModelSignature`."""
    input_example: Any
    """An input its `predict` takes (saved with it, and as a serving request)."""
    model_config: Mapping[str, Any]
    """Settings handed to the model when it loads (`context.model_config`)."""
    pip_requirements: Sequence[str]
    """Its environment, pinned (nothing is inferred)."""


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

    def log_dataset(self, dataset: DatasetRecord) -> None:
        """Records a dataset the run read, as an MLflow dataset input (shown in the run's Datasets panel)."""

    def log_model(self, name: str, model: PyfuncModel, *, tags: Mapping[str, Any]) -> str | None:
        """Logs an MLflow pyfunc model (models from code) as a logged model of this run, tagged with `tags`.

        Returns:
            The model's URI, `models:/<model_id>`; None when tracking is off.
        """
        return None

    def url(self) -> str | None:
        """The run's page in the MLflow UI when the tracking URI is a server (http/https); None otherwise."""
        return None

    def register_model(
        self, name: str, model_uri: str, *, tags: Mapping[str, Any], description: str, alias: str, move_alias: bool
    ) -> dict[str, Any] | None:
        """Registers `model_uri` as a new version of the registered model `name`; moves `alias` to it if `move_alias`.

        Returns:
            {"name", "version", "source", "alias", "alias_moved", "previous_alias_version"}; None when tracking is off.
        """
        return None


NullTracker = Tracker


class MlflowTracker(Tracker):
    """A Tracker writing to one MLflow run through `MlflowClient` (no global fluent state, thread-safe; the model
    calls point MLflow's module-level API at the same tracking URI for their duration only)."""

    def __init__(self, client: Any, run_id: str, experiment_id: str | None = None):
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id

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

    def log_dataset(self, dataset: DatasetRecord) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        schema = [{"type": t, "name": c, "required": True} for c, t in dataset.columns.items()]
        entity = Dataset(
            name=dataset.name,
            digest=dataset.digest,
            source_type="s3" if dataset.source.startswith("s3://") else "local",
            source=json.dumps({"uri": dataset.source}),
            schema=json.dumps({"mlflow_colspec": schema}) if schema else None,
            profile=json.dumps({"num_rows": int(dataset.num_rows)}),
        )
        self.client.log_inputs(self.run_id, [DatasetInput(entity, [InputTag("mlflow.data.context", dataset.context)])])

    def log_model(self, name: str, model: PyfuncModel, *, tags: Mapping[str, Any]) -> str | None:
        import mlflow
        from mlflow.entities import LoggedModelOutput

        # The logged model is created here, in the run's experiment and linked to the run as its output; the pyfunc
        # is then saved into it (its files, the input example checked against the signature by a trial predict).
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        str_tags = {k: str(v) for k, v in tags.items()}
        logged = self.client.create_logged_model(experiment_id, name=name, source_run_id=self.run_id, tags=str_tags)
        self.client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step=0)])
        with _module_api_on(self.client.tracking_uri):
            mlflow.pyfunc.log_model(
                name=name, model_id=logged.model_id, python_model=str(model.model_code),
                artifacts=dict(model.artifacts), code_paths=list(model.code_paths), signature=model.signature,
                input_example=model.input_example, model_config=dict(model.model_config),
                pip_requirements=list(model.pip_requirements),
            )  # fmt: skip
        return f"models:/{logged.model_id}"

    def url(self) -> str | None:
        uri = str(self.client.tracking_uri)
        if not uri.startswith(("http://", "https://")):
            return None
        experiment_id = self.experiment_id or self.client.get_run(self.run_id).info.experiment_id
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{self.run_id}"

    def register_model(
        self, name: str, model_uri: str, *, tags: Mapping[str, Any], description: str, alias: str, move_alias: bool
    ) -> dict[str, Any] | None:
        import mlflow
        from mlflow.exceptions import MlflowException

        with suppress(MlflowException):  # registered by an earlier run
            self.client.create_registered_model(name, description="DINOv2 backbones from the pipeline's report stage")
        previous = None
        with suppress(MlflowException):  # no version holds the alias yet
            previous = self.client.get_model_version_by_alias(name, alias).version
        with _module_api_on(self.client.tracking_uri):  # links the version to the logged model, as MLflow's UI shows
            version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
        self.client.update_model_version(name, version.version, description=description)
        if move_alias:
            self.client.set_registered_model_alias(name, alias, version.version)
        return {
            "name": name,
            "version": int(version.version),
            "source": model_uri,
            "alias": alias,
            "alias_moved": bool(move_alias),
            "previous_alias_version": int(previous) if previous is not None else None,
        }


@contextmanager
def _module_api_on(uri: str) -> Iterator[None]:
    """Points MLflow's module-level API (`mlflow.pyfunc.log_model`, `mlflow.register_model`) at `uri` for a block.

    `set_tracking_uri` sets a module global and MLFLOW_TRACKING_URI; afterwards the global is cleared and the variable
    restored, so the process (and its children) resolve the URI as they did before.
    """
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # clears the global and the variable ...
        if previous is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous  # ... which had this value


def dataset_digest(uris: Sequence[str], hashes: Sequence[str]) -> str:
    """The identity of a list of images: each one's URI and content hash, in order (16 hex digits)."""
    digest = hashlib.sha256()
    for uri, sha in zip(uris, hashes, strict=True):
        digest.update(f"{uri}\t{sha}\n".encode())
    return digest.hexdigest()[:16]


def dataset_columns(frame: Any) -> dict[str, str]:
    """A DataFrame's columns as an MLflow dataset schema: name -> `boolean`, `long`, `double`, `binary` or `string`."""
    kinds = {"b": "boolean", "i": "long", "u": "long", "f": "double", "S": "binary"}
    return {str(c): kinds.get(frame[c].dtype.kind, "string") for c in frame.columns}


@contextmanager
def existing_run(run_id: str | None, root: Path | None = None) -> Iterator[Tracker]:
    """A queued Tracker on a run opened elsewhere (a stage's run, tagged by the flow once DVC has locked the stage);
    what the server cannot take before the block ends stays in a spill file (`components.tracking_queue`)."""
    if not run_id or not tracking_enabled():
        yield Tracker()
        return
    from components.tracking_queue import QueuedTracker, spool_dir

    tracker = QueuedTracker(MlflowTracker(mlflow_client(root), run_id), spool_path(spool_dir(root), "tags", run_id))
    try:
        yield tracker
    finally:
        tracker.close()


def spool_path(folder: Path, name: str, run_id: str) -> Path:
    """A run's spill file: `<folder>/<name>-<run id>.spool.jsonl`."""
    from components.tracking_queue import SPOOL_SUFFIX

    return Path(folder) / f"{name}-{run_id}{SPOOL_SUFFIX}"


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
    """Opens an MLflow run (nested under `parent_run_id` when given) and closes it FINISHED or FAILED.

    The run's records go through a `QueuedTracker`: its end (status and end time) is queued last, and the block ends
    without waiting for a server that is away (what is left stays in `.tracking/`, see `components.tracking_queue`).
    """
    if not tracking_enabled():
        yield Tracker()
        return
    from components.tracking_queue import QueuedTracker, spool_dir

    client = mlflow_client(root)
    experiment_id = ensure_experiment(client, experiment, root)
    run_tags = {"mlflow.runName": name}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=name, tags=run_tags)
    target = MlflowTracker(client, run.info.run_id, experiment_id)
    tracker = QueuedTracker(target, spool_path(spool_dir(root), name, run.info.run_id))
    tracker.set_tags({"git_commit": git_commit(root), **(tags or {})})
    try:
        yield tracker
    except BaseException:
        tracker.terminate("FAILED")
        tracker.close()
        raise
    tracker.terminate("FINISHED")
    tracker.close()
