"""A throw-away copy of the project with a tiny config, for tests that run the pipeline end to end.

`make_workspace(tmp_path)` copies dvc.yaml, params.yaml and the code the stages depend on into a fresh git + DVC
repository and writes TINY_OVERRIDES into its params.yaml, so the whole pipeline runs in a minute or two on a CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from components.config import apply_overrides, read_params, validate_config

ROOT = Path(__file__).resolve().parents[1]

TINY_OVERRIDES: dict[str, Any] = {
    "synthetic.num_classes": 3,
    "synthetic.image_size": 64,
    "synthetic.pool_size": 48,
    "synthetic.leak_per_class": 1,
    "synthetic.seed_per_class": 2,
    "synthetic.eval_train_per_class": 6,
    "synthetic.eval_val_per_class": 2,
    "synthetic.eval_test_per_class": 3,
    "synthetic.num_places": 3,
    "synthetic.views_per_place": 2,
    "prepare.num_workers": 0,
    "embed.arch": "vit_test",
    "embed.image_size": 56,
    "embed.batch_size": 32,
    "embed.num_workers": 0,
    "curate.calibration_images": 48,
    "model.arch": "vit_test",
    "dino.head_n_prototypes": 64,
    "dino.head_hidden_dim": 32,
    "dino.head_bottleneck_dim": 16,
    "ibot.head_n_prototypes": 64,
    "ibot.head_hidden_dim": 32,
    "ibot.head_bottleneck_dim": 16,
    "optim.epochs": 1,
    "optim.epoch_length": 2,
    "optim.warmup_epochs": 0,
    "optim.freeze_last_layer_epochs": 0,
    "teacher.warmup_teacher_temp_epochs": 0,
    "crops.local_crops_number": 2,
    "train.batch_size_per_gpu": 8,
    "train.num_workers": 0,
    "train.checkpoint_period": 2,
    "train.log_period": 1,
    "highres.iterations": 2,
    "highres.batch_size_per_gpu": 8,
    "highres.warmup_iterations": 0,
    "highres.global_crops_size": 56,
    "distill.epochs": 1,
}


def tiny_params(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The project's params.yaml with TINY_OVERRIDES (and `extra`) applied, validated."""
    raw = apply_overrides(read_params(ROOT / "params.yaml"), {**TINY_OVERRIDES, **(extra or {})})
    validate_config(raw, source="tiny params")
    return raw


def stage_env(root: Path) -> dict[str, str]:
    """An environment whose `python` is this interpreter (dvc.yaml commands say `python -m components`)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def make_workspace(path: Path, extra: dict[str, Any] | None = None) -> Path:
    """A fresh git + DVC repository at `path` holding the pipeline and a tiny params.yaml."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "prefect.yaml", ".dvcignore"):
        shutil.copy2(ROOT / name, path / name)
    shutil.copytree(ROOT / "components", path / "components", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "flows", path / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "infra" / "deepspeed", path / "infra" / "deepspeed")
    (path / "params.yaml").write_text(yaml.safe_dump(tiny_params(extra), sort_keys=False))
    (path / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n/reports/pipeline_summary.json\n")
    env = stage_env(path)
    env.update(GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.invalid")
    env.update(GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.invalid")
    for cmd in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "commit", "-q", "-m", "workspace"],
    ):
        subprocess.run(cmd, cwd=path, env=env, check=True, timeout=120)
    return path
