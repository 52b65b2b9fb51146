"""The finetune flow: preflight -> validate -> quantize -> train (GPU pool) -> evaluate -> merge -> register
-> (promote) -> retention.

    loraflow up && loraflow run configs/demo.yaml     # or simply: make demo

Each stage is a task in flows/stages.py around a plain function in tasks/; this module only
says what runs in which order and where. One MLflow parent run holds a nested run per stage.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.bookkeeping import lineage_of, publish_summary, reporting_failure, resolve_locations, start_parent_run
from flows.placement import train_on_pool
from flows.promote import promote
from flows.stages import (
    base_model_stage,
    evaluate_stage,
    merge_stage,
    preflight_stage,
    quantize_stage,
    register_stage,
    retention_stage,
    validate_stage,
)
from loraflow.config import PipelineConfig
from loraflow.records import RunSummary


@flow(name="finetune", log_prints=True)
def finetune(
    config: PipelineConfig, home: str | None = None, tracking_uri: str | None = None, fresh: bool = False
) -> RunSummary:
    """Fine-tune the base model on the dataset and register the adapter as a candidate.

    Args:
        config: the whole run configuration (the Prefect UI renders it as a form).
        home: LORAFLOW_HOME holding caches and run folders (default: the worker's LORAFLOW_HOME).
        tracking_uri: MLflow server (default: config.tracking.uri, else the worker's MLFLOW_TRACKING_URI).
        fresh: train from scratch: drop this config's checkpoints and cached adapter instead of resuming.
    """
    home, tracking_uri = resolve_locations(config, home, tracking_uri)
    preflight_stage(config, home, tracking_uri)
    run = start_parent_run(config, home, tracking_uri, flow_run.get_id() or "local")
    run_dir, parent, cache = run.run_dir, run.tracker, home / "cache"
    with reporting_failure(parent):
        base_model = base_model_stage(config, cache)
        data = validate_stage(config, base_model, run_dir, parent)
        base = quantize_stage(config, base_model, cache, parent)
        adapter = train_on_pool(config, base, data, run_dir, parent, fresh)
        evaluation = evaluate_stage(config, base, adapter, data, run_dir, parent)
        merged = merge_stage(config, base, adapter, data, run_dir, parent)
        version = register_stage(
            config, base, adapter, evaluation, merged, lineage_of(run, data, base, evaluation), parent
        )
        promotion = (
            promote(version.name, version.version, tracking_uri, config.promotion) if config.promotion.enabled else None
        )
        summary = publish_summary(version, evaluation, merged, run, promotion)
    retention_stage(config, home, tracking_uri)
    return summary
