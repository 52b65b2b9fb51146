"""lora.init: LoftQ and CLoQ on the 4-bit base (and gaussian), on the tiny model; the fused operator keeps working."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from loraflow.config import LoraConfig
from loraflow.errors import UsageError
from loraflow.ml import lora_init
from loraflow.ml.batching import collate
from loraflow.ml.lora_init import (
    HOST_GRAM_BUDGET,
    PREFIX,
    Calibration,
    _InputGrams,
    cloq_factors,
    gram_budget,
    gram_bytes,
    gram_passes,
    init_adapter,
    input_grams,
    loftq_factors,
)
from loraflow.ml.models import load_quantized
from loraflow.ml.prompts import Encoded
from loraflow.ml.training import prepare_for_training
from tests.conftest import model_inputs, records_batch, tiny_records, torch_threads


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


# --- cloq: the output-space fit on calibration inputs ---


def _output_error(x: torch.Tensor, residual: torch.Tensor, delta: torch.Tensor) -> float:
    """||X (residual - delta)^T||_F: what the layer's outputs on X lose to the residual left."""
    return (x @ (residual - delta).t()).norm().item()


def _anisotropic_layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 24 x 16 weight, its coarse rounding and 200 inputs whose scales span three orders of magnitude,
    mixed by a rotation (so that no axis of the weight is special)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 16, generator=g)
    q = (w * 2).round() / 2  # a rounding error that is close to white noise, as NF4's is
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    x = torch.randn(200, 16, generator=g) * torch.logspace(0, -3, 16)[None, :] @ rotation
    return w, q, x


def test_cloq_factors_are_the_closed_form_optimum_of_the_output_error_and_beat_loftq() -> None:
    w, q, x = _anisotropic_layer()
    residual, gram, r = w - q, x.t() @ x, 4
    for scaling in (0.5, 2.0):
        a, b = cloq_factors(w, q, gram, r, scaling, damping=0.0)
        assert a.shape == (r, 16) and b.shape == (24, r)
        cloq = scaling * b @ a
        # The same optimum by another route: the symmetric square root S of X^T X instead of Cholesky.
        vals, vecs = torch.linalg.eigh(gram.double())
        root, inv_root = (vecs * vals.sqrt()) @ vecs.t(), (vecs / vals.sqrt()) @ vecs.t()
        u, s, vh = torch.linalg.svd(residual.double() @ root)
        best = (u[:, :r] * s[:r]) @ vh[:r] @ inv_root
        torch.testing.assert_close(cloq.double(), best, atol=1e-4, rtol=1e-4)
        optimum = _output_error(x, residual, cloq)
        # ... and the minimum: no other rank-r matrix does better.
        la, lb = loftq_factors(w, q, r, scaling)
        loftq = _output_error(x, residual, scaling * lb @ la)
        assert optimum < 0.8 * loftq  # the weight-space SVD spends its rank where the inputs are small
        g = torch.Generator().manual_seed(1)
        for _ in range(20):
            random_rank_r = torch.randn(24, r, generator=g) @ torch.randn(r, 16, generator=g) * 0.1
            nearby = (
                scaling
                * (b + 0.01 * torch.randn(b.shape, generator=g))
                @ (a + 0.01 * torch.randn(a.shape, generator=g))
            )
            assert optimum < _output_error(x, residual, random_rank_r)
            assert optimum < _output_error(x, residual, nearby)
    # Damping (the default) moves the optimum only a little.
    a, b = cloq_factors(w, q, gram, r, 1.0)
    assert _output_error(x, residual, b @ a) < 1.01 * optimum


def test_cloq_refuses_a_gram_matrix_that_is_not_positive_definite() -> None:
    w, q, _ = _anisotropic_layer()
    with pytest.raises(UsageError, match="not positive definite"):
        cloq_factors(w, q, torch.zeros(16, 16), 4, 1.0)


