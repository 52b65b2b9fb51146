"""Run bookkeeping for the finetune flow: run directory, MLflow parent run, lineage, summary artifacts."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import yaml

from loraflow.config import PipelineConfig
from loraflow.lineage import code_version
from loraflow.records import (
    EvalReport,
    Lineage,
    MergedModel,
    QuantizedBase,
    RegisteredVersion,
    RunSummary,
    ValidatedData,
)
from loraflow.reports import metrics_rows, summary_markdown
from loraflow.tracking import MlflowTracker


def start_parent_run(
    config: PipelineConfig, home: Path, tracking_uri: str, flow_run_id: str
) -> tuple[Path, MlflowTracker]:
    """Create the run directory and the MLflow parent run, and record the config in both."""
    name = config.run_name or f"{config.registry.model_name}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{flow_run_id[:8]}"
    run_dir = home / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=False)
    config_file = run_dir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    parent = MlflowTracker.start(
        tracking_uri,
        config.tracking.experiment,
        name,
        tags={
            "loraflow.flow_run_id": flow_run_id,
            "loraflow.config_hash": config.config_hash(),
            "loraflow.code_version": code_version(),
        },
    )
    parent.log_params(config.model_dump(mode="json"))
    parent.log_artifact(config_file)
    return run_dir, parent


def lineage_of(config: PipelineConfig, data: ValidatedData, base: QuantizedBase, parent: MlflowTracker) -> Lineage:
    run = parent.client.get_run(parent.run_id)
    return Lineage(
        data_digest=data.digest,
        data_source=data.source,
        contract=data.contract,
        base_model=base.base.name,
        base_digest=base.base.digest,
        config_hash=config.config_hash(),
        code_version=run.data.tags["loraflow.code_version"],
        flow_run_id=run.data.tags["loraflow.flow_run_id"],
        mlflow_run_id=parent.run_id,
    )


def publish_summary(
    version: RegisteredVersion, evaluation: EvalReport, merged: MergedModel, run_dir: Path, parent: MlflowTracker
) -> RunSummary:
    """Tag the parent run, publish Prefect artifacts that link to it, and return the run summary."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    metrics = parent.client.get_run(parent.run_id).data.metrics
    stage_seconds = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("stage_seconds/")}
    parent.set_tags({"loraflow.registered_model": version.name, "loraflow.registered_version": version.version})
    summary = RunSummary(
        version=version,
        evaluation=evaluation,
        merged=merged,
        run_dir=str(run_dir),
        mlflow_run_url=parent.url,
        flow_run_id=parent.client.get_run(parent.run_id).data.tags["loraflow.flow_run_id"],
        stage_seconds=stage_seconds,
    )
    summary.save(run_dir / "summary.json")
    create_markdown_artifact(
        summary_markdown(version, evaluation, merged, parent.url, stage_seconds), key="finetune-summary"
    )
    create_table_artifact(
        metrics_rows(evaluation), key="finetune-metrics", description=f"Held-out metrics; MLflow run {parent.url}"
    )
    return summary
