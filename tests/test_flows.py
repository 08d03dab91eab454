"""The Prefect flow over the DVC pipeline, under Prefect's test harness, on a tiny copy of the project: a failing
gate stops every downstream stage and is not retried; bad params fail before any stage starts; which failures the
flow retries.

A deployment run started through the Prefect API (the UI's Run button), served by a real worker, with its MLflow
runs, its summary and a second run that DVC skips: tests/services/test_pipeline_services.py.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from components.config import ConfigError
from tests.pipeline_utils import make_workspace

pytestmark = pytest.mark.timeout(900)

EXPECTED_STAGES = ["synth", "prepare", "embed", "curate"]


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_expected_stages_are_dvc_order():
    order = list(yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"])
    assert order[: len(EXPECTED_STAGES)] == EXPECTED_STAGES


def test_bad_override_fails_before_any_stage(prefect_api, tmp_path):
    from flows.pipeline import pipeline

    ws = make_workspace(tmp_path / "ws")
    params_before = (ws / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=r"optim.base_lr = -1"):
        pipeline(workdir=str(ws), overrides={"optim.base_lr": -1})
    assert not (ws / "data").exists()
    assert (ws / "params.yaml").read_text() == params_before


def test_failing_gate_stops_downstream_stages(prefect_api, tmp_path):
    """A corrupt embedding checkpoint (NaN weights) gives NaN embeddings: the embed gate fails, nothing after runs."""
    from components.model import build_backbone, save_official_weights
    from flows.pipeline import pipeline

    model = build_backbone("vit_test")
    with torch.no_grad():
        model.norm.weight.fill_(float("nan"))
    weights = save_official_weights(model, tmp_path / "corrupt.pth")
    ws = make_workspace(tmp_path / "ws", {"embed.weights": str(weights)})
    with pytest.raises(Exception, match=r"stage embed failed \(exit code 3: a quality gate failed\)"):
        pipeline(workdir=str(ws))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    embed_runs = client.search_runs(experiments, filter_string="tags.stage = 'embed'")
    assert len(embed_runs) == 1, "a failed gate fails the same way again: the stage is not retried"
    assert (ws / "data" / "prepared" / "manifest.parquet").exists()  # upstream kept
    assert not (ws / "data" / "curated").exists()
    assert not (ws / "models").exists()
    gate_reports = list((ws / "data").rglob("embeddings*.json"))
    assert gate_reports, "the failed gate's report was not saved"
    # The failed run is summarised too: what ran, the stage that failed, what never ran.
    summary = json.loads((ws / "reports" / "pipeline_summary.json").read_text())
    order = list(yaml.safe_load((ws / "dvc.yaml").read_text())["stages"])
    after = order[order.index("embed") + 1 :]
    assert {s: v["status"] for s, v in summary["stages"].items()} == {
        "synth": "completed", "prepare": "completed", "embed": "failed", **dict.fromkeys(after, "not run")
    }  # fmt: skip


class _FailedState:
    def __init__(self, err: BaseException) -> None:
        self.err = err

    def result(self) -> None:
        raise self.err


def test_named_exit_codes_are_not_retried_other_failures_are():
    from dvc.exceptions import ReproductionError
    from dvc.stage.exceptions import StageCmdFailedError

    from flows.pipeline import StageFailedError, _exit_code, _retry_unless_named

    def dvc_error(status: int) -> ReproductionError:
        try:
            try:
                raise StageCmdFailedError("python -m components embed", status)
            except StageCmdFailedError as cause:
                raise ReproductionError("failed to reproduce 'embed'") from cause
        except ReproductionError as err:
            return err

    assert _exit_code(dvc_error(3)) == 3 and _exit_code(RuntimeError("no exit")) is None
    for code, retried in ((1, True), (2, False), (3, False), (4, False), (5, False), (-9, True)):
        failed = _FailedState(StageFailedError("embed", code))
        assert _retry_unless_named(None, None, failed) is retried, code
    assert _retry_unless_named(None, None, _FailedState(ConnectionError("S3 went away"))) is True
    assert str(pickle.loads(pickle.dumps(StageFailedError("embed", 3)))) == (
        "stage embed failed (exit code 3: a quality gate failed)"
    )
