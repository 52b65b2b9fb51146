"""Integration (issue 20): a credential in the tracking URI shows nowhere loraflow writes or prints.

The whole pipeline runs through the CLI, as in test_pipeline.py, with `tracking.uri` set to
`http://probeuser:PASSWORD@127.0.0.1:PORT` (the local MLflow server accepts and ignores basic auth),
promotion on so that the gate and the audit ledger write too, then `history --tracking-uri` with the
same URI. Everything is then read back and searched for the password, raw and percent-encoded, and
for its Basic-auth header: every MLflow experiment, run (params, tags, metrics), artifact (downloaded),
registered model, version and logged model; every Prefect flow run (parameters, job variables,
states), task run, artifact, log, deployment and block; the captured CLI output; and every file
under LORAFLOW_HOME: run directories, service logs, both servers' databases and MLflow's artifacts.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from tests.flows.test_pipeline import FIXTURE, cli, write_config

pytestmark = pytest.mark.integration

USER = "probeuser"
PASSWORD = "qZ7p-Probe/S3cret"  # "/" must be percent-encoded in a URL: the raw and the encoded form are searched
ENCODED = quote(PASSWORD, safe="")
NEEDLES = (PASSWORD, ENCODED, "qZ7p-Probe", base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
MODEL_NAME = "tiny-credential"


def leaks(where: str, text: str | bytes | list) -> list[str]:
    if isinstance(text, list):  # fields read back through an API
        text = json.dumps(text, default=str)
    data = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
    return [f"{where}: contains {needle!r}" for needle in NEEDLES if needle.encode() in data]


@pytest.fixture(scope="module")
def credential_run(local_stack, tmp_path_factory):
    from loraflow.ml.tiny import build_tiny_llama
    from loraflow.records import RunSummary, load_record

    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    base = build_tiny_llama(
        tmp_path_factory.mktemp("cred") / "tiny",
        [f"{r['instruction']} {r['output']}" for r in rows] * 3,
        vocab_size=768,
    )
    uri = f"http://{USER}:{ENCODED}@127.0.0.1:{local_stack.mlflow_port}"
    config = write_config(tmp_path_factory.mktemp("cred-cfg") / "run.yaml", base, FIXTURE, model_name=MODEL_NAME)
    cfg = yaml.safe_load(config.read_text())
    cfg["tracking"]["uri"] = uri
    cfg["promotion"] = {"enabled": True}
    config.write_text(yaml.safe_dump(cfg))

    outputs = {"up": cli(local_stack, "up"), "run": cli(local_stack, "run", str(config))}
    assert outputs["up"].returncode == 0, outputs["up"].stderr[-3000:]
    run = outputs["run"]
    assert run.returncode == 0, f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-5000:]}"
    outputs["history"] = cli(local_stack, "history", MODEL_NAME, "--version", "1", "--tracking-uri", uri)
    assert outputs["history"].returncode == 0, outputs["history"].stderr[-3000:]
    summary = load_record(RunSummary, next((local_stack.home / "runs").glob(f"{MODEL_NAME}-*/summary.json")))
    return uri, outputs, summary


def test_the_run_works_and_says_once_where_the_credential_belongs(local_stack, credential_run):
    from mlflow import MlflowClient

    _, outputs, summary = credential_run
    run = outputs["run"]
    assert f"Registered model: {MODEL_NAME}  version 1" in run.stdout
    warnings = [line for line in run.stderr.splitlines() if "carries a credential" in line]
    assert len(warnings) == 1, run.stderr[-3000:]
    assert "tracking.uri" in warnings[0] and "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD" in warnings[0]
    assert "--tracking-uri carries a credential" in outputs["history"].stderr
    # The link printed for people carries no credential (the browser asks for it).
    assert f"MLflow UI:     http://127.0.0.1:{local_stack.mlflow_port}/#/experiments/" in run.stdout

    # What the run recorded shows the user, never the password.
    client = MlflowClient(tracking_uri=local_stack.mlflow_url)
    params = client.get_run(summary.version.run_id).data.params
    assert params["tracking.uri"] == f"http://{USER}:***@127.0.0.1:{local_stack.mlflow_port}"
    config_yaml = yaml.safe_load((Path(summary.run_dir) / "config.yaml").read_text())
    assert config_yaml["tracking"]["uri"] == params["tracking.uri"]


def test_the_flow_run_parameters_carry_no_credential(local_stack, credential_run):
    """The finetune flow's parameters: the config redacted, the URI it uses without its credential."""
    from prefect.client.orchestration import SyncPrefectClient

    _, _, summary = credential_run
    with SyncPrefectClient(local_stack.prefect_api_url) as prefect:
        parameters = prefect.read_flow_run(summary.flow_run_id).parameters
    assert parameters["config"]["tracking"]["uri"] == f"http://{USER}:***@127.0.0.1:{local_stack.mlflow_port}"
    assert parameters["tracking_uri"] == local_stack.mlflow_url


