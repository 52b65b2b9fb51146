"""The LoRA-on-4-bit linear layer as one operator, computed in the activations' dtype.

peft's LoRA wrapper of a bitsandbytes ``Linear4bit`` computes, per projection: the 4-bit matmul,
a defensive copy of its output, the input upcast to the adapter's fp32, two fp32 matmuls and a
downcast. In a bf16 model that is three extra activation-sized tensors per projection (the fp32
copy of the input is also saved for the backward pass) and fp32 matrix products that run at a
fraction of the bf16 rate. Here the same function is

    y = x @ dequant(W).T + s * (x @ A.T) @ B.T

with A and B cast to x's dtype for the products (the fp32 weights stay the optimizer's master
copy, as under autocast), the LoRA product accumulated into the base product in place, and only
x and the (tokens x r) product x @ A.T saved for the backward pass, which dequantizes W once more
for dx (accumulating the LoRA term in place again) and never computes a gradient for W.

Forward and backward are registered as custom operators (``loraflow::lora_nf4``): torch.compile
then sees each as one opaque kernel call, so the layers around them still fuse, while the
in-place accumulation survives (traced as plain tensor code, it is turned into an out-of-place
addmm that first copies its activation-sized input: measured 30 ms per 8B step on the H200).

Dropout on the adapter's input is applied inside the operator; its keep-mask (one byte per
element) is what the backward pass needs of it, where peft keeps the dropped input in fp32.

Only the plain case is taken over: one active adapter, no bias, no DoRA or other variant. Any
other layer keeps peft's forward. The adapter itself stays a peft adapter: saving, loading and
merging are unchanged. tests/test_stages.py checks values and gradients against peft.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor


def _dequantize(
    qweight: Tensor,
    absmax: Tensor,
    absmax2: Tensor | None,
    code2: Tensor | None,
    offset: Tensor | None,
    blocksize2: int,
    shape: list[int],
    blocksize: int,
    quant_type: str,
    dtype: torch.dtype,
) -> Tensor:
    """bitsandbytes.functional.dequantize_4bit, from the quant state's tensors."""
    if absmax2 is not None:  # double quantization: the absmax values are 8-bit themselves
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax, absmax2, code2, blocksize2, torch.float32)
        absmax = absmax + offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(qweight, absmax, blocksize, quant_type, shape, dtype)


@torch.library.custom_op("loraflow::lora_nf4", mutates_args=())
def lora_nf4(
    x: Tensor,
    qweight: Tensor,
    absmax: Tensor,
    absmax2: Tensor | None,
    code2: Tensor | None,
    offset: Tensor | None,
    blocksize2: int,
    shape: list[int],
    blocksize: int,
    quant_type: str,
    state_dtype: torch.dtype,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(x @ dequant(W).T + scale * (d(x) @ A.T) @ B.T, d(x) @ A.T, mask) for a 2-D x, where d is
    dropout with probability ``dropout`` and mask its keep-mask (empty without dropout)."""
    # The base product through the op bitsandbytes' own forward (bitsandbytes.matmul_4bit) uses,
    # so that it is bit for bit the one of an unfused layer.
    gemm = torch.ops.bitsandbytes.gemm_4bit.default
    w = qweight.view(-1, 1)
    if absmax2 is None:
        y = gemm(x, w, shape, absmax, blocksize, quant_type)
    else:
        y = gemm(
            x, w, shape, absmax2, blocksize, quant_type, absmax_8bit=absmax, absmax_code=code2, absmax_offset=offset
        )
    mask = _keep_mask(x, dropout)
    xa = _dropped(x, mask, dropout) @ lora_a.to(x.dtype).t()
    y.addmm_(xa, lora_b.to(x.dtype).t(), alpha=scale)
    return y, xa, mask


def _keep_mask(x: Tensor, p: float) -> Tensor:
    """Dropout's keep-mask (1 byte per element, the only extra tensor dropout saves), or empty."""
    if p == 0:
        return x.new_empty(0, dtype=torch.bool)
    return torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)


def _dropped(x: Tensor, mask: Tensor, p: float) -> Tensor:
    return x if p == 0 else x * mask * (1 / (1 - p))


@lora_nf4.register_fake
def _(x, qweight, absmax, absmax2, code2, offset, blocksize2, shape, blocksize, quant_type, state_dtype,
      lora_a, lora_b, scale, dropout):  # fmt: skip
    mask = x.new_empty(x.shape if dropout else (0,), dtype=torch.bool)
    return x.new_empty(x.shape[0], shape[0]), x.new_empty(x.shape[0], lora_a.shape[0]), mask


