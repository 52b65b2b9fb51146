"""Training throughput on instruction-data lengths: padded, packed and padding-free batches, side by side.

    # on a GPU (Unsloth runs where it is importable: PYTHONPATH holding the carried packages)
    python bench/packing_throughput.py --shape 8b --seq 2048 --batch 4 --steps 10 --warmup 3 --workdir .bench-cache
    python bench/packing_throughput.py --shape 8b --long-context --workdir .bench-cache   # longest sequence, 8K-32K
    python bench/packing_throughput.py --shape tiny --seq 64 --batch 2 --steps 2 --warmup 1 \\
        --loraflow-mode lean --plain-mode bf16                                              # CPU smoke

The examples. Each has a prompt part (labels ignored) and a response part (labelled), their lengths
drawn from a log-normal distribution whose means are the published average prompt and completion
lengths (LLaMA tokens) of four instruction datasets, one dataset per example in turn:

    dataset            prompt  completion   source: Wang et al. 2023, "How Far Can Camels Go?
    Alpaca               27.8        64.6   Exploring the State of Instruction Tuning on Open
    Dolly               118.1        91.3   Resources" (NeurIPS 2023 Datasets and Benchmarks,
    OpenAssistant 1      34.8       212.5   arXiv:2306.04751), Table 1 (average prompt and
    ShareGPT             71.0       357.8   completion length per instance, LLaMA tokenizer)

The means are quoted from that table as recalled while writing this script, offline: check them
against the paper before quoting a result. The spread is ours, not published: sigma 1.0 of the
log of each length (long tails of a few thousand tokens, as these datasets have), each example
at least one prompt and one response token and cut to ``--seq`` tokens. Token ids are random: the
throughput depends on lengths, not on which tokens.

A step is the same group of examples for every variant: ``--batch`` rows of ``--seq`` tokens of
one epoch packed as the train stage packs it (loraflow/ml/batching.py ``epoch_rows``: the examples
shuffled, packed by best fit decreasing, the rows shuffled; the header prints the rows' fill). Each
variant then trains on that group in its own layout, in a process of its own on the 4-bit checkpoint
of bench/train_throughput.py (same build, LoRA r=16 on all seven projections, same LoRA seed):

  loraflow:padded        the train stage without packing: micro-batches of --padded-batch examples,
                         right-padded to the longest (gradient accumulation over the group)
  loraflow:packed-flex   the train stage with packing: --batch rows of --seq tokens, FlexAttention
                         with a document-causal block mask (loraflow/ml/attention.py)
  loraflow:packed-sdpa   the same rows through SDPA with the dense block-diagonal mask that
                         transformers builds from the restarting position ids (the code before)
  plain:padded           transformers + peft + bitsandbytes, micro-batches as loraflow:padded
  plain:flatten          the same with transformers' padding-free DataCollatorWithFlattening: the
                         whole group in one row, position ids restarting per example
  unsloth:padded         Unsloth's FastLanguageModel on the padded micro-batches
  unsloth:flatten        Unsloth on the flattened row (what its padding-free batching feeds the model)

It prints real (non-pad) tokens/s, peak and reserved GPU memory, and each step's loss (sum of
response-token cross-entropies over the group / their number) against the first variant: every
layout computes the same function, so a difference beyond ``LOSS_TOLERANCE`` means a layout
lets examples see each other or drops tokens, and is marked in the table.

With --long-context, each of --long-variants trains one sequence of each --lengths tokens (all
labelled, random ids) in a process of its own, in increasing order, under a hard cap of each
--budgets GB in turn (``torch.cuda.set_per_process_memory_fraction``: the caching allocator may hold
no more, as on a card of that size; GB are 10^9 bytes, and the CUDA context is not counted), until a
length runs out of memory under the cap; the next budget goes on from that length. A length that
fails otherwise, or does not finish within --length-timeout seconds, ends the variant's sweep. It
reports tokens/s at 8K, 16K and 32K and the longest length that trained within each budget.

With --emulate-layers L on a shape of fewer layers (``8b-4l``: four layers of the 8B shape), each
process first allocates a ballast of what the missing layers would hold on the GPU (their 4-bit
weights as the checkpoint stores them, and LoRA r=16 on all seven projections with its gradient and
two AdamW moments, 16 bytes a parameter), so that a cap of B GB leaves what it would leave the full
model. This stands for the full model only where a system keeps one layer's activations on the GPU
at a time (layer inputs offloaded to host memory, as ``lean`` and Unsloth's offloaded checkpointing
do); it reaches lengths whose full-model step would not finish in a device call, and whose offloaded
layer inputs (L x tokens x hidden x 2 bytes) the host's memory may not hold.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository's packages
    sys.path.insert(0, str(ROOT))

from bench import train_throughput as tt  # noqa: E402  (after the path above)
from bench.train_throughput import Result  # noqa: E402

# (prompt mean, completion mean) in tokens: Wang et al. 2023, Table 1 (see the docstring)
DATASETS = {
    "alpaca": (27.8, 64.6),
    "dolly": (118.1, 91.3),
    "oasst1": (34.8, 212.5),
    "sharegpt": (71.0, 357.8),
}
SIGMA = 1.0  # log-normal spread of each length: our choice, not a published figure
LOSS_TOLERANCE = 0.01  # bf16 compute: different kernels and summation orders, same function
DEFAULT_VARIANTS = [
    "loraflow:packed-flex",
    "loraflow:packed-sdpa",
    "loraflow:padded",
    "plain:padded",
    "plain:flatten",
    "unsloth:padded",
    "unsloth:flatten",
]
LONG_VARIANTS = ["loraflow:long", "unsloth:long"]
LENGTHS = [8192, 16384, 32768, 49152, 65536, 98304, 131072, 196608, 262144]


def lengths(n: int, seq: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, response) token counts of ``n`` examples, the datasets in turn, each cut to ``seq``."""
    rng = random.Random(seed)
    out = []
    names = list(DATASETS)
    for i in range(n):
        prompt_mean, response_mean = DATASETS[names[i % len(names)]]
        # a log-normal with mean m: mu = ln m - sigma^2 / 2
        p = max(1, round(rng.lognormvariate(math.log(prompt_mean) - SIGMA**2 / 2, SIGMA)))
        r = max(1, round(rng.lognormvariate(math.log(response_mean) - SIGMA**2 / 2, SIGMA)))
        p = min(p, seq - 1)
        out.append((p, min(r, seq - p)))
    return out


