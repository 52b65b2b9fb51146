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
from loraflow.ml.loss import row_loss_sums
from loraflow.ml.prompts import Encoded, encode, prompt_text, reference
from loraflow.records import ExampleScores, ModelMetrics


@torch.no_grad()
def example_losses(
    model: torch.nn.Module, tok: PreTrainedTokenizerBase, examples: list[Encoded], batch_size: int
) -> tuple[list[float], list[int]]:
    """Per encoded example: mean cross-entropy over its labelled tokens (0.0 when it has none) and their count."""
    losses: list[float] = []
    counts: list[int] = []
    for i in range(0, len(examples), batch_size):
        sums, n = row_loss_sums(model, collate(examples[i : i + batch_size], tok.pad_token_id))
        losses += [s / c if c else 0.0 for s, c in zip(sums.tolist(), n.tolist(), strict=True)]
        counts += n.tolist()
    return losses, counts


def heldout_loss(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    records: list[dict[str, Any]],
    max_length: int,
    batch_size: int,
) -> tuple[float, int]:
    """Mean response-token cross-entropy and the number of tokens scored."""
    losses, counts = example_losses(model, tok, [encode(tok, r, max_length) for r in records], batch_size)
    return ExampleScores(loss=losses, tokens=counts, rouge_l=[]).mean_loss(), sum(counts)


def text_examples(tok: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[Encoded]:
    """Plain passages (no chat template) with every token labelled, cut at ``max_length`` tokens."""
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"][:max_length]
        out.append(Encoded(ids, list(ids)))
    return out


def text_losses(
    model: torch.nn.Module, tok: PreTrainedTokenizerBase, texts: list[str], max_length: int, batch_size: int
) -> ExampleScores:
    """Per passage of plain text: mean next-token cross-entropy (its perplexity is exp of the token-weighted mean)."""
    losses, counts = example_losses(model, tok, text_examples(tok, texts, max_length), batch_size)
    return ExampleScores(loss=losses, tokens=counts, rouge_l=[])


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
) -> tuple[ModelMetrics, list[str], ExampleScores]:
    """Held-out loss of every record and ROUGE-L of greedy answers to ``gen_records``: the means, the
    answers, and each example's scores (``records`` order; an example whose response was cut away
    entirely by ``max_length`` has 0 tokens and weighs nothing)."""
    losses, counts = example_losses(model, tok, [encode(tok, r, max_length) for r in records], cfg.batch_size)
    answers = generate_answers(
        model, tok, [prompt_text(tok, r) for r in gen_records], cfg.batch_size, cfg.max_new_tokens
    )
    per_example = ExampleScores(
        loss=losses, tokens=counts, rouge_l=rouge_l(answers, [reference(r) for r in gen_records])
    )
    loss = per_example.mean_loss()
    metrics = ModelMetrics(
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        rouge_l=per_example.mean_rouge_l(),
        tokens=sum(counts),
        generated=len(gen_records),
    )
    return metrics, answers, per_example
