"""Prefect tasks around the stage functions in tasks/: placement, retries, tracking; no ML here.

The stage functions stay importable without Prefect (the GPU image has none); these wrappers are
the only place that ties them to Prefect and MLflow. Each stage logs into its own nested MLflow run.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.bookkeeping import markdown_artifact
from flows.caching import cache_dir_of, cache_key, reuse_or_run
from loraflow.config import PipelineConfig
from loraflow.records import (
    Adapter,
    BaseModelRef,
    EvalReport,
    Lineage,
    MergedModel,
    QuantizedBase,
    RegisteredVersion,
    ValidatedData,
)
from loraflow.tracking import MlflowTracker, Tracker, stage_run


@task(name="preflight", cache_policy=NO_CACHE)
def preflight_stage(config: PipelineConfig, home: Path, tracking_uri: str) -> None:
    """Fail in seconds, with every problem listed, before any heavy work (flows/preflight.py); then close what
    crashed attempts left open (flows/reconcile.py): a scheduled run is often the next to notice them."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.preflight import preflight, raise_if_any
    from flows.reconcile import reconcile

    raise_if_any(preflight(config, home, tracking_uri))
    with get_client(sync_client=True) as prefect:
        for closed in reconcile(prefect, MlflowClient(tracking_uri=tracking_uri)):
            print(f"closed {closed.what} {closed.id}: {closed.why}")


@task(name="base-model", cache_policy=NO_CACHE)
def base_model_stage(config: PipelineConfig, cache_dir: Path) -> BaseModelRef:
    """The base model as a local Hugging Face folder with its digest (a GGUF file is converted once)."""
    from loraflow.ml.models import prepare_base

    return prepare_base(config.base_model, cache_dir)


@task(name="validate", cache_policy=NO_CACHE)
def validate_stage(config: PipelineConfig, base: BaseModelRef, run_dir: Path, parent: MlflowTracker) -> ValidatedData:
    from tasks.validate import validate

    with stage_run(parent, "validate") as tracker:
        # Example lengths are counted with the run's own tokenizer.
        try:
            data = validate(
                config.data,
                run_dir,
                base.path,
                config.train.max_seq_length,
                trust_remote_code=base.trust_remote_code,
            )
        finally:  # the reports explain a violation: keep them with the run either way
            _publish_validation(run_dir / "data", parent, tracker)
        tracker.log_params({"contract": data.contract, "data_digest": data.digest, "rows": data.rows})
        tracker.log_metrics({"train_rows": data.train_rows, "eval_rows": data.eval_rows})
    return data


def _publish_validation(folder: Path, parent: MlflowTracker, tracker: MlflowTracker) -> None:
    """Attach the reports and quarantine file to the run; link them from a Prefect markdown artifact."""
    import json

    from loraflow.data.report import markdown

    for name in ("validation_report.json", "validation_report.html", "quarantine.jsonl"):
        if (folder / name).is_file():
            parent.log_artifact(folder / name, "data")
    report_file = folder / "validation_report.json"
    if not report_file.is_file():  # the file could not be read at all: the error says why
        return
    report = json.loads(report_file.read_text(encoding="utf-8"))
    q, t = report.get("quarantine") or {}, report.get("tokens") or {}
    tracker.log_metrics(
        {
            "rows": report["rows"],
            "failed_expectations": report["failed"],
            "quarantined_rows": q.get("rows", 0),
            "quarantined_share": q.get("share", 0.0),
            **({"truncated_share": t["truncated_share"]} if t else {}),
        }
    )
    markdown_artifact(
        markdown(report, parent.url), key="data-contract", description=f"{report['contract']}: {report['status']}"
    )


@task(name="quantize", cache_policy=NO_CACHE)
def quantize_stage(config: PipelineConfig, base: BaseModelRef, cache_dir: Path, parent: MlflowTracker) -> QuantizedBase:
    from tasks.quantize import quantize

    with stage_run(parent, "quantize") as tracker:
        return quantize(base, config.quant, cache_dir, tracker)


@task(name="train-attempt", cache_policy=NO_CACHE)
def train_attempt(
    config: PipelineConfig,
    base: QuantizedBase,
    data: ValidatedData,
    run_dir: Path,
    checkpoint_dir: Path | None,
    tracker: Tracker,
) -> Adapter:
    """One run of the trainer process; the train flow retries it (config.train.retries), each retry resuming."""
    from prefect.runtime import task_run

    from flows.trainer import run_attempt

    return run_attempt(config, base, data, run_dir, checkpoint_dir, tracker, attempt=task_run.run_count or 1)


