"""Memory profiles of the train stage: what is kept, recomputed or moved to host memory.

    fast      keep every activation; no recomputation (the most memory, the most tokens/s)
    balanced  keep only each decoder layer's input and recompute the layer in the backward pass
    lean      as balanced, with the layer inputs moved to pinned host memory until the backward
              pass needs them, a smaller output-head chunk, and on long micro-batches each MLP run
              in tiles of tokens (``tile_mlps``)

All three compute the same function: the loss curves agree (tests/stages/test_train.py). The peak each
reaches on a GPU, and its cost in tokens/s, is in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.utils.checkpoint

from loraflow.errors import UsageError

MemoryProfile = Literal["fast", "balanced", "lean"]


@dataclass(frozen=True)
class ProfileSettings:
    recompute: Literal["none", "layer", "layer_offload"]
    loss_chunk_tokens: int  # output-head chunk of loraflow.ml.loss.token_loss_sum
    mlp_tile_tokens: int = 0  # tile of ``tile_mlps`` (0: MLPs never tiled) ...
    mlp_tile_above: int = 0  # ... for micro-batches of more tokens than this


PROFILES: dict[str, ProfileSettings] = {
    "fast": ProfileSettings("none", 2048),
    "balanced": ProfileSettings("layer", 2048),
    # 512: on the 8B shape, 0.4 GB less peak than 1024 at 1.00x the tokens/s (full rows and the
    # instruction-length mix). MLP tiles only above 64K tokens: tiled, a 32K sequence ran at 0.84x
    # for 2.2 GB less, and untiled the 8B shape trains 64K tokens within 24 GB (docs/benchmarks.md,
    # issue 16)
    "lean": ProfileSettings("layer_offload", 512, mlp_tile_tokens=4096, mlp_tile_above=65536),
}


def apply_profile(model: torch.nn.Module, profile: MemoryProfile) -> None:
    """Set up activation recomputation on a (not yet LoRA-wrapped) transformers model."""
    settings = PROFILES[profile]
    if settings.recompute == "none":
        return
    func: Callable[..., Any] = (
        offloaded_checkpoint if settings.recompute == "layer_offload" else _non_reentrant_checkpoint
    )
    # The per-layer hook of transformers (GradientCheckpointingLayer): each decoder layer calls
    # func(layer_forward, hidden_states). Set directly rather than through the public enable
    # method, whose name and arguments changed within transformers 5.
    model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=func)
    model.enable_input_require_grads()  # frozen embeddings: the first layer's input must carry a gradient


def _non_reentrant_checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def offloaded_checkpoint(function: Callable[..., Any], hidden: torch.Tensor, *args: Any) -> torch.Tensor:
    """Run one decoder layer without keeping its activations; keep its input in host memory."""
    return _OffloadedCheckpoint.apply(function, hidden, *args)


# False: each offloaded input is copied back only when its own layer's backward pass starts
# (bench/train_throughput.py's +noprefetch).
PREFETCH = True
_streams: dict[torch.device, torch.cuda.Stream] = {}
# Per device, the offloaded checkpoint that ran last: the next one links to it, so that its
# backward pass (which runs just before that one's) can bring its input back ahead of time.
_last: dict[torch.device, weakref.ref] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


class _Replay:
    """The RNG and autocast state a forward pass ran under, to run a part of it again in the backward pass
    with the same dropout masks and the same precision."""

    def __init__(self, x: torch.Tensor, rng: bool = True) -> None:
        kind = x.device.type
        self.autocast = (kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind))
        self.devices = [x.device] if x.is_cuda else []
        self.rng = rng
        self.cpu_rng = torch.get_rng_state() if rng else None
        self.cuda_rng = torch.cuda.get_rng_state(x.device) if rng and x.is_cuda else None

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        kind, dtype, enabled = self.autocast
        with torch.random.fork_rng(devices=self.devices, enabled=self.rng), torch.autocast(kind, dtype, enabled):
            if self.rng:
                torch.set_rng_state(self.cpu_rng)
                if self.cuda_rng is not None:
                    torch.cuda.set_rng_state(self.cuda_rng, self.devices[0])
            yield


class _OffloadedCheckpoint(torch.autograd.Function):
    """Checkpoint a layer and move its input to pinned host memory on a side stream.

    Forward: run the layer without autograd, copy its input (tokens x hidden, bf16) to the host
    while the next layers compute. Backward: take the input back (copied on the side stream while
    the layer after it was backpropagated), replay the layer with the same RNG state (LoRA dropout
    draws the same mask) and autocast state, and backpropagate through the replay; meanwhile the
    side stream brings back the input of the layer before.
    """

    @staticmethod
    def forward(ctx, function, hidden, *args):  # type: ignore[override]
        ctx.function, ctx.args, ctx.device = function, args, hidden.device
        ctx.cuda = hidden.is_cuda
        ctx.replay = _Replay(hidden)
        with torch.no_grad():
            out = function(hidden, *args)
        ctx.prefetched = None
        if ctx.cuda:
            host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            stream = _copy_stream(hidden.device)
            stream.wait_stream(torch.cuda.current_stream(hidden.device))
            with torch.cuda.stream(stream):
                host.copy_(hidden, non_blocking=True)
            hidden.record_stream(stream)  # the allocator keeps it until the copy is done
            ctx.copied = stream.record_event()
            ctx.previous = _last.get(hidden.device)
            _last[hidden.device] = weakref.ref(ctx)
        else:
            host = hidden.detach()  # already in host memory
        ctx.host = host
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden = _take_input(ctx).detach().requires_grad_(True)
        if ctx.cuda and PREFETCH:
            previous = ctx.previous() if ctx.previous else None
            if previous is not None and previous.host is not None and previous.prefetched is None:
                _prefetch(previous)  # overlaps with this layer's replay and backward
        with ctx.replay.replaying(), torch.enable_grad():
            out = ctx.function(hidden, *ctx.args)
        torch.autograd.backward(out, grad_out)
        return (None, hidden.grad) + (None,) * len(ctx.args)


def _prefetch(ctx) -> None:
    """Start copying an offloaded layer input back to the GPU on the side stream."""
    stream = _copy_stream(ctx.device)
    with torch.cuda.stream(stream):  # after the copy to the host: the same stream
        hidden = ctx.host.to(ctx.device, non_blocking=True)
    ctx.prefetched, ctx.host = (hidden, stream.record_event()), None


def _take_input(ctx) -> torch.Tensor:
    """An offloaded layer's input, back on its device (on the current stream)."""
    if not ctx.cuda:
        hidden, ctx.host = ctx.host, None
        return hidden
    if ctx.prefetched is None:
        _prefetch(ctx)
    (hidden, copied), ctx.prefetched = ctx.prefetched, None
    compute = torch.cuda.current_stream(ctx.device)
    compute.wait_event(copied)
    hidden.record_stream(compute)  # allocated on the side stream, used and freed on this one
    return hidden


