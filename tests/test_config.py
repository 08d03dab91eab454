"""The config tree: params.yaml loads, bad keys and values fail naming the key, and everything is documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from components.config import (
    ConfigError,
    PipelineConfig,
    apply_overrides,
    load_config,
    parse_override,
    read_params,
    scaled_lr,
    validate_config,
)

ROOT = Path(__file__).resolve().parents[1]


def _raw() -> dict:
    return read_params(ROOT / "params.yaml")


def test_params_yaml_loads_and_is_complete():
    cfg = load_config(ROOT / "params.yaml")
    assert isinstance(cfg, PipelineConfig)
    # every section of the tree is spelled out in params.yaml, so a user sees every key
    assert set(_raw()) == set(PipelineConfig.model_fields)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"optim.bse_lr": 0.1}, "optim.bse_lr: unknown key (value 0.1)"),
        ({"nonsense": 1}, "nonsense: unknown key"),
        ({"train.batch_size_per_gpu": "many"}, "train.batch_size_per_gpu = 'many'"),
        ({"optim.base_lr": -0.5}, "optim.base_lr = -0.5: Input should be greater than 0"),
        ({"model.arch": "vit_huge"}, "model.arch = 'vit_huge'"),
        ({"teacher.centering": "mean"}, "teacher.centering = 'mean'"),
        ({"ibot.mask_ratio_min_max": [0.6, 0.2]}, "ibot.mask_ratio_min_max"),
        ({"crops.global_crops_size": 57}, "crops.global_crops_size = 57 is not a multiple of model.patch_size = 14"),
        ({"optim.warmup_epochs": 99}, "warmup_epochs (99) exceeds epochs"),
        ({"crops.color_jitter": [0.4, 0.4, 0.2, 0.6]}, "crops.color_jitter = [0.4, 0.4, 0.2, 0.6]"),
        ({"crops.blur_sigma": [2.0, 0.1]}, "crops.blur_sigma"),
        ({"crops.grayscale_prob": 1.5}, "crops.grayscale_prob = 1.5"),
    ],
)
def test_bad_values_name_the_key_and_value(override, needle):
    with pytest.raises(ConfigError) as err:
        validate_config(apply_overrides(_raw(), override))
    assert needle in str(err.value)


def test_all_problems_reported_at_once():
    raw = apply_overrides(_raw(), {"optim.base_lr": 0, "train.zero_stage": 5, "embed.bogus": True})
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    text = str(err.value)
    assert "3 problem(s)" in text
    for key in ("optim.base_lr", "train.zero_stage", "embed.bogus"):
        assert key in text


def test_config_is_frozen():
    cfg = load_config(ROOT / "params.yaml")
    with pytest.raises(Exception, match="frozen"):
        cfg.optim.base_lr = 1.0  # type: ignore[misc]


def test_overrides_parse_yaml_values():
    assert parse_override("optim.epochs=7") == ("optim.epochs", 7)
    assert parse_override("distill.students=[vit_test, vit_tiny]") == ("distill.students", ["vit_test", "vit_tiny"])
    assert parse_override("model.pretrained_weights=null") == ("model.pretrained_weights", None)
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("optim.epochs")


def test_scaled_lr_follows_dinov2_rules():
    assert scaled_lr(0.004, 1024, "sqrt_wrt_1024") == pytest.approx(0.004)
    assert scaled_lr(0.004, 256, "sqrt_wrt_1024") == pytest.approx(0.002)
    assert scaled_lr(0.004, 2048, "linear_wrt_1024") == pytest.approx(0.008)
    assert scaled_lr(0.004, 2048, "none") == pytest.approx(0.004)


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def test_every_config_field_has_a_docstring():
    missing = [key for key, field in _fields(PipelineConfig) if not field.description]
    assert not missing, f"config fields without a docstring: {missing}"


def test_every_params_key_has_a_comment():
    uncommented = []
    for line in (ROOT / "params.yaml").read_text().splitlines():
        # a section header is documented by its own keys' comments, but a leaf must carry one
        is_leaf = re.match(r"^\s*[A-Za-z_][\w]*:", line) and not line.rstrip().endswith(":")
        if is_leaf and "#" not in line:
            uncommented.append(line.strip())
    assert not uncommented, f"params.yaml keys without a comment: {uncommented}"


def test_cli_rejects_bad_params_before_any_work(tmp_path):
    raw = apply_overrides(_raw(), {"prepare.min_side": -3})
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    out = tmp_path / "prepared"
    proc = subprocess.run(
        [sys.executable, "-m", "components", "prepare", "--params", str(bad), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "prepare.min_side = -3" in proc.stderr
    assert not out.exists()
    assert not (tmp_path / "mlflow.db").exists()
