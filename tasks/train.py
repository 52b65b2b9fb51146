"""train: QuantizedBase + ValidatedData + LoRA/training config -> Adapter (standard PEFT format).

The loop itself is loraflow.ml.training; this stage reads the split, encodes it with the base's
tokenizer, trains with a fixed seed and saves the adapter, its tokenizer and the loss curve.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from loraflow.config import LoraConfig, TrainConfig
from loraflow.errors import DataError
from loraflow.hashing import sha256_dir
from loraflow.ml.batching import packed_rows_per_epoch
from loraflow.ml.examples import encode_all, read_jsonl
from loraflow.ml.lora_init import init_adapter
from loraflow.ml.models import load_quantized, load_tokenizer
from loraflow.ml.training import fit, prepare_for_training
from loraflow.records import Adapter, QuantizedBase, ValidatedData
from loraflow.tracking import NULL_TRACKER, Tracker


def train(
    base: QuantizedBase,
    data: ValidatedData,
    lora: LoraConfig,
    cfg: TrainConfig,
    run_dir: Path,
    tracker: Tracker = NULL_TRACKER,
    progress: bool = True,
) -> Adapter:
    """Train a LoRA adapter on the 4-bit base and save it under ``run_dir/adapter``."""
    start = time.perf_counter()
    tok = load_tokenizer(base.path)
    examples = encode_all(tok, read_jsonl(data.train_path), cfg.max_seq_length)
    if len(examples) < cfg.batch_size:
        raise DataError(
            f"only {len(examples)} training examples keep a response within max_seq_length={cfg.max_seq_length} "
            f"tokens, fewer than one batch of {cfg.batch_size}: "
            "add data, raise train.max_seq_length or lower train.batch_size."
        )
    if cfg.packing and packed_rows_per_epoch(examples, cfg.max_seq_length, cfg.seed) < cfg.batch_size:
        raise DataError(
            f"the {len(examples)} training examples pack into fewer than one batch of {cfg.batch_size} rows of "
            f"{cfg.max_seq_length} tokens: add data, lower train.batch_size or set train.packing=false."
        )
    tracker.log_params(
        {"lora": lora.model_dump(mode="json"), "train": cfg.model_dump(mode="json"), "train_examples": len(examples)}
    )

    # fork_rng: seeding adapter init and dropout must not leak into the caller's global RNG state;
    # enable_grad: a caller inside torch.no_grad() must not silently disable training.
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(cfg.seed)
        model = prepare_for_training(load_quantized(base.path), lora, cfg.memory_profile, cfg.compile)
        init_adapter(model, lora, base.base.path)  # lora.init; LoftQ reads the full-precision weights
        result = fit(model, examples, tok.pad_token_id, cfg, run_dir, tracker, progress)

    adapter_dir = run_dir / "adapter"
    model.save_pretrained(adapter_dir)
    tok.save_pretrained(adapter_dir)
    curve_path = run_dir / "train" / "loss_curve.json"
    curve_path.parent.mkdir(parents=True, exist_ok=True)
    curve_path.write_text(json.dumps(result.curve))
    adapter = Adapter(
        path=str(adapter_dir),
        digest=sha256_dir(adapter_dir),
        steps=result.steps,
        epochs=result.epochs,
        train_examples=len(examples),
        trained_tokens=result.trained_tokens,
        final_loss=result.final_loss,
        seconds=time.perf_counter() - start,
        checkpoints=result.checkpoints,
        loss_curve_path=str(curve_path),
    )
    tracker.log_metrics(
        {
            "train/final_loss": adapter.final_loss,
            "train/seconds": adapter.seconds,
            "train/tokens_per_second": adapter.trained_tokens / adapter.seconds,
        }
    )
    tracker.log_artifact(curve_path, "train")
    return adapter