def examples(n: int, seq: int, vocab: int, seed: int = 0):
    """Encoded examples with random ids: prompt labels ignored, response labelled."""
    import torch

    from loraflow.ml.prompts import IGNORE_INDEX, Encoded

    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for p, r in lengths(n, seq, seed):
        ids = torch.randint(0, vocab, (p + r,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE_INDEX] * p + ids[p:]))
    return out


def step_groups(encoded, batch: int, seq: int, steps: int, seed: int = 0):
    """Each step's examples: ``batch`` rows of ``seq`` tokens of one epoch, packed as the train stage packs them."""
    from loraflow.ml.batching import epoch_rows

    rows = epoch_rows(encoded, seq, random.Random(seed))
    groups = [rows[i : i + batch] for i in range(0, len(rows) - batch + 1, batch)][:steps]
    if len(groups) < steps:
        raise ValueError(f"{len(encoded)} examples make only {len(groups)} steps; raise the example count")
    return groups


def fill(groups, seq: int) -> float:
    """Real tokens over the rows' capacity: what packing leaves unpadded."""
    real = sum(len(e.input_ids) for rows in groups for row in rows for e in row)
    return real / (seq * sum(len(rows) for rows in groups))


def layout(kind: str, rows, pad_id: int, padded_batch: int) -> list[dict]:
    """The micro-batches of one step's group in a variant's layout (host tensors)."""
    from loraflow.ml.batching import collate, collate_packed

    group = [e for row in rows for e in row]
    if kind.startswith("packed"):
        return [collate_packed(rows, pad_id)]
    if kind == "flatten":
        from transformers import DataCollatorWithFlattening

        flat = DataCollatorWithFlattening(return_tensors="pt")
        b = flat([{"input_ids": e.input_ids, "labels": e.labels} for e in group])
        return [{k: b[k] for k in ("input_ids", "labels", "position_ids")}]
    # padding carries ignored labels (collate), so transformers' own loss skips it as loraflow's does
    return [collate(group[i : i + padded_batch], pad_id) for i in range(0, len(group), padded_batch)]


