"""How a fresh LoRA adapter on the 4-bit base starts (``lora.init``).

``default``   peft's: A Kaiming-uniform, B zero, so the model starts as the 4-bit base.
``gaussian``  peft's alternative: A normal with std 1/r, B zero (same start, other A scale).
``loftq``     LoftQ (Li et al., 2023) with the quantized base kept as it is: A and B start as the
              best rank-r approximation of what quantization took away, W - dequant(Q(W)), so the
              model starts as close to the full-precision weights as rank r allows.
``cloq``      CLoQ (Deng et al., 2025) with the quantized base kept as it is: A and B start as the
              rank-r product that best restores each layer's *outputs* on calibration inputs, i.e.
              minimise ||X (W - dequant(Q(W)) - B A)^T||_F over the inputs X the layer sees on a few
              training examples, instead of the residual's own norm (LoftQ). Directions of the
              residual that real inputs excite count; those they never excite do not.

LoftQ here is peft's ``replace_lora_weights_loftq`` (one LoftQ step on an existing bitsandbytes
model: the quantized weights stay, only A and B change), with two differences: it runs on the CPU
as well (peft's helper moves weights to "cuda"), and A and B are divided by the LoRA scaling
(alpha / r), which peft's helper leaves out, so that scaling * B @ A equals the rank-r residual
for any alpha. The 4-bit weights are never replaced: the quantize stage's checkpoint stays the base
that train, evaluate, merge and the registry share. peft's full LoftQ (``init_lora_weights="loftq"``
with several iterations) re-quantizes W - B @ A and so needs a base of its own per adapter;
PiSSA and OLoRA likewise subtract their initial B @ A from the base weights. Neither fits a
4-bit base shared between adapters, and they are not offered.

CLoQ's closed form: with H = X^T X + damping (a small multiple of the identity, so that H is
positive definite however few tokens there are) and H = L L^T (Cholesky), the error is
||(dW - B A) L||_F, so B A = SVD_r(dW L) L^-1 (Eckart-Young in the whitened space). X is the input of
each adapted projection, captured by forward hooks during one no-grad pass of the 4-bit model (adapter
off) over ``lora.calibration_rows`` training examples drawn with the training seed, non-pad tokens
only. Projections that read the same tensor (q/k/v, gate/up: the fused operator's groups) share one H.
The paper quantizes the base itself with the calibration data too (GPTQ-style); here the base is the
shared one of the quantize stage, and only the LoRA part of the method applies.

Every init keeps the fused operator (loraflow/ml/lora4bit.py): they only set A and B.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loraflow.config import LoraConfig
from loraflow.errors import UsageError
from loraflow.ml.batching import collate
from loraflow.ml.prompts import Encoded

PREFIX = "base_model.model."  # peft's prefix before the base model's module names


def _full_precision_weight(folder: Path, name: str, index: dict[str, str] | None) -> torch.Tensor:
    from safetensors import safe_open

    file = folder / (index[name] if index is not None else "model.safetensors")
    with safe_open(str(file), framework="pt", device="cpu") as f:
        return f.get_tensor(name)


def _weight_index(folder: Path, init: str) -> dict[str, str] | None:
    """Tensor name -> shard file of a sharded checkpoint; None for a single model.safetensors."""
    sharded = folder / "model.safetensors.index.json"
    if sharded.is_file():
        return json.loads(sharded.read_text())["weight_map"]
    if (folder / "model.safetensors").is_file():
        return None
    raise UsageError(
        f"lora.init={init} needs the full-precision base as safetensors, and {folder} has none "
        "(model.safetensors or model.safetensors.index.json): point base_model.path at such a folder, "
        "or set lora.init=default"
    )


# CLoQ's damping, as a share of the mean diagonal of X^T X (GPTQ's percdamp): keeps H positive definite
# when the calibration tokens span fewer dimensions than the layer's input, and barely moves the optimum.
DAMPING = 0.01


@dataclass(frozen=True)
class Calibration:
    """Training examples that a calibrated init (``cloq``) draws its rows from.

    Attributes:
        examples: the encoded training split (never held-out rows).
        pad_id: the tokenizer's padding id, for collating.
        seed: which rows are drawn (the training seed: same seed, same rows).
        batch_size: rows per no-grad forward pass.
    """

    examples: Sequence[Encoded]
    pad_id: int
    seed: int
    batch_size: int = 8

    def rows(self, n: int) -> list[Encoded]:
        """``n`` examples (all of them if there are fewer) drawn without replacement with ``seed``."""
        picked = random.Random(self.seed).sample(range(len(self.examples)), min(n, len(self.examples)))
        return [self.examples[i] for i in picked]


def lora_4bit_layers(model: torch.nn.Module, names: Collection[str] | None = None) -> dict[str, torch.nn.Module]:
    """The peft LoRA layers on bitsandbytes ``Linear4bit`` weights (those in ``names``, if given), in model order."""
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, LoraLinear4bit) and (names is None or name in names)
    }


def _residuals(
    model: torch.nn.Module, full_precision: str | Path, init: str, names: Collection[str] | None = None
) -> Iterator[tuple[str, torch.nn.Module, str, torch.Tensor, torch.Tensor]]:
    """(name, peft layer, adapter, full-precision weight, dequantized 4-bit weight) of every LoRA layer on a
    bitsandbytes ``Linear4bit`` (of those in ``names``, if given), the weights in float32 on the layer's
    device; refuses a model with none."""
    import bitsandbytes as bnb

    folder = Path(full_precision)
    index = _weight_index(folder, init)
    n = 0
    for name, module in lora_4bit_layers(model, names).items():
        (adapter,) = module.lora_A  # one adapter: the train stage creates exactly one
        weight = module.base_layer.weight
        state = copy.copy(weight.quant_state)
        state.dtype = torch.float32  # dequantize at full precision, as merge does
        dequantized = bnb.functional.dequantize_4bit(weight.data, state)
        original = _full_precision_weight(folder, name.removeprefix(PREFIX) + ".weight", index)
        if original.shape != dequantized.shape:
            raise UsageError(
                f"lora.init={init}: {name} is {tuple(dequantized.shape)} in the 4-bit base but "
                f"{tuple(original.shape)} in {folder}: the full-precision folder is not the one it was quantized from"
            )
        yield name, module, adapter, original.to(dequantized.device, torch.float32), dequantized
        n += 1
    if n == 0:
        raise UsageError(f"lora.init={init} applies to LoRA layers on a 4-bit base, and this model has none")


def _set_factors(module: torch.nn.Module, adapter: str, a: torch.Tensor, b: torch.Tensor) -> None:
    lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    lora_a.copy_(a.to(lora_a.dtype))
    lora_b.copy_(b.to(lora_b.dtype))


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
    n = 0
    for _, module, adapter, original, dequantized in _residuals(model, full_precision, "loftq"):
        a, b = loftq_factors(original, dequantized, module.r[adapter], module.scaling[adapter])
        _set_factors(module, adapter, a, b)
        n += 1
    return n


@torch.no_grad()
def cloq_factors(
    weight: torch.Tensor,
    dequantized: torch.Tensor,
    gram: torch.Tensor,
    r: int,
    scaling: float,
    damping: float = DAMPING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r x in) and B (out x r) with ``scaling * B @ A`` the rank-r matrix closest to the residual
    ``weight - dequantized`` in the output space of inputs with Gram matrix ``gram`` (X^T X, in x in):
    the minimiser of ||X (weight - dequantized - scaling * B @ A)^T||_F, with ``damping * mean(diag(gram))``
    added to the diagonal of the Gram matrix first (0: none; the Gram matrix must then be positive definite).
    In float32.
    """
    residual = weight.to(torch.float32) - dequantized.to(torch.float32)
    h = gram.to(torch.float32)
    h = h + damping * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    chol, info = torch.linalg.cholesky_ex(h)  # h = L L^T: the error is ||(residual - BA) L||_F
    if info.item() != 0:
        raise UsageError(
            "lora.init=cloq: a layer's input Gram matrix is not positive definite (its calibration inputs are "
            "all zero or not finite): raise lora.calibration_rows, or set lora.init=loftq"
        )
    u, s, vh = torch.linalg.svd(residual @ chol, full_matrices=False)
    directions = torch.linalg.solve_triangular(chol, vh[:r], upper=False, left=False)  # V_r^T L^-1
    root = (s[:r] / scaling).sqrt()
    return root[:, None] * directions, u[:, :r] * root[None, :]


