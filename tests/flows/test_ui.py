"""Integration, as a user would: headless Chromium fills in the Prefect UI's form for the
`finetune` deployment, starts a custom run with changed parameters, and the run is then checked
through the Prefect and MLflow APIs.

Needs Debian's `chromium` (installed by .ci/run) and the `playwright` package (its own browser
download is not used: it drives /usr/bin/chromium).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from loraflow import tags as T
from tests.flows.conftest import FIXTURE, cli, write_config

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
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
# Screenshots go to a temporary folder; LORAFLOW_SCREENSHOTS=docs/img refreshes the README's.
SCREENSHOTS_ENV = "LORAFLOW_SCREENSHOTS"


def prop(scope, label: str):
    """The form property whose own label is ``label`` (optional ones read 'label (Optional)')."""
    return scope.locator(
        "xpath=.//div[contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')]"
        "[./div[contains(@class, 'p-label__header')]//span[contains(@class, 'schema-form-property__label')]"
        f"[normalize-space()='{label}' or normalize-space()='{label} (Optional)']]"
    ).first


@pytest.fixture(scope="module")
def ui_stack(local_stack, tmp_path_factory):
    from loraflow.ml.tiny import build_tiny_llama

    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    base = build_tiny_llama(
        tmp_path_factory.mktemp("ui") / "tiny", [f"{r['instruction']} {r['output']}" for r in rows] * 3, vocab_size=768
    )
    config = write_config(tmp_path_factory.mktemp("ui-cfg") / "form-defaults.yaml", base, FIXTURE, model_name="ui-form")
    result = cli(local_stack, "deploy", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return local_stack


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (apt-get install chromium)")
def test_custom_run_from_the_prefect_ui_form(ui_stack, tmp_path):
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    shots = Path(os.environ.get(SCREENSHOTS_ENV, tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with SyncPrefectClient(ui_stack.prefect_api_url) as client:
        deployment = client.read_deployment_by_name("finetune/cpu")
        by_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        # `loraflow run` submits this deployment too (other tests on the shared stack): only new runs count.
        before = {r.id for r in client.read_flow_runs(deployment_filter=by_deployment)}

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        # Waits are for elements, not "networkidle": both UIs keep polling their servers.
        page.goto(f"{ui_stack.prefect_ui_url}/deployments", wait_until="load")
        page.get_by_role("link", name="cpu", exact=True).first.click()
        page.wait_for_url(re.compile(r".*/deployments/deployment/.*"))
        page.get_by_text("flows/finetune.py:finetune").first.wait_for()  # the entrypoint, in the details
        page.screenshot(path=str(shots / "prefect-deployment.png"))
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run", exact=True).click()
        page.wait_for_url(re.compile(r".*/run(\?.*)?$"))

        train, lora = prop(page, "Train"), prop(page, "Lora")
        prop(train, "Max Steps").locator("input").first.fill("3")
        prop(train, "Learning Rate").locator("input").first.fill("0.004")
        prop(lora, "R").locator("input").first.fill("2")
        prop(train, "Max Steps").scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "prefect-form.png"))
        page.get_by_role("button", name="Submit").click()
        # The UI goes back to the deployment's page and toasts "<run> scheduled to start now".
        page.get_by_text("scheduled to start").first.wait_for(timeout=30_000)
        page.screenshot(path=str(shots / "prefect-submitted.png"))
        browser.close()

    with SyncPrefectClient(ui_stack.prefect_api_url) as client:
        runs = client.read_flow_runs(deployment_filter=by_deployment, sort=FlowRunSort.EXPECTED_START_TIME_DESC)
    runs = [r for r in runs if r.id not in before]
    assert len(runs) == 1, "exactly the one run started from the form"
    flow_run_id = str(runs[0].id)

    with SyncPrefectClient(ui_stack.prefect_api_url) as client:
        deadline = time.monotonic() + 300
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                break
            assert time.monotonic() < deadline, f"flow run still {run.state.name if run.state else None}"
            time.sleep(2)
    assert run.deployment_id == deployment.id
    assert run.state.is_completed(), run.state.message
    params = run.parameters["config"]
    assert params["train"]["max_steps"] == 3
    assert params["train"]["learning_rate"] == 0.004
    assert params["lora"]["r"] == 2

    mlflow = MlflowClient(tracking_uri=ui_stack.mlflow_url)
    mv = mlflow.get_model_version_by_alias("ui-form", "candidate")
    assert mv.tags[T.FLOW_RUN_ID] == flow_run_id
    logged = mlflow.get_run(mv.tags[T.MLFLOW_RUN_ID]).data.params
    assert (logged["train.max_steps"], logged["train.learning_rate"], logged["lora.r"]) == ("3", "0.004", "2")

    with sync_playwright() as p:  # the registered model's page, for the README
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        # "load", not "networkidle": the MLflow UI keeps polling its server.
        page.goto(f"{ui_stack.mlflow_url}/#/models/ui-form/versions/{mv.version}", wait_until="load")
        page.get_by_text(T.DATA_DIGEST).first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "mlflow-model-version.png"), full_page=True)
        browser.close()


def test_nightly_retrain_schedule_and_parameter_bounds(ui_stack):
    """The nightly deployment runs at 03:00 UTC every day; the server refuses out-of-bounds form values."""
    import asyncio
    import datetime as dt
    import inspect

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.server.schemas.schedules import CronSchedule

    with SyncPrefectClient(ui_stack.prefect_api_url) as client:
        nightly = client.read_deployment_by_name("finetune/retrain-nightly")
        assert nightly.work_pool_name == "cpu" and nightly.parameters["config"]["promotion"]["enabled"] is True
        promote = client.read_deployment_by_name("promote/cpu")
        assert promote.work_pool_name == "cpu" and promote.parameters["tracking_uri"] == ui_stack.mlflow_url
        (schedule,) = nightly.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 3 * * *", "UTC", True)
        start = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
        server_side = CronSchedule(cron=schedule.schedule.cron, timezone=schedule.schedule.timezone)
        dates = server_side.get_dates(3, start=start)  # the server's own schedule arithmetic
        if inspect.isawaitable(dates):  # sync_compatible: a coroutine when an event loop is around
            dates = asyncio.run(dates)
        assert [d.isoformat() for d in dates] == [
            "2026-11-29T03:00:00+00:00",
            "2026-11-30T03:00:00+00:00",
            "2026-12-01T03:00:00+00:00",
        ]

        form = client.read_deployment_by_name("finetune/cpu")
        assert form.enforce_parameter_schema
        bad = json.loads(json.dumps(form.parameters))
        bad["config"]["lora"]["r"] = 0  # LoraConfig.r has ge=1: the schema's minimum
        with pytest.raises(PrefectHTTPStatusError, match="422|409|Validation|r"):
            client.create_flow_run_from_deployment(form.id, parameters=bad)


def test_failed_run_fires_the_alert_and_names_the_stage(ui_stack, tmp_path):
    """A finetune run that fails in validate: the automation POSTs to the webhook, and the flow run's
    `finetune-failure` artifact names the stage and the reason."""
    import http.server
    import threading

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    received: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = Path(ui_stack.home) / "deployments.json"
        form_config = json.loads(config.read_text())["config"]
        result = cli(
            ui_stack, "deploy", "--config", form_config, "--alert-webhook", f"http://127.0.0.1:{server.server_port}/"
        )
        assert result.returncode == 0, result.stderr[-2000:]

        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"instruction": "x", "input": "", "output": ""}\n')
        failing = tmp_path / "failing.yaml"
        failing.write_text(Path(form_config).read_text().replace(str(FIXTURE), str(bad)))
        failing.write_text(failing.read_text().replace(str(FIXTURE.parent), str(tmp_path)))
        run = cli(ui_stack, "run", str(failing))
        assert run.returncode == 1, run.stderr[-2000:]

        deadline = time.monotonic() + 90
        while not received and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        server.shutdown()
    assert received, "the failed-run automation did not call the webhook"
    assert "finetune" in received[0]["text"] and "Failed" in received[0]["subject"]

    with SyncPrefectClient(ui_stack.prefect_api_url) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["finetune-failure"]))
        )
    assert any("stage `validate`" in a.data for a in artifacts)
