"""Peak GPU memory of loraflow's train stage on Llama shapes too large to build in 16 bits first.

    python bench/largest_shape.py --shapes 34b 70b --profile lean --seq 2048 --batch 1   # on a GPU
    python bench/largest_shape.py --shapes tiny --seq 32 --steps 1                        # CPU smoke

The question is the QLoRA paper's: what trains within 48 GB (its single-GPU budget for 65B)? A
70B model is 140 GB in bf16, more than the GPU or the host holds, so the model is built directly
in 4 bits: the skeleton on the meta device, then each linear layer drawn at random in bf16 on
the device and quantized to NF4 with double quantization at once (bitsandbytes, as the quantize
stage's settings say), one at a time. The resulting modules are the ones `from_pretrained`
makes. LoRA r=16 on all seven projections, the train stage's `prepare_for_training` and loss, a
few steps on random tokens; the peak is `torch.cuda.max_memory_allocated` (and reserved).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.train_throughput import LINEAR, llama_config  # noqa: E402
from loraflow.config import LoraConfig, QuantConfig  # noqa: E402
from loraflow.ml.loss import token_loss_sum  # noqa: E402
from loraflow.ml.memory import PROFILES  # noqa: E402
from loraflow.ml.models import bnb_config, disable_cpu_weight_repacking  # noqa: E402
from loraflow.ml.training import prepare_for_training  # noqa: E402


def build_in_4bit(shape: str, device: str) -> torch.nn.Module:
    """A random Llama of ``shape`` whose linear layers are NF4 + double quantization from the start."""
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = llama_config(shape)
    quant = bnb_config(QuantConfig())
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    model = replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"], quantization_config=quant)
    g = torch.Generator(device=device).manual_seed(0)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = torch.empty(module.out_features, module.in_features, dtype=torch.bfloat16, device=device)
            w.normal_(0.0, config.initializer_range, generator=g)
            module.weight = bnb.nn.Params4bit(
                w, requires_grad=False, quant_type="nf4", compress_statistics=True, module=module
            )._quantize(device)
            module.compute_dtype = torch.bfloat16
    for name, p in list(model.named_parameters()):
        if p.device.type == "meta":
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            value = torch.empty(p.shape, dtype=torch.bfloat16, device=device)
            value.fill_(1.0) if "norm" in name else value.normal_(0.0, config.initializer_range, generator=g)
            setattr(owner, name.rsplit(".", 1)[1], torch.nn.Parameter(value, requires_grad=False))
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffer was on meta
    model.is_loaded_in_4bit = True
    model.config.quantization_config = quant
    disable_cpu_weight_repacking(model)
    return model


def probe(shape: str, profile: str, seq: int, batch: int, steps: int) -> dict[str, float | str]:
    cuda = torch.cuda.is_available()
    device = "cuda:0" if cuda else "cpu"
    start = time.perf_counter()
    torch.manual_seed(0)
    model = prepare_for_training(
        build_in_4bit(shape, device), LoraConfig(r=16, alpha=32, dropout=0.0, target_modules=LINEAR), profile
    )
    built = time.perf_counter() - start
    weights = torch.cuda.memory_allocated() / 1e9 if cuda else float("nan")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(1)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        loss_sum, n = token_loss_sum(model, b, chunk_tokens=PROFILES[profile].loss_chunk_tokens)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum.item() / n)
    return {
        "shape": shape,
        "profile": profile,
        "build_s": built,
        "weights_gb": weights,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan"),
        "reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if cuda else float("nan"),
        "loss": losses[-1],
    }


def main(argv: list[str] | None = None) -> list[dict[str, float | str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["70b"])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="lean")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    rows = []
    for shape in args.shapes:
        try:
            row = probe(shape, args.profile, args.seq, args.batch, args.steps)
        except torch.OutOfMemoryError:
            row = {"shape": shape, "profile": args.profile, "error": "OOM"}
        rows.append(row)
        print(row, flush=True)
        gc.collect()  # peft models hold reference cycles: free the last shape before the next one
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
