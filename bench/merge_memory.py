"""Merge time and peak host memory: the in-memory merge vs the streaming merge, each in its own process.

    python bench/merge_memory.py --shape 1b                          # both modes, bf16 output
    python bench/merge_memory.py --shape 3b --modes stream           # streaming only
    python bench/merge_memory.py --shape 8b --json merge-8b.json     # in-memory mode: ~70 GB of host memory
    python bench/merge_memory.py --shape tiny                        # CPU smoke (tests/test_bench.py)

A Llama of the given shape (bench/train_throughput.py's SHAPES) is built from config with random
weights in bf16, quantized through the real 4-bit path (bitsandbytes NF4 + double quantization,
bf16 compute, as the quantize stage does; on the GPU when there is one, else on the CPU) and
saved; a random LoRA adapter (r=16, alpha 32, all seven linear projections, A and B nonzero) is
saved with peft. With --workdir these are kept there and reused by later runs. Then each mode
merges that adapter into that checkpoint on the CPU, in a fresh process of its own so that each
peak is clean:

  in-memory  what tasks/merge.py did before the streaming merge: the whole 4-bit model
             dequantized to fp32 (loraflow.ml.models.dequantize), peft's merge_and_unload, then
             .to(dtype).save_pretrained
  stream     loraflow/ml/merge.py: tensor by tensor, shards of at most --max-shard-gb

Only the write path is timed (no logit check), so the figures isolate merging. It prints each
merge's wall seconds (imports excluded), the child's peak resident memory and its resident memory
after imports, the output size, and the largest absolute difference between the two outputs'
tensors. The peak is the child's VmHWM, which counts pages of memory-mapped files too; not
ru_maxrss from wait4 or RUSAGE_CHILDREN, into which Linux folds the peak of the image a child
replaced at exec: the parent's peak. --max-rss-gb stops a child whose resident memory passes that
many GB (for shared machines) and reports it as stopped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (HERE.parent, HERE):  # the repository's packages, and bench/train_throughput.py beside this file
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from train_throughput import LINEAR, SHAPES, build, load_4bit  # noqa: E402

MODES = ["in-memory", "stream"]


@dataclass
class Result:
    mode: str
    seconds: float = float("nan")  # the merge alone, measured in the child (imports excluded)
    peak_rss_gb: float = float("nan")  # the child's VmHWM
    rss_after_imports_gb: float = float("nan")
    output_gb: float = float("nan")  # weight files on disk
    files: int = 0
    error: str | None = None


def prepare(shape: str, work: Path) -> tuple[Path, Path, int]:
    """The 4-bit checkpoint and the adapter (reused when ``work`` already holds them); and the parameter count."""
    import torch
    from peft import LoraConfig, get_peft_model

    base, adapter = work / f"{shape}-nf4", work / f"{shape}-lora-r16"
    if not (base / "config.json").is_file():
        full = build(shape, work / f"{shape}-bf16")
        model = load_4bit(full)
        model.save_pretrained(base)
        torch.manual_seed(0)
        # init_lora_weights=False: B random too (peft's default B = 0 would merge nothing).
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=LINEAR, init_lora_weights=False)
        # Saved while the model it names still exists: peft reads that folder's config as it saves.
        get_peft_model(model, lora).save_pretrained(adapter)
        shutil.rmtree(full)  # 16 GB for 8b, not needed any more
        del model
        gc.collect()  # the peft wrapper's reference cycles would keep the 4-bit model alive beside the children
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden
    return base, adapter, layers * per_layer + 2 * vocab * hidden + hidden


# --- one merge, in its own process ---


def proc_status_gb(field: str, pid: int | str = "self") -> float:
    """A memory line of /proc/<pid>/status (VmRSS, VmHWM, ...) in GB; 0.0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / 1e9  # kB
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def child(mode: str, base: Path, adapter: Path, out: Path, dtype_name: str, max_shard_gb: float, result: Path) -> None:
    import bitsandbytes  # noqa: F401  (imported before the clock starts, as every other library)
    import peft  # noqa: F401

    from loraflow.ml.merge import merge_in_memory, stream_merge
    from loraflow.ml.models import DTYPES

    dtype = DTYPES[dtype_name]
    before = proc_status_gb("VmRSS")
    start = time.perf_counter()
    if mode == "in-memory":
        merge_in_memory(base, adapter).to(dtype).save_pretrained(out)
    else:
        stream_merge(base, adapter, out, dtype=dtype, max_shard_bytes=int(max_shard_gb * 1e9))
    seconds = time.perf_counter() - start
    # VmHWM: this process's own peak since exec. Not ru_maxrss: Linux folds the pre-exec image's peak
    # into it (for a child of this benchmark, the parent's peak), so it reads too high for small merges.
    peak = proc_status_gb("VmHWM")
    result.write_text(json.dumps({"seconds": seconds, "rss_after_imports_gb": before, "peak_rss_gb": peak}))


