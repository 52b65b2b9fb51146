"""evaluate: base and fine-tuned model on the held-out split -> EvalReport.

Both models are scored on the same examples with the same encoding as training: mean
cross-entropy per response token (and its perplexity), and ROUGE-L F1 of greedy answers against
the reference answers. The base is the same loaded 4-bit model with the adapter switched off, so
the comparison isolates what the adapter changed.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from rouge_score import rouge_scorer
from transformers import PreTrainedTokenizerBase

from loraflow.batching import collate
from loraflow.config import EvalConfig
from loraflow.loss import token_loss_sum
from loraflow.models import load_quantized, load_tokenizer
from loraflow.prompts import last_user_turn, prompt_text, reference
from loraflow.records import Adapter, EvalReport, ModelMetrics, QuantizedBase, ValidatedData
from loraflow.tracking import NULL_TRACKER, Tracker
from tasks.train import encode_all, read_jsonl


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


def evaluate(
    base: QuantizedBase,
    adapter: Adapter,
    data: ValidatedData,
    cfg: EvalConfig,
    max_length: int,
    run_dir: Path,
    tracker: Tracker = NULL_TRACKER,
) -> EvalReport:
    """Score base and fine-tuned models on the held-out split and write answer samples."""
    start = time.perf_counter()
    records = read_jsonl(data.eval_path)
    gen_records = records[: cfg.generation_rows] if cfg.generation_rows else records
    tok = load_tokenizer(adapter.path)
    # Inference only, never trained: bitsandbytes' faster CPU layout is safe here.
    model = PeftModel.from_pretrained(load_quantized(base.path, cpu_repack=True), adapter.path)
    model.eval()
    results = {}
    for name, adapter_state in (("base", model.disable_adapter), ("finetuned", nullcontext)):
        with adapter_state():
            results[name] = score(model, tok, records, gen_records, cfg, max_length)

    samples = run_dir / "eval" / "samples.jsonl"
    samples.parent.mkdir(parents=True, exist_ok=True)
    with open(samples, "w", encoding="utf-8") as f:
        for i, r in enumerate(gen_records):
            row = {
                "prompt": last_user_turn(r),
                "reference": reference(r),
                "base": results["base"][1][i],
                "finetuned": results["finetuned"][1][i],
                "rouge_l_base": results["base"][2][i],
                "rouge_l_finetuned": results["finetuned"][2][i],
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    report = EvalReport(
        base=results["base"][0],
        finetuned=results["finetuned"][0],
        samples_path=str(samples),
        seconds=time.perf_counter() - start,
    )
    for name in ("base", "finetuned"):
        m: ModelMetrics = getattr(report, name)
        tracker.log_metrics(
            {f"eval/{name}/loss": m.loss, f"eval/{name}/perplexity": m.perplexity, f"eval/{name}/rouge_l": m.rouge_l}
        )
    tracker.log_metrics({"eval/seconds": report.seconds})
    tracker.log_artifact(samples, "eval")
    return report