def _mlflow_texts(local_stack, tmp_path: Path) -> list[str]:
    """Every experiment, run, artifact, registered model, version and logged model, searched for the needles."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=local_stack.mlflow_url)
    found: list[str] = []
    experiments = client.search_experiments(view_type=ViewType.ALL)
    exp_ids = [e.experiment_id for e in experiments]
    for e in experiments:
        found += leaks(f"experiment {e.name}", [e.name, e.artifact_location, e.tags])
    runs = client.search_runs(exp_ids, run_view_type=ViewType.ALL, max_results=5000)
    assert len(runs) >= 7  # the parent run and one per stage, at least
    for r in runs:
        where = f"run {r.info.run_name} ({r.info.run_id})"
        found += leaks(f"{where} params/tags/metrics", [r.data.params, r.data.tags, list(r.data.metrics)])
        local = Path(client.download_artifacts(r.info.run_id, "", str(tmp_path / r.info.run_id)))
        found += [
            leak for f in local.rglob("*") if f.is_file() for leak in leaks(f"{where} artifact {f}", f.read_bytes())
        ]
    for logged in client.search_logged_models(exp_ids):
        found += leaks(f"logged model {logged.model_id}", [logged.params, logged.tags, logged.name])
    for rm in client.search_registered_models():
        found += leaks(f"registered model {rm.name}", [rm.tags, rm.description, rm.aliases])
        for v in client.search_model_versions(f"name = '{rm.name}'"):
            mv = client.get_model_version(rm.name, v.version)
            found += leaks(f"{rm.name} v{mv.version}", [mv.tags, mv.source, mv.description, mv.aliases])
            local = Path(
                mlflow.artifacts.download_artifacts(
                    f"models:/{rm.name}/{mv.version}",
                    dst_path=str(tmp_path / f"{rm.name}-{mv.version}"),
                    tracking_uri=local_stack.mlflow_url,
                )
            )
            found += [
                leak
                for f in local.rglob("*")
                if f.is_file()
                for leak in leaks(f"{rm.name} v{mv.version} {f}", f.read_bytes())
            ]
    return found


def _paged(read, **kwargs) -> list:
    out, offset = [], 0
    while batch := read(**kwargs, limit=200, offset=offset):
        out += batch
        offset += len(batch)
    return out


def _prefect_texts(local_stack) -> list[str]:
    """Every flow run, task run, artifact, log, deployment and block document, searched for the needles."""
    from prefect.client.orchestration import SyncPrefectClient

    found: list[str] = []
    with SyncPrefectClient(local_stack.prefect_api_url) as prefect:
        collections = {
            "flow run": _paged(prefect.read_flow_runs),
            "task run": _paged(prefect.read_task_runs),
            "artifact": _paged(prefect.read_artifacts),
            "log": _paged(prefect.read_logs),
            "deployment": prefect.read_deployments(),
            "block": prefect.read_block_documents(include_secrets=False),
        }
        for kind, items in collections.items():
            assert items or kind == "block", f"no {kind}s read back"
            for item in items:
                found += leaks(f"Prefect {kind} {getattr(item, 'name', '') or item.id}", item.model_dump_json())
    return found


def test_the_credential_shows_nowhere(local_stack, credential_run, tmp_path, monkeypatch):
    _, outputs, summary = credential_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local_stack.mlflow_url)  # models:/ URIs resolve through it
    found: list[str] = []
    for command, result in outputs.items():
        found += leaks(f"`loraflow {command}` output", f"{result.stdout}\n{result.stderr}")
    found += _mlflow_texts(local_stack, tmp_path)
    found += _prefect_texts(local_stack)
    # Run directories, service logs, the servers' databases (SQLite) and MLflow's artifact store.
    files = [f for f in local_stack.home.rglob("*") if f.is_file()]
    assert any(f.name == "summary.json" for f in files) and any(f.suffix == ".db" for f in files)
    found += [leak for f in files for leak in leaks(str(f.relative_to(local_stack.home)), f.read_bytes())]
    assert not found, "the credential leaked:\n" + "\n".join(found)


def test_deployments_refuse_a_credential_and_take_it_from_secret_blocks(local_stack, credential_run, tmp_path):
    """Deployment parameters are readable by every UI user: a credential in the URI is refused. The Secret
    blocks reach every deployed run's environment as references, resolved the way the worker resolves them."""
    import asyncio
    import contextlib

    from prefect.blocks.system import Secret
    from prefect.client.orchestration import SyncPrefectClient, get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessJobConfiguration

    from flows.deploy import ALERT_AUTOMATION, ALERT_BLOCK, CREDENTIAL_BLOCKS

    uri, _, summary = credential_run
    with_credential = Path(summary.run_dir) / "config.yaml"  # the run's config, with the credential put back
    cfg = yaml.safe_load(with_credential.read_text())
    cfg["tracking"]["uri"] = uri
    refused_config = tmp_path / "refused.yaml"
    refused_config.write_text(yaml.safe_dump(cfg))
    refused = cli(local_stack, "deploy", "--config", str(refused_config))
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "Secret blocks mlflow-tracking-username and mlflow-tracking-password" in refused.stderr
    assert not leaks("refused deploy", refused.stdout + refused.stderr)

    del cfg["tracking"]["uri"]
    clean_config = tmp_path / "clean.yaml"
    clean_config.write_text(yaml.safe_dump(cfg))
    webhook = "https://hooks.example.com/services/T0/B0/WebhookS3cretPath?token=WebhookToken"
    with temporary_settings({PREFECT_API_URL: local_stack.prefect_api_url}):
        values = {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
        for var, block in CREDENTIAL_BLOCKS.items():
            Secret(value=values[var]).save(block, overwrite=True)
        try:
            deployed = cli(local_stack, "deploy", "--config", str(clean_config), "--alert-webhook", webhook)
            assert deployed.returncode == 0, deployed.stderr[-2000:]
            assert "from the Secret blocks mlflow-tracking-username, mlflow-tracking-password" in deployed.stdout
            assert "webhook on hooks.example.com" in deployed.stdout
            assert "WebhookS3cretPath" not in deployed.stdout + deployed.stderr

            async def resolved_env() -> tuple[dict, dict]:
                async with get_client() as client:
                    deployment = await client.read_deployment_by_name("train/gpu")
                    pool = await client.read_work_pool("gpu")
                    job = await ProcessJobConfiguration.from_template_and_values(
                        pool.base_job_template, deployment.job_variables, client=client
                    )
                    return deployment.job_variables["env"], job.env

            stored, resolved = asyncio.run(resolved_env())
            assert stored == {var: "{{ prefect.blocks.secret." + b + " }}" for var, b in CREDENTIAL_BLOCKS.items()}
            assert resolved["MLFLOW_TRACKING_USERNAME"] == USER and resolved["MLFLOW_TRACKING_PASSWORD"] == PASSWORD
            with SyncPrefectClient(local_stack.prefect_api_url) as prefect:
                block = prefect.read_block_document_by_name(ALERT_BLOCK, "custom-webhook", include_secrets=False)
            assert "WebhookS3cretPath" not in block.model_dump_json()
        finally:
            with SyncPrefectClient(local_stack.prefect_api_url) as prefect:
                blocks = [*((b, "secret") for b in CREDENTIAL_BLOCKS.values()), (ALERT_BLOCK, "custom-webhook")]
                for name, slug in blocks:
                    with contextlib.suppress(ObjectNotFound):  # not created when the test failed early
                        prefect.delete_block_document(prefect.read_block_document_by_name(name, slug).id)
                for automation in prefect.read_automations_by_name(name=ALERT_AUTOMATION):
                    prefect.delete_automation(automation.id)
    # Without the blocks, deploying again leaves no reference behind (a missing block would fail every run).
    redeployed = cli(local_stack, "deploy", "--config", str(clean_config))
    assert redeployed.returncode == 0 and "from each worker's environment" in redeployed.stdout
    with SyncPrefectClient(local_stack.prefect_api_url) as prefect:
        assert prefect.read_deployment_by_name("train/gpu").job_variables == {"env": {}}
