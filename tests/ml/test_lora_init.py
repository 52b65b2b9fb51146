"""lora.init: LoftQ on the 4-bit base (and gaussian), on the tiny model; the fused operator keeps working."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from loraflow.config import LoraConfig
from loraflow.errors import UsageError
from loraflow.ml.lora_init import init_adapter, loftq_factors
from loraflow.ml.models import load_quantized
from loraflow.ml.training import prepare_for_training
from tests.conftest import records_batch, torch_threads


def test_loftq_factors_are_the_best_rank_r_fit_of_the_residual_at_any_scaling() -> None:
    torch.manual_seed(0)
    w, q = torch.randn(24, 16), torch.randn(24, 16)
    u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    for scaling in (0.5, 2.0):
        a, b = loftq_factors(w, q, 4, scaling)
        assert a.shape == (4, 16) and b.shape == (24, 4)
        torch.testing.assert_close(scaling * b @ a, best, atol=1e-5, rtol=1e-5)


def _peft(tiny_quantized, init: str, compute_dtype: str | None = None):
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, init=init)
    with torch_threads(1):
        torch.manual_seed(0)
        model = prepare_for_training(load_quantized(tiny_quantized.path, compute_dtype=compute_dtype), lora, "fast")
        init_adapter(model, lora, tiny_quantized.base.path)
    return model


def _effective_weights(model) -> dict[str, torch.Tensor]:
    """Module name -> dequantized 4-bit weight + scaling * B @ A, in float32."""
    from peft.tuners.lora.bnb import Linear4bit

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            qs = copy.copy(m.base_layer.weight.quant_state)
            qs.dtype = torch.float32
            w = bnb.functional.dequantize_4bit(m.base_layer.weight.data, qs)
            delta = m.scaling["default"] * m.lora_B["default"].weight.float() @ m.lora_A["default"].weight.float()
            out[name.removeprefix("base_model.model.") + ".weight"] = w + delta
    return out


def test_loftq_moves_every_adapted_weight_towards_the_full_precision_one(tiny_quantized) -> None:
    full = load_file(f"{tiny_quantized.base.path}/model.safetensors")
    plain, loftq = (
        _effective_weights(_peft(tiny_quantized, "default")),
        _effective_weights(_peft(tiny_quantized, "loftq")),
    )
    assert plain.keys() == loftq.keys() and len(plain) == 14  # 2 layers x 7 projections
    for name, w in full.items():
        if name in plain:
            before, after = (plain[name] - w.float()).norm(), (loftq[name] - w.float()).norm()
            assert after < before  # B = 0 by default: `before` is the whole quantization error


def test_loftq_output_is_closer_to_the_full_precision_model_and_trains_through_the_fused_operator(
    tiny_quantized, tok
) -> None:
    from transformers import AutoModelForCausalLM

    from loraflow.ml.loss import token_loss_sum

    batch = records_batch(tok)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch_threads(1):
        full = AutoModelForCausalLM.from_pretrained(tiny_quantized.base.path, dtype=torch.float32).eval()
        with torch.no_grad():
            reference = full(**inputs).logits
        distance = {}
        for init in ("default", "loftq"):
            model = _peft(tiny_quantized, init, compute_dtype="float32")
            model.train()  # dropout is 0: train mode runs the fused operator, with the same values
            with torch.no_grad():
                distance[init] = (model(**inputs).logits - reference).abs().mean().item()
            loss, _ = token_loss_sum(model, batch)
            loss.backward()  # gradients flow through the fused operator into A and B
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert distance["loftq"] < 0.9 * distance["default"]


def test_gaussian_init_starts_as_the_base_and_loftq_needs_safetensors(tiny_quantized, tmp_path) -> None:
    model = _peft(tiny_quantized, "gaussian")
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / 4, rel=0.3)
    with pytest.raises(UsageError, match="needs the full-precision base as safetensors"):
        init_adapter(model, LoraConfig(init="loftq"), tmp_path)
