"""The CLI and dvc.yaml agree: same stages, same paths, and each stage lists exactly the params it reads."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.cli import STAGES, build_parser
from components.stages.specs import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _cmd_flags(cmd: str) -> dict[str, str]:
    words = shlex.split(cmd)
    assert words[:3] == ["python", "-m", "components"], cmd
    flags = {}
    for flag, value in zip(words[4::2], words[5::2], strict=True):
        flags[flag.removeprefix("--")] = value
    return flags


def _paths(entries: list) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}


def test_same_stages_in_the_same_order():
    assert list(DVC) == list(STAGES)


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_params_match_what_the_stage_reads(stage):
    assert tuple(DVC[stage]["params"]) == STAGES[stage].sections


@pytest.mark.parametrize("stage", list(STAGES))
def test_command_paths_are_the_cli_defaults_and_dvc_deps_outs(stage):
    spec, entry = STAGES[stage], DVC[stage]
    flags = _cmd_flags(entry["cmd"])
    assert shlex.split(entry["cmd"])[3] == stage
    declared = {arg.name: arg.default for arg in spec.paths}
    assert set(flags) == set(declared), f"{stage}: command flags {set(flags)} vs CLI paths {set(declared)}"
    tracked = _paths(entry.get("deps")) | _paths(entry.get("outs")) | _paths(entry.get("metrics"))
    tracked |= _paths(entry.get("plots"))
    for name, value in flags.items():
        if declared[name] is not None:
            assert value == declared[name], f"{stage} --{name}: dvc.yaml {value} vs CLI default {declared[name]}"
        assert value in tracked, f"{stage} --{name} {value} is neither a dep nor an out in dvc.yaml"


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_has_help(stage):
    proc = subprocess.run(
        [sys.executable, "-m", "components", stage, "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert "--params" in proc.stdout
    for arg in STAGES[stage].paths:
        assert f"--{arg.name}" in proc.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_commands_are_not_dvc_stages_and_have_help(command):
    """`benchmark` and the like read data outside the repository: dispatched like a stage, absent from dvc.yaml."""
    assert command not in DVC and command not in STAGES
    proc = subprocess.run(
        [sys.executable, "-m", "components", command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    for flag in ("--params", "--recipe", *(f"--{arg.name.replace('_', '-')}" for arg in COMMANDS[command].paths)):
        assert flag in proc.stdout


def test_unknown_stage_is_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train_everything"])


def test_a_stage_reads_only_the_sections_it_declares(tmp_path, monkeypatch):
    from components import cli
    from components.config import ConfigError, load_config, restrict_sections
    from components.stages.specs import StageSpec

    cfg = restrict_sections(load_config(ROOT / "params.yaml"), ("seed", "embed"), reader="stage embed")
    assert cfg.embed.arch and cfg.seed == 0 and cfg.tracking.experiment  # declared (tracking: every stage may)
    with pytest.raises(ConfigError, match="stage embed reads params section 'curate', which it does not declare"):
        _ = cfg.curate
    assert cfg.model_dump(mode="json")["curate"]  # the saved resolved config stays whole

    monkeypatch.setitem(cli.STAGES, "synth", StageSpec("x", f"{__name__}:reads_an_undeclared_section", ("seed",), ()))
    assert cli.main(["synth", "--params", str(ROOT / "params.yaml")]) == cli.EXIT_CONFIG_ERROR
    assert "model" not in READ


READ: dict[str, str] = {}


def reads_an_undeclared_section(cfg, **_):
    """A stage whose code reads a section (`model`) its spec does not list."""
    READ["model"] = cfg.model.arch


def fills_the_disk(cfg, **_):
    from components.storage import OutOfSpaceError

    raise OutOfSpaceError("checkpoints/step_4", "needs 2.0 GiB, 0.1 GiB free; the last checkpoint is intact")


def test_each_named_failure_has_its_own_exit_code(monkeypatch, capsys):
    from components import cli
    from components.stages.specs import StageSpec

    assert len(set(cli.EXIT_REASONS)) == len(cli.EXIT_REASONS) == 4 and 0 not in cli.EXIT_REASONS
    monkeypatch.setitem(cli.STAGES, "synth", StageSpec("x", f"{__name__}:fills_the_disk", ("seed",), ()))
    assert cli.main(["synth", "--params", str(ROOT / "params.yaml")]) == cli.EXIT_FAULT
    assert "checkpoints/step_4: needs 2.0 GiB" in capsys.readouterr().err
