"""QLoRA training throughput and peak memory: the plain recipe, Unsloth and loraflow, side by side.

    # on a GPU (Unsloth runs where it is importable: PYTHONPATH holding the carried packages)
    python bench/train_throughput.py --shape 8b --seq 2048 --batch 4 --steps 17 --warmup 3
    python bench/train_throughput.py --shape 8b --budgets 8 24 80          # best tokens/s within each budget
    python bench/train_throughput.py --shape tiny --seq 32 --batch 2 --steps 2 --warmup 1   # CPU smoke
    # the distributed paths: each loraflow variant also through torchrun on N GPUs (N gloo CPU ranks without)
    python bench/train_throughput.py --shape 8b --seq 2048 --batch 4 --variants loraflow:balanced --gpus 1
    python bench/train_throughput.py --shape 8b --seq 2048 --batch 4 --variants loraflow:balanced --gpus 1 \
        --distributed ddp fsdp                                            # plain, @ddp1 and @fsdp1 side by side

A Llama of the given shape is built from config with random weights, saved, loaded through the
real 4-bit path (bitsandbytes NF4 + double quantization, bf16 compute, as the quantize stage
does) and saved again as a 4-bit checkpoint. Every variant then loads that checkpoint in a fresh
process of its own (Unsloth patches transformers on import; a fresh process also gives each
variant a clean peak-memory reading) and trains LoRA r=16 on all seven linear projections of
every layer on the same random token batches from the same seed:

  plain     transformers + peft + bitsandbytes: `ckpt` is `prepare_model_for_kbit_training`
            (every non-quantized weight upcast to fp32) with gradient checkpointing; `bf16-ckpt`
            and `bf16` keep them in bf16, with and without checkpointing
  unsloth   FastLanguageModel with its offloaded checkpointing (`offload`), plain checkpointing
            (`ckpt`) or none (`none`); `+tiled` loads it with ``unsloth_tiled_mlp=True`` (its
            sequence-tiled MLP for long context)
  loraflow  the train stage's own code (tasks/train.py `prepare_for_training`, loraflow/ml/loss.py
            `token_loss_sum`) in each memory profile (`fast`, `balanced`, `lean`), optionally
            with Liger's fused RMSNorm/SwiGLU/RoPE (`+liger`) or compiled decoder layers (`+compile`);
            `+peft` keeps peft's own LoRA layers instead of loraflow/ml/lora4bit.py's fused operator
            (the code before it), `+autocast` runs the step under torch.autocast(bf16);
            `+ungrouped` calls the operator once per projection (no q/k/v and gate/up groups),
            `+bnbops` dequantizes through bitsandbytes' operators instead of its kernels directly,
            `+noprefetch` (`lean`) copies each offloaded layer input back only when its layer's
            backward pass starts instead of during the backward pass of the layer after it,
            `+expandable` runs with PyTorch's expandable_segments allocator setting,
            `+chunkN` computes the output head N labelled tokens at a time instead of the
            profile's ``loss_chunk_tokens`` (to measure a profile change before making it),
            `+tileN` runs the MLPs in tiles of N tokens above the profile's ``mlp_tile_above``
            (`+tile0`: never tiled; loraflow/ml/memory.py ``tile_mlps``)

With --gpus N every loraflow variant runs a second time as ``<variant>@ddpN``: the script launches
torchrun with N ranks itself (``python -m torch.distributed.run --nproc-per-node N --standalone``),
and the ranks train as the train stage's data-parallel path does (loraflow/ml/distributed.py): each
takes its share of the same global batch of --batch rows, the LoRA gradients are all-reduced, and
the losses are normalised by the global token count, so the losses match the 1-process run's.
Its tokens/s counts every rank's tokens; its peak memory is the largest rank's. With N=1 the ratio
of the two rows is the cost of the distributed path itself; with N>1, the scaling. With
``--distributed fsdp`` (or ``ddp fsdp``: both) the ranks run ``<variant>@fsdpN`` as the train stage's
``train.distributed='fsdp'`` does: the 4-bit checkpoint loaded in host memory, stored in bf16 and cut
into one slice per rank by FSDP2 (``loraflow.ml.distributed.shard``), which all-gathers each layer
before it runs and reduce-scatters the LoRA gradients; at N=1 its ratio to the plain row is what the
gathering and freeing cost, and its peak memory what one rank holds.

It prints tokens/s, peak GPU memory (allocated and reserved), the ratio to every other variant,
and the largest difference of the first 20 losses against the first variant. With --budgets it
sweeps batch sizes for each variant and reports the best tokens/s each system reaches within
each memory budget (peak reserved memory, what a card of that size must hold). With --profile N
each variant profiles two more steps and its log (in the work folder's logs/) gets the top N
kernels by device time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository's packages
    sys.path.insert(0, str(ROOT))

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (64, 128, 2, 4, 2, 512),
    "1b": (2048, 8192, 16, 32, 8, 128256),  # Llama-3.2-1B
    "3b": (3072, 8192, 28, 24, 8, 128256),  # Llama-3.2-3B
    "8b": (4096, 14336, 32, 32, 8, 128256),  # Llama-3-8B
    # 4 of Llama-3-8B's layers: where both systems keep one layer's activations on the GPU at a time
    # (layer inputs offloaded), its per-token memory is the 8B shape's at an eighth of the time
    # (bench/packing_throughput.py --long-context --emulate-layers 32)
    "8b-4l": (4096, 14336, 4, 32, 8, 128256),
    "13b": (5120, 13824, 40, 40, 40, 32000),  # Llama-2-13B
    "34b": (8192, 22016, 48, 64, 8, 32000),  # CodeLlama-34B
    "70b": (8192, 28672, 80, 64, 8, 128256),  # Llama-3-70B
}
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_VARIANTS = [
    "plain:ckpt",
    "plain:bf16-ckpt",
    "unsloth:offload",
    "unsloth:ckpt",
    "loraflow:balanced",
    "loraflow:lean",
    "loraflow:fast",
]


@dataclass
class Result:
    variant: str
    batch: int
    tokens_per_s: float = float("nan")
    peak_gb: float = float("nan")  # max allocated
    reserved_gb: float = float("nan")  # max reserved by the caching allocator
    losses: list[float] = field(default_factory=list)
    error: str | None = None  # "OOM", "not importable: ...", or the failure
    cap_gb: float | None = None  # the memory cap it ran under (bench/packing_throughput.py --long-context)


def llama_config(shape: str):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )


def build(shape: str, out: Path) -> Path:
    """A random-init Llama of ``shape`` saved in bf16, built in bf16 (2 bytes per parameter, not the
    6 of an fp32 init and a cast: the 3b shape then builds on a 24 GB machine)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    return out