def labelled(b) -> int:
    return int((b["labels"][:, 1:] != -100).sum())


def real_tokens(b) -> int:
    return int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()


def run_mix(variant: str, path: Path, args) -> Result:
    """One variant on the instruction-length mix: tokens/s over the timed steps, every step's loss."""
    import torch

    from loraflow.ml.attention import resolve_attention, set_attention
    from loraflow.ml.loss import token_loss_sum

    engine, kind = variant.split(":", 1)
    mode = {"loraflow": args.loraflow_mode, "plain": args.plain_mode, "unsloth": args.unsloth_mode}[engine]
    cuda = torch.cuda.is_available()
    model, _ = tt.prepare(engine, mode, path, args.seq)
    if engine == "loraflow" and kind.startswith("packed"):
        set_attention(model, resolve_attention(kind.removeprefix("packed-"), model.device))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    steps = args.warmup + args.steps
    encoded = examples(args.examples, args.seq, vocab)
    groups = step_groups(encoded, args.batch, args.seq, steps)
    data = [layout(kind, rows, 0, args.padded_batch) for rows in groups]
    profile, *extras = mode.split("+")
    chunk = tt.loss_chunk(profile, extras) if engine == "loraflow" else None
    if engine != "loraflow":  # the train stage takes host batches and moves them itself (loraflow/ml/loss.py)
        data = [[{k: v.to(device) for k, v in b.items()} for b in micro] for micro in data]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, tokens, start = [], 0, time.perf_counter()
    for i, micro in enumerate(data):
        if i == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            start, tokens = time.perf_counter(), 0
        n = sum(labelled(b) for b in micro)
        step_loss = 0.0
        for b in micro:
            if engine == "loraflow":
                loss_sum, _ = token_loss_sum(model, b, chunk_tokens=chunk)
            else:  # transformers' loss is the mean over the micro-batch's labelled tokens
                loss_sum = model(**{k: b[k] for k in b if k != "attention_mask" or kind == "padded"}).loss * labelled(b)
            (loss_sum / n).backward()
            step_loss += loss_sum.item() / n  # a sync point: every variant pays it
            tokens += real_tokens(b)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
    reserved = torch.cuda.max_memory_reserved() / 1e9 if cuda else float("nan")
    return Result(variant, args.batch, tokens / seconds, peak, reserved, losses)


def run_long(variant: str, path: Path, args) -> Result:
    """One sequence of ``args.seq`` tokens, all labelled: tokens/s and memory (``batch`` holds the length)."""
    engine = variant.split(":", 1)[0]
    mode = {"loraflow": args.loraflow_mode, "plain": args.plain_mode, "unsloth": args.unsloth_mode}[engine]
    r = tt.run_variant(f"{engine}:{mode}", path, 1, args.seq, args.steps, args.warmup)
    r.variant, r.batch = variant, args.seq
    return r


def ballast_gb(model: Path, shape: str, layers: int) -> float:
    """What the ``layers - shape's layers`` missing decoder layers would hold on the GPU (see the docstring)."""
    from loraflow.ml.models import checkpoint_bytes

    hidden, inter, have, heads, kv, _ = tt.SHAPES[shape]
    weights = checkpoint_bytes(model, "model.layers.")
    kv_out = kv * hidden // heads
    dims = [(hidden, hidden), (hidden, kv_out), (hidden, kv_out), (hidden, hidden)] + [(hidden, inter)] * 2
    lora = 16 * sum(in_ + out for in_, out in [*dims, (inter, hidden)])  # r=16 on the seven projections
    per_layer = weights / have + 16 * lora  # 16 bytes a LoRA parameter: fp32 weight, gradient, 2 moments
    return max(0, layers - have) * per_layer / 1e9


