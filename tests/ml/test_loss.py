"""The chunked response-token loss equals the full-logits loss, gradients included."""

from __future__ import annotations

import pytest
import torch

from loraflow.ml.loss import row_loss_sums, token_loss_sum
from loraflow.ml.models import (
    load_quantized,
)
from loraflow.ml.training import prepare_for_training
from tests.conftest import (
    LORA,
    records_batch,
)

# --- the chunked response-token loss ---


@pytest.mark.parametrize("chunk_tokens", [1, 3, 1024])
def test_chunked_loss_equals_full_logits_loss_and_gradients(tiny_quantized, tok, chunk_tokens) -> None:
    """The output head on labelled positions only, chunk by chunk with recomputation, gives the loss
    and the LoRA gradients of the reference path through the full logits."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = prepare_for_training(load_quantized(tiny_quantized.path), LORA, "fast")
    model.train()
    batch = records_batch(tok)

    def loss_and_grads(chunk):
        model.zero_grad(set_to_none=True)
        loss_sum, n = token_loss_sum(model, batch, chunk_tokens=chunk)
        (loss_sum / n).backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        return loss_sum.item(), n, grads

    ref_loss, ref_n, ref_grads = loss_and_grads(None)
    loss, n, grads = loss_and_grads(chunk_tokens)
    assert n == ref_n > chunk_tokens or chunk_tokens == 1024
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    # The head runs in bf16 on both paths; they round the logits' gradient at different points
    # (before vs after the 1/n scale), so compare each tensor as a whole, at bf16 precision.
    # (lora_A's gradients are exactly zero at the first step: lora_B starts at zero.)
    nonzero = [k for k in ref_grads if ref_grads[k].norm() > 0]
    assert nonzero and all(grads[k].norm() == 0 for k in ref_grads if k not in nonzero)
    for k in nonzero:
        error = (grads[k] - ref_grads[k]).norm() / ref_grads[k].norm()
        assert error < 1e-2, f"{k}: relative gradient error {error:.2e}"


@pytest.mark.parametrize("chunk_tokens", [3, 2048])
def test_row_loss_sums_add_up_to_the_batch_loss(tiny_quantized, tok, chunk_tokens) -> None:
    """Per-example sums (the gate's bootstrap input) are the batch loss taken apart, row by row."""
    model = load_quantized(tiny_quantized.path).eval()
    batch = records_batch(tok)
    with torch.no_grad():
        total, n = token_loss_sum(model, batch)
        sums, counts = row_loss_sums(model, batch, chunk_tokens=chunk_tokens)
        first, first_n = token_loss_sum(model, {k: v[:1] for k, v in batch.items()})
    assert counts.tolist() == (batch["labels"][:, 1:] != -100).sum(dim=1).tolist() and int(counts.sum()) == n
    assert sums.sum().item() == pytest.approx(total.item(), rel=1e-5)
    assert sums[0].item() == pytest.approx(first.item(), rel=1e-3) and int(counts[0]) == first_n
