"""The LoRA-on-4-bit linear layers as one operator, computed in the activations' dtype.

peft's LoRA wrapper of a bitsandbytes ``Linear4bit`` computes, per projection: the 4-bit matmul,
a defensive copy of its output, the input upcast to the adapter's fp32, two fp32 matmuls and a
downcast. In a bf16 model that is three extra activation-sized tensors per projection (the fp32
copy of the input is also saved for the backward pass) and fp32 matrix products that run at a
fraction of the bf16 rate. Here the same function is, for each projection i of a group that
reads the same input x (a single layer is a group of one),

    y_i = x @ dequant(W_i).T + s_i * (x @ A_i.T) @ B_i.T

with A and B cast to x's dtype for the products (the fp32 weights stay the optimizer's master
copy, as under autocast), the LoRA product accumulated into the base product in place, and only
x and the (rank x tokens) products A_i @ x.T saved for the backward pass, which dequantizes each
W_i once more for dx (accumulating every term of the group into one buffer) and never computes a
gradient for W.

Grouping: an attention block's q/k/v projections and an MLP's gate/up projections read the same
input. ``fuse_lora_4bit`` gives such a parent a forward that computes the whole group in one
operator call (one stacked A product, one dx buffer, a third of the host-side dispatches) and
hands each projection its output; the parent's own forward then runs unchanged. A projection
called on another input computes its own output, so grouping is never wrong, only not used.

Forward and backward are registered as custom operators (``loraflow::lora_nf4``): torch.compile
then sees each as one opaque kernel call, so the layers around them still fuse, while the
in-place accumulation survives (traced as plain tensor code, it is turned into an out-of-place
addmm that first copies its activation-sized input: measured 30 ms per 8B step on the H200).

The base product is bitsandbytes' own: its ``gemm_4bit`` operator for small inputs, and for
training-sized ones (more rows than its fused kernel takes, where ``gemm_4bit`` itself
dequantizes and calls cuBLAS) the same bitsandbytes dequantization kernels called directly, which
skips the Python layer of its operator dispatch on every call. tests/test_gpu.py checks that the
two give identical bits.

Dropout on the adapter's input is applied inside the operator; its keep-mask (one byte per
element) is what the backward pass needs of it, where peft keeps the dropped input in fp32.

Only the plain case is taken over: one active adapter, no bias, no DoRA or other variant. Any
other layer keeps peft's forward. The adapter itself stays a peft adapter: saving, loading and
merging are unchanged. tests/ml/test_lora4bit.py checks values and gradients against peft.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import itertools
import types
from collections.abc import Sequence

import torch
from torch import Tensor

# bitsandbytes' gemm_4bit runs its fused kernel up to this many rows on CUDA, and above it
# dequantizes and calls cuBLAS (bitsandbytes/backends/cuda/ops.py, _gemm_4bit_custom_max_m).
_GEMM_4BIT_MAX_ROWS = 1536
# False: every dequantization through bitsandbytes' operators (bench/train_throughput.py's +bnbops).
DIRECT_DEQUANTIZE = True
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# The parent modules' projections that read the parent's input, grouped into one operator call.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@functools.cache
def _bnb_lib() -> ctypes.CDLL:
    """bitsandbytes' native library, with the signatures of the dequantization kernels used here:
    (code, A, absmax, out, blocksize, n, stream)."""
    from bitsandbytes.cextension import lib

    argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p]
    for name in ["cdequantize_blockwise_fp32"] + [
        f"cdequantize_blockwise_{d}_{q}" for d in _DTYPE_NAMES.values() for q in ("nf4", "fp4")
    ]:
        getattr(lib, name).argtypes = argtypes
    return lib


class _Quant:
    """The 4-bit weights of a group and their quantization states, as the operators take them."""

    def __init__(self, qweights, absmax, absmax2, code2, offset, blocksize2, shapes, blocksize, quant_type):
        self.qweights, self.absmax, self.blocksize, self.quant_type = qweights, absmax, blocksize, quant_type
        self.nested = (absmax2, code2, offset, blocksize2) if absmax2 else None
        self.shapes = [shapes[i : i + 2] for i in range(0, len(shapes), 2)]

    def __len__(self) -> int:
        return len(self.qweights)

    def weight(self, i: int, dtype: torch.dtype) -> Tensor:
        """dequant(W_i) in ``dtype``: bitsandbytes.functional.dequantize_4bit."""
        q, absmax = self.qweights[i], self.absmax[i]
        if q.is_cuda and DIRECT_DEQUANTIZE:
            return self._weight_cuda(i, dtype)
        if self.nested:  # double quantization: the absmax values are 8-bit themselves
            absmax2, code2, offset, blocksize2 = self.nested
            absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
                absmax, absmax2[i], code2[i], blocksize2, torch.float32
            )
            absmax = absmax + offset[i]
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            q, absmax, self.blocksize, self.quant_type, self.shapes[i], dtype
        )

    def _weight_cuda(self, i: int, dtype: torch.dtype) -> Tensor:
        """The kernels of bitsandbytes' CUDA dequantize_4bit, called without its operator layer."""
        q, absmax = self.qweights[i], self.absmax[i]
        if q.device.index != torch.cuda.current_device():
            with torch.cuda.device(q.device):
                return self._weight_cuda(i, dtype)
        lib, stream = _bnb_lib(), torch._C._cuda_getCurrentRawStream(q.device.index)
        if self.nested:
            absmax2, code2, offset, blocksize2 = self.nested
            scales = torch.empty(absmax.shape, dtype=torch.float32, device=q.device)
            lib.cdequantize_blockwise_fp32(
                code2[i].data_ptr(), absmax.data_ptr(), absmax2[i].data_ptr(), scales.data_ptr(),
                blocksize2, absmax.numel(), stream,
            )  # fmt: skip
            absmax = scales.add_(offset[i])
        out = torch.empty(self.shapes[i], dtype=dtype, device=q.device)
        dequantize = getattr(lib, f"cdequantize_blockwise_{_DTYPE_NAMES[dtype]}_{self.quant_type}")
        dequantize(None, q.data_ptr(), absmax.data_ptr(), out.data_ptr(), self.blocksize, out.numel(), stream)
        return out

    def product(self, x: Tensor, i: int) -> Tensor:
        """x @ dequant(W_i).T, bit for bit what bitsandbytes' own forward (matmul_4bit) computes."""
        if x.is_cuda and x.shape[0] > _GEMM_4BIT_MAX_ROWS and DIRECT_DEQUANTIZE:  # gemm_4bit's dequant + cuBLAS
            return x @ self.weight(i, x.dtype).t()
        q, absmax = self.qweights[i].view(-1, 1), self.absmax[i]
        gemm = torch.ops.bitsandbytes.gemm_4bit.default
        if not self.nested:
            return gemm(x, q, self.shapes[i], absmax, self.blocksize, self.quant_type)
        absmax2, code2, offset, _ = self.nested
        return gemm(
            x, q, self.shapes[i], absmax2[i], self.blocksize, self.quant_type,
            absmax_8bit=absmax, absmax_code=code2[i], absmax_offset=offset[i],
        )  # fmt: skip


