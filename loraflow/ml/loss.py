"""The training and evaluation loss: cross-entropy on response tokens only, summed in fp32.

Kept apart from the stages because train and evaluate must score tokens in exactly the same
way, and because the output head is where most of a 128k-vocabulary model's activation memory
goes: the full fp32 logits of a 4 x 2048 batch are 4.2 GB.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint

from loraflow.ml.attention import document_block_mask, uses_flex
from loraflow.ml.prompts import IGNORE_INDEX

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

    A packed batch (``loraflow.ml.batching.pack``) carries ``position_ids`` that restart at 0 for
    every example and no attention mask: with SDPA, transformers then builds a block-diagonal causal
    mask from them; with FlexAttention (``loraflow.ml.attention``), the batch gets a document-causal
    block mask. Either way packed examples never attend to each other.
    """
    # Which positions are scored is worked out where the labels are (the host, for the stages'
    # batches): no GPU synchronisation for the token count or the selection.
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE_INDEX
    n_tokens = int(selected.sum())
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    flex = uses_flex(causal_lm)
    if chunk_tokens is None or causal_lm.config.model_type not in PLAIN_HEAD_MODELS:
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(**model_inputs(batch, flex)).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            batch["labels"][:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss, n_tokens
    rows, cols = selected.nonzero(as_tuple=True)
    positions = rows * batch["labels"].size(1) + cols  # of the labelled tokens' predictors, in (batch x seq)
    labels = targets[rows, cols].to(model.device, non_blocking=True)
    positions = positions.to(model.device, non_blocking=True)
    batch = {k: v.to(model.device, non_blocking=True) for k, v in batch.items()}
    hidden = causal_lm.get_decoder()(**model_inputs(batch, flex)).last_hidden_state
    hidden = hidden.reshape(-1, hidden.size(-1)).index_select(0, positions)  # (labelled tokens, hidden)
    head = causal_lm.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad:
        return _FusedHeadCrossEntropy.apply(hidden, head.weight, labels, chunk_tokens), n_tokens
    loss = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n_tokens, chunk_tokens):
        loss = loss + torch.utils.checkpoint.checkpoint(
            _head_loss_sum, head, hidden[i : i + chunk_tokens], labels[i : i + chunk_tokens], use_reentrant=False
        )
    return loss, n_tokens


@torch.no_grad()
def row_loss_sums(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a padded batch: the sum of its labelled tokens' cross-entropies (fp32) and their count.

    Scoring only (no gradient); the tokens are those :func:`token_loss_sum` sums, with the same
    arithmetic (fp32 log-sum-exp minus the target's logit), so the rows add up to its total. The
    evaluate stage needs them apart: the promotion gate bootstraps over examples.
    """
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE_INDEX
    rows, cols = selected.nonzero(as_tuple=True)
    labels = targets[rows, cols].to(model.device)
    inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in model_inputs(batch).items()}
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if causal_lm.config.model_type in PLAIN_HEAD_MODELS:
        hidden = causal_lm.get_decoder()(**inputs).last_hidden_state[rows.to(model.device), cols.to(model.device)]
        head = causal_lm.get_output_embeddings()
        per_token = torch.cat(
            [_token_losses(head(hidden[i : i + chunk_tokens]), labels[i : i + chunk_tokens])
             for i in range(0, len(labels), chunk_tokens)]
        ) if len(labels) else hidden.new_zeros(0, dtype=torch.float32)  # fmt: skip
    else:
        logits = model(**inputs).logits[:, :-1][rows.to(model.device), cols.to(model.device)]
        per_token = _token_losses(logits, labels)
    sums = torch.zeros(targets.size(0), dtype=torch.float32).index_add_(0, rows, per_token.cpu())
    return sums, selected.sum(dim=1)


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - logits.gather(1, labels[:, None]).squeeze(1)


def model_inputs(batch: dict[str, torch.Tensor], flex: bool = False) -> dict[str, Any]:
    """The forward arguments of a padded batch (attention mask) or a packed one (position ids; with
    ``flex``, for a model on FlexAttention, also its document-causal block mask)."""
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
        if flex:  # a 4-D mask: transformers passes it to the attention as it is
            inputs["attention_mask"] = document_block_mask(batch["position_ids"])
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


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
