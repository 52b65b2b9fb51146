"""evaluate: base and fine-tuned model on the held-out split -> EvalReport.

Both models are scored on the same examples with the same encoding as training: mean
cross-entropy per response token (and its perplexity), and ROUGE-L F1 of greedy answers against
the reference answers. The base is the same loaded 4-bit model with the adapter switched off, so
the comparison isolates what the adapter changed.

Every example's scores go into ``eval/examples.jsonl`` (loraflow/scores.py): the promotion gate
compares two versions example by example, with a bootstrap interval, rather than by their means.
With ``eval.general_text`` both models also score a set of general-text passages as perplexity:
what the fine-tune forgot (``promotion.max_general_regression``).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

from peft import PeftModel

from loraflow import scores
from loraflow.config import EvalConfig
from loraflow.errors import DataError
from loraflow.hashing import sha256_file
from loraflow.ml.examples import read_jsonl
from loraflow.ml.models import load_quantized, load_tokenizer
from loraflow.ml.prompts import last_user_turn, reference
from loraflow.ml.scoring import score, text_losses
from loraflow.records import (
    Adapter,
    EvalReport,
    ExampleScores,
    GeneralTextMetrics,
    ModelMetrics,
    QuantizedBase,
    ValidatedData,
)
from loraflow.tracking import NULL_TRACKER, Tracker


def evaluate(
    base: QuantizedBase,
    adapter: Adapter,
    data: ValidatedData,
    cfg: EvalConfig,
    max_length: int,
    run_dir: Path,
    tracker: Tracker = NULL_TRACKER,
) -> EvalReport:
    """Score base and fine-tuned models on the held-out split (and the general text) and write samples."""
    start = time.perf_counter()
    records = read_jsonl(data.eval_path)
    gen_records = records[: cfg.generation_rows] if cfg.generation_rows else records
    passages = general_passages(cfg.general_text) if cfg.general_text else None
    trust = base.base.trust_remote_code
    tok = load_tokenizer(adapter.path, trust_remote_code=trust)
    # Inference only, never trained: bitsandbytes' faster CPU layout is safe here.
    model = PeftModel.from_pretrained(load_quantized(base.path, trust_remote_code=trust, cpu_repack=True), adapter.path)
    model.eval()
    results, general = {}, {}
    for name, adapter_state in (("base", model.disable_adapter), ("finetuned", nullcontext)):
        with adapter_state():
            results[name] = score(model, tok, records, gen_records, cfg, max_length)
            if passages is not None:
                general[name] = text_losses(model, tok, passages, max_length, cfg.batch_size)

    out = run_dir / "eval"
    samples = out / "samples.jsonl"
    samples.parent.mkdir(parents=True, exist_ok=True)
    with open(samples, "w", encoding="utf-8") as f:
        for i, r in enumerate(gen_records):
            row = {
                "prompt": last_user_turn(r),
                "reference": reference(r),
                "base": results["base"][1][i],
                "finetuned": results["finetuned"][1][i],
                "rouge_l_base": results["base"][2].rouge_l[i],
                "rouge_l_finetuned": results["finetuned"][2].rouge_l[i],
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    per_example = {scores.HELDOUT: {name: results[name][2] for name in results}}
    if general:
        per_example[scores.GENERAL] = general
    examples = scores.write_examples(out / scores.EXAMPLES_FILE, per_example)
    report = EvalReport(
        base=with_intervals(results["base"][0], results["base"][2], cfg.confidence),
        finetuned=with_intervals(results["finetuned"][0], results["finetuned"][2], cfg.confidence),
        general=general_metrics(cfg.general_text, general, cfg.confidence) if general else None,
        samples_path=str(samples),
        examples_path=str(examples),
        seconds=time.perf_counter() - start,
    )
    for name in ("base", "finetuned"):
        m: ModelMetrics = getattr(report, name)
        tracker.log_metrics(
            {f"eval/{name}/loss": m.loss, f"eval/{name}/perplexity": m.perplexity, f"eval/{name}/rouge_l": m.rouge_l}
        )
    if report.general is not None:
        g = report.general
        tracker.log_metrics(
            {
                "eval/base/general_perplexity": g.base_perplexity,
                "eval/finetuned/general_perplexity": g.finetuned_perplexity,
                "eval/general_increase": g.increase,
            }
        )
    tracker.log_metrics({"eval/seconds": report.seconds})
    tracker.log_artifact(samples, "eval")
    tracker.log_artifact(examples, "eval")
    return report


def general_passages(path: str) -> list[str]:
    """The ``text`` of every record of a general-text JSONL file."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"eval.general_text {path} does not exist (the demo's is data/general_text.jsonl)")
    texts = [r.get("text") for r in read_jsonl(file)]
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise DataError(f"eval.general_text {path}: every line must be a JSON object with a non-empty 'text'")
    return texts


def with_intervals(m: ModelMetrics, examples: ExampleScores, level: float) -> ModelMetrics:
    """The metrics with their bootstrap intervals over examples."""
    rouge = scores.rouge_l_interval(examples, level) if examples.rouge_l else None
    return m.model_copy(update={"loss_interval": scores.loss_interval(examples, level), "rouge_l_interval": rouge})


def general_metrics(path: str, s: dict[str, ExampleScores], level: float) -> GeneralTextMetrics:
    """Perplexities on the general text and how much the fine-tune raised it, with a paired interval."""
    base, tuned = s["base"].mean_loss(), s["finetuned"].mean_loss()
    low, high = scores.loss_interval(s["finetuned"], level, other=s["base"])
    return GeneralTextMetrics(
        path=path,
        sha256=sha256_file(Path(path)),
        passages=len(s["base"].loss),
        tokens=sum(s["base"].tokens),
        base_perplexity=math.exp(base),
        finetuned_perplexity=math.exp(tuned),
        increase=math.exp(tuned - base) - 1,
        increase_interval=(math.exp(low) - 1, math.exp(high) - 1),
    )
