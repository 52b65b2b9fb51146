"""Tiled MLPs (loraflow/ml/memory.py ``tile_mlps``) compute what the whole MLP computes."""

from __future__ import annotations

import pytest
import torch

from loraflow.errors import UsageError
from loraflow.ml.loss import token_loss_sum
from loraflow.ml.memory import _TiledMLP, tile_mlps
from loraflow.ml.models import load_quantized
from loraflow.ml.training import prepare_for_training
from tests.conftest import LORA


def loss_and_grads(
    path: str, profile: str, tiles: int, above: int = 0, dropout: float = 0.0, loop: bool = False, device=None
):
    """Loss and LoRA gradients of one step on 2 rows of 24 tokens, fp32 compute, LoRA B made nonzero.

    ``tiles`` tokens per MLP tile (0: untiled); ``loop``: the tiles as a plain autograd loop instead
    of ``_TiledMLP`` (everything kept, the same tiles in the same order: the same dropout masks).
    """
    torch.manual_seed(0)
    model = load_quantized(path, compute_dtype="float32", device=device)
    model = prepare_for_training(model, LORA.model_copy(update={"dropout": dropout}), profile)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    assert tile_mlps(model, tiles, above) == model.config.num_hidden_layers
    if loop:
        for layer in model.base_model.model.model.layers:
            untiled = layer.mlp._loraflow_untiled
            layer.mlp.forward = lambda x, f=untiled: torch.cat(
                [f(t.unsqueeze(0)).squeeze(0) for t in x.reshape(-1, x.shape[-1]).split(tiles)]
            ).view(*x.shape[:-1], -1)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    torch.manual_seed(3)
    loss_sum, n = token_loss_sum(model, batch)
    (loss_sum / n).backward()
    grads = {k: p.grad.detach().cpu() for k, p in model.named_parameters() if p.requires_grad}
    return loss_sum.item(), grads


def max_rel_error(grads: dict, ref: dict) -> float:
    return max(((grads[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)


@pytest.mark.parametrize("profile", ["balanced", "lean"])
def test_tiled_mlps_give_the_untiled_loss_and_gradients(tiny_quantized, profile) -> None:
    """Tiles of 7 tokens (the last one shorter) over 2 x 24 tokens, under recomputed and offloaded layers."""
    ref_loss, ref = loss_and_grads(tiny_quantized.path, profile, tiles=0)
    loss, grads = loss_and_grads(tiny_quantized.path, profile, tiles=7)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert max_rel_error(grads, ref) < 1e-5


def test_tiled_mlps_replay_the_dropout_masks_of_their_forward_pass(tiny_quantized) -> None:
    """With LoRA dropout, the backward pass replays each tile with the masks its forward pass drew:
    the gradients are those of the same tiles computed with every activation kept."""
    ref_loss, ref = loss_and_grads(tiny_quantized.path, "lean", tiles=7, dropout=0.3, loop=True)
    loss, grads = loss_and_grads(tiny_quantized.path, "lean", tiles=7, dropout=0.3)
    untiled_loss, _ = loss_and_grads(tiny_quantized.path, "lean", tiles=0, dropout=0.3)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert max_rel_error(grads, ref) < 1e-5
    assert untiled_loss != pytest.approx(loss, rel=1e-6)  # the masks do depend on the tiling


def test_short_micro_batches_are_not_tiled_and_tiling_comes_off(tiny_quantized, monkeypatch) -> None:
    """At or under ``above`` tokens the MLP runs whole; ``tokens=0`` restores each MLP's own forward."""
    model = load_quantized(tiny_quantized.path, compute_dtype="float32")
    model = prepare_for_training(model, LORA, "balanced")
    mlp = model.base_model.model.model.layers[0].mlp
    own = mlp.forward
    tile_mlps(model, 4, above=48)
    calls = []
    apply = _TiledMLP.apply
    monkeypatch.setattr(_TiledMLP, "apply", lambda *a: calls.append(a[-1].shape) or apply(*a))
    x = torch.randn(2, 24, model.config.hidden_size)
    mlp(x)
    assert calls == []
    mlp(torch.randn(2, 25, model.config.hidden_size))
    assert calls == [torch.Size([2, 25, model.config.hidden_size])]
    monkeypatch.undo()
    tile_mlps(model, 0, 0)
    assert mlp.forward == own and "_loraflow_untiled" not in mlp.__dict__
    assert torch.equal(mlp(x), own(x))


def test_an_mlp_that_returns_more_than_a_tensor_is_refused_with_the_way_out() -> None:
    """A mixture of experts that also returns router logits cannot be put back together from tiles."""

    class RouterMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.up(x), x.sum(-1)

    layer = torch.nn.Module()
    layer.mlp = RouterMLP()
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([layer])
    assert tile_mlps(model, 2, 3) == 1
    x = torch.randn(1, 3, 4)
    assert isinstance(model.layers[0].mlp(x), tuple)  # short: as it was
    with pytest.raises(UsageError, match="returns tuple, not one tensor: use train.memory_profile='balanced'"):
        model.layers[0].mlp(torch.randn(1, 4, 4))


def test_untiled_micro_batches_compile_without_a_graph_break(tiny_quantized) -> None:
    """Below ``above`` the wrapper is traced into the compiled layer: full rows keep one graph per layer."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = prepare_for_training(load_quantized(tiny_quantized.path), LORA, "lean", "on")
    tile_mlps(model, 4, above=1000)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    loss_sum, n = token_loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    (loss_sum / n).backward()
    assert counters["stats"]["unique_graphs"] > 0  # the layers did compile
    assert dict(counters["graph_break"]) == {}  # (the untiled lean layers compile without one too)
