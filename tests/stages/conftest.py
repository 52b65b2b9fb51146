"""Shared by the stage tests: the tiny model trained once per session, and helpers that replay training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from loraflow.config import TrainConfig
from loraflow.ml.batching import collate, micro_batches
from loraflow.ml.examples import encode_all, read_jsonl
from loraflow.ml.lora4bit import fuse_lora_4bit
from loraflow.ml.loss import token_loss_sum
from loraflow.ml.models import (
    load_quantized,
)
from loraflow.records import Adapter, QuantizedBase
from tasks.train import train
from tests.conftest import LORA, torch_threads

# A high constant learning rate: the loss falls visibly in 15 steps, and the state after step k
# does not depend on the total number of steps.
TRAIN = TrainConfig(
    max_steps=15,
    learning_rate=1e-2,
    lr_scheduler="constant",
    batch_size=4,
    max_seq_length=64,
    checkpoint_every=5,
    memory_profile="fast",
)


def loss_curve(adapter: Adapter) -> list[float]:
    return [row["loss"] for row in json.loads(Path(adapter.loss_curve_path).read_text())]


def training_batches(tok, data, cfg: TrainConfig) -> list[dict[str, torch.Tensor]]:
    """The micro-batches train() sees, in order (grad_accum 1: one per step)."""
    stream = micro_batches(encode_all(tok, read_jsonl(data.train_path), cfg.max_seq_length), cfg.batch_size, cfg.seed)
    return [collate(next(stream), tok.pad_token_id) for _ in range(cfg.max_steps)]


def lora_on_fresh_base(base: QuantizedBase, adapter_dir: str | Path) -> torch.nn.Module:
    return PeftModel.from_pretrained(load_quantized(base.path), str(adapter_dir))


def step_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """The training loss of one micro-batch, computed the way train() does (train mode, grad on,
    the fused LoRA layers of loraflow/ml/lora4bit.py)."""
    fuse_lora_4bit(model)
    model.train()
    loss_sum, n = token_loss_sum(model, batch)
    return loss_sum.item() / n


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Every test here on one thread (see torch_threads); session fixtures below use it too."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def trained(tiny_quantized, tiny_data, tmp_path_factory) -> Adapter:
    with torch_threads(1):
        run = tmp_path_factory.mktemp("run")
        return train(tiny_quantized, tiny_data, LORA, TRAIN, run, checkpoint_dir=run / "checkpoints")