def worker(args: argparse.Namespace) -> None:
    engine = args.variant.split(":", 1)[0]
    import torch

    if torch.cuda.is_available() and args.cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 1e9 / total))
    ballast = None
    if torch.cuda.is_available() and args.ballast_gb:  # on the CPU, nothing to cap: no ballast either
        ballast = torch.empty(int(args.ballast_gb * 1e9), dtype=torch.uint8, device="cuda")
    try:
        if engine == "unsloth":
            import importlib.util

            if importlib.util.find_spec("unsloth") is None:
                raise ModuleNotFoundError("unsloth is not installed")
        run = run_long if args.variant.endswith(":long") else run_mix
        result = run(args.variant, args.model, args)
    except Exception as e:  # reported as the variant's result: one failing variant must not end the table
        import torch

        from loraflow.errors import UsageError

        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        missing = isinstance(e, ModuleNotFoundError) or (engine == "unsloth" and "requires" in str(e).lower())
        unavailable = isinstance(e, UsageError)  # e.g. FlexAttention on a CPU
        error = (
            "OOM"
            if oom
            else f"not importable: {e}"
            if missing
            else f"not available: {e}"
            if unavailable
            else f"{type(e).__name__}: {e}"
        )
        if not (oom or missing or unavailable):
            import traceback

            traceback.print_exc()
        result = Result(args.variant, args.seq if args.variant.endswith(":long") else args.batch, error=error[:300])
    del ballast  # counted in the peak: the emulated model's memory
    result.cap_gb = args.cap_gb or None
    args.out.write_text(json.dumps(asdict(result)))


