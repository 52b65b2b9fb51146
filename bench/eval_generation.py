"""Evaluation generation: batched, KV-cached greedy answers vs one prompt at a time, side by side.

    python bench/eval_generation.py --model demo --rows 64 --batch 16                # CPU: the demo as evaluate runs it
    python bench/eval_generation.py --model demo --rows 64 --batch 1 4 16 64         # CPU: batch-size sweep
    python bench/eval_generation.py --shape 1b --rows 64 --batch 4 16 64 --max-new-tokens 128   # on a GPU
    python bench/eval_generation.py --shape tiny --rows 6 --batch 4 --max-new-tokens 8 --min-len 8 --max-len 24  # smoke

Two ways of producing the evaluate stage's greedy answers, on the same prompts in this one process:

  one at a time  the naive way: `model.generate` once per prompt, no padding
  batched        what tasks/evaluate.py's `generate_answers` does: left-padded batches of
                 `--batch` prompts, one `generate` call (with its KV cache) per batch

Models:

  --model demo   (default) the demo's 4-bit base as the evaluate stage loads it
                 (`load_quantized(path, cpu_repack=True)`), quantized once by the quantize stage
                 into $LORAFLOW_HOME/cache; prompts are the last `--rows` records of the demo data
                 rendered with `prompt_text`; batch size and max_new_tokens from configs/demo.yaml.
                 Also checks that the stage's own `generate_answers` gives the benchmark's batched
                 answers, and scores each method's answers with the stage's ROUGE-L.
  --shape NAME   a random-init Llama of bench/train_throughput.py's shapes loaded through the same
                 4-bit path (its `build` + `load_4bit`), random prompt ids of `--min-len`..`--max-len`
                 tokens. Random weights rarely emit EOS, so every prompt gets exactly
                 `--max-new-tokens` new tokens (min_new_tokens = max_new_tokens).

Each method is warmed up once on its first batch, then timed (torch.cuda.synchronize around it on a
GPU). It prints prompts/s, generated tokens/s (up to and including EOS; padding after an early EOS
is not counted), the speed ratio to one at a time, peak memory (GPU: torch.cuda.max_memory_allocated;
CPU: the process's peak resident size during the method, sampled), how many answers differ from one
at a time and the mean position of their first differing token: a padded batch does not run the same
arithmetic as a single prompt (left padding changes the attention's shapes and mask, kernels may tile
several rows differently from one), bf16 rounding moves the logits a little, and where greedy decoding
meets a near-tie the answer diverges from there on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench.` imports, also when loaded by path (tests/test_bench.py)

from bench.train_throughput import SHAPES, build, load_4bit  # noqa: E402


@dataclass(frozen=True)
class Generation:
    """Greedy decoding settings shared by both methods."""

    max_new_tokens: int
    pad_id: int
    eos_id: int
    min_new_tokens: int = 0

    def kwargs(self, max_new_tokens: int | None = None) -> dict[str, Any]:
        n = max_new_tokens or self.max_new_tokens
        return {
            "max_new_tokens": n,
            "min_new_tokens": min(self.min_new_tokens, n),
            "do_sample": False,
            "pad_token_id": self.pad_id,
            "eos_token_id": self.eos_id,
        }


@dataclass
class Run:
    method: str
    batch_size: int
    seconds: float
    prompts_per_s: float
    tokens_per_s: float
    new_tokens: int
    peak: float  # GPU: max_memory_allocated in GB; CPU: peak resident size during the run in MiB
    outputs: list[list[int]] = field(repr=False)  # new token ids per prompt, cut after the first EOS
    x_one_at_a_time: float = 1.0
    differ: int = 0  # answers not identical to one at a time's
    diverge_at: float | None = None  # mean index of the first differing new token, over those answers
    rouge_l: float | None = None


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """The process's peak resident size while inside the block, sampled every few ms by a thread.

    getrusage's ru_maxrss is the peak over the process's whole life, so it cannot tell two methods
    run one after the other apart.
    """

    def __init__(self, every_s: float = 0.01) -> None:
        self.every_s, self.peak_mib = every_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, rss_mib())
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRss:
        self.peak_mib = rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, rss_mib())


def cut(ids: list[int], eos_id: int) -> list[int]:
    """Ids up to and including the first EOS (what follows in a batch is padding)."""
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@torch.no_grad()
def one_at_a_time(
    model: torch.nn.Module, prompts: list[list[int]], gen: Generation, max_new_tokens: int | None = None
) -> list[list[int]]:
    """The naive way: one `generate` call per prompt, nothing padded."""
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=model.device)
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen.kwargs(max_new_tokens))
        out.append(seq[0, ids.shape[1] :].tolist())
    return out


@torch.no_grad()
def batched(
    model: torch.nn.Module,
    prompts: list[list[int]],
    batch_size: int,
    gen: Generation,
    max_new_tokens: int | None = None,
) -> list[list[int]]:
    """As tasks/evaluate.py's `generate_answers`: left-padded batches, one `generate` call each."""
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[gen.pad_id] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        seq = model.generate(input_ids=ids, attention_mask=mask, **gen.kwargs(max_new_tokens))
        out += seq[:, width:].tolist()
    return out


