"""The train flow: runs on the `gpu` work pool, reached by the finetune flow through its deployment.

    loraflow up            # starts a worker for the `gpu` pool and deploys this flow as `train/gpu`

It receives small records (paths, digests) and writes its result to ``<run_dir>/adapter.json``:
the run directory is the storage both sides reach, Prefect results are not (DESIGN.md).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.bookkeeping import entry_point
from flows.stages import train_attempt
from flows.trainer import retry_if_crashed
from loraflow.config import PipelineConfig
from loraflow.errors import StageError
from loraflow.records import Adapter, QuantizedBase, ValidatedData
from loraflow.reports import plot_loss_curve
from loraflow.tracking import BufferedTracker, MlflowTracker, stage_run

ADAPTER_RECORD = "adapter.json"
FINISHED_RECORD = "finished.json"  # beside the checkpoints: the adapter of a training that completed
RETRY_DELAY_S = 2


@flow(name="train", log_prints=True)
def train_flow(
    config: PipelineConfig,
    base: QuantizedBase,
    data: ValidatedData,
    run_dir: str,
    tracking_uri: str,
    parent_run_id: str,
    checkpoint_dir: str | None = None,
) -> Adapter:
    """Train a LoRA adapter on the 4-bit base; the adapter record lands in the run directory.

    A crashed trainer is retried ``config.train.retries`` times, each attempt resuming from the newest
    checkpoint in ``checkpoint_dir``; all attempts log into one MLflow train run.
    """
    tracking_uri = entry_point(tracking_uri, "tracking_uri")
    run = Path(run_dir)
    with stage_run(MlflowTracker(tracking_uri, parent_run_id), "train") as child:
        tracker = BufferedTracker(child)
        attempt = train_attempt.with_options(
            retries=config.train.retries, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=retry_if_crashed
        )
        adapter = attempt(config, base, data, run, Path(checkpoint_dir) if checkpoint_dir else None, tracker)
        if checkpoint_dir:  # before anything that needs MLflow: a later run reuses it instead of training again
            adapter.save(Path(checkpoint_dir).parent / FINISHED_RECORD)
        tracker.log_artifact(plot_loss_curve(adapter.loss_curve_path, run / "train" / "loss_curve.png"), "train")
        try:
            tracker.flush(config.tracking.outage_timeout_s)
        except ConnectionError as e:
            raise StageError(
                f"training finished, but MLflow at {tracking_uri} stayed unreachable: {e}. The adapter is safe in "
                f"{adapter.path}; run the same config again once MLflow is back and it is registered without "
                "retraining."
            ) from e
    adapter.save(run / ADAPTER_RECORD)
    return adapter
