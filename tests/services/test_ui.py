"""The UIs users click through, in headless Chromium (Debian's package, driven by Playwright; no browser download).

    .venv/bin/python -m pytest tests/services/test_ui.py       (needs /usr/bin/chromium: `make browser` installs it)

Screenshots go to test-artifacts/ (git-ignored) so a reviewer can see what the tests saw.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.services.stack_utils import ARTIFACTS_DIR, PipelineRun

pytestmark = [pytest.mark.services, pytest.mark.timeout(900)]

CHROMIUM = Path("/usr/bin/chromium")
# The machine's network is closed: without these Chromium waits on (or fails at) updates, sync and QUIC probes.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
PAGE_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser_page() -> Iterator[Any]:
    """A page of a fresh headless Chromium profile."""
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} is missing: `make browser` installs Debian's chromium package"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        try:
            yield context.new_page()
        finally:
            context.close()


def _screenshot(page: Any, name: str) -> Path:
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS_DIR / name
    page.screenshot(path=str(path), full_page=True)
    return path


def test_prefect_ui_shows_the_deployment_parameter_form(stack: Any, project: Path, browser_page: Any) -> None:
    from playwright.sync_api import expect

    from tests.services.stack_utils import prefect_call

    async def pipeline_deployment(client: Any) -> Any:
        return await client.read_deployment_by_name("dinov2-pipeline/pipeline")

    deployment = prefect_call(stack, pipeline_deployment)
    page = browser_page
    # The page the deployment's "Run > Custom run" button opens: a form built from the flow's typed parameters.
    page.goto(f"{stack.prefect.url}/deployments/deployment/{deployment.id}/run")
    expect(page.get_by_text("Parameters", exact=True)).to_be_visible()
    try:
        for prop in deployment.parameter_openapi_schema["properties"].values():
            expect(page.get_by_text(prop["title"], exact=False).first).to_be_visible()
            description = prop.get("description", "")
            if description:  # the docstring's Args line, shown under the field (markdown: compare a plain prefix)
                expect(page.get_by_text(description.split("`")[0].strip()[:40], exact=False).first).to_be_visible()
        expect(page.get_by_role("button", name="Submit")).to_be_visible()
    finally:
        _screenshot(page, "prefect-deployment-run-form.png")


def test_mlflow_ui_lists_the_pipeline_runs(stack: Any, pipeline_run: PipelineRun, browser_page: Any) -> None:
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import expect

    client = MlflowClient(tracking_uri=stack.mlflow.url)
    flow_run_id = str(pipeline_run.flow_run.id)
    (parent,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.prefect_flow_run_id = '{flow_run_id}' and tags.kind = 'pipeline'",
    )
    page = browser_page
    page.goto(f"{stack.mlflow.url}/#/experiments/{parent.info.experiment_id}/runs")
    try:
        expect(page.get_by_text(parent.info.run_name, exact=True).first).to_be_visible()
    finally:
        _screenshot(page, "mlflow-experiment-runs.png")
    # The parent run's page links its nested runs, one per stage.
    page.goto(f"{stack.mlflow.url}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}")
    try:
        expect(page.get_by_text("Child runs", exact=True)).to_be_visible()
        for stage in pipeline_run.stages:
            expect(page.get_by_role("link", name=stage, exact=True).first).to_be_visible()
    finally:
        _screenshot(page, "mlflow-pipeline-run.png")


def test_prefect_ui_shows_the_flow_run_artifacts(stack: Any, pipeline_run: PipelineRun, browser_page: Any) -> None:
    from playwright.sync_api import expect
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from tests.services.stack_utils import prefect_call

    async def artifacts(client: Any) -> list[Any]:
        runs = ArtifactFilterFlowRunId(any_=[pipeline_run.flow_run.id])
        return await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=runs))

    by_key = {a.key: a for a in prefect_call(stack, artifacts)}
    page = browser_page
    # The flow run's Artifacts tab lists them ...
    page.goto(f"{stack.prefect.url}/runs/flow-run/{pipeline_run.flow_run.id}")
    try:
        page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
        for key in ("pipeline-stages", "evaluation-comparison", "quality-gate", "mlflow-parent-run"):
            expect(page.get_by_text(key, exact=False).first).to_be_visible()
    finally:
        _screenshot(page, "prefect-flow-run-artifacts.png")
    # ... the stage summary renders as a table, the gate's verdict as Markdown, each with the MLflow link.
    page.goto(f"{stack.prefect.url}/artifacts/artifact/{by_key['pipeline-stages'].id}")
    try:
        expect(page.get_by_text("pretrain_highres", exact=True).first).to_be_visible()
        expect(page.get_by_text("completed", exact=True).first).to_be_visible()
        expect(page.get_by_text(f"{stack.mlflow.url}/#/experiments/", exact=False).first).to_be_visible()
    finally:
        _screenshot(page, "prefect-artifact-pipeline-stages.png")
    page.goto(f"{stack.prefect.url}/artifacts/artifact/{by_key['quality-gate'].id}")
    try:
        expect(page.get_by_role("heading", name="Quality gate: PASSED").first).to_be_visible()
    finally:
        _screenshot(page, "prefect-artifact-quality-gate.png")


def test_mlflow_sets_pipeline_runs_side_by_side(
    stack: Any, pipeline_run: PipelineRun, second_pipeline_run: PipelineRun, browser_page: Any
) -> None:
    """The experiment's run table, filtered to pipeline runs, with the comparison columns a user picks under
    "Columns"; then MLflow's compare view of the two runs."""
    import json

    from mlflow.tracking import MlflowClient
    from playwright.sync_api import expect

    client = MlflowClient(tracking_uri=stack.mlflow.url)
    parents = []
    for flow in (pipeline_run, second_pipeline_run):
        (parent,) = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.prefect_flow_run_id = '{flow.flow_run.id}' and tags.kind = 'pipeline'",
        )
        parents.append(parent)
    experiment = parents[0].info.experiment_id
    columns = ("preset", "epochs", "curated_images", "final_model", "knn.top1", "depth_linear.rmse", "gate_passed")
    page = browser_page
    page.set_viewport_size({"width": 2200, "height": 1000})  # the grid renders only the columns in view
    try:
        _pick_run_table_columns(page, stack.mlflow.url, experiment, columns)
        for final in {p.data.params["final_model"] for p in parents}:
            expect(page.get_by_role("gridcell", name=final, exact=True).first).to_be_visible()
        runs = json.dumps([p.info.run_id for p in parents])
        page.goto(f"{stack.mlflow.url}/#/compare-runs?runs={runs}&experiments={json.dumps([experiment])}")
        try:
            for name in columns:
                expect(page.get_by_text(name, exact=True).first).to_be_visible()
            expect(page.get_by_text("teacher", exact=True).first).to_be_visible()  # the second run's final model
        finally:
            _screenshot(page, "mlflow-compare-pipeline-runs.png")
    finally:
        page.set_viewport_size({"width": 1400, "height": 1000})


def _pick_run_table_columns(page: Any, mlflow_url: str, experiment: str, columns: tuple[str, ...]) -> None:
    """The experiment's run table filtered to pipeline runs, with `columns` picked under "Columns" (and three
    attribute columns dropped, for room), as a user sets it up."""
    import urllib.parse

    from playwright.sync_api import expect

    search = urllib.parse.quote("tags.kind = 'pipeline'")
    page.goto(f"{mlflow_url}/#/experiments/{experiment}/runs?searchFilter={search}")
    try:
        page.get_by_role("button", name="Columns", exact=True).click()
        dialog = page.get_by_role("dialog")
        for name in ("Dataset", "Source", "Models", *columns):
            dialog.get_by_role("textbox", name="Search columns").fill(name)
            dialog.get_by_text(name, exact=True).first.click()  # `final_model` also matches in `final_model_arch`
        page.keyboard.press("Escape")
        for name in columns:
            expect(page.get_by_role("columnheader", name=name, exact=True).first).to_be_visible()
    finally:
        _screenshot(page, "mlflow-pipeline-runs-columns.png")
