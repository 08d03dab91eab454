"""The pipeline against real servers: a deployment run through the Prefect API, MLflow with S3 artifacts, DVC on S3.

    .venv/bin/python -m pytest tests/services/test_pipeline_services.py

All tests share one run of the tiny pipeline (`pipeline_run` in conftest.py), started through the Prefect server's API
as the UI's Run button does and executed by the stack's process worker.
"""

from __future__ import annotations

import filecmp
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.services import MLFLOW_BUCKET, WORK_POOL
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.services.stack_utils import RUN_PARAMETERS, PipelineRun, client_env, git_env, prefect_call, run

pytestmark = [pytest.mark.services, pytest.mark.timeout(900)]


def _mlflow_runs(stack: Any, pipeline_run: PipelineRun) -> tuple[Any, Any, list[Any]]:
    """(client, parent run, nested stage runs) of the pipeline run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow.url)
    flow_run_id = str(pipeline_run.flow_run.id)
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(
        experiments, filter_string=f"tags.prefect_flow_run_id = '{flow_run_id}' and tags.kind = 'pipeline'"
    )
    assert len(parents) == 1, f"expected one parent run tagged with flow run {flow_run_id}, got {len(parents)}"
    parent = parents[0]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    return client, parent, children


def _artifact_files(client: Any, run_id: str, path: str | None = None) -> list[str]:
    files: list[str] = []
    for item in client.list_artifacts(run_id, path):
        files.extend(_artifact_files(client, run_id, item.path) if item.is_dir else [item.path])
    return files


def test_deployment_run_is_picked_up_by_the_worker_with_a_task_run_per_stage(
    stack: Any, pipeline_run: PipelineRun
) -> None:
    flow_run = pipeline_run.flow_run
    assert flow_run.state.is_completed()
    assert flow_run.deployment_id == pipeline_run.deployment.id
    assert flow_run.work_pool_name == WORK_POOL
    assert flow_run.name.startswith(RUN_PARAMETERS.get("stage") or "pipeline"), flow_run.name  # says what runs
    assert f"{flow_run.id}" in stack.worker.process.log_tail(200_000)  # our worker submitted it

    names = [tr.name for tr in sorted(pipeline_run.task_runs, key=lambda tr: tr.expected_start_time)]
    assert sorted(names) == sorted(pipeline_run.stages)  # exactly one task run per stage
    assert all(tr.state.is_completed() for tr in pipeline_run.task_runs)

    async def pipeline_deployment_parameters(client: Any) -> dict[str, Any]:
        return (await client.read_deployment(pipeline_run.deployment.id)).parameter_openapi_schema

    schema = prefect_call(stack, pipeline_deployment_parameters)
    for name in ("stage", "arch", "epochs", "overrides"):  # the typed parameters the UI's form renders
        assert schema["properties"][name].get("description"), name


def test_pipeline_logs_to_the_mlflow_server_with_artifacts_in_s3(stack: Any, pipeline_run: PipelineRun) -> None:
    client, parent, children = _mlflow_runs(stack, pipeline_run)
    assert parent.info.status == "FINISHED"
    assert len(children) == len(pipeline_run.stages), [c.info.run_name for c in children]
    s3 = stack.s3.client()
    keys = [
        obj["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=MLFLOW_BUCKET)
        for obj in page.get("Contents", [])
    ]
    for child in children:
        assert child.info.status == "FINISHED", child.info.run_name
        assert child.data.metrics, f"stage run {child.info.run_name} logged no metric"
        assert child.data.params, f"stage run {child.info.run_name} logged no params"
        assert child.data.tags.get("git_commit"), f"stage run {child.info.run_name} has no git commit tag"
        assert any(k.startswith("dvc.out.") for k in child.data.tags), f"{child.info.run_name} has no DVC hash tags"
        files = _artifact_files(client, child.info.run_id)
        assert files, f"stage run {child.info.run_name} logged no artifact"
        # The artifact lives in the S3 bucket behind the server's artifact proxy ...
        on_s3 = [k for k in keys if f"/{child.info.run_id}/artifacts/{files[0]}" in k]
        assert len(on_s3) == 1, f"{files[0]} of {child.info.run_name} is not in s3://{MLFLOW_BUCKET}"
        # ... and a client reads back exactly those bytes through the server.
        local = Path(client.download_artifacts(child.info.run_id, files[0]))
        assert local.read_bytes() == s3.get_object(Bucket=MLFLOW_BUCKET, Key=on_s3[0])["Body"].read()


def _cached_outs(project: Path) -> dict[str, list[str]]:
    """Each stage's outputs that DVC caches (and so pushes), from dvc.yaml."""
    outs: dict[str, list[str]] = {}
    for name, stage in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].items():
        for out in stage.get("outs", []):
            path, opts = next(iter(out.items())) if isinstance(out, dict) else (out, {})
            if opts.get("cache", True):
                outs.setdefault(name, []).append(path)
    return outs


