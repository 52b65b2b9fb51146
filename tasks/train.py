"""train: QuantizedBase + ValidatedData + LoRA/training config -> Adapter (standard PEFT format).

A plain PyTorch loop (no Trainer) so that the step, the loss and the checkpoint layout are ours:
loss on response tokens only, token-weighted across gradient accumulation, AdamW on the adapter
weights, one checkpoint folder per ``checkpoint_every`` steps holding everything a resume needs
(adapter, optimizer, scheduler, RNG state, step).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler

from loraflow.config import LoraConfig, TrainConfig
from loraflow.errors import DataError
from loraflow.models import load_quantized, load_tokenizer
from loraflow.prompts import IGNORE_INDEX, Encoded, encode
from loraflow.records import Adapter, QuantizedBase, ValidatedData
from loraflow.tracking import NULL_TRACKER, Tracker


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_all(tok: PreTrainedTokenizerBase, records: list[dict[str, Any]], max_length: int) -> list[Encoded]:
    """Encode records, dropping those whose response was truncated away entirely."""
    encoded = [encode(tok, r, max_length) for r in records]
    return [e for e in encoded if e.label_tokens > 0]


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding is masked out of attention and labels."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def micro_batches(examples: list[Encoded], batch_size: int, seed: int) -> Iterator[list[Encoded]]:
    """Endless stream of shuffled micro-batches, reshuffled each epoch with a seeded generator."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):  # the caller ensures one full batch
            yield [examples[j] for j in order[i : i + batch_size]]


# Architectures whose logits are exactly lm_head(final hidden state): no soft-capping or scaling.
PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3"}
LOSS_CHUNK_TOKENS = 2048  # measured on the H200: the best tokens/s of 1024-8192 (docs/benchmarks.md)


def token_loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int | None = LOSS_CHUNK_TOKENS
) -> tuple[torch.Tensor, int]:
    """Sum of response-token cross-entropies (fp32) and the number of tokens summed.

    With ``chunk_tokens`` (and a plain-head architecture), the output head runs only on the
    labelled positions, ``chunk_tokens`` at a time: the full (tokens x vocabulary) fp32 logits,
    4.2 GB for a batch of 4 x 2048 with a 128k vocabulary, never exist. A frozen bias-free head
    (the LoRA case) gets the fused path, which computes the gradient for the hidden states while
    each chunk's logits exist, so nothing is recomputed; any other head recomputes its chunks in
    the backward pass. ``chunk_tokens=None`` is the reference path through the full logits.
    """
    batch = {k: v.to(model.device) for k, v in batch.items()}
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE_INDEX
    n_tokens = int(selected.sum())
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if chunk_tokens is None or causal_lm.config.model_type not in PLAIN_HEAD_MODELS:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss, n_tokens
    hidden = causal_lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = hidden.last_hidden_state[:, :-1][selected]  # (labelled tokens, hidden)
    head = causal_lm.get_output_embeddings()
    labels = targets[selected]
    if type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad:
        return _FusedHeadCrossEntropy.apply(hidden, head.weight, labels, chunk_tokens), n_tokens
    loss = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n_tokens, chunk_tokens):
        loss = loss + torch.utils.checkpoint.checkpoint(
            _head_loss_sum, head, hidden[i : i + chunk_tokens], labels[i : i + chunk_tokens], use_reentrant=False
        )
    return loss, n_tokens


def _head_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")


class _FusedHeadCrossEntropy(torch.autograd.Function):
    """sum CE(hidden @ weight.T, labels) for a frozen head, chunk by chunk, with d/d(hidden) computed
    in the forward pass (softmax - onehot, times the weight) while the chunk's logits exist."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        for i in range(0, hidden.size(0), chunk):
            h, y = hidden[i : i + chunk], labels[i : i + chunk]
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if grad_hidden is not None:
                probs = torch.exp(logits.sub_(lse[:, None]))  # in place: one (chunk x vocab) buffer
                probs[torch.arange(len(y), device=y.device), y] -= 1.0
                grad_hidden[i : i + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None


def peft_config(cfg: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )


def prepare_for_training(model: torch.nn.Module, lora: LoraConfig, gradient_checkpointing: bool) -> torch.nn.Module:
    """Freeze the 4-bit base and wrap it with a fresh LoRA adapter.

    Non-quantized weights stay in their loaded dtype: peft's ``prepare_model_for_kbit_training``
    would upcast them all (lm_head included) to fp32, which costs 2.3x throughput on a GPU for
    no measured gain (DESIGN.md).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config(lora))


def total_steps(cfg: TrainConfig, n_examples: int) -> tuple[int, float]:
    steps_per_epoch = max(1, n_examples // (cfg.batch_size * cfg.grad_accum))
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
    steps, epochs = total_steps(cfg, len(examples))
    tracker.log_params(
        {"lora": lora.model_dump(mode="json"), "train": cfg.model_dump(mode="json"), "train_examples": len(examples)}
    )

    # fork_rng: seeding adapter init and dropout must not leak into the caller's global RNG state;
    # enable_grad: a caller inside torch.no_grad() must not silently disable training.
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(cfg.seed)
        model = prepare_for_training(load_quantized(base.path), lora, cfg.gradient_checkpointing)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps
        )
        batches = micro_batches(examples, cfg.batch_size, cfg.seed)
        curve: list[dict[str, float]] = []
        checkpoints: list[str] = []
        trained_tokens = 0
        window: list[float] = []
        model.train()
        bar = tqdm(range(1, steps + 1), desc="train", unit="step", disable=not progress)
        for step in bar:
            micro = [collate(next(batches), tok.pad_token_id) for _ in range(cfg.grad_accum)]
            n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
            step_loss = 0.0
            for b in micro:
                loss_sum, _ = token_loss_sum(model, b)
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

    adapter_dir = run_dir / "adapter"
    model.save_pretrained(adapter_dir)
    tok.save_pretrained(adapter_dir)
    curve_path = run_dir / "train" / "loss_curve.json"
    curve_path.parent.mkdir(parents=True, exist_ok=True)
    curve_path.write_text(json.dumps(curve))
    result = Adapter(
        path=str(adapter_dir),
        steps=steps,
        epochs=epochs,
        train_examples=len(examples),
        trained_tokens=trained_tokens,
        final_loss=sum(last_window) / len(last_window),
        seconds=time.perf_counter() - start,
        checkpoints=checkpoints,
        loss_curve_path=str(curve_path),
    )
    tracker.log_metrics(
        {
            "train/final_loss": result.final_loss,
            "train/seconds": result.seconds,
            "train/tokens_per_second": trained_tokens / result.seconds,
        }
    )
    tracker.log_artifact(curve_path, "train")
    return result
