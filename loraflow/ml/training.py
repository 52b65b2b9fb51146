"""The training loop's parts: the peft config, preparing a 4-bit model for LoRA, the step loop, checkpoints.

A plain PyTorch loop (no Trainer) so that the step, the loss and the checkpoint layout are ours:
loss on response tokens only, token-weighted across gradient accumulation, AdamW on the adapter
weights, one checkpoint folder per ``checkpoint_every`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers import get_scheduler

from loraflow.config import CompileMode, LoraConfig, TrainConfig
from loraflow.ml.batching import collate, collate_packed, micro_batches, packed_micro_batches, packed_rows_per_epoch
from loraflow.ml.lora4bit import fuse_lora_4bit
from loraflow.ml.loss import token_loss_sum
from loraflow.ml.memory import PROFILES, MemoryProfile, apply_profile
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
) -> torch.nn.Module:
    """Freeze the (4-bit) base, set up the memory profile and wrap it with a fresh LoRA adapter.

    Non-quantized weights stay in their loaded dtype: peft's ``prepare_model_for_kbit_training``
    would upcast them all (lm_head included) to fp32, which costs 2.3x throughput on a GPU for
    no measured gain (DESIGN.md). With ``compile``, each decoder layer, LoRA included, goes
    through torch.compile: the layers share one compiled graph, which fuses the norms,
    activations, rotary embeddings and LoRA additions that eager mode runs as separate kernels.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    apply_profile(model, profile)
    peft_model = get_peft_model(model, peft_config(lora))
    if fused:
        fuse_lora_4bit(peft_model)
    if compile == "on" or (compile == "auto" and model.device.type == "cuda"):
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


def save_checkpoint(model, optimizer, scheduler, step: int, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        },
        out / "trainer_state.pt",
    )
    return out


@dataclass
class Fit:
    """What the training loop produced (the adapter itself stays in the model)."""

    steps: int
    epochs: float
    trained_tokens: int
    final_loss: float
    curve: list[dict[str, float]]
    checkpoints: list[str]


def fit(
    model: torch.nn.Module,
    examples: list[Encoded],
    pad_id: int,
    cfg: TrainConfig,
    run_dir: Path,
    tracker: Tracker = NULL_TRACKER,
    progress: bool = True,
) -> Fit:
    """Train the LoRA weights of ``model`` (from :func:`prepare_for_training`) on encoded examples.

    The data order follows ``cfg.seed``; LoRA dropout follows torch's RNG, which the caller seeds
    (``train`` does, before the adapter is initialised).
    """
    if cfg.packing:
        units = packed_rows_per_epoch(examples, cfg.max_seq_length, cfg.seed)
        batches = (
            collate_packed(b, pad_id)
            for b in packed_micro_batches(examples, cfg.batch_size, cfg.max_seq_length, cfg.seed)
        )
    else:
        units = len(examples)
        batches = (collate(b, pad_id) for b in micro_batches(examples, cfg.batch_size, cfg.seed))
    steps, epochs = total_steps(cfg, units)
    chunk_tokens = PROFILES[cfg.memory_profile].loss_chunk_tokens
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)
    curve: list[dict[str, float]] = []
    checkpoints: list[str] = []
    trained_tokens = 0
    window: list[float] = []
    last_window: list[float] = []
    model.train()
    bar = tqdm(range(1, steps + 1), desc="train", unit="step", disable=not progress)
    for step in bar:
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        step_loss = 0.0
        for b in micro:
            loss_sum, _ = token_loss_sum(model, b, chunk_tokens=chunk_tokens)
            (loss_sum / n_tokens).backward()
            step_loss += loss_sum.item() / n_tokens
            trained_tokens += int(b["attention_mask"].sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        curve.append({"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm})
        window.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if step % cfg.log_every == 0 or step == steps:
            tracker.log_metrics(
                {"train/loss": sum(window) / len(window), "train/lr": lr, "train/grad_norm": grad_norm}, step
            )
            last_window, window = window, []
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < steps:
            ck = save_checkpoint(model, optimizer, scheduler, step, run_dir / "checkpoints" / f"step-{step:06d}")
            checkpoints.append(str(ck))
    bar.close()
    return Fit(steps, epochs, trained_tokens, sum(last_window) / len(last_window), curve, checkpoints)
