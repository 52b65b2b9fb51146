"""Memory profiles of the train stage: what is kept, recomputed or moved to host memory.

    fast      keep every activation; no recomputation (the most memory, the most tokens/s)
    balanced  keep only each decoder layer's input and recompute the layer in the backward pass
    lean      as balanced, with the layer inputs moved to pinned host memory until the backward
              pass needs them, and a smaller output-head chunk

All three compute the same function: the loss curves agree (tests/stages/test_train.py). The peak each
reaches on a GPU, and its cost in tokens/s, is in docs/benchmarks.md.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.utils.checkpoint

MemoryProfile = Literal["fast", "balanced", "lean"]


@dataclass(frozen=True)
class ProfileSettings:
    recompute: Literal["none", "layer", "layer_offload"]
    loss_chunk_tokens: int  # output-head chunk of loraflow.ml.loss.token_loss_sum


PROFILES: dict[str, ProfileSettings] = {
    "fast": ProfileSettings("none", 2048),
    "balanced": ProfileSettings("layer", 2048),
    # 512: on the 8B shape's instruction-length mix, 0.4 GB less peak than 1024 at 0.998x the tokens/s
    # (docs/benchmarks.md, issue 16)
    "lean": ProfileSettings("layer_offload", 512),
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
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda = hidden.is_cuda
        kind = hidden.device.type
        ctx.autocast = (kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind))
        if ctx.cuda:
            ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device)
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
        devices = [ctx.device] if ctx.cuda else []
        kind, dtype, enabled = ctx.autocast
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), torch.autocast(kind, dtype, enabled):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
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
