"""The fused LoRA-on-4-bit operator computes what peft computes, dropout included."""

from __future__ import annotations

import types

import bitsandbytes as bnb
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loraflow.ml.lora4bit import _apply, _fused_forward
from loraflow.ml.loss import token_loss_sum
from loraflow.ml.models import (
    load_quantized,
)
from loraflow.ml.training import prepare_for_training
from tests.conftest import LORA


def fused_vs_peft(path: str, device: str) -> tuple[int, float, float, dict[str, float]]:
    """Loss and LoRA gradients of the same adapter with peft's LoRA layers and with the fused ones
    (loraflow/ml/lora4bit.py), the whole model computing in fp32: (layers fused, loss, loss, max
    relative gradient error per tensor)."""
    results = []
    for fused in (False, True):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = load_quantized(path, device=device, compute_dtype="float32")
            model = prepare_for_training(model, LORA, "balanced", fused=fused)
            for name, p in model.named_parameters():
                if "lora_B" in name:  # a trained-looking adapter: B starts at zero
                    torch.nn.init.normal_(p, std=0.05)
        ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        with OperatorCalls() as calls:
            loss_sum, n = token_loss_sum(model, batch)
        (loss_sum / n).backward()
        grads = {k: p.grad.detach().float().cpu() for k, p in model.named_parameters() if p.requires_grad}
        results.append((loss_sum.item(), grads))
    (ref_loss, ref), (loss, grads) = results
    errors = {k: ((grads[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref}
    fused = sum(isinstance(m.forward, types.MethodType) and m.forward.__func__ is _fused_forward
                for m in model.modules())  # fmt: skip
    return fused, sorted(calls.group_sizes), ref_loss, loss, errors


class OperatorCalls(TorchDispatchMode):
    """Records the number of projections in each call of the fused operator."""

    def __init__(self) -> None:
        super().__init__()
        self.group_sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.loraflow.lora_nf4.default:
            self.group_sizes.append(len(args[1]))
        return func(*args, **(kwargs or {}))


def test_fused_lora_layers_compute_what_peft_computes(tiny_quantized) -> None:
    """In fp32 the fused LoRA-on-4-bit operator gives peft's loss and gradients (to rounding): the
    base product is bitsandbytes' own, the LoRA terms and the backward are written out by hand.
    The projections that read one input (q/k/v, gate/up) go through one operator call."""
    fused, group_sizes, ref_loss, loss, errors = fused_vs_peft(tiny_quantized.path, "cpu")
    assert fused == 2 * 7  # every projection of both layers
    assert group_sizes == [1, 1, 1, 1, 2, 2, 3, 3]  # per layer: q/k/v, o, gate/up and down
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("names", [["down_proj"], ["gate_proj", "up_proj"]])
def test_fused_lora_dropout_is_the_reference_dropout_with_the_same_mask(tiny_quantized, names) -> None:
    """With dropout, the operator's outputs and their gradients for x, A and B are those of
    x @ W_i.T + s_i * ((x * mask_i / (1 - p)) @ A_i.T) @ B_i.T, with the keep-masks (one per
    projection of a group) drawn from the same seed."""
    model = load_quantized(tiny_quantized.path, compute_dtype="float32")
    bases = [getattr(model.model.layers[0].mlp, name) for name in names]
    ws = []
    for base in bases:
        base.weight.quant_state.dtype = torch.float32  # the backward's dequantization at full precision too
        ws.append(bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, ws[0].shape[1], generator=g, requires_grad=True)
    a = [torch.randn(4, w.shape[1], generator=g, requires_grad=True) for w in ws]
    b = [torch.randn(w.shape[0], 4, generator=g, requires_grad=True) for w in ws]
    upstream = [torch.randn(6, w.shape[0], generator=g) for w in ws]
    p, s = 0.3, [0.5, 2.0][: len(ws)]
    leaves = [x, *a, *b]

    def run(fn):
        for t in leaves:
            t.grad = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            ys = fn()
        torch.autograd.backward(ys, upstream)
        return [y.detach() for y in ys], [t.grad.clone() for t in leaves]

    def reference():
        masks = torch.empty((len(ws), *x.shape), dtype=torch.bool).bernoulli_(1 - p)
        terms = zip(ws, s, masks, a, b, strict=True)
        return [x @ w.T + si * ((x * m / (1 - p)) @ ai.T) @ bi.T for w, si, m, ai, bi in terms]

    ys, grads = run(lambda: _apply(x, bases, a, b, s, p))
    ys_ref, grads_ref = run(reference)
    assert not torch.equal(ys[0], run(lambda: _apply(x, bases, a, b, s, 0.0))[0][0])  # dropout did something
    for got, want in zip(ys + grads, ys_ref + grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
