"""The training loop's parts: the peft config, preparing a 4-bit model for LoRA, the step loop, checkpoints.

A plain PyTorch loop (no Trainer) so that the step, the loss and the checkpoint layout are ours:
loss on response tokens only, token-weighted across gradient accumulation, AdamW on the adapter
weights, a checkpoint every ``checkpoint_every`` steps that a killed run resumes from exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch.distributed.tensor import DTensor
from transformers import get_scheduler

from loraflow.config import CompileMode, LoraConfig, TrainConfig
from loraflow.ml import checkpoints
from loraflow.ml.attention import resolve_attention, set_attention
from loraflow.ml.batching import collate, collate_packed, micro_batches, packed_micro_batches, packed_rows_per_epoch
from loraflow.ml.distributed import World, is_sharded
from loraflow.ml.lora4bit import fuse_lora_4bit
from loraflow.ml.loss import token_loss_sum
from loraflow.ml.memory import PROFILES, MemoryProfile, apply_profile, tile_mlps
from loraflow.ml.prompts import IGNORE_INDEX, Encoded
from loraflow.tracking import NULL_TRACKER, Tracker


def peft_config(cfg: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )


def prepare_for_training(
    model: torch.nn.Module,
    lora: LoraConfig,
    profile: MemoryProfile,
    compile: CompileMode = "off",
    fused: bool = True,
    device: str | None = None,
) -> torch.nn.Module:
    """Freeze the (4-bit) base, set up the memory profile and wrap it with a fresh LoRA adapter.

    Non-quantized weights stay in their loaded dtype: peft's ``prepare_model_for_kbit_training``
    would upcast them all (lm_head included) to fp32, which costs 2.3x throughput on a GPU for
    no measured gain (DESIGN.md). With ``compile``, each decoder layer, LoRA included, goes
    through torch.compile: the layers share one compiled graph, which fuses the norms,
    activations, rotary embeddings and LoRA additions that eager mode runs as separate kernels;
    'auto' compiles when the model trains on a GPU (``device``, by default where it is now).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    apply_profile(model, profile)
    peft_model = get_peft_model(model, peft_config(lora))
    if fused:
        fuse_lora_4bit(peft_model)
    settings = PROFILES[profile]
    if settings.mlp_tile_tokens:  # around the MLPs' forward as it is now: LoRA and its fused groups inside
        tile_mlps(peft_model, settings.mlp_tile_tokens, settings.mlp_tile_above)
    if compile == "on" or (compile == "auto" and torch.device(device or model.device).type == "cuda"):
        for layer in model.get_decoder().layers:
            layer.compile()
    return peft_model