class _InputGrams:
    """Forward pre-hooks that sum X^T X (float32) of each hooked layer's input over the non-pad tokens.

    Layers of one parent called on the very same tensor one after the other (q/k/v, gate/up) share one sum.
    """

    def __init__(self, layers: dict[str, torch.nn.Module]) -> None:
        self.mask: torch.Tensor | None = None  # the current batch's attention mask, set by the caller
        self.grams: dict[str, torch.Tensor] = {}  # layer name -> its Gram matrix (shared tensors)
        self._last: dict[str, tuple[torch.Tensor, str]] = {}  # parent -> (last input, the layer that summed it)
        self._owner: dict[str, str] = {}  # layer name -> the layer whose sum it uses (itself, or a sibling)
        self._handles = [layer.register_forward_pre_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str):
        parent = name.rpartition(".")[0]

        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            last = self._last.get(parent)
            owner = last[1] if last is not None and last[0] is x else name  # a sibling summed this input already?
            if self._owner.setdefault(name, owner) != owner:  # sharing must not change between batches
                raise RuntimeError(
                    f"{name} shares its input with {self._owner[name]} in one batch, with {owner} in another"
                )
            if owner != name:
                self.grams[name] = self.grams[owner]
                return
            assert self.mask is not None
            if x.shape[:-1] != self.mask.shape:
                raise RuntimeError(f"{name}'s input {tuple(x.shape)} does not match the batch {tuple(self.mask.shape)}")
            tokens = x[self.mask.to(device=x.device, dtype=torch.bool)].to(torch.float32)
            if name not in self.grams:
                self.grams[name] = tokens.new_zeros(tokens.shape[1], tokens.shape[1])
            self.grams[name].addmm_(tokens.t(), tokens)
            self._last[parent] = (x, name)

        return hook

    def next_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self._last.clear()  # drops the previous batch's inputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last.clear()


