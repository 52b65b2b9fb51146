"""Where the train stage runs: on the `gpu` work pool through its deployment, or in this process."""

from __future__ import annotations

from pathlib import Path

from flows.caching import cache_dir_of, cache_key, reuse_or_run
from loraflow import tags as T
from loraflow.config import PipelineConfig
from loraflow.credentials import redact
from loraflow.errors import StageError
from loraflow.records import Adapter, QuantizedBase, ValidatedData, load_record
from loraflow.tracking import MlflowTracker


def train_on_pool(
    config: PipelineConfig, base: QuantizedBase, data: ValidatedData, run_dir: Path, parent: MlflowTracker
) -> Adapter:
    """Run the train flow where the config places it (or reuse an unchanged adapter) and return the adapter."""
    data_settings = config.data.model_dump(mode="json", exclude={"path", "allowed_roots"})
    key = cache_key("train", data.digest, data_settings, base.base.digest, base.quant_hash, config.lora, config.train)
    return reuse_or_run(
        "train",
        key,
        Adapter,
        cache_dir_of(run_dir),
        parent,
        lambda: _dispatch(config, base, data, run_dir, parent),
        lambda a: [a.path],
    )


def _dispatch(
    config: PipelineConfig, base: QuantizedBase, data: ValidatedData, run_dir: Path, parent: MlflowTracker
) -> Adapter:
    from flows.train import ADAPTER_RECORD, train_flow

    params = {
        "config": config,
        "base": base,
        "data": data,
        "run_dir": str(run_dir),
        "tracking_uri": parent.tracking_uri,
        "parent_run_id": parent.run_id,
    }
    orchestration = config.orchestration
    if orchestration.train_on == "in_process":
        return train_flow(**params)

    from prefect.deployments import run_deployment

    # Flow-run parameters are readable by every Prefect UI user: redacted like every other writer.
    jsonable = redact({k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in params.items()})
    run = run_deployment(orchestration.train_deployment, parameters=jsonable, timeout=orchestration.train_timeout_s)
    state = run.state
    if state is None or not state.is_completed():
        parent.set_tags({T.FAILED_STAGE: "train"})
        state_name = state.name if state else "unknown"
        raise StageError(
            f"the train flow run '{run.name}' ({run.id}) on deployment '{orchestration.train_deployment}' ended "
            f"{state_name}: {state.message if state else ''}. Its logs are in the Prefect UI and the worker's log "
            "(`loraflow status` shows where). If it is still running, raise orchestration.train_timeout_s."
        )
    return load_record(Adapter, run_dir / ADAPTER_RECORD)
