"""train: QuantizedBase + ValidatedData + LoRA/training config -> Adapter (standard PEFT format).

The loop itself is loraflow.ml.training; this stage reads the split, encodes it with the base's
tokenizer, trains with a fixed seed and saves the adapter, its tokenizer and the loss curve. With a
checkpoint folder it resumes from the newest checkpoint of the same run found there.

The train flow runs it in a process of its own, so that a killed trainer (OOM, pre-emption) costs
one attempt, not the flow:

    python -m tasks.train REQUEST.json EVENTS.jsonl ADAPTER.json

reads a :class:`TrainRequest`, appends every metric, tag and step to EVENTS.jsonl (the flow
forwards them to MLflow and the logs) and writes the Adapter record to ADAPTER.json. With
``train.distributed`` 'ddp' or 'fsdp' the flow starts it under torchrun, one process per rank:

    python -m torch.distributed.run --nproc-per-node N --standalone -m tasks.train REQUEST EVENTS ADAPTER

and each rank finds its place in torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); rank 0 writes
the events, checkpoints, adapter and record, with every rank's tokens/s and peak memory among its metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from loraflow import tags as T
from loraflow.config import LoraConfig, TrainConfig
from loraflow.errors import DataError, LoraflowError
from loraflow.hashing import sha256_dir, sha256_file
from loraflow.ml import checkpoints, distributed
from loraflow.ml.batching import packed_rows_per_epoch
from loraflow.ml.examples import encode_all, read_jsonl
from loraflow.ml.lora_init import Calibration, init_adapter
from loraflow.ml.models import load_quantized, load_tokenizer
from loraflow.ml.training import StepInfo, fit, prepare_for_training
from loraflow.records import Adapter, QuantizedBase, Record, ValidatedData, load_record
from loraflow.tracking import NULL_TRACKER, EventLog, Tracker


def run_key(base: QuantizedBase, data: ValidatedData, lora: LoraConfig, cfg: TrainConfig) -> str:
    """What makes two trainings the same run: the train split's bytes, the 4-bit base, LoRA and training settings."""
    parts = [sha256_file(Path(data.train_path)), base.base.digest, base.quant_hash, lora.identity()]
    return hashlib.sha256(json.dumps([*parts, cfg.identity()], sort_keys=True).encode()).hexdigest()


def train(
    base: QuantizedBase,
    data: ValidatedData,
    lora: LoraConfig,
    cfg: TrainConfig,
    run_dir: Path,
    tracker: Tracker = NULL_TRACKER,
    checkpoint_dir: Path | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    world: distributed.World | None = None,
) -> Adapter:
    """Train a LoRA adapter on the 4-bit base and save it under ``run_dir/adapter``.

    With ``checkpoint_dir``, checkpoints go there and training resumes from the newest one of this
    run (:func:`run_key`); one written with other library versions is refused unless
    ``cfg.resume_across_versions``. With ``world``, this process is one rank (:mod:`loraflow.ml.distributed`),
    holding the whole model ('ddp', and 'fsdp' without ``world``) or its shard of it ('fsdp'): only rank 0
    tracks and writes; every rank returns the same Adapter.
    """
    start = time.perf_counter()
    if world is not None and not world.main:
        tracker, on_step = NULL_TRACKER, None
    trust = base.base.trust_remote_code
    tok = load_tokenizer(base.path, trust_remote_code=trust)
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

    key = run_key(base, data, lora, cfg)
    resume = _resumable(checkpoint_dir, key, cfg, tracker) if checkpoint_dir is not None else None

    # fork_rng: seeding adapter init and dropout must not leak into the caller's global RNG state;
    # enable_grad: a caller inside torch.no_grad() must not silently disable training.
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(cfg.seed)  # the same adapter init on every rank
        device = world.device if world is not None else None
        sharded = world is not None and cfg.distributed == "fsdp"
        if sharded:  # in host memory: shard() moves each layer's slice to the GPU, which never holds the whole base
            dtype = None if device == "cpu" else base.compute_dtype  # a GPU run keeps the saved one, never the CPU's
            loaded = load_quantized(base.path, trust_remote_code=trust, device="cpu", compute_dtype=dtype)
        else:
            loaded = load_quantized(base.path, trust_remote_code=trust, device=device)
        model = prepare_for_training(loaded, lora, cfg.memory_profile, cfg.compile, device=device)
        # lora.init; LoftQ and CLoQ read the full-precision weights (under 'fsdp' on the CPU: the model is in
        # host memory), CLoQ also runs the model over lora.calibration_rows training examples
        init_adapter(model, lora, base.base.path, Calibration(examples, tok.pad_token_id, cfg.seed, cfg.batch_size))
        if sharded:
            distributed.shard(model, world)
        if world is not None and world.size > 1:  # each rank draws its own dropout masks for its own rows
            torch.manual_seed(cfg.seed + 1 + world.rank)
        result = fit(model, examples, tok.pad_token_id, cfg, tracker, checkpoint_dir, key, resume, on_step, world)

    adapter_dir = run_dir / "adapter"
    curve_path = run_dir / "train" / "loss_curve.json"
    weights = checkpoints.adapter_tensors(model)  # every rank: gathered to rank 0 when sharded
    if world is None or world.main:
        model.save_pretrained(adapter_dir, state_dict=weights)
        tok.save_pretrained(adapter_dir)
        curve_path.parent.mkdir(parents=True, exist_ok=True)
        curve_path.write_text(json.dumps(result.curve))
    if world is not None:
        ranks = world.gather(
            {
                "tokens_per_second": result.rank_tokens / result.rank_seconds,
                "peak_memory_gb": distributed.peak_memory_gb(world.device),
            }
        )
        for rank, figures in enumerate(ranks):
            tracker.log_metrics(
                {
                    distributed.RANK_TOKENS_PER_S.format(rank=rank): figures["tokens_per_second"],
                    distributed.RANK_PEAK_MEMORY_GB.format(rank=rank): figures["peak_memory_gb"],
                }
            )
        tracker.log_metrics({"train/ranks": world.size})
        world.barrier()  # rank 0's adapter is on disk before any rank reads it
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