def load_4bit(path: Path, device: str | None = None):
    """Load a checkpoint through the stages' 4-bit path: quantize a full-precision one as the
    quantize stage does, or load a saved 4-bit one as train does (``loraflow.ml.models.load_quantized``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraflow.config import QuantConfig
    from loraflow.ml.models import bnb_config, disable_cpu_weight_repacking, load_quantized

    device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    if "quantization_config" in json.loads((path / "config.json").read_text()):
        return load_quantized(path, device=device)
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config(QuantConfig()), dtype=torch.bfloat16, device_map={"": device}
    )
    disable_cpu_weight_repacking(model)
    return model


def build_4bit(shape: str, folder: Path) -> Path:
    """The 4-bit checkpoint every variant loads, built once per folder and shape."""

    out = folder / f"{shape}-nf4"
    if not (out / "config.json").is_file():
        _build_4bit(shape, folder, out)
    if not (out / "tokenizer.json").is_file():
        # Unsloth loads a tokenizer with the model; the batches are random ids, any tokenizer will do.
        from loraflow.ml.tiny import train_tokenizer

        train_tokenizer(["a tokenizer for the benchmark's random batches"] * 4, 300).save_pretrained(out)
    return out


def _build_4bit(shape: str, folder: Path, out: Path) -> None:
    import torch

    full = build(shape, folder / f"{shape}-bf16")
    model = load_4bit(full)
    model.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for f in full.iterdir():  # 16 GB for 8B: not needed any more
        f.unlink()
    full.rmdir()


def batches(vocab: int, batch: int, seq: int, n: int) -> list:
    """The same random token batches in every process: a seeded CPU generator."""
    import torch

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


# --- one variant, in its own process ---


def prepare(engine: str, mode: str, path: Path, seq: int, device: str | None = None, world=None):
    """The model to train and a function batch -> mean loss, for one variant; with ``world``, sharded over it."""
    import torch

    from loraflow.config import LoraConfig
    from loraflow.ml.training import peft_config

    lora = LoraConfig(r=16, alpha=32, dropout=0.0, target_modules=LINEAR)
    torch.manual_seed(0)  # the same LoRA init for every variant
    if engine == "unsloth":
        from unsloth import FastLanguageModel

        mode, *extras = mode.split("+")
        model, _ = FastLanguageModel.from_pretrained(
            model_name=str(path),
            max_seq_length=seq,
            dtype=torch.bfloat16,
            load_in_4bit=True,
            unsloth_tiled_mlp="tiled" in extras,
        )
        tiled = [m for m in model.modules() if getattr(m.forward, "__name__", "").startswith("tiled_forward")]
        if ("tiled" in extras) != bool(tiled):
            raise RuntimeError(f"Unsloth tiled {len(tiled)} MLPs, mode {mode}+{'+'.join(extras)}")
        model = FastLanguageModel.get_peft_model(
            model,
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=LINEAR,
            bias="none",
            use_gradient_checkpointing={"offload": "unsloth", "ckpt": True, "none": False}[mode],
            random_state=0,
        )
        return model, lambda b: model(**b).loss
    if world is not None:  # as tasks/train.py loads for 'fsdp': host memory, the saved compute dtype
        from loraflow.ml.models import load_quantized

        compute = json.loads((path / "config.json").read_text())["quantization_config"]["bnb_4bit_compute_dtype"]
        model = load_quantized(path, device="cpu", compute_dtype=None if device == "cpu" else compute)
    else:
        model = load_4bit(path, device)
    if engine == "plain":
        from peft import get_peft_model, prepare_model_for_kbit_training

        checkpointing = mode.endswith("ckpt")
        if mode == "ckpt":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
        model = get_peft_model(model, peft_config(lora))
        return model, lambda b: model(**b).loss
    from loraflow.ml import lora4bit, memory
    from loraflow.ml.lora4bit import fuse_lora_4bit
    from loraflow.ml.loss import token_loss_sum
    from loraflow.ml.training import prepare_for_training

    profile, *extras = mode.split("+")
    if "liger" in extras:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model
        )
    model = prepare_for_training(
        model,
        lora,
        profile,
        "on" if "compile" in extras else "off",
        fused=not {"peft", "ungrouped"} & set(extras),
        device=device,
    )
    if "ungrouped" in extras:  # the fused layers one by one (compiling starts at the first step)
        fuse_lora_4bit(model, group=False)
    if world is not None:
        from loraflow.ml import distributed

        distributed.shard(model, world)
    lora4bit.DIRECT_DEQUANTIZE = "bnbops" not in extras
    memory.PREFETCH = "noprefetch" not in extras
    tiles = [int(e.removeprefix("tile")) for e in extras if e.startswith("tile") and e[4:].isdigit()]
    if tiles:
        memory.tile_mlps(model, tiles[-1], memory.PROFILES[profile].mlp_tile_above)
    chunk = loss_chunk(profile, extras)
    autocast = "autocast" in extras  # peft's forward, LoRA in bf16 (with +peft)

    def step_loss(b):
        with torch.autocast(model.device.type, torch.bfloat16, enabled=autocast):
            loss_sum, n = token_loss_sum(model, b, chunk_tokens=chunk)
        return loss_sum / n

    return model, step_loss


def loss_chunk(profile: str, extras: list[str]) -> int:
    """The output head's chunk: the profile's, or N of a ``+chunkN`` extra."""
    from loraflow.ml.memory import PROFILES

    asked = [int(e.removeprefix("chunk")) for e in extras if e.startswith("chunk") and e[5:].isdigit()]
    return asked[-1] if asked else PROFILES[profile].loss_chunk_tokens


def run_variant(
    variant: str, path: Path, batch: int, seq: int, steps: int, warmup: int, profile: int = 0, world=None
) -> Result:
    import torch

    engine, mode = variant.split("@", 1)[0].split(":", 1)  # "@ddpN", "@fsdpN": the ranks are this process's world
    sharded = world is not None and "@fsdp" in variant
    if "+expandable" in mode:  # read when the CUDA allocator starts, at the first allocation
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    cuda = torch.cuda.is_available()
    model, step_loss = prepare(engine, mode, path, seq, world.device if world else None, world if sharded else None)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    data = batches(vocab, batch, seq, warmup + steps)
    if world is not None and not sharded:  # shard() has broadcast them before cutting them
        world.broadcast_params(params)
    if engine != "loraflow":  # the train stage takes host batches and moves them itself (loraflow/ml/loss.py)
        data = [{k: v.to(device) for k, v in b.items()} for b in data]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, tokens, start = [], 0, time.perf_counter()
    for i, b in enumerate(data):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            start, tokens = time.perf_counter(), 0
        if world is None:
            loss = step_loss(b)
            loss.backward()
        else:  # this rank's rows, normalised by the global token count: the 1-process gradient, summed over ranks
            mine = world.shard(b)
            scale = int((mine["labels"][:, 1:] != -100).sum()) / int((b["labels"][:, 1:] != -100).sum())
            loss = step_loss(mine) * scale
            loss.backward()
            if not sharded:  # FSDP reduce-scattered them in the backward pass
                world.all_reduce_grads(params)
            loss = torch.tensor(world.sum(loss.item()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # a sync point: every variant pays it
        tokens += int(b["attention_mask"].sum())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if profile:  # after the timed steps: two more, under the profiler, the kernels' share printed
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        with profiler(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for b in data[:2]:
                step_loss(b).backward()
                opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=profile, max_name_column_width=90))
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
    reserved = torch.cuda.max_memory_reserved() / 1e9 if cuda else float("nan")
    if world is not None:  # the largest rank's
        peak, reserved = (max(x) for x in zip(*world.gather((peak, reserved)), strict=True))
    return Result(variant, batch, tokens / seconds, peak, reserved, losses)


def worker(args: argparse.Namespace) -> None:
    engine = args.variant.split(":", 1)[0]
    world = None
    if "WORLD_SIZE" in os.environ:  # one rank of a `@ddpN` or `@fsdpN` variant, started by torchrun (see spawn)
        from loraflow.ml import distributed

        env = os.environ
        world = distributed.start(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))
    try:
        if engine == "unsloth":
            import importlib.util

            if importlib.util.find_spec("unsloth") is None:
                raise ModuleNotFoundError("unsloth is not installed")
        result = run_variant(
            args.variant, args.model, args.batch, args.seq, args.steps, args.warmup, args.profile, world
        )
    except Exception as e:  # reported as the variant's result: one failing variant must not end the table
        import torch

        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        missing = isinstance(e, ModuleNotFoundError) or (engine == "unsloth" and "requires" in str(e).lower())
        error = "OOM" if oom else (f"not importable: {e}" if missing else f"{type(e).__name__}: {e}")
        if not (oom or missing):
            import traceback

            traceback.print_exc()
        result = Result(args.variant, args.batch, error=error[:300])
    if world is None or world.main:
        args.out.write_text(json.dumps(asdict(result)))
    if world is not None:
        distributed.stop()


# --- the side-by-side run ---


def spawn(
    variant: str, model: Path, batch: int, seq: int, steps: int, warmup: int, tmp: Path, profile: int = 0
) -> Result:
    out = tmp / f"{variant.replace(':', '-').replace('+', '_').replace('@', '_')}-{batch}.json"
    cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--model", str(model)]
    if "@" in variant:  # N ranks through torchrun, as the train flow launches the trainer (flows/trainer.py)
        ranks = variant.rsplit("@", 1)[1].removeprefix("ddp").removeprefix("fsdp")
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", ranks, "--standalone"]
        cmd = [*torchrun, *cmd[1:]]
    cmd += ["--batch", str(batch), "--seq", str(seq), "--steps", str(steps), "--warmup", str(warmup), "--out", str(out)]
    cmd += ["--profile", str(profile)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out.with_suffix(".log").write_text(proc.stdout + proc.stderr)  # the worker's whole output, kept for failures
    if not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return Result(variant, batch, error=f"worker exited {proc.returncode}: " + " | ".join(tail))
    result = Result(**json.loads(out.read_text()))
    status = result.error or f"{result.tokens_per_s:,.0f} tok/s, peak {result.peak_gb:.1f} GB"
    print(f"  {variant} batch {batch}: {status}", flush=True)
    return result


def table(results: list[Result]) -> str:
    ok = [r for r in results if r.error is None]
    base = ok[0] if ok else None
    lines = [
        f"| variant | batch | tokens/s | peak GB | reserved GB | max \\|Δloss\\| vs {base.variant if base else '-'} | "
        + " | ".join(f"x {r.variant}" for r in ok)
        + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(ok),
    ]
    for r in results:
        if r.error is not None:
            lines.append(f"| {r.variant} | {r.batch} | {r.error} |")
            continue
        n = min(20, len(r.losses), len(base.losses))
        dloss = max(abs(a - b) for a, b in zip(r.losses[:n], base.losses[:n], strict=True))
        ratios = " | ".join(f"{r.tokens_per_s / o.tokens_per_s:.2f}" for o in ok)
        lines.append(
            f"| {r.variant} | {r.batch} | {r.tokens_per_s:,.0f} | {r.peak_gb:.1f} | {r.reserved_gb:.1f} "
            f"| {dloss:.4f} | {ratios} |"
        )
    return "\n".join(lines)


def budget_table(results: list[Result], budgets: list[float]) -> str:
    """The best tokens/s per system within each budget of peak reserved memory."""
    systems = sorted({r.variant.split(":")[0] for r in results})
    lines = ["| system | " + " | ".join(f"within {b:g} GB" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for system in systems:
        cells = []
        for budget in budgets:
            fits = [
                r
                for r in results
                if r.variant.split(":")[0] == system
                and r.error is None
                and (math.isnan(r.reserved_gb) or r.reserved_gb <= budget)
            ]
            best = max(fits, key=lambda r: r.tokens_per_s, default=None)
            cells.append(
                f"{best.tokens_per_s:,.0f} ({best.variant.split(':', 1)[1]}, batch {best.batch}, "
                f"{best.reserved_gb:.1f} GB)"
                if best
                else "does not fit"
            )
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Result]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=17, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="engine:mode, e.g. loraflow:balanced+liger")
    ap.add_argument("--budgets", type=float, nargs="+", help="sweep batch sizes; best tokens/s within each GB budget")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="batch sizes of the sweep")
    ap.add_argument("--workdir", type=Path, help="keep the 4-bit checkpoint here between runs (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument(
        "--profile", type=int, default=0, metavar="N", help="profile two extra steps; the top N kernels go to the logs"
    )
    ap.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="also run each loraflow variant on N torchrun ranks",
    )
    ap.add_argument(
        "--distributed",
        nargs="+",
        choices=["ddp", "fsdp"],
        default=["ddp"],
        help="with --gpus: the ranks' placement, data-parallel (<variant>@ddpN) or sharded (<variant>@fsdpN), or both",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.gpus:
        if args.batch < args.gpus:
            ap.error(f"--gpus {args.gpus} splits --batch {args.batch} rows: give at least one row per rank")
        ranked = [f"{v}@{d}{args.gpus}" for d in args.distributed for v in args.variants if v.startswith("loraflow:")]
        args.variants = [*args.variants, *ranked]
    if args.worker:
        worker(args)
        return []

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = args.workdir or tmp
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        model = build_4bit(args.shape, folder)
        print(f"4-bit {args.shape} checkpoint ready in {time.perf_counter() - start:.0f} s: {model}", flush=True)
        logs = folder / "logs"
        logs.mkdir(exist_ok=True)
        results = [
            spawn(v, model, args.batch, args.seq, args.steps, args.warmup, logs, args.profile) for v in args.variants
        ]
        sweep: list[Result] = []
        if args.budgets:
            limit = max(args.budgets)
            for variant in args.variants:
                for batch in args.batches:
                    same = [r for r in results if r.variant == variant and r.batch == batch]
                    r = same[0] if same else spawn(variant, model, batch, args.seq, 4, 2, logs)
                    sweep.append(r)
                    if r.error is not None or r.reserved_gb > limit:
                        break  # a larger batch needs more memory still
    header = f"shape={args.shape} seq={args.seq} batch={args.batch} steps={args.warmup}+{args.steps} on {gpu}"
    print(header)
    print(table(results))
    if args.budgets:
        print(f"\nbest tokens/s within each budget (batches {args.batches}, seq {args.seq}):")
        print(budget_table(sweep, args.budgets))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": [asdict(r) for r in results + sweep]}, indent=2))
    return results


if __name__ == "__main__":
    main()
