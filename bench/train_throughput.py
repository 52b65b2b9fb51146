"""QLoRA training throughput: the plain recipe vs loraflow's train-stage code, side by side.

    python bench/train_throughput.py --shape 1b --seq 2048 --batch 4 --steps 12        # on a GPU
    python bench/train_throughput.py --shape tiny --seq 64 --batch 2 --steps 3         # CPU smoke

Each shape is a Llama built from config with random weights, saved, then loaded through the real
4-bit path (bitsandbytes NF4 + double quantization, as the quantize stage does). Every variant
trains LoRA r=16 on all seven linear projections of every layer, on the same random token
batches, in this one process, one after the other:

  plain     transformers + peft + bitsandbytes with `prepare_model_for_kbit_training` (which
            upcasts every non-quantized weight to fp32) and gradient checkpointing
  loraflow  tasks/train.py's `prepare_for_training` (non-quantized weights kept in bf16) and its
            response-token loss `token_loss_sum`: once through the full logits, once with the
            chunked output head (the default), and optionally without checkpointing

It prints tokens/s, peak GPU memory, the ratio to `plain`, and the largest difference of the
first losses against `plain` on identical batches. Results go into docs/benchmarks.md with the
command that produced them.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from loraflow.config import LoraConfig, QuantConfig
from loraflow.loss import LOSS_CHUNK_TOKENS, token_loss_sum
from loraflow.models import bnb_config, disable_cpu_weight_repacking
from tasks.train import peft_config, prepare_for_training

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (64, 128, 2, 4, 2, 512),
    "1b": (2048, 8192, 16, 32, 8, 128256),  # Llama-3.2-1B
    "3b": (3072, 8192, 28, 24, 8, 128256),  # Llama-3.2-3B
    "8b": (4096, 14336, 32, 32, 8, 128256),  # Llama-3-8B
}
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Result:
    variant: str
    tokens_per_s: float
    peak_gb: float
    losses: list[float]


def build(shape: str, out: Path) -> Path:
    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    del model
    return out


def load_4bit(path: Path) -> torch.nn.Module:
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config(QuantConfig()), dtype=torch.bfloat16, device_map={"": device}
    )
    disable_cpu_weight_repacking(model)
    return model


def batches(vocab: int, batch: int, seq: int, n: int, device: str) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return [{k: v.to(device) for k, v in b.items()} for b in out]


def prepare(variant: str, path: Path, checkpointing: bool) -> torch.nn.Module:
    lora = LoraConfig(r=16, alpha=32, dropout=0.0, target_modules=LINEAR)
    model = load_4bit(path)
    if variant == "plain":
        from peft import get_peft_model, prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
        return get_peft_model(model, peft_config(lora))
    return prepare_for_training(model, lora, "balanced" if checkpointing else "fast")


def run(
    variant: str,
    path: Path,
    data: list[dict[str, torch.Tensor]],
    warmup: int,
    checkpointing: bool,
    chunk_tokens: int | None = LOSS_CHUNK_TOKENS,
) -> Result:
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)  # same LoRA init for every variant
    model = prepare(variant, path, checkpointing)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, tokens, start = [], 0, 0.0
    for i, batch in enumerate(data):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            start, tokens = time.perf_counter(), 0
        if variant == "plain":
            loss = model(**batch).loss  # transformers' own shifted mean cross-entropy
        else:
            loss_sum, n = token_loss_sum(model, batch, chunk_tokens=chunk_tokens)
            loss = loss_sum / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # a sync point: fine, both variants pay it
        tokens += int(batch["attention_mask"].sum())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
    name = variant + ("" if checkpointing else " (no ckpt)") + (" full logits" if chunk_tokens is None else "")
    del model, opt
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return Result(name, tokens / seconds, peak, losses)


def main(argv: list[str] | None = None) -> list[Result]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-ckpt", action="store_true", help="also run loraflow without gradient checkpointing")
    ap.add_argument("--chunk", type=int, action="append", help="extra loraflow runs with this loss chunk size")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        path = build(args.shape, Path(tmp) / args.shape)
        data = batches(SHAPES[args.shape][5], args.batch, args.seq, args.warmup + args.steps, device)
        results = [
            run("plain", path, data, args.warmup, True),
            run("loraflow", path, data, args.warmup, True, chunk_tokens=None),
            run("loraflow", path, data, args.warmup, True),
        ]
        for chunk in args.chunk or []:
            results.append(run(f"loraflow chunk {chunk}", path, data, args.warmup, True, chunk_tokens=chunk))
        if args.no_ckpt:
            results.append(run("loraflow", path, data, args.warmup, False))
    base = results[0]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"shape={args.shape} seq={args.seq} batch={args.batch} steps={args.steps} on {gpu}")
    print(f"{'variant':<22}{'tokens/s':>10}{'peak GB':>9}{'x plain':>9}{'max |dloss| vs plain':>22}")
    for r in results:
        n = min(20, len(r.losses), len(base.losses))
        dloss = max(abs(a - b) for a, b in zip(r.losses[:n], base.losses[:n], strict=True))
        ratio = r.tokens_per_s / base.tokens_per_s
        print(f"{r.variant:<22}{r.tokens_per_s:>10,.0f}{r.peak_gb:>9.1f}{ratio:>9.2f}{dloss:>22.4f}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results


if __name__ == "__main__":
    main()