def measure(model: torch.nn.Module, prompts: list[list[int]], batch_size: int | None, gen: Generation) -> Run:
    """Warm up once, then time one method on all prompts. ``batch_size=None``: one at a time."""
    fn: Callable[..., list[list[int]]]
    if batch_size is None:
        method, size, fn = "one at a time", 1, partial(one_at_a_time, model, gen=gen)
    else:
        method, size, fn = "batched", batch_size, partial(batched, model, batch_size=batch_size, gen=gen)
    cuda = torch.cuda.is_available()
    fn(prompts[:size], max_new_tokens=4)  # first-call costs: CUDA kernels, bitsandbytes' CPU weight repacking
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRss() as rss:
        start = time.perf_counter()
        raw = fn(prompts)
        if cuda:
            torch.cuda.synchronize()  # already synced by .tolist(); kept so the timing never depends on it
        seconds = time.perf_counter() - start
    outputs = [cut(o, gen.eos_id) for o in raw]
    tokens = sum(len(o) for o in outputs)
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else rss.peak_mib
    return Run(method, size, seconds, len(prompts) / seconds, tokens / seconds, tokens, peak, outputs)


def random_prompts(vocab: int, n: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for length in lengths]


@dataclass
class Demo:
    """The demo model, tokenizer and held-out prompts as the evaluate stage sees them."""

    model: torch.nn.Module
    tok: Any
    texts: list[str]
    references: list[str]
    batch_size: int
    max_new_tokens: int


