"""Where the train stage runs: on the `gpu` work pool through its deployment, or in this process."""

from __future__ import annotations

import shutil
from pathlib import Path

from flows.bookkeeping import flow_parameters
from flows.caching import cache_dir_of, cache_key, reuse_or_run
from flows.follow import follow
from flows.train import FINISHED_RECORD
from loraflow import tags as T
from loraflow.config import PipelineConfig
from loraflow.errors import StageError
from loraflow.records import Adapter, QuantizedBase, ValidatedData, load_record
from loraflow.tracking import MlflowTracker


def train_on_pool(
    config: PipelineConfig,
    base: QuantizedBase,
    data: ValidatedData,
    run_dir: Path,
    parent: MlflowTracker,
    fresh: bool = False,
) -> Adapter:
    """Run the train flow where the config places it (or reuse an unchanged adapter) and return the adapter.

    Its checkpoints live under ``<LORAFLOW_HOME>/cache/train/<key>/``, keyed like the adapter cache, so
    a retried attempt and a later run of the same config both resume from them; ``fresh`` removes
    them and ignores a cached adapter.
    """
    data_settings = config.data.model_dump(mode="json", exclude={"path", "allowed_roots"})
    identity = config.train.identity()
    key = cache_key(
        "train", data.digest, data_settings, base.base.digest, base.quant_hash, config.lora.identity(), identity
    )
    cache = cache_dir_of(run_dir)
    folder = cache / "train" / key[:16]
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
        (cache / "stages" / "train" / f"{key}.json").unlink(missing_ok=True)

    def run() -> Adapter:
        # A training that finished but whose flow failed afterwards (MLflow away) is not done again.
        finished = folder / FINISHED_RECORD
        if finished.is_file() and Path((adapter := load_record(Adapter, finished)).path).is_dir():
            print(f"training of this config already finished in an earlier run: reusing {adapter.path}")
            return adapter
        return _dispatch(config, base, data, run_dir, folder / "checkpoints", parent)

    return reuse_or_run("train", key, Adapter, cache, parent, run, lambda a: [a.path])


def _dispatch(
    config: PipelineConfig,
    base: QuantizedBase,
    data: ValidatedData,
    run_dir: Path,
    checkpoints: Path,
    parent: MlflowTracker,
) -> Adapter:
    from flows.train import ADAPTER_RECORD, train_flow

    params = {
        "config": config,
        "base": base,
        "data": data,
        "run_dir": str(run_dir),
        "tracking_uri": parent.tracking_uri,
        "parent_run_id": parent.run_id,
        "checkpoint_dir": str(checkpoints),
    }
    orchestration = config.orchestration
    if orchestration.train_on == "in_process":
        return train_flow(**params)

    from prefect.deployments import run_deployment

    submitted = run_deployment(orchestration.train_deployment, parameters=flow_parameters(params), timeout=0)
    print(f"train flow run '{submitted.name}' submitted to deployment {orchestration.train_deployment}; following it")
    run = follow(submitted.id, orchestration.train_timeout_s, prefix="train | ")
    state = run.state
    if state is None or not state.is_completed():
        state_name = state.name if state else "unknown"
        error = StageError(
            f"the train flow run '{run.name}' ({run.id}) on deployment '{orchestration.train_deployment}' ended "
            f"{state_name}: {state.message if state else ''}. Its logs are in the Prefect UI and the worker's log "
            "(`loraflow status` shows where). If it is still running, raise orchestration.train_timeout_s."
        )
        try:
            parent.set_tags({T.FAILED_STAGE: "train"})
        except Exception as e:  # noqa: BLE001  (MLflow away: the train flow's failure is the one to report)
            error.add_note(f"the failed stage could not be recorded in MLflow: {e}")
        raise error
    return load_record(Adapter, run_dir / ADAPTER_RECORD)
