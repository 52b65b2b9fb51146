"""How a fresh LoRA adapter on the 4-bit base starts (``lora.init``).

``default``   peft's: A Kaiming-uniform, B zero, so the model starts as the 4-bit base.
``gaussian``  peft's alternative: A normal with std 1/r, B zero (same start, other A scale).
``loftq``     LoftQ (Li et al., 2023) with the quantized base kept as it is: A and B start as the
              best rank-r approximation of what quantization took away, W - dequant(Q(W)), so the
              model starts as close to the full-precision weights as rank r allows.

LoftQ here is peft's ``replace_lora_weights_loftq`` (one LoftQ step on an existing bitsandbytes
model: the quantized weights stay, only A and B change), with two differences: it runs on the CPU
as well (peft's helper moves weights to "cuda"), and A and B are divided by the LoRA scaling
(alpha / r), which peft's helper leaves out, so that scaling * B @ A equals the rank-r residual
for any alpha. The 4-bit weights are never replaced: the quantize stage's checkpoint stays the base
that train, evaluate, merge and the registry share. peft's full LoftQ (``init_lora_weights="loftq"``
with several iterations) re-quantizes W - B @ A and so needs a base of its own per adapter;
PiSSA and OLoRA likewise subtract their initial B @ A from the base weights. Neither fits a
4-bit base shared between adapters, and they are not offered.

All three keep the fused operator (loraflow/ml/lora4bit.py): they only set A and B.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from loraflow.config import LoraConfig
from loraflow.errors import UsageError

PREFIX = "base_model.model."  # peft's prefix before the base model's module names


def _full_precision_weight(folder: Path, name: str, index: dict[str, str] | None) -> torch.Tensor:
    from safetensors import safe_open

    file = folder / (index[name] if index is not None else "model.safetensors")
    with safe_open(str(file), framework="pt", device="cpu") as f:
        return f.get_tensor(name)


def _weight_index(folder: Path) -> dict[str, str] | None:
    """Tensor name -> shard file of a sharded checkpoint; None for a single model.safetensors."""
    sharded = folder / "model.safetensors.index.json"
    if sharded.is_file():
        return json.loads(sharded.read_text())["weight_map"]
    if (folder / "model.safetensors").is_file():
        return None
    raise UsageError(
        f"lora.init=loftq needs the full-precision base as safetensors, and {folder} has none "
        "(model.safetensors or model.safetensors.index.json): point base_model.path at such a folder, "
        "or set lora.init=default"
    )


@torch.no_grad()
def loftq_factors(weight: torch.Tensor, dequantized: torch.Tensor, r: int, scaling: float) -> tuple:
    """A (r x in) and B (out x r) with ``scaling * B @ A`` the best rank-r approximation of the quantization
    residual ``weight - dequantized`` (truncated SVD, in float32)."""
    residual = weight.to(torch.float32) - dequantized.to(torch.float32)
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = (s[:r] / scaling).sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


@torch.no_grad()
def loftq_init(model: torch.nn.Module, full_precision: str | Path) -> int:
    """Set A and B of every LoRA layer on a 4-bit weight from the residual of the full-precision weight.

    Args:
        model: a peft model whose LoRA layers wrap bitsandbytes ``Linear4bit`` layers (one adapter).
        full_precision: the folder of the weights the 4-bit base was quantized from
            (``QuantizedBase.base.path``).

    Returns the number of layers initialised.
    """
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    folder = Path(full_precision)
    index = _weight_index(folder)
    n = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLinear4bit):
            continue
        (adapter,) = module.lora_A  # one adapter: the train stage creates exactly one
        weight = module.base_layer.weight
        state = copy.copy(weight.quant_state)
        state.dtype = torch.float32  # dequantize at full precision, as merge does
        dequantized = bnb.functional.dequantize_4bit(weight.data, state)
        original = _full_precision_weight(folder, name.removeprefix(PREFIX) + ".weight", index)
        if original.shape != dequantized.shape:
            raise UsageError(
                f"lora.init=loftq: {name} is {tuple(dequantized.shape)} in the 4-bit base but "
                f"{tuple(original.shape)} in {folder}: the full-precision folder is not the one it was quantized from"
            )
        a, b = loftq_factors(original.to(dequantized.device), dequantized, module.r[adapter], module.scaling[adapter])
        lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        lora_a.copy_(a.to(lora_a.dtype))
        lora_b.copy_(b.to(lora_b.dtype))
        n += 1
    if n == 0:
        raise UsageError("lora.init=loftq applies to LoRA layers on a 4-bit base, and this model has none")
    return n


@torch.no_grad()
def gaussian_init(model: torch.nn.Module) -> int:
    """peft's ``init_lora_weights="gaussian"``: A ~ N(0, 1/r^2), B = 0 (draws from torch's global RNG)."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_A:
                module.reset_lora_parameters(adapter, "gaussian")
                n += 1
    return n


def init_adapter(model: torch.nn.Module, lora: LoraConfig, full_precision: str | Path) -> int:
    """Apply ``lora.init`` to a model fresh from ``get_peft_model`` (peft's default init); returns layers changed."""
    if lora.init == "loftq":
        return loftq_init(model, full_precision)
    if lora.init == "gaussian":
        return gaussian_init(model)
    return 0