def load_demo(rows: int, cache_dir: Path) -> Demo:
    from loraflow.config import load_config
    from loraflow.ml.examples import read_jsonl
    from loraflow.ml.models import load_quantized, load_tokenizer, prepare_base
    from loraflow.ml.prompts import prompt_text, reference
    from tasks.quantize import quantize

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    base = quantize(
        prepare_base(cfg.base_model, cache_dir), cfg.quant, cache_dir
    )  # a one-time GGUF conversion, then the cache
    tok = load_tokenizer(base.path)
    model = load_quantized(base.path, cpu_repack=True)  # inference only, as in tasks/evaluate.py
    model.eval()
    records = read_jsonl(cfg.data.path)[-rows:]
    return Demo(
        model,
        tok,
        [prompt_text(tok, r) for r in records],
        [reference(r) for r in records],
        cfg.eval.batch_size,
        cfg.eval.max_new_tokens,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", choices=["demo"], help="the demo's 4-bit base and held-out prompts (default)")
    src.add_argument("--shape", choices=sorted(SHAPES), help="a random-init Llama shape from bench/train_throughput.py")
    ap.add_argument("--rows", type=int, default=64, help="prompts (demo: the last ROWS records of its data)")
    ap.add_argument("--batch", type=int, nargs="+", help="batched sizes (default: demo eval.batch_size, else 16)")
    ap.add_argument("--max-new-tokens", type=int, help="default: demo eval.max_new_tokens, else 128")
    ap.add_argument("--min-len", type=int, default=64, help="--shape: shortest random prompt")
    ap.add_argument("--max-len", type=int, default=256, help="--shape: longest random prompt")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)

    demo = None
    if args.shape:
        with tempfile.TemporaryDirectory() as tmp:
            model = load_4bit(build(args.shape, Path(tmp) / args.shape))
        model.eval()
        max_new = args.max_new_tokens or 128
        eos = model.config.eos_token_id
        gen = Generation(max_new, pad_id=0, eos_id=eos[0] if isinstance(eos, list) else eos, min_new_tokens=max_new)
        prompts = random_prompts(SHAPES[args.shape][5], args.rows, args.min_len, args.max_len)
        sizes = args.batch or [16]
        label = f"shape={args.shape} (random init, 4-bit)"
    else:
        demo = load_demo(args.rows, Path(os.environ.get("LORAFLOW_HOME", ".loraflow")) / "cache")
        model = demo.model
        max_new = args.max_new_tokens or demo.max_new_tokens
        gen = Generation(max_new, pad_id=demo.tok.pad_token_id, eos_id=demo.tok.eos_token_id)
        prompts = [demo.tok(t, add_special_tokens=False)["input_ids"] for t in demo.texts]
        sizes = args.batch or [demo.batch_size]
        label = "model=demo (SmolLM2-135M-Instruct, 4-bit NF4)"

    rss_loaded, load_before = rss_mib(), os.getloadavg()[0]
    runs = [measure(model, prompts, None, gen)] + [measure(model, prompts, b, gen) for b in sizes]
    base = runs[0]
    for r in runs:
        r.x_one_at_a_time = r.prompts_per_s / base.prompts_per_s
        firsts = [first_difference(a, b) for a, b in zip(r.outputs, base.outputs, strict=True) if a != b]
        r.differ = len(firsts)
        r.diverge_at = sum(firsts) / len(firsts) if firsts else None

    stage_match = None
    if demo is not None:
        from loraflow.ml.scoring import generate_answers, rouge_l

        for r in runs:
            answers = [demo.tok.decode(o, skip_special_tokens=True).strip() for o in r.outputs]
            r.rouge_l = sum(rouge_l(answers, demo.references)) / len(answers)
            if r.method == "batched" and r.batch_size == demo.batch_size and stage_match is None:
                # The benchmark's batched path must be what the evaluate stage runs, not a near-copy.
                stage = generate_answers(model, demo.tok, demo.texts, r.batch_size, max_new)
                stage_match = sum(a == b for a, b in zip(answers, stage, strict=True))

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    lengths = [len(p) for p in prompts]
    print(f"{label}, {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, max_new_tokens={max_new}")
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"  # other work skews CPU timings
    print(f"on {device}; {load}" + ("" if cuda else f"; RSS with the model loaded {rss_loaded:,.0f} MiB"))
    peak = "peak GB" if cuda else "peak RSS MiB"
    rouge = "" if demo is None else f"{'ROUGE-L':>9}"
    head = f"{'method':<15}{'batch':>6}{'s':>8}{'prompts/s':>11}{'tokens/s':>10}{'x one':>7}"
    print(f"{head}{peak:>14}{'differ':>9}{'at token':>9}{rouge}")
    for r in runs:
        mem = f"{r.peak:>14.2f}" if cuda else f"{r.peak:>14,.0f}"
        at = "-" if r.diverge_at is None else f"{r.diverge_at:.1f}"
        score = "" if r.rouge_l is None else f"{r.rouge_l:>9.4f}"
        print(
            f"{r.method:<15}{r.batch_size:>6}{r.seconds:>8.2f}{r.prompts_per_s:>11.2f}{r.tokens_per_s:>10.1f}"
            f"{r.x_one_at_a_time:>7.2f}{mem}{f'{r.differ}/{len(prompts)}':>9}{at:>9}{score}"
        )
    if stage_match is not None:
        print(f"tasks.evaluate.generate_answers at batch {demo.batch_size}: {stage_match}/{len(prompts)} same answers")

    result = {
        "mode": label,
        "device": device,
        "prompts": len(prompts),
        "max_new_tokens": max_new,
        "rss_loaded_mib": rss_loaded,
        "load_average": [load_before, os.getloadavg()[0]],
        "stage_match": stage_match,
        "runs": [{k: v for k, v in asdict(r).items() if k != "outputs"} for r in runs],
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    result["outputs"] = [r.outputs for r in runs]
    return result


if __name__ == "__main__":
    main()
