"""A pickled checkpoint with a malicious payload is refused by every loader of the project (no servers needed).

    .venv/bin/python -m pytest tests/services/test_security.py

torch checkpoints are pickles: loading one with `weights_only=False` runs whatever its `__reduce__` says. Every loader
must use `weights_only=True` (or safetensors), so the payload below, which creates a file when unpickled, is refused
and the file never appears. Serving S3, MLflow and Prefect on 127.0.0.1 and keeping credentials out of params, MLflow
and logs are covered in test_stack.py and test_pipeline_services.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch


class _CreatesAFile:
    """Unpickling this calls `open(marker, "w")`: harmless here, but it could as well be `os.system`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A file that looks like an official checkpoint: a state dict with one poisoned value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cls_token": torch.zeros(1, 1, 64), "pos_embed": _CreatesAFile(marker)}, path)
    return path


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Control: an unsafe load of the same file does run the payload (in a child process), so the tests below mean
    something."""
    marker = tmp_path / "pwned-control"
    ckpt = _malicious_checkpoint(tmp_path / "evil.pth", marker)
    code = f"import torch; torch.load({str(ckpt)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert marker.exists()


def _read_state_dict(path: Path) -> Any:
    from components.model.adapter import read_state_dict

    return read_state_dict(path)


def _load_official_weights(path: Path) -> Any:
    from components.model import build_backbone, load_official_weights

    return load_official_weights(build_backbone("vit_test"), path)


def _training_checkpoint(path: Path) -> Any:
    from components.training.checkpoint import STATE_FILE, CheckpointManager

    folder = path.parent / "step_000010"
    folder.mkdir()
    path.rename(folder / STATE_FILE)
    return CheckpointManager.load(folder)


def _evaluation_model(path: Path) -> Any:
    from components.evaluation.models import ModelSpec, build_model

    return build_model(ModelSpec(name="evil", arch="vit_test", role="extra", weights=str(path)), seed=0)


LOADERS: dict[str, Callable[[Path], Any]] = {
    "components.model.adapter.read_state_dict": _read_state_dict,
    "components.model.load_official_weights": _load_official_weights,
    "components.training.checkpoint.CheckpointManager.load": _training_checkpoint,
    "components.evaluation.models.build_model": _evaluation_model,
}


@pytest.mark.parametrize("loader", LOADERS, ids=list(LOADERS))
def test_a_malicious_pickle_is_refused(loader: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = _malicious_checkpoint(tmp_path / "ckpt" / "evil.pth", marker)
    with pytest.raises(Exception, match=r"(?i)weights.only|unsupported global|unpickl"):
        LOADERS[loader](ckpt)
    assert not marker.exists(), f"{loader} ran the checkpoint's payload"