def _same_tree(a: Path, b: Path) -> bool:
    if a.is_file():
        return b.is_file() and filecmp.cmp(a, b, shallow=False)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def test_dvc_push_then_pull_into_a_fresh_clone_round_trips_every_output(
    stack: Any, pipeline_run: PipelineRun, tmp_path: Path
) -> None:
    project = pipeline_run.project
    env = client_env(stack)
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "add", "-A"], project, git_env())
    run(["git", "commit", "-q", "--allow-empty", "-m", "pipeline run"], project, git_env())
    run([*dvc, "push"], project, env)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path, git_env())
    outs = _cached_outs(clone)
    assert not any((clone / p).exists() for paths in outs.values() for p in paths)  # git holds none of them
    run([*dvc, "pull", *pipeline_run.stages], clone, env)

    checked = [p for stage, paths in outs.items() if stage in pipeline_run.stages for p in paths]
    assert checked, "no cached output to check"
    for path in checked:
        assert (clone / path).exists(), f"{path} was not pulled"
        assert _same_tree(project / path, clone / path), f"{path} differs after push and pull"
    status = run([*dvc, "status", "--cloud", *pipeline_run.stages], clone, env)
    assert "in sync" in status or "up to date" in status, status


def test_credentials_never_reach_params_mlflow_logs_or_reports(stack: Any, pipeline_run: PipelineRun) -> None:
    """The S3 keys reach the stages only through the environment: nothing the run wrote may contain them."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    secrets = {"the secret key": S3_SECRET_KEY, "the access key": S3_ACCESS_KEY}
    project = pipeline_run.project
    leaks: list[str] = []

    def check(where: str, text: str) -> None:
        leaks.extend(f"{where} contains {name}" for name, value in secrets.items() if value in text)

    # Files: params, DVC's config and lock, reports, metrics, every log of the stack and of the run.
    candidates = [project / "params.yaml", project / "dvc.lock", project / ".dvc" / "config"]
    for folder in (project / "reports", project / "metrics", stack.state_dir):
        candidates += [p for p in folder.rglob("*") if p.is_file()]
    candidates += [p for p in project.rglob("*.log")] + [p for p in project.rglob("*.json") if ".dvc" not in p.parts]
    for path in candidates:
        if path.name in ("env", "s3-credentials.json", "s3-identities.json") or path.stat().st_size > 20_000_000:
            continue  # the stack's own 0600 credential files, and large binaries
        check(str(path), path.read_text(errors="replace"))

    # MLflow: params, tags and artifacts of every run.
    client, parent, children = _mlflow_runs(stack, pipeline_run)
    for mlrun in [parent, *children]:
        check(f"MLflow params of {mlrun.info.run_name}", repr(mlrun.data.params))
        check(f"MLflow tags of {mlrun.info.run_name}", repr(mlrun.data.tags))
        for artifact in _artifact_files(client, mlrun.info.run_id):
            local = Path(client.download_artifacts(mlrun.info.run_id, artifact))
            if local.stat().st_size < 20_000_000:
                check(f"MLflow artifact {artifact} of {mlrun.info.run_name}", local.read_text(errors="replace"))

    # Prefect: the flow run's parameters and every log line it sent to the server.
    async def logs_and_parameters(client: Any) -> tuple[list[Any], dict[str, Any]]:
        flow_run_id = pipeline_run.flow_run.id
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        return logs, (await client.read_flow_run(flow_run_id)).parameters

    logs, parameters = prefect_call(stack, logs_and_parameters)
    assert logs, "the flow run sent no logs to the Prefect server"
    check("Prefect flow-run logs", "\n".join(entry.message for entry in logs))
    check("Prefect flow-run parameters", repr(parameters))
    assert not leaks, "\n".join(leaks)


def test_every_stage_has_a_deployment_and_gpu_stages_run_one_at_a_time(stack: Any, project: Any) -> None:
    """prefect.yaml, as registered: the pipeline and one deployment per stage on the process pool, with a
    description; GPU stages limited to one run at a time."""

    async def deployments(client: Any) -> list[Any]:
        return await client.read_deployments()

    registered = {d.name: d for d in prefect_call(stack, deployments)}
    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    assert {"pipeline", *stages} <= set(registered), sorted(registered)
    for name, deployment in registered.items():
        assert deployment.work_pool_name == WORK_POOL, name
        assert deployment.description, name
        assert deployment.parameter_openapi_schema["properties"], name
    for name in ("pretrain", "distill"):
        limit = registered[name].global_concurrency_limit
        assert limit is not None and limit.limit == 1, (name, limit)


# --------------------------------------------------------------------------------------------------------------------
# Lineage, Prefect artifacts, pipeline runs side by side
# --------------------------------------------------------------------------------------------------------------------


def test_stage_runs_record_the_datasets_they_read(stack: Any, pipeline_run: PipelineRun) -> None:
    """The curated manifest on the training runs, each evaluation set on the evaluate run: MLflow datasets with the
    digest, source and row count."""
    import pandas as pd

    from components.training.data import manifest_digest

    client, _, children = _mlflow_runs(stack, pipeline_run)
    runs = {c.data.tags["stage"]: client.get_run(c.info.run_id) for c in children}
    project = pipeline_run.project
    curated_rows = len(pd.read_parquet(project / "data/curated/manifest.parquet"))
    for stage in ("pretrain", "pretrain_highres", "distill"):
        (curated,) = [i for i in runs[stage].inputs.dataset_inputs if i.dataset.name == "curated"]
        assert curated.dataset.digest == manifest_digest(str(project / "data/curated")), stage  # the training set's
        assert json.loads(curated.dataset.source) == {"uri": "data/curated/manifest.parquet"}
        assert json.loads(curated.dataset.profile)["num_rows"] == curated_rows
        assert "uri" in [c["name"] for c in json.loads(curated.dataset.schema)["mlflow_colspec"]]
        assert {t.key: t.value for t in curated.tags}["mlflow.data.context"] == "training"
    prepared = pd.read_parquet(project / "data/prepared/manifest.parquet")
    eval_rows = prepared[prepared["source"].str.startswith("eval/")]["source"].value_counts().to_dict()
    inputs = {i.dataset.name: i for i in runs["evaluate"].inputs.dataset_inputs}
    assert set(inputs) == set(eval_rows)  # eval/classification, eval/segmentation, eval/depth, eval/retrieval
    for name, item in inputs.items():
        assert json.loads(item.dataset.profile)["num_rows"] == eval_rows[name]
        assert json.loads(item.dataset.source) == {"uri": f"data/synthetic/{name}"}
        assert (
            len(item.dataset.digest) == 16
            and {t.key: t.value for t in item.tags}["mlflow.data.context"] == "evaluation"
        )


def _artifacts(stack: Any, flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read(client: Any) -> list[Any]:
        runs = ArtifactFilterFlowRunId(any_=[flow_run_id])
        return await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=runs))

    return {a.key: a for a in prefect_call(stack, read)}


def test_flow_run_publishes_its_summary_evaluation_and_gate_as_prefect_artifacts(
    stack: Any, pipeline_run: PipelineRun
) -> None:
    _, parent, _ = _mlflow_runs(stack, pipeline_run)
    link = f"{stack.mlflow.url}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    artifacts = _artifacts(stack, pipeline_run.flow_run.id)
    assert set(artifacts) == {"pipeline-stages", "evaluation-comparison", "quality-gate", "mlflow-parent-run"}
    assert artifacts["mlflow-parent-run"].data == f"[MLflow parent run]({link})"  # a link artifact, as Markdown
    for key in ("pipeline-stages", "evaluation-comparison", "quality-gate"):
        assert link in artifacts[key].description, key
    stages = json.loads(artifacts["pipeline-stages"].data)
    assert [r["stage"] for r in stages] == pipeline_run.stages
    assert all(r["status"] == "completed" and r["duration_s"] > 0 for r in stages)
    summary = json.loads((pipeline_run.project / "reports/pipeline_summary.json").read_text())
    assert {r["stage"]: r["headline"].split(" = ")[0] for r in stages} == {
        s: v["headline"].get("name", "") for s, v in summary["stages"].items()
    }
    final = parent.data.params["final_model"]
    models = {r["model"]: r for r in json.loads(artifacts["evaluation-comparison"].data)}
    # The high-resolution export is the teacher; the pretrain export is evaluated beside it (`teacher_pretrain`).
    assert set(models) == {"teacher", "teacher_pretrain", "student_vit_test", "random_init"}
    assert models[final]["final"] == "yes" and models["teacher_pretrain"]["final"] != "yes"
    assert models[final]["knn.top1"] == pytest.approx(parent.data.metrics["knn.top1"], abs=1e-4)
    gate = artifacts["quality-gate"].data
    assert gate.startswith("# Quality gate: PASSED") and f"Candidate **{final}**" in gate and "| knn | top1 |" in gate


def test_pipeline_runs_compare_side_by_side_in_mlflow(
    stack: Any, pipeline_run: PipelineRun, second_pipeline_run: PipelineRun
) -> None:
    """Two pipeline runs: the parent runs carry what tells them apart and the final model's headline metric of every
    task, so `search_runs` ranks them by a headline metric without opening a nested run."""
    import pandas as pd

    from components.evaluation.metrics import HEADLINE_METRICS

    client, first, _ = _mlflow_runs(stack, pipeline_run)
    _, second, _ = _mlflow_runs(stack, second_pipeline_run)
    second_stages = json.loads(_artifacts(stack, second_pipeline_run.flow_run.id)["pipeline-stages"].data)
    # The second run changed report keys only: DVC re-ran that stage and skipped the others.
    assert {r["stage"]: r["status"] for r in second_stages} == {
        s: "completed" if s == "report" else "skipped" for s in second_pipeline_run.stages
    }
    status = run([sys.executable, "-m", "dvc", "status"], pipeline_run.project, client_env(stack))
    assert "up to date" in status, status  # nothing left for DVC to do

    ranked = client.search_runs(
        [first.info.experiment_id], filter_string="tags.kind = 'pipeline'", order_by=["metrics.`knn.top1` DESC"]
    )
    ids = [r.info.run_id for r in ranked if r.info.run_id in (first.info.run_id, second.info.run_id)]
    assert len(ids) == 2
    values = [client.get_run(i).data.metrics["knn.top1"] for i in ids]
    assert values == sorted(values, reverse=True)

    project = pipeline_run.project
    headline = json.loads((project / "metrics/eval/summary.json").read_text())["headline"]
    curated = len(pd.read_parquet(project / "data/curated/manifest.parquet"))
    # The first run registers the better candidate by the gate metric (ties: the name first in order), the second one
    # the teacher, the only candidate it allows.
    best = min(("teacher", "student_vit_test"), key=lambda m: (-headline[m]["knn.top1"], m))
    for parent, expected_final in ((first, best), (second, "teacher")):
        params, metrics = parent.data.params, parent.data.metrics
        assert {k: params[k] for k in ("preset", "epochs", "global_batch_size", "data_source", "curated_images")} == {
            "preset": "vit_test", "epochs": "1", "global_batch_size": "8", "data_source": "data/synthetic",
            "curated_images": str(curated),
        }  # fmt: skip
        final = params["final_model"]
        assert final == expected_final
        tasks = {f"{t}.{m}" for t, m in HEADLINE_METRICS.items()} & set(headline[final])
        assert tasks and {k: metrics[k] for k in tasks} == pytest.approx({k: headline[final][k] for k in tasks})
        assert metrics["gate_passed"] == 1.0 and parent.data.tags["quality_gate"] == "passed"