def evaluate_stage(
    config: PipelineConfig,
    base: QuantizedBase,
    adapter: Adapter,
    data: ValidatedData,
    run_dir: Path,
    parent: MlflowTracker,
) -> EvalReport:
    key = cache_key(
        "evaluate",
        adapter.digest,
        data.digest,
        base.base.digest,
        base.quant_hash,
        config.eval,
        config.train.max_seq_length,
    )
    return reuse_or_run(
        "evaluate",
        key,
        EvalReport,
        cache_dir_of(run_dir),
        parent,
        lambda: _evaluate(config, base, adapter, data, run_dir, parent),
        lambda r: [r.samples_path, r.examples_path],
    )


@task(name="evaluate", cache_policy=NO_CACHE)
def _evaluate(
    config: PipelineConfig,
    base: QuantizedBase,
    adapter: Adapter,
    data: ValidatedData,
    run_dir: Path,
    parent: MlflowTracker,
) -> EvalReport:
    from tasks.evaluate import evaluate

    with stage_run(parent, "evaluate") as tracker:
        report = evaluate(base, adapter, data, config.eval, config.train.max_seq_length, run_dir, tracker)
    parent.log_artifact(report.samples_path, "eval")
    return report


def merge_stage(
    config: PipelineConfig,
    base: QuantizedBase,
    adapter: Adapter,
    data: ValidatedData,
    run_dir: Path,
    parent: MlflowTracker,
) -> MergedModel:
    key = cache_key("merge", adapter.digest, data.digest, base.base.digest, base.quant_hash, config.merge)
    return reuse_or_run(
        "merge",
        key,
        MergedModel,
        cache_dir_of(run_dir),
        parent,
        lambda: _merge(config, base, adapter, data, run_dir, parent),
        lambda r: [r.path],
    )


@task(name="merge", cache_policy=NO_CACHE)
def _merge(
    config: PipelineConfig,
    base: QuantizedBase,
    adapter: Adapter,
    data: ValidatedData,
    run_dir: Path,
    parent: MlflowTracker,
) -> MergedModel:
    from tasks.merge import merge

    with stage_run(parent, "merge") as tracker:
        return merge(base, adapter, data, config.merge, run_dir, tracker)


@task(name="retention", cache_policy=NO_CACHE)
def retention_stage(config: PipelineConfig, home: Path, tracking_uri: str) -> None:
    """Remove what the retention settings allow (loraflow/registry/retention.py); never what an alias needs."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from loraflow.registry.retention import collect

    if not config.retention.on_finish:
        return
    try:
        plan = collect(home, config.retention, MlflowClient(tracking_uri=tracking_uri))
    except (MlflowException, OSError) as e:  # housekeeping: the run itself succeeded; the next one collects
        print(f"retention skipped ({type(e).__name__}: {e}); `loraflow gc` removes what it allows later")
        return
    if plan.remove:
        print(f"retention: removed {len(plan.remove)} path(s), {plan.bytes / 2**20:.0f} MB freed")


def outage_backoff(total_s: float) -> list[float]:
    """Retry delays (5 s doubling to 60 s) that together wait out an MLflow outage of ``total_s``."""
    delays: list[float] = []
    while sum(delays) < total_s:
        delays.append(min(5.0 * 2 ** len(delays), 60.0))
    return delays


def register_stage(
    config: PipelineConfig,
    base: QuantizedBase,
    adapter: Adapter,
    evaluation: EvalReport,
    merged: MergedModel,
    lineage: Lineage,
    parent: MlflowTracker,
) -> RegisteredVersion:
    """Register the adapter, retrying through an MLflow outage of up to ``tracking.outage_timeout_s``."""
    delays = outage_backoff(config.tracking.outage_timeout_s)
    task = _register.with_options(retries=len(delays), retry_delay_seconds=delays)
    return task(config, base, adapter, evaluation, merged, lineage, parent)


# Registering talks to the MLflow server over the network; a failed attempt leaves no version behind
# (register deletes a version it could not finish), and a repeated one finds the version it made.
@task(name="register", cache_policy=NO_CACHE)
def _register(
    config: PipelineConfig,
    base: QuantizedBase,
    adapter: Adapter,
    evaluation: EvalReport,
    merged: MergedModel,
    lineage: Lineage,
    parent: MlflowTracker,
) -> RegisteredVersion:
    from tasks.register import register

    with stage_run(parent, "register"):
        return register(
            adapter, base, evaluation, merged, lineage, config.registry, parent.tracking_uri, config.eval.max_new_tokens
        )