def test_input_grams_sum_the_projections_inputs_over_non_pad_tokens_and_share_them(tiny_quantized, tok) -> None:
    from loraflow.ml.examples import encode_all

    rows = encode_all(tok, [{"instruction": "Hi.", "input": "", "output": "Hi!"}] + tiny_records(), 64)
    model = _peft(tiny_quantized, "default", compute_dtype="float32")
    with torch_threads(1):
        grams = input_grams(model, rows, tok.pad_token_id, batch_size=4)  # 9 rows: padding in every batch
        batch = collate(rows, tok.pad_token_id)
        with torch.no_grad(), model.disable_adapter():
            hidden = model(**model_inputs(batch), output_hidden_states=True).hidden_states
    assert len(grams) == 14 and model.training  # every projection; training mode restored
    # Layer 1: the padding embedding is zero, so padding adds nothing to layer 0's inputs, but attention
    # makes it non-zero from there on.
    layer = model.get_base_model().model.layers[1]
    mask = batch["attention_mask"].bool()
    x = layer.input_layernorm(hidden[1])[mask].float()  # q/k/v's input, real tokens only
    prefix = "base_model.model.model.layers.1."
    torch.testing.assert_close(grams[prefix + "self_attn.q_proj"], x.t() @ x, atol=1e-3, rtol=1e-4)
    assert grams[prefix + "self_attn.k_proj"] is grams[prefix + "self_attn.q_proj"]
    assert grams[prefix + "self_attn.v_proj"] is grams[prefix + "self_attn.q_proj"]
    assert grams[prefix + "mlp.up_proj"] is grams[prefix + "mlp.gate_proj"]
    assert grams[prefix + "self_attn.o_proj"] is not grams[prefix + "self_attn.q_proj"]
    assert grams[prefix + "mlp.down_proj"].shape == (128, 128)  # the tiny model's intermediate size


def test_input_grams_refuse_layers_that_share_an_input_in_one_batch_only() -> None:
    class Parent(torch.nn.Module):  # b reads a's input in the first call, another tensor afterwards
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.calls = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.a(x) + self.b(x if self.calls == 1 else 2 * x)

    parent, x, mask = Parent(), torch.randn(2, 3, 4), torch.ones(2, 3)
    grams = _InputGrams({"p.a": parent.a, "p.b": parent.b})
    grams.next_batch(mask)
    parent(x)
    assert grams.grams["p.b"] is grams.grams["p.a"]
    grams.next_batch(mask)
    with pytest.raises(RuntimeError, match="p.b shares its input with p.a in one batch, with p.b in another"):
        parent(x)


def test_calibration_draws_the_same_training_rows_for_the_same_seed() -> None:
    examples = [Encoded([i], [i]) for i in range(100)]
    first, again, other = (Calibration(examples, 0, seed).rows(10) for seed in (0, 0, 1))
    assert first == again and first != other and len(set(e.input_ids[0] for e in first)) == 10
    assert len(Calibration(examples[:5], 0, 0).rows(10)) == 5  # fewer examples than asked: all of them


def _cloq(tiny_quantized, tok, rows: int = 16):
    from loraflow.ml.examples import encode_all

    examples = encode_all(tok, tiny_records() * 2, 64)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, init="cloq", calibration_rows=rows)
    with torch_threads(1):
        torch.manual_seed(0)
        model = prepare_for_training(load_quantized(tiny_quantized.path, compute_dtype="float32"), lora, "fast")
        init_adapter(model, lora, tiny_quantized.base.path, Calibration(examples, tok.pad_token_id, seed=0))
    return model


