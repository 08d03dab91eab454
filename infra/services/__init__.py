"""The local service stack without Docker: SeaweedFS S3, MLflow, a Prefect server and a process worker.

Start and stop it:
    make services          (python -m infra.services start)
    make services-stop     (python -m infra.services stop)
    python -m infra.services status

Tests and benchmarks start the same servers through this package (`Stack`, `SeaweedFS`), on free ports and in
temporary state folders, so there is one implementation of starting and stopping each server.
"""

from infra.services.process import ServiceError, ServiceProcess
from infra.services.stack import (
    BUCKETS,
    DATA_BUCKET,
    DVC_BUCKET,
    MLFLOW_BUCKET,
    WORK_POOL,
    MLflowServer,
    Ports,
    PrefectServer,
    PrefectWorker,
    S3Credentials,
    SeaweedFS,
    Stack,
    StackConfig,
    free_port,
)

__all__ = [
    "BUCKETS",
    "DATA_BUCKET",
    "DVC_BUCKET",
    "MLFLOW_BUCKET",
    "WORK_POOL",
    "MLflowServer",
    "Ports",
    "PrefectServer",
    "PrefectWorker",
    "S3Credentials",
    "SeaweedFS",
    "ServiceError",
    "ServiceProcess",
    "Stack",
    "StackConfig",
    "free_port",
]