@torch.library.custom_op("loraflow::lora_nf4_backward", mutates_args=())
def lora_nf4_backward(
    grad: Tensor,
    x: Tensor,
    xa: Tensor,
    mask: Tensor,
    qweight: Tensor,
    absmax: Tensor,
    absmax2: Tensor | None,
    code2: Tensor | None,
    offset: Tensor | None,
    blocksize2: int,
    shape: list[int],
    blocksize: int,
    quant_type: str,
    state_dtype: torch.dtype,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout: float,
    need_x: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB); dx is empty when not needed."""
    grad = grad.to(x.dtype)
    a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    gb = grad @ b  # (tokens, r)
    grad_b = (grad.t() @ xa).mul_(scale).to(lora_b.dtype)
    grad_a = (gb.t() @ _dropped(x, mask, dropout)).mul_(scale).to(lora_a.dtype)
    if not need_x:
        return x.new_empty(0), grad_a, grad_b
    # The dequantization of bitsandbytes' own backward: the saved compute dtype, then x's.
    w = _dequantize(qweight, absmax, absmax2, code2, offset, blocksize2, shape, blocksize, quant_type, state_dtype)
    grad_x = grad @ w.to(x.dtype)
    if dropout == 0:
        grad_x.addmm_(gb, a, alpha=scale)
    else:
        grad_x.add_((gb @ a).mul_(mask), alpha=scale / (1 - dropout))
    return grad_x, grad_a, grad_b


@lora_nf4_backward.register_fake
def _(grad, x, xa, mask, qweight, absmax, absmax2, code2, offset, blocksize2, shape, blocksize, quant_type,
      state_dtype, lora_a, lora_b, scale, dropout, need_x):  # fmt: skip
    grad_x = x.new_empty(x.shape) if need_x else x.new_empty(0)
    return grad_x, torch.empty_like(lora_a), torch.empty_like(lora_b)


_STATE = slice(1, 11)  # qweight ... state_dtype: the 4-bit weight and its quantization state
_SAVED = object()  # marks a state entry kept with save_for_backward


def _setup_context(ctx, inputs, output):
    x, (lora_a, lora_b, scale, dropout) = inputs[0], inputs[-4:]
    state = inputs[_STATE]
    _, xa, mask = output
    ctx.save_for_backward(x, xa, mask, lora_a, lora_b, *(v for v in state if isinstance(v, Tensor)))
    ctx.state = tuple(_SAVED if isinstance(v, Tensor) else v for v in state)
    ctx.scale, ctx.dropout = scale, dropout


def _backward(ctx, grad, _grad_xa, _grad_mask):
    x, xa, mask, lora_a, lora_b, *tensors = ctx.saved_tensors
    saved = iter(tensors)
    state = [next(saved) if v is _SAVED else v for v in ctx.state]
    need_x = ctx.needs_input_grad[0]
    grad_x, grad_a, grad_b = lora_nf4_backward(
        grad, x, xa, mask, *state, lora_a, lora_b, ctx.scale, ctx.dropout, need_x
    )
    no_grad_state = (None,) * len(ctx.state)  # the 4-bit weight and its quantization state
    return (grad_x if need_x else None, *no_grad_state, grad_a, grad_b, None, None)


lora_nf4.register_autograd(_backward, setup_context=_setup_context)


def lora_4bit_linear(
    x: Tensor, base: torch.nn.Module, lora_a: Tensor, lora_b: Tensor, scale: float, dropout: float = 0.0
) -> Tensor:
    """``base(x) + scale * lora_b(lora_a(dropout(x)))`` for a bitsandbytes ``Linear4bit`` ``base``."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(base)
    qs = base.weight.quant_state
    if qs.nested:
        state = (qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset, qs.state2.blocksize)
    else:
        state = (qs.absmax, None, None, None, 0)
    x2 = x.reshape(-1, x.shape[-1])
    y, _, _ = lora_nf4(
        x2, base.weight, *state, list(qs.shape), qs.blocksize, qs.quant_type, qs.dtype, lora_a, lora_b, scale, dropout
    )
    return y.view(*x.shape[:-1], y.shape[-1])


def _fused_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return type(self).forward(self, x, *args, **kwargs)  # peft's own path
    name = self.active_adapters[0]
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
    return lora_4bit_linear(
        x, self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p
    )


def fuse_lora_4bit(model: torch.nn.Module) -> int:
    """Give every plain peft LoRA layer on a bitsandbytes ``Linear4bit`` the fused forward.

    Returns the number of layers changed; the others keep peft's forward.
    """
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    n = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear4bit) or module.base_layer.bias is not None:
            continue
        if len(module.lora_A) != 1 or module.lora_variant or any(module.use_dora.values()):
            continue
        drop = module.lora_dropout[next(iter(module.lora_A))]
        qs = module.base_layer.weight.quant_state
        if type(drop) not in (torch.nn.Identity, torch.nn.Dropout) or (qs.nested and qs.state2.blocksize != 256):
            continue  # another dropout, or a double quantization bitsandbytes' fused matmul does not take
        module.forward = types.MethodType(_fused_forward, module)
        n += 1
    return n
