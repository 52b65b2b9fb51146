"""Deployments as code: what `loraflow deploy` (and `loraflow up`) apply to a Prefect server.

| deployment              | flow     | pool | schedule                                |
|-------------------------|----------|------|-----------------------------------------|
| finetune/cpu            | finetune | cpu  | on demand (Prefect UI form, API, CLI)   |
| finetune/retrain-nightly| finetune | cpu  | cron 0 3 * * *, timezone explicit (UTC) |
| train/gpu               | train    | gpu  | started by finetune via run_deployment  |
| promote/cpu             | promote  | cpu  | on demand (gate + alias move, audited)  |

Applying is idempotent: deploying again updates the deployments in place. The `gpu` pool has a
concurrency limit of 1 (one training run per GPU); the `cpu` pool runs the orchestrating flows.

Deployment parameters are stored in the Prefect server, readable by every UI user, so a credential
never goes into one: a config whose tracking URI carries one is refused, with where it belongs. An
MLflow credential for deployed runs lives in the Prefect Secret blocks `mlflow-tracking-username` and
`mlflow-tracking-password`; when they exist, every deployment's job variables map them to MLflow's
environment variables, and the worker resolves them when it starts a run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from flows.bookkeeping import flow_parameters
from loraflow.config import PipelineConfig, load_config
from loraflow.credentials import PASSWORD_VAR, USERNAME_VAR, redact
from loraflow.errors import UsageError
from loraflow.lineage import REPO_ROOT

CPU_POOL = "cpu"
GPU_POOL = "gpu"
NIGHTLY_CRON = "0 3 * * *"
NIGHTLY_TIMEZONE = "UTC"
# Prefect Secret blocks holding the MLflow credential of deployed runs, by the variable MLflow reads.
CREDENTIAL_BLOCKS = {USERNAME_VAR: "mlflow-tracking-username", PASSWORD_VAR: "mlflow-tracking-password"}


@dataclass(frozen=True)
class Deployed:
    name: str  # "<flow>/<deployment>"
    pool: str
    id: str
    env: tuple[str, ...] = ()  # the variables its runs get from Secret blocks (CREDENTIAL_BLOCKS)


def _from_source(entrypoint: str):
    from prefect import Flow

    return Flow.from_source(source=str(REPO_ROOT), entrypoint=entrypoint)


def _deploy(entrypoint: str, name: str, pool: str, env: dict[str, str], **kwargs) -> str:
    deployment_id = _from_source(entrypoint).deploy(
        name=name,
        work_pool_name=pool,
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
        job_variables={"env": env},  # replaced on every apply: a deleted Secret block is no longer referenced
        **kwargs,
    )
    return str(deployment_id)


def credential_env(client) -> dict[str, str]:
    """Job-variable `env` that gives a run the MLflow credential kept in Secret blocks (CREDENTIAL_BLOCKS).

    The values are block references, resolved by the worker when it starts the run: the deployment and
    its runs show the reference, never the secret. Only blocks that exist are referenced (a missing one
    would fail every run).
    """
    from prefect.exceptions import ObjectNotFound

    env = {}
    for var, block in CREDENTIAL_BLOCKS.items():
        try:
            client.read_block_document_by_name(block, block_type_slug="secret", include_secrets=False)
        except ObjectNotFound:
            continue
        env[var] = "{{ prefect.blocks.secret." + block + " }}"
    return env


def deploy_train(pool: str = GPU_POOL, env: dict[str, str] | None = None) -> Deployed:
    """The `train/gpu` deployment the finetune flow reaches with run_deployment."""
    dep_id = _deploy(
        "flows/train.py:train_flow",
        "gpu",
        pool,
        env or {},
        description="Trains a LoRA adapter on the 4-bit base; started by the finetune flow.",
        concurrency_limit=1,
    )
    return Deployed("train/gpu", pool, dep_id, tuple(env or {}))


ALERT_AUTOMATION = "loraflow-run-failed"
ALERT_BLOCK = "loraflow-alerts"


def alert_block(webhook_url: str):
    """The Prefect notification block that POSTs to ``webhook_url`` (Slack, Teams and friends accept its JSON).

    The URL itself goes into the block's secret values: a webhook URL is often the credential (Slack's path,
    a ``?token=``), and the block's plain fields are shown in the Prefect UI.
    """
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    return CustomWebhookNotificationBlock(
        name=ALERT_BLOCK,
        url="{{webhook_url}}",
        secrets={"webhook_url": webhook_url},
        json_data={"text": "{{body}}", "subject": "{{subject}}"},
        allow_private_urls=True,
    )


def ensure_failure_alert(webhook_url: str) -> str:
    """An automation that POSTs to ``webhook_url`` when a finetune or train flow run fails or crashes.

    Re-applying replaces the automation, so it is idempotent. Returns the automation id.
    """
    from prefect.automations import Automation, EventTrigger, SendNotification
    from prefect.client.orchestration import get_client

    block_id = alert_block(webhook_url).save(ALERT_BLOCK, overwrite=True)
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(name=ALERT_AUTOMATION):
            client.delete_automation(old.id)
    automation = Automation(
        name=ALERT_AUTOMATION,
        description="Notify when a loraflow finetune or train flow run fails or crashes.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": ["finetune", "train"]},
            posture="Reactive",
            threshold=1,
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject="loraflow: flow run {{ flow_run.name }} {{ flow_run.state.name }}",
                body="Flow {{ flow.name }} run {{ flow_run.name }} ({{ flow_run.id }}) ended "
                "{{ flow_run.state.name }}: {{ flow_run.state.message }}",
            )
        ],
    ).create()
    return str(automation.id)


def refuse_credentials(config_file: Path, tracking_uri: str) -> None:
    """Refuse a tracking URI with a credential: deployment parameters are readable by every Prefect UI user."""
    if redact(tracking_uri) == tracking_uri:
        return
    raise UsageError(
        f"the tracking URI of the deployments ({redact(tracking_uri)}, from tracking.uri in {config_file} or "
        "MLFLOW_TRACKING_URI) carries a credential, and deployment parameters are stored in the Prefect server for "
        "every UI user to read. Take it out of the URL and keep it in the Prefect Secret blocks "
        f"{' and '.join(CREDENTIAL_BLOCKS.values())} (Blocks page of the Prefect UI, or "
        "`prefect.blocks.system.Secret(value=...).save(NAME)`): `loraflow deploy` hands them to every deployed run as "
        f"{USERNAME_VAR}/{PASSWORD_VAR}. Then deploy again."
    )


CHOICE_FILE = "deployments.json"


def save_choice(home: Path, config: Path) -> None:
    """Remember which config `loraflow deploy` used, so that `loraflow up` re-applies the same defaults."""
    (home / CHOICE_FILE).write_text(json.dumps({"config": str(config)}))


def apply_saved(home: Path, default_config: Path) -> list[Deployed]:
    """Apply the deployments with the config chosen by the last `loraflow deploy` (else ``default_config``)."""
    choice = home / CHOICE_FILE
    config = Path(json.loads(choice.read_text())["config"]) if choice.is_file() else default_config
    return deploy_all(config)


def deploy_all(default_config: Path, cpu_pool: str = CPU_POOL, gpu_pool: str = GPU_POOL) -> list[Deployed]:
    """Create the pools and apply every loraflow deployment; ``default_config`` fills the form's defaults."""
    from prefect.client.orchestration import get_client
    from prefect.schedules import Cron

    from loraflow.stack.services import ensure_process_pools

    config: PipelineConfig = load_config(default_config)
    # The promote deployment's server: the config's, else the caller's (the stack's).
    tracking_uri = config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    refuse_credentials(default_config, tracking_uri)
    with get_client(sync_client=True) as client:
        ensure_process_pools(client, {cpu_pool: None, gpu_pool: 1})
        env = credential_env(client)
    defaults = flow_parameters({"config": config})
    out = [deploy_train(gpu_pool, env)]
    out.append(
        Deployed(
            "finetune/cpu",
            cpu_pool,
            _deploy(
                "flows/finetune.py:finetune",
                "cpu",
                cpu_pool,
                env,
                parameters=defaults,
                description="Fine-tune on demand: the form sets data, base model, LoRA and training settings.",
            ),
            tuple(env),
        )
    )
    # The nightly retrain ends with the promotion gate: a better adapter becomes champion unattended.
    gated = config.promotion.model_copy(update={"enabled": True})
    nightly = config.model_copy(update={"run_name": None, "promotion": gated})
    out.append(
        Deployed(
            "finetune/retrain-nightly",
            cpu_pool,
            _deploy(
                "flows/finetune.py:finetune",
                "retrain-nightly",
                cpu_pool,
                env,
                parameters=flow_parameters({"config": nightly}),
                schedules=[Cron(NIGHTLY_CRON, timezone=NIGHTLY_TIMEZONE)],
                description=f"Retrain on the latest data every night ({NIGHTLY_CRON} {NIGHTLY_TIMEZONE}).",
            ),
            tuple(env),
        )
    )
    out.append(
        Deployed(
            "promote/cpu",
            cpu_pool,
            _deploy(
                "flows/promote.py:promote",
                "cpu",
                cpu_pool,
                env,
                parameters=flow_parameters(
                    {"name": config.registry.model_name, "rules": config.promotion, "tracking_uri": tracking_uri}
                ),
                description="Run the promotion gate on a registered version (fill in its number) and move aliases.",
            ),
            tuple(env),
        )
    )
    return out