def _rows(lora_a: Sequence[Tensor]) -> list[slice]:
    """Each adapter's rows in the stacked (sum of ranks, ...) tensors."""
    ends = [0]
    for a in lora_a:
        ends.append(ends[-1] + a.shape[0])
    return [slice(start, end) for start, end in itertools.pairwise(ends)]


def _keep_masks(x: Tensor, n: int, p: float) -> Tensor:
    """Dropout's keep-masks, one per projection (1 byte per element, the only extra tensor
    dropout saves), or empty."""
    if p == 0:
        return x.new_empty(0, dtype=torch.bool)
    return torch.empty((n, *x.shape), dtype=torch.bool, device=x.device).bernoulli_(1 - p)


def _dropped(x: Tensor, mask: Tensor, p: float) -> Tensor:
    return x if p == 0 else x * mask * (1 / (1 - p))


def _stacked(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    return (torch.cat(list(tensors)) if len(tensors) > 1 else tensors[0]).to(dtype)


@torch.library.custom_op("loraflow::lora_nf4", mutates_args=())
def lora_nf4(
    x: Tensor,
    qweights: list[Tensor],
    absmax: list[Tensor],
    absmax2: list[Tensor],
    code2: list[Tensor],
    offset: list[Tensor],
    blocksize2: int,
    shapes: list[int],
    blocksize: int,
    quant_type: str,
    state_dtype: torch.dtype,
    lora_a: list[Tensor],
    lora_b: list[Tensor],
    scales: list[float],
    dropout: float,
) -> list[Tensor]:
    """For a 2-D x and each projection i: x @ dequant(W_i).T + scales[i] * (d_i(x) @ A_i.T) @ B_i.T,
    where d_i is dropout with probability ``dropout``; then A_i @ d_i(x).T stacked over i (sum of
    ranks x tokens) and the keep-masks (projections x x.shape, empty without dropout).

    ``shapes`` holds each W_i's two dimensions in turn; the double-quantization lists
    (absmax2, code2, offset) are empty for a weight quantized once.
    """
    quant = _Quant(qweights, absmax, absmax2, code2, offset, blocksize2, shapes, blocksize, quant_type)
    ys = [quant.product(x, i) for i in range(len(quant))]
    masks, rows = _keep_masks(x, len(quant), dropout), _rows(lora_a)
    if dropout == 0:
        xa_t = _stacked(lora_a, x.dtype) @ x.t()
    else:
        xa_t = x.new_empty(rows[-1].stop, x.shape[0])
        for r, a, mask in zip(rows, lora_a, masks, strict=True):
            torch.mm(a.to(x.dtype), _dropped(x, mask, dropout).t(), out=xa_t[r])
    for y, r, b, s in zip(ys, rows, lora_b, scales, strict=True):
        y.addmm_(xa_t[r].t(), b.to(x.dtype).t(), alpha=s)
    return [*ys, xa_t, masks]


@lora_nf4.register_fake
def _(x, qweights, absmax, absmax2, code2, offset, blocksize2, shapes, blocksize, quant_type, state_dtype,
      lora_a, lora_b, scales, dropout):  # fmt: skip
    ys = [x.new_empty(x.shape[0], shapes[2 * i]) for i in range(len(qweights))]
    masks = x.new_empty((len(qweights), *x.shape) if dropout else (0,), dtype=torch.bool)
    return [*ys, x.new_empty(sum(a.shape[0] for a in lora_a), x.shape[0]), masks]


@torch.library.custom_op("loraflow::lora_nf4_backward", mutates_args=())
def lora_nf4_backward(
    grads: list[Tensor],
    x: Tensor,
    xa_t: Tensor,
    masks: Tensor,
    qweights: list[Tensor],
    absmax: list[Tensor],
    absmax2: list[Tensor],
    code2: list[Tensor],
    offset: list[Tensor],
    blocksize2: int,
    shapes: list[int],
    blocksize: int,
    quant_type: str,
    state_dtype: torch.dtype,
    lora_a: list[Tensor],
    lora_b: list[Tensor],
    scales: list[float],
    dropout: float,
    need_x: bool,
) -> list[Tensor]:
    """[dx, dA_1, ..., dA_n, dB_1, ..., dB_n]; dx is empty when not needed."""
    quant = _Quant(qweights, absmax, absmax2, code2, offset, blocksize2, shapes, blocksize, quant_type)
    dtype, rows = x.dtype, _rows(lora_a)
    grads = [g.to(dtype) for g in grads]
    gb_t = x.new_empty(xa_t.shape)  # (g_i @ B_i).T stacked like xa_t
    grad_b = []
    for g, r, b, s in zip(grads, rows, lora_b, scales, strict=True):
        torch.mm(b.to(dtype).t(), g.t(), out=gb_t[r])
        grad_b.append((g.t() @ xa_t[r].t()).mul_(s).to(b.dtype))
    if dropout == 0:
        ga = gb_t @ x
        grad_a = [(ga[r] * s).to(a.dtype) for r, s, a in zip(rows, scales, lora_a, strict=True)]
    else:
        grad_a = [
            (gb_t[r] @ _dropped(x, mask, dropout)).mul_(s).to(a.dtype)
            for r, s, a, mask in zip(rows, scales, lora_a, masks, strict=True)
        ]
    if not need_x:
        return [x.new_empty(0), *grad_a, *grad_b]
    # The dequantization of bitsandbytes' own backward: the saved compute dtype, then x's.
    grad_x = grads[0] @ quant.weight(0, state_dtype).to(dtype)
    for i in range(1, len(quant)):
        grad_x.addmm_(grads[i], quant.weight(i, state_dtype).to(dtype))
    if dropout == 0 and len(set(scales)) == 1:
        grad_x.addmm_(gb_t.t(), _stacked(lora_a, dtype), alpha=scales[0])
    elif dropout == 0:
        for r, s, a in zip(rows, scales, lora_a, strict=True):
            grad_x.addmm_(gb_t[r].t(), a.to(dtype), alpha=s)
    else:
        for r, s, a, mask in zip(rows, scales, lora_a, masks, strict=True):
            grad_x.add_((gb_t[r].t() @ a.to(dtype)).mul_(mask), alpha=s / (1 - dropout))
    return [grad_x, *grad_a, *grad_b]


@lora_nf4_backward.register_fake
def _(grads, x, xa_t, masks, qweights, absmax, absmax2, code2, offset, blocksize2, shapes, blocksize,
      quant_type, state_dtype, lora_a, lora_b, scales, dropout, need_x):  # fmt: skip
    grad_x = x.new_empty(x.shape) if need_x else x.new_empty(0)
    return [grad_x, *(torch.empty_like(a) for a in lora_a), *(torch.empty_like(b) for b in lora_b)]


_STATE = slice(1, 11)  # qweights ... state_dtype: the 4-bit weights and their quantization states
_LISTS = 5  # of which the first five are lists of tensors


def _setup_context(ctx, inputs, output):
    x, state, (lora_a, lora_b, scales, dropout) = inputs[0], inputs[_STATE], inputs[-4:]
    n = len(lora_a)
    ctx.lengths = [len(t) for t in state[:_LISTS]]
    ctx.save_for_backward(x, *output[n:], *(t for ts in state[:_LISTS] for t in ts), *lora_a, *lora_b)
    ctx.static, ctx.scales, ctx.dropout = state[_LISTS:], scales, dropout


def _backward(ctx, grads):
    n, lengths = ctx.lengths[0], ctx.lengths
    x, xa_t, masks, *saved = ctx.saved_tensors
    lists = []
    for length in lengths + [n, n]:  # the state's lists, lora_a, lora_b
        lists.append(saved[:length])
        saved = saved[length:]
    *state, lora_a, lora_b = lists
    need_x = ctx.needs_input_grad[0]
    out = lora_nf4_backward(
        grads[:n], x, xa_t, masks, *state, *ctx.static, lora_a, lora_b, ctx.scales, ctx.dropout, need_x
    )
    # None for the 4-bit weights and their quantization states, list by list
    no_grad = [[None] * length for length in lengths] + [None] * (_STATE.stop - _STATE.start - _LISTS)
    return (out[0] if need_x else None, *no_grad, out[1 : n + 1], out[n + 1 :], None, None)


lora_nf4.register_autograd(_backward, setup_context=_setup_context)


def _operator_inputs(bases: Sequence[torch.nn.Module]) -> tuple:
    """The operator's arguments for the 4-bit weights of ``bases`` (bitsandbytes ``Linear4bit``s
    with the same quantization settings), from qweights to state_dtype."""
    states = []
    for base in bases:
        # Sharded by FSDP (loraflow/ml/distributed.py), a layer's weight arrives as the plain gathered tensor
        # without bitsandbytes' quant_state, which the module keeps. bitsandbytes' own forward re-wraps the weight
        # to re-attach it (a `.data` assignment, which breaks a torch.compile graph); the operator reads it here.
        state = getattr(base.weight, "quant_state", None)
        states.append(state if state is not None else base.quant_state)
    qs = states[0]
    nested = [(s.state2.absmax, s.state2.code, s.offset) for s in states] if qs.nested else []
    absmax2, code2, offset = (list(t) for t in zip(*nested, strict=True)) if nested else ([], [], [])
    return (
        [base.weight for base in bases], [s.absmax for s in states], absmax2, code2, offset,
        qs.state2.blocksize if qs.nested else 0, [d for s in states for d in s.shape],
        qs.blocksize, qs.quant_type, qs.dtype,
    )  # fmt: skip


def _apply(x: Tensor, bases, lora_a, lora_b, scales, dropout: float) -> list[Tensor]:
    x2 = x.reshape(-1, x.shape[-1])
    out = lora_nf4(x2, *_operator_inputs(bases), list(lora_a), list(lora_b), list(scales), dropout)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in out[: len(bases)]]