def gram_bytes(layers: dict[str, torch.nn.Module]) -> int:
    """What the Gram matrices of ``layers`` take at most (float32, in x in each; inputs that siblings share
    are counted once per sibling, so this is an upper bound)."""
    return sum(4 * m.in_features**2 for m in layers.values())


# Gram matrices per calibration pass on the CPU (on a GPU: half its free memory)
HOST_GRAM_BUDGET = 4 * 2**30


def _by_parent(layers: dict[str, torch.nn.Module]) -> list[list[str]]:
    """The layer names grouped by their parent module, in model order: siblings that may share an input."""
    parents: dict[str, list[str]] = {}
    for name in layers:
        parents.setdefault(name.rpartition(".")[0], []).append(name)
    return list(parents.values())


def gram_passes(layers: dict[str, torch.nn.Module], budget: int) -> list[list[str]]:
    """The layers split into calibration passes whose Gram matrices take at most ``budget`` bytes each
    (:func:`gram_bytes`), siblings always in one pass; a parent larger than the budget gets a pass alone."""
    passes: list[list[str]] = []
    current: list[str] = []
    used = 0
    for siblings in _by_parent(layers):
        need = gram_bytes({n: layers[n] for n in siblings})
        if current and used + need > budget:
            passes.append(current)
            current, used = [], 0
        current += siblings
        used += need
    if current:
        passes.append(current)
    return passes


def gram_budget(layers: dict[str, torch.nn.Module], device: torch.device) -> int:
    """Bytes of Gram matrices one calibration pass may hold: ``HOST_GRAM_BUDGET`` on the CPU, half the
    GPU's free memory on a GPU (the forward pass needs the rest); refuses when one module's layers
    cannot fit even alone."""
    if device.type != "cuda":
        return HOST_GRAM_BUDGET
    free, _ = torch.cuda.mem_get_info(device)
    budget = free // 2
    largest = max((gram_bytes({n: layers[n] for n in siblings}) for siblings in _by_parent(layers)), default=0)
    if largest > budget:
        raise UsageError(
            f"lora.init=cloq calibrates one module's projections at a time, and the largest needs up to "
            f"{largest / 1e9:.2f} GB of float32 Gram matrices, more than half of the {free / 1e9:.2f} GB free on "
            f"{device}. Use lora.init=loftq (no calibration pass), adapt fewer projections (lora.target_modules), "
            "or train on a GPU with more memory"
        )
    return budget