def tile_mlps(model: torch.nn.Module, tokens: int, above: int) -> int:
    """Run each decoder layer's MLP in tiles of ``tokens`` tokens on micro-batches of more than ``above``.

    An MLP acts on each token alone, so it can run on a long sequence a tile at a time: the forward
    pass keeps only the MLP's input, and the backward pass recomputes and backpropagates one tile
    after another. Its intermediate activations (three of the intermediate size per token, 3.5x the
    hidden size on Llama-3-8B) then exist for one tile, not for the whole sequence, at the cost of one
    more forward pass of the MLP. Call it on the LoRA-wrapped model (it wraps each MLP's forward as it
    is then, the fused LoRA groups included); ``tokens=0`` takes the tiling off again. Returns the
    number of MLPs: the ``mlp`` of each decoder layer (``...layers.N.mlp``); a layer without one is
    left as it is.
    """
    n = 0
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) < 3 or parts[-1] != "mlp" or parts[-3] != "layers" or not parts[-2].isdigit():
            continue
        untiled = module.__dict__.pop("_loraflow_untiled", None)
        if untiled is not None:  # tiled before: its own forward back first
            if untiled == types.MethodType(type(module).forward, module):
                module.__dict__.pop("forward", None)
            else:
                module.forward = untiled
        if tokens > 0:
            module._loraflow_untiled = module.forward
            module._loraflow_tile = (tokens, above)
            module.forward = types.MethodType(_tiled_mlp_forward, module)
        n += 1
    return n


def _tiled_mlp_forward(self: torch.nn.Module, x: torch.Tensor, *args, **kwargs):
    tokens, above = self._loraflow_tile
    if args or kwargs or x.shape[:-1].numel() <= above:  # short, or not a one-input MLP: as it was
        return self._loraflow_untiled(x, *args, **kwargs)
    return _run_tiled(self, x, tokens)


@torch.compiler.disable  # a loop of backward passes inside a backward pass: eager, a graph break in a compiled layer
def _run_tiled(mlp: torch.nn.Module, x: torch.Tensor, tokens: int) -> torch.Tensor:
    dropout = mlp.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in mlp.modules())
    return _TiledMLP.apply(mlp._loraflow_untiled, tokens, dropout, x)


class _TiledMLP(torch.autograd.Function):
    """An MLP over a micro-batch a tile of tokens at a time, keeping only its input for the backward pass.

    Backward replays each tile with the RNG state of the forward pass (LoRA dropout draws the same
    masks: the tiles run in the same order) and the same autocast state, and backpropagates it: the
    adapter's gradients accumulate tile by tile, the input's gradient is filled a tile at a time.
    """

    @staticmethod
    def forward(ctx, forward, tokens, dropout, x):  # type: ignore[override]
        ctx.forward, ctx.tokens, ctx.replay = forward, tokens, _Replay(x, rng=dropout)
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        out = None
        for start in range(0, flat.shape[0], tokens):
            y = forward(flat[start : start + tokens].unsqueeze(0))
            if not isinstance(y, torch.Tensor):  # e.g. a mixture of experts that also returns router logits
                raise UsageError(
                    f"train.memory_profile='lean' tiles each MLP above {tokens} tokens, but this model's MLP "
                    f"returns {type(y).__name__}, not one tensor: use train.memory_profile='balanced', or "
                    "shorter sequences"
                )
            y = y.squeeze(0)
            if out is None:
                out = y.new_empty(flat.shape[0], y.shape[-1])
            out[start : start + y.shape[0]] = y
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        flat = x.detach().reshape(-1, x.shape[-1])
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat)
        with ctx.replay.replaying():
            for start in range(0, flat.shape[0], ctx.tokens):
                tile = flat[start : start + ctx.tokens].unsqueeze(0).requires_grad_(True)
                with torch.enable_grad():
                    y = ctx.forward(tile)
                torch.autograd.backward(y, grad_flat[start : start + ctx.tokens].unsqueeze(0))
                grad_x[start : start + tile.shape[1]] = tile.grad[0]
        return None, None, None, grad_x.view_as(x)