def _plain(layer) -> bool:
    """Whether a fused layer runs the operator now (else peft's own forward)."""
    return not layer.disable_adapters and not layer.merged and len(layer.active_adapters) == 1


def _dropout(layer) -> float:
    drop = layer.lora_dropout[layer.active_adapters[0]]
    return drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0


def lora_4bit_group(x: Tensor, layers: Sequence[torch.nn.Module]) -> list[Tensor]:
    """The outputs of fused peft LoRA layers that share the input x, from one operator call."""
    names = [layer.active_adapters[0] for layer in layers]
    return _apply(
        x,
        [layer.base_layer for layer in layers],
        [layer.lora_A[name].weight for layer, name in zip(layers, names, strict=True)],
        [layer.lora_B[name].weight for layer, name in zip(layers, names, strict=True)],
        [layer.scaling[name] for layer, name in zip(layers, names, strict=True)],
        _dropout(layers[0]),
    )


def _fused_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    if args or kwargs or not _plain(self):
        return type(self).forward(self, x, *args, **kwargs)  # peft's own path
    return lora_4bit_group(x, [self])[0]


class _Computed:
    """A projection whose output for one input is already known: called on that input it returns
    the output, on any other it runs the projection."""

    def __init__(self, layer: torch.nn.Module, x: Tensor, y: Tensor) -> None:
        self.layer, self.x, self.y = layer, x, y

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.y if x is self.x and not args and not kwargs else self.layer(x, *args, **kwargs)