def spawn(
    variant: str, model: Path, args, tmp: Path, seq: int | None = None, cap: float = 0.0, ballast: float = 0.0
) -> Result:
    seq = seq or args.seq
    out = tmp / f"{variant.replace(':', '-').replace('+', '_')}-{seq}-{cap:g}.json"
    cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--model", str(model), "--out", str(out)]
    for flag in ("batch", "steps", "warmup", "examples", "padded_batch", "loraflow_mode", "plain_mode", "unsloth_mode"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += ["--seq", str(seq), "--cap-gb", str(cap), "--ballast-gb", str(ballast)]
    timeout = args.length_timeout or None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out.with_suffix(".log").write_text(str(e.stdout or "") + str(e.stderr or ""))
        print(f"  {variant} seq {seq}: not finished in {timeout:g} s", flush=True)
        return Result(variant, seq, error=f"not finished in {timeout:g} s", cap_gb=cap or None)
    out.with_suffix(".log").write_text(proc.stdout + proc.stderr)
    if not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return Result(variant, seq, error=f"worker exited {proc.returncode}: " + " | ".join(tail), cap_gb=cap or None)
    result = Result(**json.loads(out.read_text()))
    status = result.error or f"{result.tokens_per_s:,.0f} real tok/s, peak {result.peak_gb:.1f} GB"
    print(f"  {variant} seq {seq}{f' (cap {cap:g} GB)' if cap else ''}: {status}", flush=True)
    return result


def table(results: list[Result]) -> str:
    ok = [r for r in results if r.error is None]
    base = ok[0] if ok else None
    lines = [
        f"| variant | real tokens/s | peak GB | reserved GB | max \\|Δloss\\| vs {base.variant if base else '-'} | "
        + " | ".join(f"x {r.variant}" for r in ok)
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(ok),
    ]
    for r in results:
        if r.error is not None:
            lines.append(f"| {r.variant} | {r.error} |")
            continue
        dloss = max(abs(a - b) for a, b in zip(r.losses, base.losses, strict=True))
        flag = "" if dloss <= LOSS_TOLERANCE else f" (over {LOSS_TOLERANCE}: differs)"
        ratios = " | ".join(f"{r.tokens_per_s / o.tokens_per_s:.2f}" for o in ok)
        memory = f"{r.peak_gb:.1f} | {r.reserved_gb:.1f}"
        lines.append(f"| {r.variant} | {r.tokens_per_s:,.0f} | {memory} | {dloss:.4f}{flag} | {ratios} |")
    return "\n".join(lines)


def long_table(results: list[Result], budgets: list[float], shown: list[int]) -> str:
    """Per variant: tokens/s (peak GB) at the shown lengths, and per budget the longest length that
    trained under that cap, with the first that did not."""
    variants = list(dict.fromkeys(r.variant for r in results))
    head = [f"tokens/s at {n // 1024}K" for n in shown] + [f"longest within {b:g} GB" for b in budgets]
    lines = ["| variant | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for v in variants:
        runs = [r for r in results if r.variant == v]
        cells = []
        for n in shown:
            r = next((r for r in runs if r.batch == n), None)
            cells.append("-" if r is None else r.error or f"{r.tokens_per_s:,.0f} ({r.peak_gb:.1f} GB)")
        for b in budgets:
            fits = [r for r in runs if r.error is None and (r.cap_gb or math.inf) <= b]
            failed = [r for r in runs if r.error is not None and r.cap_gb == b]
            cell = f"{max(r.batch for r in fits):,}" if fits else "none"
            if failed:
                cell += f" ({failed[0].error.split(':')[0]} at {failed[0].batch:,})"
            cells.append(cell)
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(tt.SHAPES), default="8b")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per packed row (and the longest example)")
    ap.add_argument("--batch", type=int, default=4, help="packed rows per step")
    ap.add_argument("--padded-batch", type=int, default=4, help="examples per padded micro-batch")
    ap.add_argument("--examples", type=int, default=4000, help="examples drawn (enough for warmup + steps)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    ap.add_argument("--loraflow-mode", default="lean+compile", help="memory profile[+extras] of the loraflow variants")
    ap.add_argument("--plain-mode", default="bf16-ckpt", help="plain variants' mode (bench/train_throughput.py)")
    ap.add_argument("--unsloth-mode", default="offload", help="Unsloth's checkpointing: offload, ckpt or none")
    ap.add_argument("--long-context", action="store_true", help="longest trainable sequence and tokens/s at 8K-32K")
    ap.add_argument("--long-variants", nargs="+", default=LONG_VARIANTS)
    ap.add_argument("--lengths", type=int, nargs="+", default=LENGTHS, help="sequence lengths of --long-context")
    ap.add_argument("--budgets", type=float, nargs="+", default=[24, 80], help="GB caps of --long-context")
    ap.add_argument("--length-timeout", type=float, default=0, help="seconds a --long-context length may take (0: any)")
    ap.add_argument("--emulate-layers", type=int, default=0, help="--long-context: emulate this many layers")
    ap.add_argument("--workdir", type=Path, help="keep the 4-bit checkpoint here between runs (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cap-gb", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--ballast-gb", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return {}

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        folder = args.workdir or Path(tmp_name)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        model = tt.build_4bit(args.shape, folder)
        print(f"4-bit {args.shape} checkpoint ready in {time.perf_counter() - start:.0f} s: {model}", flush=True)
        logs = folder / "logs"
        logs.mkdir(exist_ok=True)
        if args.long_context:
            ballast = ballast_gb(model, args.shape, args.emulate_layers) if args.emulate_layers else 0.0
            for variant in args.long_variants:
                trained = 0  # the longest length trained so far: it fits any larger cap too
                for cap in sorted(args.budgets):
                    for n in (n for n in sorted(args.lengths) if n > trained):
                        r = spawn(variant, model, args, logs, seq=n, cap=cap, ballast=ballast)
                        results.append(r)
                        if r.error is not None:
                            break  # a longer sequence needs more memory (or time) still
                        trained = n
                    if results[-1].error not in (None, "OOM"):
                        break  # too slow, or failing: a larger cap changes neither
            header = f"shape={args.shape} long context, steps={args.warmup}+{args.steps} on {gpu}"
            if ballast:
                header += f"; ballast {ballast:.2f} GB: a {args.emulate_layers}-layer model's GPU memory"
            shown = [n for n in (8192, 16384, 32768) if n in args.lengths]
            text = long_table(results, args.budgets, shown)
        else:
            groups = step_groups(examples(args.examples, args.seq, 2), args.batch, args.seq, args.warmup + args.steps)
            results = [spawn(v, model, args, logs) for v in args.variants]
            header = (
                f"shape={args.shape} rows={args.batch}x{args.seq} padded micro-batch={args.padded_batch} "
                f"steps={args.warmup}+{args.steps} on {gpu}; lengths: {', '.join(DATASETS)} (Wang et al. 2023); "
                f"packed rows {fill(groups, args.seq):.1%} real tokens"
            )
            text = table(results)
    print(header)
    print(text)
    summary = {"header": header, "results": [asdict(r) for r in results]}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