def test_cloq_model_is_the_4bit_base_plus_its_low_rank_product_and_trains_through_the_fused_operator(
    tiny_quantized, tok
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraflow.ml.lora4bit import _fused_forward
    from loraflow.ml.loss import token_loss_sum

    model = _cloq(tiny_quantized, tok)
    effective = _effective_weights(model)
    assert len(effective) == 14
    # A plain float32 model holding dequant(Q) + scaling * B @ A and the 4-bit model's other weights.
    base = model.get_base_model()
    plain = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_quantized.base.path)).float()
    state = {
        name: effective[name] if name in effective else base.get_parameter(name).detach().float()
        for name, _ in plain.named_parameters()
    }
    plain.load_state_dict(state)
    batch = records_batch(tok)
    with torch_threads(1), torch.no_grad():
        expected = plain.eval()(**model_inputs(batch)).logits
        model.eval()
        got = model(**model_inputs(batch)).logits
        with model.disable_adapter():
            without = model(**model_inputs(batch)).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - without).abs().max() > 1e-3  # the adapter does contribute from the start
    # Training: every adapted layer runs the fused operator, and the gradients reach A and B.
    layers = [m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A")]
    assert layers and all(m.forward.__func__ is _fused_forward for m in layers)
    model.train()
    with torch_threads(1):
        loss, _ = token_loss_sum(model, batch)
        loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_cloq_fits_the_layer_outputs_better_than_loftq_and_needs_calibration(tiny_quantized, tok) -> None:
    from loraflow.ml.examples import encode_all

    full = load_file(f"{tiny_quantized.base.path}/model.safetensors")
    rows = Calibration(encode_all(tok, tiny_records() * 2, 64), tok.pad_token_id, seed=0).rows(16)
    models = {init: _peft(tiny_quantized, init, "float32") for init in ("default", "loftq")}
    models["cloq"] = _cloq(tiny_quantized, tok)  # calibrated on these same rows
    with torch_threads(1):
        grams = input_grams(models["default"], rows, tok.pad_token_id, batch_size=8)  # the 4-bit base's inputs
    errors = {}  # init -> layer -> ||X (W - W_eff)^T||_F^2 on the calibration inputs
    for init, model in models.items():
        errors[init] = {}
        for name, w in _effective_weights(model).items():
            diff = w - full[name].float()
            errors[init][name] = torch.trace(diff @ grams[PREFIX + name.removesuffix(".weight")] @ diff.t()).item()
    for name in errors["cloq"]:
        assert errors["cloq"][name] <= 1.001 * errors["loftq"][name]
        assert errors["cloq"][name] < errors["default"][name]
    assert sum(errors["cloq"].values()) < 0.95 * sum(errors["loftq"].values())
    with pytest.raises(UsageError, match="needs calibration examples"):
        init_adapter(models["default"], LoraConfig(init="cloq"), tiny_quantized.base.path)


def test_gram_passes_keep_siblings_together_within_the_budget() -> None:
    layers = {
        f"layers.{i}.{part}.{proj}": torch.nn.Linear(width, 4)
        for i in range(3)
        for part, projs, width in (("attn", ("q", "k", "v"), 100), ("mlp", ("down",), 300))
        for proj in projs
    }
    attn, mlp = 3 * 4 * 100**2, 4 * 300**2  # bytes of one module's Gram matrices (upper bound)
    assert gram_bytes(layers) == 3 * (attn + mlp)
    assert gram_passes(layers, gram_bytes(layers)) == [list(layers)]  # everything fits: one pass
    passes = gram_passes(layers, attn + mlp)
    assert passes == [[n for n in layers if n.startswith(f"layers.{i}.")] for i in range(3)]
    one_each = gram_passes(layers, 1)  # smaller than any module: each module alone, its siblings together
    assert [sorted({n.rpartition(".")[0] for n in p}) for p in one_each] == [[m] for m in dict.fromkeys(
        n.rpartition(".")[0] for n in layers)]  # fmt: skip
    assert [n for p in one_each for n in p] == list(layers)


def test_gram_budget_is_fixed_on_the_cpu_and_refuses_a_module_too_large_for_the_gpu(monkeypatch) -> None:
    layers = {f"layers.0.mlp.{p}": torch.nn.Linear(1000, 10) for p in ("gate", "up")}  # 8 MB of Gram matrices
    assert gram_budget(layers, torch.device("cpu")) == HOST_GRAM_BUDGET
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20_000_000, 80_000_000_000))
    assert gram_budget(layers, torch.device("cuda", 0)) == 10_000_000  # half of what is free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000_000, 80_000_000_000))
    with pytest.raises(UsageError, match=r"up to 0\.01 GB .* 0\.01 GB free on cuda:0.*lora\.init=loftq"):
        gram_budget(layers, torch.device("cuda", 0))


def test_cloq_in_many_passes_sets_what_one_pass_sets(tiny_quantized, tok, monkeypatch) -> None:
    one = _cloq(tiny_quantized, tok)
    monkeypatch.setattr(lora_init, "HOST_GRAM_BUDGET", 1)  # one module per pass
    calls = []
    real = lora_init.input_grams
    monkeypatch.setattr(lora_init, "input_grams", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    many = _cloq(tiny_quantized, tok)
    assert len(calls) > 2 and all(c for c in calls)  # several passes, each over a subset of the layers
    trained = {n: p for n, p in one.named_parameters() if p.requires_grad}
    for name, p in many.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, trained[name], atol=0, rtol=0)
