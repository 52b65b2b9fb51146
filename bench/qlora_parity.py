"""Quality parity of QLoRA and 16-bit LoRA on the demo model and data (CPU).

    python bench/qlora_parity.py --json parity.json                      # demo size, ~5 min on 2 CPU cores
    python bench/qlora_parity.py --variants qlora-nf4 lora-bf16          # without the fp32 row
    python bench/qlora_parity.py --steps 2 --eval-rows 4 --set eval.max_new_tokens=4   # smoke (~40 s)
    python bench/qlora_parity.py --variants qlora-nf4 lora-fp32 --inits loftq --seeds 0 1 2 \
        --set data.eval_max_rows=150 --set eval.generation_rows=32 --json parity.json  # lora.init, 3 seeds

The QLoRA paper's central claim is that LoRA on an NF4 + double-quantized base matches LoRA on
the same base in 16 bits. This measures that claim on the demo (configs/demo.yaml: SmolLM2-135M,
WordNet definitions, 30 steps of batch 8) with the pipeline's own code and nothing else changed:

  qlora-nf4  the 4-bit checkpoint of the quantize stage, loaded with `load_quantized` (as the
             train stage does; the evaluation reloads it as the evaluate stage does)
  lora-bf16  the same full-precision base (the quantize stage's source folder) in bfloat16
  lora-fp32  the same in float32, the reference both are measured against

Each variant trains a fresh adapter with `prepare_for_training` + `fit` (same LoRA config, same
seed set before loading, hence the same adapter init, dropout masks and batches), then scores the
held-out split with the evaluate stage's `score`: mean cross-entropy per response token and its
perplexity, ROUGE-L F1 of greedy answers, each for the fine-tuned model and for the base model
(adapter switched off). It prints one row per variant and the gaps to QLoRA.

``--inits`` also trains QLoRA with other ``lora.init`` values (rows ``qlora-nf4+<init>``; the 16-bit
references keep peft's default init), ``--seeds`` repeats everything per training seed (adapter init,
dropout, data order) and ends with the mean, sample standard deviation and range over seeds. The
base model's scores depend on neither, so they are computed once per variant. The JSON keeps every
example's scores (``examples``), for paired comparisons between rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from loraflow.config import PipelineConfig, load_config  # noqa: E402
from loraflow.ml.examples import encode_all, read_jsonl  # noqa: E402
from loraflow.ml.lora_init import Calibration, init_adapter  # noqa: E402
from loraflow.ml.models import (  # noqa: E402
    load_quantized,
    load_tokenizer,
    prepare_base,  # noqa: E402
)
from loraflow.ml.scoring import score  # noqa: E402
from loraflow.ml.training import fit, prepare_for_training  # noqa: E402
from loraflow.records import QuantizedBase  # noqa: E402
from tasks.quantize import quantize  # noqa: E402
from tasks.validate import validate  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

# variant -> loader(quantized base, for_training) -> a transformers model without adapter
Loader = Callable[[QuantizedBase, bool], torch.nn.Module]


def _full_precision(dtype: torch.dtype) -> Loader:
    return lambda q, _training: AutoModelForCausalLM.from_pretrained(q.base.path, dtype=dtype)


VARIANTS: dict[str, tuple[str, Loader]] = {
    # Training never uses bitsandbytes' repacked CPU layout (no backward); inference may, as evaluate does.
    "qlora-nf4": (
        "NF4 + double quant, bf16 compute",
        lambda q, training: load_quantized(q.path, cpu_repack=not training),
    ),
    "lora-bf16": ("bfloat16", _full_precision(torch.bfloat16)),
    "lora-fp32": ("float32", _full_precision(torch.float32)),
}
METRICS = ("loss", "perplexity", "rouge_l")


@dataclass
class VariantResult:
    variant: str
    base_weights: str
    finetuned: dict[str, float]
    base: dict[str, float]
    first_train_loss: float
    final_train_loss: float
    train_s: float
    eval_s: float
    loss_curve: list[float]
    init: str = "default"
    examples: dict[str, dict] | None = None  # "base"/"finetuned" -> ExampleScores as a dict


def run_variant(
    name: str,
    cfg: PipelineConfig,
    quantized: QuantizedBase,
    examples: list,
    records: list[dict],
    gen_records: list[dict],
    workdir: Path,
    progress: bool,
    base_scores: dict[str, tuple[dict, dict]] | None = None,
) -> VariantResult:
    """Train one adapter on this variant's base as the train stage does, then score it as evaluate does.

    ``base_scores`` keeps the base model's scores (adapter off) per variant: they depend on neither the
    seed nor the init, so later seeds reuse them instead of scoring the base again.
    """
    weights, load = VARIANTS[name]
    # lora.init is the QLoRA variant's: the 16-bit references keep peft's default init (LoftQ has no
    # quantization residual to start from there).
    lora = cfg.lora if name == "qlora-nf4" else cfg.lora.model_copy(update={"init": "default"})
    tok = load_tokenizer(quantized.path)
    run_dir = workdir / name
    # As tasks.train.train: seed before loading (loading draws nothing), keep the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(cfg.train.seed)
        model = prepare_for_training(load(quantized, True), lora, cfg.train.memory_profile)
        init_adapter(
            model,
            lora,
            quantized.base.path,
            Calibration(examples, tok.pad_token_id, cfg.train.seed, cfg.train.batch_size),
        )
        start = time.perf_counter()

        def on_step(s) -> None:
            print(f"  {name} step {s.step}/{s.steps} loss {s.loss:.4f}", flush=True)

        result = fit(model, examples, tok.pad_token_id, cfg.train, on_step=on_step if progress else None)
        train_s = time.perf_counter() - start
    model.save_pretrained(run_dir / "adapter")
    del model
    gc.collect()

    start = time.perf_counter()
    model = PeftModel.from_pretrained(load(quantized, False), run_dir / "adapter")
    model.eval()
    scored, examples = {}, {}
    base_scores = {} if base_scores is None else base_scores
    for which, adapter_state in (("base", model.disable_adapter), ("finetuned", nullcontext)):
        if which == "base" and name in base_scores:
            scored[which], examples[which] = base_scores[name]
            continue
        with adapter_state():
            metrics, _, per_example = score(model, tok, records, gen_records, cfg.eval, cfg.train.max_seq_length)
        scored[which], examples[which] = metrics.model_dump(), per_example.model_dump()
    base_scores[name] = (scored["base"], examples["base"])
    eval_s = time.perf_counter() - start
    del model
    gc.collect()
    losses = [point["loss"] for point in result.curve]
    return VariantResult(
        name,
        weights,
        scored["finetuned"],
        scored["base"],
        losses[0],
        result.final_loss,
        train_s,
        eval_s,
        losses,
        lora.init,
        examples,
    )


def qlora_rows(results: dict[str, VariantResult]) -> list[str]:
    """The QLoRA rows: 'qlora-nf4' (the config's lora.init) and 'qlora-nf4+<init>' for each --inits."""
    return [name for name in results if name.startswith("qlora-nf4")]


def gaps(results: dict[str, VariantResult], reference: str, qlora: str = "qlora-nf4") -> dict[str, dict[str, float]]:
    """QLoRA minus ``reference``, per metric, for the fine-tuned and the base model."""
    q, r = results[qlora], results[reference]
    return {which: {m: getattr(q, which)[m] - getattr(r, which)[m] for m in METRICS} for which in ("finetuned", "base")}


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max over seeds."""
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values)}


def summary(per_seed: dict[int, dict[str, VariantResult]], reference: str) -> dict[str, dict[str, dict[str, float]]]:
    """Across seeds, per row: fine-tuned metrics and (QLoRA rows) the fine-tuned loss gap to ``reference``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in next(iter(per_seed.values())):
        runs = [results[name] for results in per_seed.values()]
        out[name] = {m: spread([r.finetuned[m] for r in runs]) for m in METRICS}
        if name.startswith("qlora-nf4") and reference:
            out[name]["loss_gap"] = spread(
                [
                    results[name].finetuned["loss"] - results[reference].finetuned["loss"]
                    for results in per_seed.values()
                ]
            )
    return out


def print_summary(table: dict[str, dict[str, dict[str, float]]], reference: str, seeds: list[int]) -> None:
    print(f"\nover seeds {seeds}: mean (sd) [min, max] of the fine-tuned model")
    for name, metrics in table.items():
        cells = [f"{m} {v['mean']:.3f} ({v['sd']:.3f}) [{v['min']:.3f}, {v['max']:.3f}]" for m, v in metrics.items()]
        print(f"{name:<18}" + "  ".join(cells).replace("loss_gap", f"gap to {reference}"))


def print_table(results: dict[str, VariantResult], gap_table: dict[str, dict[str, dict[str, float]]]) -> None:
    head = f"{'variant':<19}{'base weights':<34}{'loss':>7}{'ppl':>8}{'ROUGE-L':>9}"
    print(f"{'':<53}{'fine-tuned':^24}  {'base (no adapter)':^24}")
    print(f"{head}  {'loss':>7}{'ppl':>8}{'ROUGE-L':>9}{'final train':>13}{'train s':>9}")
    for r in results.values():
        ft, b = r.finetuned, r.base
        print(
            f"{r.variant:<19}{r.base_weights:<34}{ft['loss']:>7.3f}{ft['perplexity']:>8.2f}{ft['rouge_l']:>9.3f}  "
            f"{b['loss']:>7.3f}{b['perplexity']:>8.2f}{b['rouge_l']:>9.3f}{r.final_train_loss:>13.3f}{r.train_s:>9.0f}"
        )
    for (qlora, reference), g in gap_table.items():
        ft, b = g["finetuned"], g["base"]
        print(
            f"{'gap':<19}{qlora + ' - ' + reference:<34}{ft['loss']:>+7.3f}{ft['perplexity']:>+8.2f}"
            f"{ft['rouge_l']:>+9.3f}  {b['loss']:>+7.3f}{b['perplexity']:>+8.2f}{b['rouge_l']:>+9.3f}"
        )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=DEMO, help="pipeline config (default: configs/demo.yaml)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--steps", type=int, help="optimizer steps (default: the config's train.max_steps)")
    ap.add_argument("--eval-rows", type=int, help="score only the first N held-out rows (default: all)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--no-progress", action="store_true", help="no per-step lines while training")
    ap.add_argument("--seeds", nargs="+", type=int, help="train every variant once per seed (default: train.seed)")
    ap.add_argument(
        "--inits",
        nargs="+",
        default=[],
        choices=["default", "gaussian", "loftq", "cloq"],
        help="also train QLoRA with these lora.init values (rows 'qlora-nf4+<init>')",
    )
    args = ap.parse_args(argv)
    if "qlora-nf4" not in args.variants:
        ap.error("--variants must include qlora-nf4: the gaps are measured against it")

    overrides = list(args.set) + ([f"train.max_steps={args.steps}", "train.epochs=null"] if args.steps else [])
    cfg = load_config(args.config, overrides)
    # The demo's cache: the GGUF conversion and the 4-bit checkpoint are made once and reused.
    cache_dir = Path(os.environ.get("LORAFLOW_HOME", ".loraflow")) / "cache"
    quantized = quantize(prepare_base(cfg.base_model, cache_dir), cfg.quant, cache_dir)
    with tempfile.TemporaryDirectory(prefix="qlora-parity-") as tmp:
        workdir = Path(tmp)
        data = validate(cfg.data, workdir, quantized.base.path, cfg.train.max_seq_length)
        tok = load_tokenizer(quantized.path)
        examples = encode_all(tok, read_jsonl(data.train_path), cfg.train.max_seq_length)
        records = read_jsonl(data.eval_path)[: args.eval_rows]
        gen_records = records[: cfg.eval.generation_rows] if cfg.eval.generation_rows else records
        per_seed: dict[int, dict[str, VariantResult]] = {}
        base_scores: dict[str, tuple[dict, dict]] = {}
        for seed in args.seeds or [cfg.train.seed]:
            seeded = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})
            results = {}
            for name in args.variants:
                inits = [cfg.lora.init, *args.inits] if name == "qlora-nf4" else [cfg.lora.init]
                for init in dict.fromkeys(inits):
                    run = seeded.model_copy(update={"lora": cfg.lora.model_copy(update={"init": init})})
                    key = name if init == cfg.lora.init else f"{name}+{init}"
                    results[key] = run_variant(
                        name, run, quantized, examples, records, gen_records, workdir, not args.no_progress, base_scores
                    )
                    results[key].variant = key
            per_seed[seed] = results
            gap_table = {
                (q, ref): gaps(results, ref, q)
                for q in qlora_rows(results)
                for ref in results
                if ref not in qlora_rows(results)
            }
            print(
                f"{cfg.base_model.name}: {cfg.train.max_steps} steps x batch {cfg.train.batch_size}, "
                f"LoRA r={cfg.lora.r} {cfg.lora.target_modules}, seed {seed}; "
                f"{len(records)} held-out rows ({results['qlora-nf4'].finetuned['tokens']} response tokens), "
                f"ROUGE-L on {len(gen_records)} greedy answers of <= {cfg.eval.max_new_tokens} tokens; "
                f"torch {torch.__version__}, {torch.get_num_threads()} threads"
            )
            print_table(results, gap_table)
            report(args, cfg, overrides, len(records), len(examples), per_seed, final=False)

    return report(args, cfg, overrides, len(records), len(examples), per_seed, final=True)


def report(args, cfg, overrides, eval_rows, train_examples, per_seed, final: bool) -> dict:
    """The results so far as a dict (written to --json after every seed); the summary across seeds when final."""
    reference = next((r for r in ("lora-fp32", "lora-bf16") if r in args.variants), "")
    table = summary(per_seed, reference)
    if final:
        print_summary(table, reference, list(per_seed))
    first = next(iter(per_seed.values()))
    out = {
        "config": {
            "source": str(args.config),
            "overrides": overrides,
            "train": cfg.train.model_dump(mode="json"),
            "lora": cfg.lora.model_dump(mode="json"),
            "eval": cfg.eval.model_dump(mode="json"),
            "quant": cfg.quant.model_dump(mode="json"),
            "eval_rows": eval_rows,
            "train_examples": train_examples,
            "seeds": list(per_seed),
        },
        "variants": {name: asdict(r) for name, r in first.items()},  # the first seed's, as before --seeds
        "gaps": {ref: gaps(first, ref) for ref in first if ref not in qlora_rows(first)},
        "seeds": {str(seed): {name: asdict(r) for name, r in results.items()} for seed, results in per_seed.items()},
        "summary": table,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