class _WithComputed:
    """A parent module as its own forward sees it, with some projections' outputs computed.

    A fresh object per call rather than state set on the modules: torch.compile traces it without
    side effects (state set on a module inside a checkpointed layer breaks the compiled graph).
    """

    def __init__(self, parent: torch.nn.Module, computed: dict[str, _Computed]) -> None:
        self._parent, self._computed = parent, computed

    def __getattr__(self, name: str):
        computed = self.__dict__["_computed"]
        return computed[name] if name in computed else getattr(self.__dict__["_parent"], name)


def _grouped_forward(self, *args, **kwargs):
    """The parent's own forward, with each group of its projections computed in one call first."""
    x = args[0] if args else kwargs[self._loraflow_input]
    computed = {}
    for names in self._loraflow_groups:
        layers = [getattr(self, name) for name in names]
        if all(_plain(layer) for layer in layers) and len({_dropout(layer) for layer in layers}) == 1:
            for name, layer, y in zip(names, layers, lora_4bit_group(x, layers), strict=True):
                computed[name] = _Computed(layer, x, y)
    return type(self).forward(_WithComputed(self, computed) if computed else self, *args, **kwargs)


def _groupable(layers: Sequence[torch.nn.Module]) -> bool:
    """Fused layers on one input whose weights the operator can take in one call."""
    if not all(getattr(layer.forward, "__func__", None) is _fused_forward for layer in layers):
        return False
    states = [layer.base_layer.weight.quant_state for layer in layers]
    config = {
        (s.blocksize, s.quant_type, s.dtype, s.nested, layer.base_layer.in_features,
         tuple(layer.lora_A), type(layer.lora_dropout[next(iter(layer.lora_A))]))
        for s, layer in zip(states, layers, strict=True)
    }  # fmt: skip
    return len(config) == 1


def fuse_lora_4bit(model: torch.nn.Module, group: bool = True) -> int:
    """Give every plain peft LoRA layer on a bitsandbytes ``Linear4bit`` the fused forward, and
    (with ``group``) every parent of such layers that read one input (``GROUPS``) the grouped forward.

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
    for parent in model.modules() if group else ():
        groups = tuple(
            names for names in GROUPS
            if all(isinstance(getattr(parent, name, None), LoraLinear4bit) for name in names)
            and _groupable([getattr(parent, name) for name in names])
        )  # fmt: skip
        if groups and "forward" not in parent.__dict__:  # not grouped yet
            parent._loraflow_groups = groups  # names, looked up per call: peft may swap the layers
            parent._loraflow_input = list(inspect.signature(type(parent).forward).parameters)[1]
            parent.forward = types.MethodType(_grouped_forward, parent)
    return n