@torch.no_grad()
def input_grams(
    model: torch.nn.Module,
    rows: Sequence[Encoded],
    pad_id: int,
    batch_size: int,
    names: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """X^T X of the input of every LoRA layer on a 4-bit weight (of those in ``names``, if given) over the
    non-pad tokens of ``rows``.

    One no-grad pass of the model in eval mode with the adapter switched off (the 4-bit base alone, what
    the init corrects); the model's training mode is restored. Layers that read one tensor (q/k/v,
    gate/up) get the same Gram tensor. Keys are the peft model's module names.

    The Gram matrices are float32 on the model's device: per Llama decoder layer three of hidden x hidden
    (the inputs of q/k/v, o and gate/up) and one of intermediate x intermediate (down's), 13 MB for
    SmolLM2-135M (0.4 GB in all) and 1 GB for an 8B model (32 GB in all); :func:`cloq_init` takes them
    in passes that fit (:func:`gram_passes`).
    """
    layers = lora_4bit_layers(model, names)
    device = next(p.device for p in model.parameters())
    grams = _InputGrams(layers)
    training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            for start in range(0, len(rows), batch_size):
                batch = collate(list(rows[start : start + batch_size]), pad_id)
                grams.next_batch(batch["attention_mask"])
                model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    use_cache=False,
                )
    finally:
        grams.remove()
        model.train(training)
    return grams.grams


@torch.no_grad()
def cloq_init(model: torch.nn.Module, full_precision: str | Path, calibration: Calibration, rows: int) -> int:
    """Set A and B of every LoRA layer on a 4-bit weight to CLoQ's calibrated fit of the quantization residual.

    Args:
        model: a peft model whose LoRA layers wrap bitsandbytes ``Linear4bit`` layers (one adapter).
        full_precision: the folder of the weights the 4-bit base was quantized from
            (``QuantizedBase.base.path``).
        calibration: the training examples to draw the calibration rows from.
        rows: how many to draw (``lora.calibration_rows``).

    The layers are calibrated in as many passes over the rows as their Gram matrices need to fit
    (:func:`gram_budget`, :func:`gram_passes`): one for the demo model, several for an 8B model on a
    GPU with little free memory. Every pass sees the same inputs, so the result does not depend on it.

    Returns the number of layers initialised.
    """
    layers = lora_4bit_layers(model)
    if not layers:
        raise UsageError("lora.init=cloq applies to LoRA layers on a 4-bit base, and this model has none")
    device = next(p.device for p in model.parameters())
    picked = calibration.rows(rows)
    n = 0
    for names in gram_passes(layers, gram_budget(layers, device)):
        grams = input_grams(model, picked, calibration.pad_id, calibration.batch_size, names)
        for name, module, adapter, original, dequantized in _residuals(model, full_precision, "cloq", names):
            if name not in grams:
                raise UsageError(
                    f"lora.init=cloq: {name} saw no input in the calibration pass, so it cannot be calibrated"
                )
            gram = grams.pop(name).to(dequantized.device)
            a, b = cloq_factors(original, dequantized, gram, module.r[adapter], module.scaling[adapter])
            _set_factors(module, adapter, a, b)
            n += 1
        del grams
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


def init_adapter(
    model: torch.nn.Module, lora: LoraConfig, full_precision: str | Path, calibration: Calibration | None = None
) -> int:
    """Apply ``lora.init`` to a model fresh from ``get_peft_model`` (peft's default init); returns layers changed.

    ``cloq`` needs ``calibration`` (the training examples to draw ``lora.calibration_rows`` from); the
    others ignore it.
    """
    if lora.init == "cloq":
        if calibration is None:
            raise UsageError("lora.init=cloq needs calibration examples from the training split, and none were given")
        return cloq_init(model, full_precision, calibration, lora.calibration_rows)
    if lora.init == "loftq":
        return loftq_init(model, full_precision)
    if lora.init == "gaussian":
        return gaussian_init(model)
    return 0
