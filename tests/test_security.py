"""Security defaults, checked where a run starts: what a config file may load, and what a run records.

The stack's bind address is tested in tests/stack/test_bind.py, a model's own code and the model roots at the ML
level in tests/ml/test_models.py, credentials in URLs in tests/test_credentials.py (and over a whole pipeline run
in tests/flows/test_credentials.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from flows.bookkeeping import flow_parameters, start_parent_run
from flows.deploy import alert_block, refuse_credentials
from flows.preflight import preflight, raise_if_any
from loraflow import tags as T
from loraflow.config import config_from_dict, load_config
from loraflow.credentials import move_tracking_credentials, redact
from loraflow.errors import UsageError
from loraflow.stack.services import _services
from loraflow.stack.settings import CPU_WORKER, MLFLOW, PREFECT, WORKER, StackSettings, client_env
from loraflow.tracking import stage_run
from tests.conftest import tiny_records, write_jsonl
from tests.ml.test_models import with_own_code


def _config(path: Path, model: str, **base_model) -> Path:
    cfg = {
        "base_model": {"name": "tiny-test", "path": model, **base_model},
        "data": {"path": "../data/train.jsonl"},
        "train": {"max_steps": 1},
        "registry": {"model_name": "tiny-adapter"},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_preflight_refuses_a_model_outside_the_project_or_with_untrusted_code(tiny_model_dir, tmp_path) -> None:
    """Before any work starts, a config file's model must lie in its project, and run no code it did not allow."""
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    write_jsonl(project / "data" / "train.jsonl", tiny_records())
    elsewhere = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere" / "tiny")
    with_code = with_own_code(tiny_model_dir, project / "models" / "custom")
    configs = project / "configs"

    def problems(config: Path) -> list[str]:
        found = preflight(load_config(config), tmp_path / "home", f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert all(p.usage for p in found)  # the config's to fix: exit 2
        return [p.what for p in found]

    outside = _config(configs / "outside.yaml", str(elsewhere))
    assert problems(outside) == [
        f"base model: model folder {elsewhere} is outside the allowed model roots ({project}); "
        "move it under one of them or add its folder to base_model.allowed_roots"
    ]
    with pytest.raises(UsageError, match=r"^preflight found a problem:\n  - base model: model folder"):
        raise_if_any(preflight(load_config(outside), tmp_path / "home", "sqlite:///x.db"))
    assert problems(_config(configs / "listed.yaml", str(elsewhere), allowed_roots=[str(elsewhere.parent)])) == []

    [code] = problems(_config(configs / "code.yaml", "../models/custom"))
    assert code.startswith(f"base model 'tiny-test' ({with_code}) ships its own Python code")
    assert problems(_config(configs / "trusted.yaml", "../models/custom", trust_remote_code=True)) == []


# --- secrets never become params, tags, artifacts or flow parameters ---

DB_PASSWORD = "pgPr0be-S3cret"
TOKEN = "t0kenPr0be-S3cret"
HOOK_PATH = "B0/HookPathPr0be"  # Slack and Teams put the credential in the webhook's path
WEBHOOK = f"https://hooks.example.com/services/T0/{HOOK_PATH}?token={TOKEN}"
NEEDLES = (DB_PASSWORD, TOKEN, "HookPathPr0be")


def leaks(where: str, value: object) -> list[str]:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return [f"{where}: {needle}" for needle in NEEDLES if needle in text]


@pytest.mark.parametrize(
    "uri",
    [
        pytest.param(f"postgresql+psycopg://mlflow:{DB_PASSWORD}@db.example.com:5432/mlflow", id="database-password"),
        pytest.param(f"https://mlflow.example.com/?token={TOKEN}", id="url-token"),
    ],
)
def test_a_run_records_no_secret_its_config_carries(uri: str, tmp_path, monkeypatch) -> None:
    """A config whose tracking URI carries a credential: the run that the flow starts (its params, tags, artifacts
    and run folder, a failed stage's reason) and the Prefect parameters that the CLI, the finetune flow and
    `loraflow deploy` would store show it nowhere; deploying such a config is refused outright."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # an sqlite store keeps its artifacts in ./mlruns
    config = config_from_dict(
        {
            "base_model": {"name": "tiny", "path": "models/tiny"},
            "data": {"path": "data/train.jsonl"},
            "train": {"max_steps": 1},
            "registry": {"model_name": "tiny-adapter"},
            "tracking": {"uri": uri},
        }
    )
    assert config.tracking.uri == uri  # the live object keeps it for the entry point
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = start_parent_run(config, tmp_path / "home", store, "fr-0001")
    with pytest.raises(RuntimeError), stage_run(run.tracker, "train"):
        raise RuntimeError(f"cannot reach the tracking server at {uri}")
    run.tracker.end("FAILED")

    client = MlflowClient(tracking_uri=store)
    found: list[str] = []
    runs = client.search_runs([client.get_experiment_by_name(config.tracking.experiment).experiment_id])
    assert len(runs) == 2  # the parent run and its failed stage
    for r in runs:
        found += leaks(f"run {r.info.run_name} params", r.data.params) + leaks(f"{r.info.run_name} tags", r.data.tags)
    # Logged, with the credential hidden (so the scan reads what was really recorded).
    parent = client.get_run(run.tracker.run_id).data
    assert parent.params["tracking.uri"] == redact(uri) != uri
    assert parent.tags[T.FAILURE] == f"RuntimeError: cannot reach the tracking server at {redact(uri)}"
    artifacts = Path(client.download_artifacts(run.tracker.run_id, "", str(tmp_path / "artifacts")))
    files = [*artifacts.rglob("*"), *run.run_dir.rglob("*")]
    assert any(f.name == "config.yaml" for f in files)
    found += [leak for f in files if f.is_file() for leak in leaks(str(f), f.read_text())]

    # What Prefect would store (flows/bookkeeping.py's one helper): the finetune run that the CLI submits, with
    # the URI its entry point cleaned (the train flow's parameters are built the same way), and the deployments'.
    if uri.startswith("https://"):
        clean, _ = move_tracking_credentials(uri, "tracking.uri", {})
        submitted = flow_parameters({"config": config, "tracking_uri": clean, "fresh": False})
        found += leaks("finetune parameters", submitted)
    else:  # a database URL with a password: the entry point refuses it, no flow run is ever submitted
        with pytest.raises(UsageError, match="database URL with a password"):
            move_tracking_credentials(uri, "tracking.uri", {})
    found += leaks("deployment parameters", flow_parameters({"config": config, "rules": config.promotion}))
    assert not found, "\n".join(found)
    with pytest.raises(UsageError, match="carries a credential"):
        refuse_credentials(Path("team.yaml"), uri)


def test_the_database_password_stays_in_the_two_servers_environment(tmp_path) -> None:
    """The postgres backend's password reaches the Prefect and MLflow servers through their environment only: no
    command line (every user on the machine reads those), no worker (every flow run inherits a worker's
    environment), no client."""
    s = StackSettings(home=tmp_path, backend="postgres", prefect_port=4300, mlflow_port=5300, postgres_port=5400)
    s.postgres_dir.mkdir(parents=True)
    (s.postgres_dir / "password").write_text(DB_PASSWORD)
    services = _services(s)
    assert DB_PASSWORD in services[PREFECT].env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert DB_PASSWORD in services[MLFLOW].env["MLFLOW_BACKEND_STORE_URI"]
    found = [leak for name, svc in services.items() for leak in leaks(f"{name} command line", svc.argv + [svc.url])]
    found += leaks("gpu worker environment", services[WORKER].env) + leaks("cpu worker", services[CPU_WORKER].env)
    found += leaks("client environment", client_env(s))
    assert not found, "\n".join(found)


def test_the_alert_webhook_is_kept_in_the_blocks_secret_values() -> None:
    """`loraflow deploy --alert-webhook URL`: the URL, credential path and token included, lives in the notification
    block's secret values, which Prefect shows masked; its plain fields hold a template."""
    block = alert_block(WEBHOOK)
    assert block.url == "{{webhook_url}}"
    assert block.secrets.get_secret_value() == {"webhook_url": WEBHOOK}  # the notification still reaches it
    assert not leaks("the block as Prefect shows it", block.model_dump_json())