def _resumable(folder: Path, key: str, cfg: TrainConfig, tracker: Tracker) -> checkpoints.Checkpoint | None:
    """The newest checkpoint of this run in ``folder``, checked; its step and any version change become tags."""
    found = checkpoints.latest(folder)
    if found is None:
        return None
    changed = found.check_compatible(key, cfg.resume_across_versions)
    tags = {T.RESUMED_FROM: f"step {found.step}: {found.path}"}
    if changed:
        tags[T.RESUMED_ACROSS_VERSIONS] = "; ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
    tracker.set_tags(tags)
    return found


REFUSED = 3  # the trainer's exit code when it refuses the run (a LoraflowError): not worth another attempt


class TrainRequest(Record):
    """Everything the trainer process needs (the train flow writes it, ``python -m tasks.train`` reads it)."""

    base: QuantizedBase
    data: ValidatedData
    lora: LoraConfig
    train: TrainConfig
    run_dir: str
    checkpoint_dir: str | None


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.train REQUEST.json EVENTS.jsonl ADAPTER.json``: one training attempt."""
    request_path, events_path, result_path = argv if argv is not None else sys.argv[1:]
    request = load_record(TrainRequest, Path(request_path))
    world = None
    if "WORLD_SIZE" in os.environ:  # started by torchrun: one rank of a data-parallel run
        _die_with_parent()
        env = os.environ
        world = distributed.start(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))
    try:
        main_rank = world is None or world.main
        events = EventLog(Path(events_path)) if main_rank else NULL_TRACKER
        if main_rank:
            events.event("started", pid=os.getpid(), ranks=world.size if world else 1)
        adapter = train(
            request.base,
            request.data,
            request.lora,
            request.train,
            Path(request.run_dir),
            events,
            Path(request.checkpoint_dir) if request.checkpoint_dir else None,
            on_step=lambda s: events.event("step", **dataclasses.asdict(s)),
            world=world,
        )
        if main_rank:
            adapter.save(Path(result_path))
            events.event("finished", steps=adapter.steps)
    except LoraflowError as e:  # the data or the config: another attempt would fail the same way
        if main_rank:
            events.event("refused", message=str(e), error=type(e).__name__)
        return REFUSED
    finally:
        if world is not None:
            distributed.stop()
    return 0


def _die_with_parent() -> None:
    """A rank dies with torchrun's agent, which dies with the train flow (flows/trainer.py): no orphan ranks."""
    import ctypes
    import signal

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


if __name__ == "__main__":
    sys.exit(main())
