"""evaluate: base and fine-tuned model on the held-out split -> EvalReport.

Both models are scored on the same examples with the same encoding as training: mean
cross-entropy per response token (and its perplexity), and ROUGE-L F1 of greedy answers against
the reference answers. The base is the same loaded 4-bit model with the adapter switched off, so
the comparison isolates what the adapter changed.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

from peft import PeftModel

from loraflow.config import EvalConfig
from loraflow.ml.examples import read_jsonl
from loraflow.ml.models import load_quantized, load_tokenizer
from loraflow.ml.prompts import last_user_turn, reference
from loraflow.ml.scoring import score
from loraflow.records import Adapter, EvalReport, ModelMetrics, QuantizedBase, ValidatedData
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