def spawn(mode: str, base: Path, adapter: Path, out: Path, args: argparse.Namespace, tmp: Path) -> Result:
    """Run one mode in a fresh process, watching its resident memory."""
    result = tmp / f"{mode}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--base", str(base)]
    cmd += ["--adapter", str(adapter), "--out", str(out), "--result", str(result)]
    cmd += ["--dtype", args.dtype, "--max-shard-gb", str(args.max_shard_gb)]
    proc = subprocess.Popen(cmd)
    stopped, seen = None, 0.0
    while proc.poll() is None:
        seen = max(seen, proc_status_gb("VmHWM", proc.pid))
        if args.max_rss_gb and proc_status_gb("VmRSS", proc.pid) > args.max_rss_gb:
            stopped = f"stopped: resident memory passed --max-rss-gb {args.max_rss_gb:g}"
            proc.kill()
            proc.wait()
        time.sleep(0.05)
    r = Result(mode, peak_rss_gb=seen)  # the last reading; the child's own report replaces it
    if stopped or proc.returncode != 0:
        r.error = stopped or f"exit code {proc.returncode}"
        return r
    r.__dict__.update(json.loads(result.read_text()))
    weights = list(out.glob("*.safetensors"))
    r.output_gb, r.files = sum(f.stat().st_size for f in weights) / 1e9, len(weights)
    return r


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest absolute difference over every tensor of two checkpoints (one tensor in memory at a time)."""
    from safetensors import safe_open

    def where(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                out.update(dict.fromkeys(h.keys(), f))
        return out

    fa, fb = where(a), where(b)
    if fa.keys() != fb.keys():
        raise SystemExit(f"the outputs hold different tensors: {sorted(fa.keys() ^ fb.keys())[:5]}")
    diff = 0.0
    for k in fa:
        # Open per tensor: pages read through an open handle stay resident until it closes.
        with safe_open(fa[k], framework="pt") as ha, safe_open(fb[k], framework="pt") as hb:
            ta, tb = ha.get_tensor(k), hb.get_tensor(k)
            if ta.shape != tb.shape:
                raise SystemExit(f"{k}: shapes {tuple(ta.shape)} and {tuple(tb.shape)}")
            diff = max(diff, (ta.float() - tb.float()).abs().max().item())
    return diff


def table(shape: str, params: int, args: argparse.Namespace, results: list[Result], diff: float | None) -> str:
    lines = [
        f"shape={shape} ({params / 1e9:.2f}B parameters) output={args.dtype} max_shard_gb={args.max_shard_gb:g} "
        f"on {os.cpu_count()} CPU threads",
        f"{'mode':<11}{'seconds':>9}{'peak RSS GB':>13}{'RSS after imports GB':>22}{'output GB':>11}{'files':>7}",
    ]
    for r in results:
        if r.error:
            lines.append(f"{r.mode:<11}{'-':>9}{r.peak_rss_gb:>13.2f}  {r.error}")
        else:
            lines.append(
                f"{r.mode:<11}{r.seconds:>9.1f}{r.peak_rss_gb:>13.2f}{r.rss_after_imports_gb:>22.2f}"
                f"{r.output_gb:>11.2f}{r.files:>7}"
            )
    if diff is not None:
        lines.append(f"max |in-memory - stream| over all tensors: {diff:.3g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="1b")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16", help="output dtype")
    ap.add_argument("--max-shard-gb", type=float, default=2.0, help="streaming merge's largest weight file")
    ap.add_argument("--max-rss-gb", type=float, default=0.0, help="stop a child past this resident memory (0: never)")
    ap.add_argument("--workdir", type=Path, help="keep the checkpoints here and reuse them (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    for name in ("--base", "--adapter", "--out", "--result"):
        ap.add_argument(name, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.base, args.adapter, args.out, args.dtype, args.max_shard_gb, args.result)
        return {}

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp_name:
        tmp = Path(tmp_name)
        work = args.workdir or tmp
        base, adapter, params = prepare(args.shape, work)
        results, outs = [], {}
        for mode in args.modes:
            outs[mode] = tmp / f"out-{mode}"
            results.append(spawn(mode, base, adapter, outs[mode], args, tmp))
            print(f"{mode}: {results[-1]}", flush=True)
        ok = [m for m, r in zip(args.modes, results, strict=True) if not r.error]
        diff = max_abs_diff(outs[ok[0]], outs[ok[1]]) if len(ok) == 2 else None
    print(table(args.shape, params, args, results, diff))
    summary = {
        "shape": args.shape,
        "parameters": params,
        "dtype": args.dtype,
        "max_shard_gb": args.max_shard_gb,
        "cpu_threads": os.cpu_count(),
        "results": [asdict(r) for r in results],
        "max_abs_diff": diff,
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
