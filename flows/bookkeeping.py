"""Run bookkeeping for the finetune flow: run directory, MLflow parent run, lineage, summary artifacts.

Also what every flow does first (:func:`entry_point`), and the Prefect helpers that every artifact and every
flow-run or deployment parameter goes through, redacted like every other writer (loraflow/credentials.py).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loraflow import tags as T
from loraflow.config import PipelineConfig
from loraflow.credentials import install_log_redaction, move_tracking_credentials, redact
from loraflow.errors import UsageError
from loraflow.lineage import code_version
from loraflow.noise import silence_known_noise
from loraflow.records import (
    EvalReport,
    Lineage,
    MergedModel,
    PromotionResult,
    QuantizedBase,
    RegisteredVersion,
    RunSummary,
    ValidatedData,
)
from loraflow.reports import metrics_rows, summary_markdown
from loraflow.tracking import MlflowTracker


def entry_point(tracking_uri: str, setting: str) -> str:
    """What a flow does first, as an entry point of its own (a deployment run on a worker).

    Its log records are redacted from here on (they go to the Prefect server too), and a credential
    in the MLflow URI moves into MLflow's environment variables, with a one-line warning: the URI
    that the flow passes on (to the train flow, in links and in errors) carries none.
    """
    install_log_redaction()
    silence_known_noise()
    clean, warning = move_tracking_credentials(tracking_uri, setting, os.environ)
    if warning:
        print(warning)  # flows log their prints: the warning shows in the flow run's logs
    return clean


def resolve_locations(config: PipelineConfig, home: str | None, tracking_uri: str | None) -> tuple[Path, str]:
    """Run home and MLflow URI: explicit arguments first, then the config, then the worker's environment.

    A flow started from a deployment is an entry point of its own, so this is where its
    environment is read (and where a credential leaves the URI: :func:`entry_point`).
    """
    home = home or os.environ.get("LORAFLOW_HOME")
    candidates = (
        ("tracking_uri", tracking_uri),
        ("tracking.uri", config.tracking.uri),
        ("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI")),
    )
    setting, tracking_uri = next(((name, uri) for name, uri in candidates if uri), ("", None))
    missing = [name for name, value in (("LORAFLOW_HOME", home), ("MLFLOW_TRACKING_URI", tracking_uri)) if not value]
    if missing:
        raise UsageError(
            f"the finetune flow does not know {' and '.join(missing)}: pass them as flow parameters, or start "
            "the worker with them set (`loraflow up` does)."
        )
    return Path(home).resolve(), entry_point(tracking_uri, setting)


def flow_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """Flow-run or deployment parameters as Prefect stores them: JSON, redacted (every Prefect UI user reads them)."""
    return redact({k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in params.items()})


def markdown_artifact(markdown: str, key: str, description: str | None = None) -> None:
    """A Prefect markdown artifact (redacted: everyone who opens the flow run reads it)."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(redact(markdown), key=key, description=redact(description))


def table_artifact(rows: list[dict], key: str, description: str | None = None) -> None:
    """A Prefect table artifact (redacted like the markdown ones)."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(redact(rows), key=key, description=redact(description))


@dataclass(frozen=True)
class ParentRun:
    """A finetune flow run's home: its directory, its MLflow parent run and the lineage known at its start."""

    run_dir: Path
    tracker: MlflowTracker
    flow_run_id: str
    code_version: str
    config_hash: str


def start_parent_run(config: PipelineConfig, home: Path, tracking_uri: str, flow_run_id: str) -> ParentRun:
    """Create the run directory and the MLflow parent run, and record the config in both."""
    name = config.run_name or f"{config.registry.model_name}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{flow_run_id[:8]}"
    run_dir = home / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=False)
    config_file = run_dir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    code, config_hash = code_version(), config.config_hash()
    tags = {T.FLOW_RUN_ID: flow_run_id, T.CONFIG_HASH: config_hash, T.CODE_VERSION: code}
    parent = MlflowTracker.start(tracking_uri, config.tracking.experiment, name, tags=tags)
    parent.log_params(config.model_dump(mode="json"))
    parent.log_artifact(config_file)
    return ParentRun(run_dir, parent, flow_run_id, code, config_hash)


@contextmanager
def reporting_failure(parent: MlflowTracker) -> Iterator[None]:
    """End the MLflow run FAILED or FINISHED; on failure publish which stage failed and why.

    The Prefect markdown artifact `finetune-failure` names the stage, the reason and the MLflow run,
    so that the flow run's page says what went wrong without reading logs.
    """
    try:
        with parent.run_status():
            yield
    except BaseException as e:
        try:
            tags = parent.client.get_run(parent.run_id).data.tags
        except Exception:  # noqa: BLE001  (MLflow away: report from the exception alone)
            tags = {}
        stage = tags.get(T.FAILED_STAGE, "orchestration")
        try:
            where = f"[{parent.run_id}]({parent.url})"
        except Exception:  # noqa: BLE001
            where = f"{parent.run_id} (MLflow at {parent.tracking_uri} did not answer)"
        reason = tags.get(T.FAILURE, f"{type(e).__name__}: {e}")
        markdown_artifact(
            f"# finetune failed in stage `{stage}`\n\n```\n{reason}\n```\n\n"
            f"Nothing was registered. MLflow run: {where}",
            key="finetune-failure",
            description=f"finetune failed in stage {stage}",
        )
        raise


def lineage_of(run: ParentRun, data: ValidatedData, base: QuantizedBase, evaluation: EvalReport) -> Lineage:
    parent = run.tracker
    # The held-out split goes with the run: the promotion gate re-scores a champion on it. So do the
    # per-example scores (also when the evaluate stage was reused from the cache): the gate pairs them.
    parent.log_artifact(data.eval_path, "data")
    parent.log_artifact(evaluation.examples_path, "eval")
    return Lineage(
        data_digest=data.digest,
        data_source=data.source,
        contract=data.contract,
        base_model=base.base.name,
        base_digest=base.base.digest,
        config_hash=run.config_hash,
        code_version=run.code_version,
        flow_run_id=run.flow_run_id,
        mlflow_run_id=parent.run_id,
        eval_split=f"runs:/{parent.run_id}/data/{Path(data.eval_path).name}",
        eval_examples=f"runs:/{parent.run_id}/eval/{Path(evaluation.examples_path).name}",
    )


def publish_summary(
    version: RegisteredVersion,
    evaluation: EvalReport,
    merged: MergedModel,
    run: ParentRun,
    promotion: PromotionResult | None = None,
) -> RunSummary:
    """Tag the parent run, publish Prefect artifacts that link to it, and return the run summary."""
    parent, run_dir = run.tracker, run.run_dir
    metrics = parent.client.get_run(parent.run_id).data.metrics
    stage_seconds = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("stage_seconds/")}
    parent.set_tags({T.REGISTERED_MODEL: version.name, T.REGISTERED_VERSION: version.version})
    summary = RunSummary(
        version=version,
        evaluation=evaluation,
        merged=merged,
        promotion=promotion,
        run_dir=str(run_dir),
        mlflow_run_url=parent.url,
        flow_run_id=run.flow_run_id,
        stage_seconds=stage_seconds,
    )
    summary.save(run_dir / "summary.json")
    markdown_artifact(summary_markdown(version, evaluation, merged, parent.url, stage_seconds), key="finetune-summary")
    table_artifact(
        metrics_rows(evaluation), key="finetune-metrics", description=f"Held-out metrics; MLflow run {parent.url}"
    )
    return summary
