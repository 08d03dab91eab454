"""The registered backbone as an MLflow user takes it: `mlflow.pyfunc.load_model("models:/dinov2-backbone@champion")`
in Python and `mlflow models serve` over HTTP, both against the stack's MLflow server (artifacts in S3).

    .venv/bin/python -m pytest tests/services/test_registry_serving.py
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from infra.services import free_port
from tests.services.stack_utils import PipelineRun, client_env

pytestmark = [pytest.mark.services, pytest.mark.timeout(900)]

REGISTERED = "dinov2-backbone"
CHAMPION = f"models:/{REGISTERED}@champion"
SERVE_TIMEOUT_S = 180


def _images(project: Path, count: int = 3) -> list[np.ndarray]:
    """A few evaluation images of the project's synthetic world, of two sizes (a ragged batch)."""
    from PIL import Image

    paths = sorted(p for p in (project / "data/synthetic/eval/classification/val").rglob("*") if p.is_file())[:count]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    images[-1] = np.ascontiguousarray(images[-1][: images[-1].shape[0] // 2])  # a non-square one
    return images


def _reference(export: Path, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """CLS and mean-patch features computed with components.model on the preset's evaluation preprocessing."""
    from PIL import Image

    from components.exports import read_export
    from components.model import eval_transform, get_preset

    read = read_export(export)
    preset = get_preset(read.arch)
    transform = eval_transform(preset.eval_crop, preset.eval_resize, preset.mean, preset.std)
    backbone = read.build_backbone().eval()
    with torch.inference_mode():
        out = backbone.forward_features(torch.stack([transform(Image.fromarray(a)) for a in images]))
    return {"cls": out["x_norm_clstoken"].numpy(), "patch_mean": out["x_norm_patchtokens"].mean(dim=1).numpy()}


def _serve(stack: Any, workdir: Path) -> tuple[subprocess.Popen, int]:
    """`mlflow models serve` on the champion, in this environment, from a folder outside the project, without the
    project on PYTHONPATH: the model must carry its own code."""
    port = free_port()
    env = {k: v for k, v in client_env(stack).items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION, "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    log = open(workdir / "serve.log", "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return process, port


def _post(port: int, payload: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _wait_ready(process: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer /ping in {SERVE_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def test_champion_loads_and_serves_the_features_of_components_model(
    stack: Any, pipeline_run: PipelineRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from components.serving import encode_png

    server, port = _serve(stack, tmp_path)  # starts while the checks below run in this process
    try:
        client = MlflowClient(tracking_uri=stack.mlflow.url)
        version = client.get_model_version_by_alias(REGISTERED, "champion")
        assert version.source.startswith("models:/m-")  # a logged model of the report run, not a folder of files
        model = client.get_logged_model(version.source.removeprefix("models:/"))
        assert client.get_run(model.source_run_id).data.tags["stage"] == "report"
        files = {a.path for a in client.list_logged_model_artifacts(model.model_id, "artifacts/backbone")}
        assert {"artifacts/backbone/backbone.pth", "artifacts/backbone/backbone.safetensors"} <= files

        images = _images(pipeline_run.project)
        expected = _reference(pipeline_run.project / model.tags["export"], images)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow.url)
        loaded = mlflow.pyfunc.load_model(CHAMPION)
        assert loaded.metadata.get_input_schema().input_names() == ["image"]
        assert loaded.metadata.saved_input_example_info is not None  # and its serving request example
        assert loaded.model_config["image_size"] == 224  # the preset's evaluation crop
        # A batch of encoded bytes, and a batch of arrays: the same features as components.model computes.
        for batch in ([encode_png(a) for a in images], images):
            out = loaded.predict({"image": batch})
            for key in ("cls", "patch_mean"):
                np.testing.assert_allclose(out[key], expected[key], rtol=1e-5, atol=1e-5)

        _wait_ready(server, port, tmp_path / "serve.log")
        b64 = [base64.b64encode(encode_png(a)).decode() for a in images]
        answer = _post(port, {"dataframe_split": {"columns": ["image"], "data": [[b] for b in b64]}})["predictions"]
        for key in ("cls", "patch_mean"):
            np.testing.assert_allclose(np.asarray(answer[key]), expected[key], rtol=1e-4, atol=1e-4)
        local = Path(mlflow.artifacts.download_artifacts(CHAMPION, dst_path=str(tmp_path / "champion")))
        answer = _post(port, json.loads((local / "serving_input_example.json").read_text()))["predictions"]
        assert np.asarray(answer["cls"]).shape == (2, expected["cls"].shape[1])  # the logged example is served too
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