def total_steps(cfg: TrainConfig, units_per_epoch: int) -> tuple[int, float]:
    """Optimizer steps and epochs; a unit is an example, or a packed row with ``train.packing``."""
    steps_per_epoch = max(1, units_per_epoch // (cfg.batch_size * cfg.grad_accum))
    if cfg.max_steps is not None:
        return cfg.max_steps, cfg.max_steps / steps_per_epoch
    assert cfg.epochs is not None
    steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return steps, cfg.epochs


@dataclass(frozen=True)
class StepInfo:
    """What the loop reports after each optimizer step (for a progress display)."""

    step: int
    steps: int
    loss: float
    seconds: float  # wall time of this step
    tokens: int  # non-padding tokens of this step


@dataclass
class Fit:
    """What the training loop produced (the adapter itself stays in the model)."""

    steps: int
    epochs: float
    trained_tokens: int
    final_loss: float
    curve: list[dict[str, float]]
    checkpoints: list[str]
    resumed_from: int | None = None  # the step of the checkpoint this call started from
    rank_tokens: int = 0  # non-padding tokens this rank computed (all of them without ranks)
    rank_seconds: float = 0.0  # this rank's time in the step loop


def fit(
    model: torch.nn.Module,
    examples: list[Encoded],
    pad_id: int,
    cfg: TrainConfig,
    tracker: Tracker = NULL_TRACKER,
    checkpoint_dir: Path | None = None,
    run_key: str = "",
    resume: checkpoints.Checkpoint | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    world: World | None = None,
) -> Fit:
    """Train the LoRA weights of ``model`` (from :func:`prepare_for_training`) on encoded examples.

    The data order follows ``cfg.seed``; LoRA dropout follows torch's RNG, which the caller seeds
    (``train`` does, before the adapter is initialised). With ``checkpoint_dir``, a checkpoint of
    ``run_key`` is written every ``cfg.checkpoint_every`` steps (:mod:`loraflow.ml.checkpoints`);
    with ``resume``, the loop continues from that checkpoint exactly where the run that wrote it
    was: adapter, optimizer, scheduler, RNG states, data position and loss curve restored, so the
    steps after it compute what an uninterrupted run computes.

    With ``world`` (ranks, :mod:`loraflow.ml.distributed`), every rank computes its share of each global
    micro-batch and the adapter gradients are summed over ranks before clipping: by one all-reduce
    here, or by FSDP's reduce-scatter when the model is sharded (``distributed.shard``). Only rank 0
    writes checkpoints (with every rank's RNG states) and calls ``tracker`` and ``on_step``.
    """
    sharded = is_sharded(model)
    if cfg.packing:
        units = packed_rows_per_epoch(examples, cfg.max_seq_length, cfg.seed)
        stream = packed_micro_batches(examples, cfg.batch_size, cfg.max_seq_length, cfg.seed)
        batch_of = collate_packed
        set_attention(model, resolve_attention(cfg.attention, model.device))  # flex on a GPU: no dense mask
    else:
        units = len(examples)
        stream = micro_batches(examples, cfg.batch_size, cfg.seed)
        batch_of = collate
    steps, epochs = total_steps(cfg, units)
    chunk_tokens = PROFILES[cfg.memory_profile].loss_chunk_tokens
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)
    loop = {"curve": [], "trained_tokens": 0, "window": [], "last_window": []}
    start = 0
    if world is not None:
        world.rows(cfg.batch_size)  # refuses a batch too small to split before any work
    if resume is not None:
        state = checkpoints.restore(model, optimizer, resume)
        scheduler.load_state_dict(state["scheduler"])
        loop = state["loop"]
        start = resume.step
        for _ in range(start * cfg.grad_accum):  # the batch stream is replayed, not stored
            next(stream)
        checkpoints.set_rng_states(checkpoints.rng_of_rank(state, world.rank if world else 0))
    if world is not None and not sharded:
        world.broadcast_params(params)  # identical by construction (same seed, same file); made sure, as DDP does
    curve, window = loop["curve"], loop["window"]
    rank_tokens, loop_began = 0, time.perf_counter()
    model.train()
    for step in range(start + 1, steps + 1):
        began = time.perf_counter()
        micro = [batch_of(next(stream), pad_id) for _ in range(cfg.grad_accum)]
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)  # global: all ranks' rows
        step_loss, step_tokens = 0.0, 0
        for b in micro:
            step_tokens += int(b["attention_mask"].sum())
            if world is not None:
                b = world.shard(b)
                rank_tokens += int(b["attention_mask"].sum())
            loss_sum, _ = token_loss_sum(model, b, chunk_tokens=chunk_tokens)
            (loss_sum / n_tokens).backward()
            step_loss += loss_sum.item() / n_tokens
        if world is not None:
            if not sharded:  # FSDP has reduce-scattered them in the backward pass
                world.all_reduce_grads(params)
            step_loss = world.sum(step_loss)
        else:
            rank_tokens += step_tokens
        loop["trained_tokens"] += step_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        grad_norm = (grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm).item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        curve.append({"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm})
        window.append(step_loss)
        if step % cfg.log_every == 0 or step == steps:
            if world is None or world.main:
                tracker.log_metrics(
                    {"train/loss": sum(window) / len(window), "train/lr": lr, "train/grad_norm": grad_norm}, step
                )
            loop["last_window"], window = window, []
            loop["window"] = window
        if checkpoint_dir is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < steps:
            adapter = checkpoints.adapter_tensors(model)  # every rank: gathered when sharded
            state = {
                "optimizer": checkpoints.optimizer_state(model, optimizer),
                "scheduler": scheduler.state_dict(),
                "rng": checkpoints.rng_states(),
                "loop": loop,
            }
            meta = {"run_key": run_key}
            if world is not None:  # every rank's dropout stream, and how many there were
                state["rng_ranks"] = world.gather(state["rng"])
                meta["world_size"] = world.size
            if world is None or world.main:
                checkpoints.save(checkpoint_dir, step, model, adapter, state, meta, cfg.keep_checkpoints)
        if on_step is not None and (world is None or world.main):
            on_step(StepInfo(step, steps, step_loss, time.perf_counter() - began, step_tokens))
    if world is not None:
        world.barrier()  # rank 0's last checkpoint is complete before any rank lists them
    last = loop["last_window"]
    kept = [str(c.path) for c in checkpoints.complete(checkpoint_dir)] if checkpoint_dir is not None else []
    resumed = resume.step if resume is not None else None
    seconds = time.perf_counter() - loop_began
    return Fit(steps, epochs, loop["trained_tokens"], sum(last) / len(last), curve, kept, resumed, rank_tokens, seconds)
