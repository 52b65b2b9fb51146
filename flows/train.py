"""The train flow: runs on the `gpu` work pool, reached by the finetune flow through its deployment.

    loraflow up            # starts a worker for the `gpu` pool and deploys this flow as `train/gpu`

It receives small records (paths, digests) and writes its result to ``<run_dir>/adapter.json``:
the run directory is the storage both sides reach, Prefect results are not (DESIGN.md).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.bookkeeping import entry_point
from flows.stages import train_stage
from loraflow.config import PipelineConfig
from loraflow.records import Adapter, QuantizedBase, ValidatedData
from loraflow.tracking import MlflowTracker

ADAPTER_RECORD = "adapter.json"


@flow(name="train", log_prints=True)
def train_flow(
    config: PipelineConfig,
    base: QuantizedBase,
    data: ValidatedData,
    run_dir: str,
    tracking_uri: str,
    parent_run_id: str,
) -> Adapter:
    """Train a LoRA adapter on the 4-bit base; the adapter record lands in the run directory."""
    tracking_uri = entry_point(tracking_uri, "tracking_uri")
    adapter = train_stage(config, base, data, Path(run_dir), MlflowTracker(tracking_uri, parent_run_id))
    adapter.save(Path(run_dir) / ADAPTER_RECORD)
    return adapter
