"""Scoring a model on held-out records: response-token loss, greedy answers, ROUGE-L.

The evaluate stage, the promotion gate's re-scoring and the serving model all use these, so the
numbers they compare are computed one way.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from rouge_score import rouge_scorer
from transformers import PreTrainedTokenizerBase

from loraflow.config import EvalConfig
from loraflow.ml.batching import collate
from loraflow.ml.examples import encode_all
from loraflow.ml.loss import token_loss_sum
from loraflow.ml.prompts import prompt_text, reference
from loraflow.records import ModelMetrics


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    records: list[dict[str, Any]],
    max_length: int,
    batch_size: int,
) -> tuple[float, int]:
    """Mean response-token cross-entropy and the number of tokens scored."""
    examples = encode_all(tok, records, max_length)
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss_sum, n = token_loss_sum(model, collate(examples[i : i + batch_size], tok.pad_token_id))
        total += loss_sum.item()
        count += n
    return total / max(count, 1), count


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module, tok: PreTrainedTokenizerBase, prompts: list[str], batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy answers, batched with left padding and a KV cache."""
    answers: list[str] = []
    previous_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(
                model.device
            )
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            answers += [a.strip() for a in tok.batch_decode(new.cpu(), skip_special_tokens=True)]
    finally:
        tok.padding_side = previous_side
    return answers


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]


def score(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    records: list[dict[str, Any]],
    gen_records: list[dict[str, Any]],
    cfg: EvalConfig,
    max_length: int,
) -> tuple[ModelMetrics, list[str], list[float]]:
    loss, tokens = heldout_loss(model, tok, records, max_length, cfg.batch_size)
    answers = generate_answers(
        model, tok, [prompt_text(tok, r) for r in gen_records], cfg.batch_size, cfg.max_new_tokens
    )
    scores = rouge_l(answers, [reference(r) for r in gen_records])
    metrics = ModelMetrics(
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        rouge_l=sum(scores) / max(len(scores), 1),
        tokens=tokens,
        generated=len(gen_records),
    )
    return metrics, answers, scores
