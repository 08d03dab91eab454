"""`dvc exp run -S` on the tiny project the stack's pipeline run left: DVC re-runs only what reads the changed key, and
`dvc exp show` lists the experiment beside the workspace with its params and metrics.

    .venv/bin/python -m pytest tests/services/test_dvc_experiments.py
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
import yaml

from tests.services.stack_utils import PipelineRun, client_env, git_env, run

pytestmark = [pytest.mark.services, pytest.mark.timeout(900)]

EXPERIMENT = "epochs-2"


def _experiment(shown: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """An experiment's data in `dvc exp show --json`."""
    for commit in shown:
        for experiment in commit.get("experiments") or []:
            for rev in experiment["revs"]:
                if rev.get("name") == name:
                    return rev["data"]
    raise AssertionError(f"experiment {name} is not listed by `dvc exp show`")


def test_dvc_exp_run_reruns_only_what_reads_the_key_and_exp_show_lists_it(
    stack: Any, pipeline_run: PipelineRun
) -> None:
    project = pipeline_run.project
    git_author = {k: v for k, v in git_env().items() if k.startswith("GIT_")}  # experiments are git commits
    env = {**client_env(stack), **git_author, "DINOV2_TRACKING": "off"}
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-q", "--allow-empty", "-m", "pipeline run"], project, env)  # dvc.lock: the baseline

    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    readers = [name for name, stage in stages.items() if "optim" in stage.get("params", [])]
    assert readers == ["pretrain", "pretrain_highres", "distill"]  # the stages that declare the `optim` section
    upstream = ["synth", "prepare", "embed", "curate"]
    # --temp: the experiment runs in a copy of the committed workspace, whose outputs come from DVC's cache; the
    # target keeps it to the first stage that reads the key (the others re-run the same way, only slower).
    out = run([*dvc, "exp", "run", "--temp", "-n", EXPERIMENT, "-S", "optim.epochs=2", "pretrain"], project, env)
    assert "Running stage 'pretrain'" in out, out[-3000:]
    for name in upstream:
        assert f"Running stage '{name}'" not in out and f"Stage '{name}' didn't change" in out, name

    shown = json.loads(run([*dvc, "exp", "show", "--json"], project, env))
    workspace = next(c["data"] for c in shown if c["rev"] == "workspace")
    experiment = _experiment(shown, EXPERIMENT)
    assert workspace["params"]["params.yaml"]["data"]["optim"]["epochs"] == 1
    assert experiment["params"]["params.yaml"]["data"]["optim"]["epochs"] == 2
    before = workspace["metrics"]["metrics/pretrain.json"]["data"]
    after = experiment["metrics"]["metrics/pretrain.json"]["data"]
    assert after["iterations"] == 2 * before["iterations"]  # twice the epochs of the same length
    assert after["headline"]["name"] == "loss" and after["headline"]["value"] != before["headline"]["value"]
    # Outputs: the upstream stages' are the baseline's (restored from the cache), pretrain's are new.
    for path in ("data/prepared", "data/embeddings", "data/curated"):
        assert experiment["outs"][path]["hash"] == workspace["outs"][path]["hash"], path
    assert experiment["outs"]["models/pretrain"]["hash"] != workspace["outs"]["models/pretrain"]["hash"]
