"""Training over the ranks torchrun starts: data-parallel (DDP) or sharded (FSDP2), PyTorch's process group.

    python -m torch.distributed.run --nproc-per-node 2 --standalone -m tasks.train REQUEST EVENTS ADAPTER

Every rank builds the same global micro-batches from the seeded data stream and computes only its share
of each: a contiguous slice of the rows (:meth:`World.shard`). The loss of a rank's rows is divided by
the token count of the *global* micro-batches, so the adapter gradients summed over ranks equal the
gradient of one process on the whole batch, up to the order of floating-point sums. Clipping and AdamW
then act on that sum; rank 0 writes the events, checkpoints and the adapter.

``train.distributed='ddp'``: every rank holds the whole 4-bit base and the whole adapter. The summing is
one ``all_reduce`` of the flattened LoRA gradients per optimizer step, after gradient accumulation, as
DDP's ``no_sync`` would; every rank then steps identical gradients, so the adapters stay identical.
Why not ``DistributedDataParallel`` itself: the train step calls the decoder and the fused output head
directly (loraflow/ml/loss.py), not the wrapped module's ``forward``, which DDP needs to prepare its
reducer; and DDP's bucket hooks fight activation recomputation and torch.compile. The LoRA gradients
are a few hundred MB at most, one collective per step; the fused LoRA operator, every memory profile,
compile and packing work unchanged because nothing hooks into the backward pass.

``train.distributed='fsdp'`` (:func:`shard`): for a base whose 4 bits do not fit one GPU. FSDP2's
``fully_shard`` cuts every decoder layer's parameters, the 4-bit weights and the LoRA adapter alike,
into one slice per rank; a layer's forward (and backward) all-gathers its slices just before it runs
and frees them after, and the backward reduce-scatters the LoRA gradients (summed, not averaged), so
each rank holds and steps only its slice of the adapter and of AdamW's moments. Its cost over DDP:
two all-gathers of every layer per step; docs/benchmarks.md has the measured figure.

Because the global batch (``train.batch_size`` rows) is split, never multiplied, a config computes
the same steps on any number of ranks and either placement: its checkpoints resume on another number
of ranks or another placement (loraflow/ml/checkpoints.py says what "exactly" then means).

Initialising the process group reads torchrun's environment: that is the entry point's business
(tasks/train.py ``main``), which hands a :class:`World` down.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from loraflow.errors import UsageError

# Per-rank figures the train run gets (rank 0 gathers them): the metric names, formatted with the rank.
RANK_TOKENS_PER_S = "train/rank{rank}/tokens_per_second"
RANK_PEAK_MEMORY_GB = "train/rank{rank}/peak_memory_gb"


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a data-parallel run (the process group is initialised)."""

    rank: int
    size: int
    local_rank: int
    device: str  # where this rank's model lives: cuda:<local_rank>, or cpu

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes events, checkpoints and the adapter."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` rows (the first ``n % size`` ranks take one more)."""
        if n < self.size:
            raise UsageError(
                f"a micro-batch of {n} rows cannot be split across {self.size} ranks: "
                f"raise train.batch_size to at least {self.size} or lower train.gpus"
            )
        share, extra = divmod(n, self.size)
        start = self.rank * share + min(self.rank, extra)
        return slice(start, start + share + (self.rank < extra))

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of a collated global micro-batch."""
        rows = self.rows(next(iter(batch.values())).size(0))
        return {k: v[rows] for k, v in batch.items()}

    def sum(self, value: float) -> float:
        """The sum of a float over all ranks (in float64)."""
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t.item())

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over all ranks, in one collective of their flattened copy."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        for p, reduced in zip(params, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            if p.grad is None:
                p.grad = reduced
            else:
                p.grad.copy_(reduced)

    def broadcast_params(self, params: list[torch.nn.Parameter]) -> None:
        """Make every rank's ``params`` rank 0's (what DDP does when it wraps a module)."""
        comm = torch.device(self._comm_device)
        with torch.no_grad():
            for p in params:
                if p.device.type == comm.type:
                    dist.broadcast(p.data, src=0)
                else:  # nccl sends CUDA tensors only: under fsdp the model is still in host memory here
                    buf = p.data.to(comm)
                    dist.broadcast(buf, src=0)
                    p.data.copy_(buf)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    @property
    def _comm_device(self) -> str:
        return self.device if dist.get_backend() == "nccl" else "cpu"


def start(rank: int, size: int, local_rank: int) -> World:
    """Join the process group torchrun set up (nccl on CUDA, gloo on the CPU) and pick this rank's device."""
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"rank {rank} (local rank {local_rank}) has no GPU: this machine shows {torch.cuda.device_count()}; "
                "lower train.gpus"
            )
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=size, device_id=None)
    return World(rank, size, local_rank, device)


def shard(model: torch.nn.Module, world: World) -> None:
    """Shard a peft model on the 4-bit base (from ``prepare_for_training``, adapter initialised) over the ranks.

    FSDP2 units: each decoder layer, then the decoder (embeddings and final norm) as the root; the
    train step calls the decoder itself (loraflow/ml/loss.py), so its forward is where FSDP gathers.
    The output head stays whole on every rank (frozen; the fused loss reads its weight directly).
    The model may sit in host memory: ``fully_shard`` moves each unit's parameters to this rank's device
    as it cuts them, so no GPU ever holds the whole base: its slices, the layers gathered at the moment
    (FSDP may gather the next while one runs), the embeddings during a step, and the output head.

    How the 4-bit weights survive sharding: their packed bytes are first stored in the compute dtype
    (:func:`loraflow.ml.models.set_quant_storage`); the sharded parameter is a plain DTensor that has
    lost bitsandbytes' ``Params4bit`` type and its ``quant_state``; the module keeps the latter, and
    bitsandbytes' own ``Linear4bit`` forward re-attaches it to the gathered weight, as the fused LoRA
    operator reads it (loraflow/ml/lora4bit.py). The quantization constants stay whole on every rank
    (1/32 of the 4-bit bytes with double quantization, 1/8 without). No mixed-precision policy: the 4-bit
    storage must reach bitsandbytes as it is, the fp32 LoRA weights are the optimizer's master copy
    (cast per product in the layers), and their gradients are reduce-scattered in fp32.

    Raises:
        UsageError: a trainable weight lies outside the decoder layers (e.g. LoRA on the output head).
    """
    import bitsandbytes as bnb
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from loraflow.ml.models import set_quant_storage

    causal_lm = model.get_base_model()
    decoder = causal_lm.get_decoder()
    inside = {id(p) for p in decoder.layers.parameters()}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        raise UsageError(
            f"train.distributed='fsdp' shards the decoder layers, and these trainable weights lie outside them: "
            f"{outside[:3]}; leave them out of lora.target_modules (e.g. 'all-linear') or use train.distributed='ddp'"
        )
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if quantized:
        set_quant_storage(model, quantized[0].compute_dtype)
    world.broadcast_params([p for p in model.parameters() if p.requires_grad])  # as DDP does, before the cut
    mesh = init_device_mesh(torch.device(world.device).type, (world.size,))
    units = [*decoder.layers, decoder]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    for unit in units:  # each rank's loss is already a share of the global mean: sum the shares, never average
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    head = causal_lm.get_output_embeddings()
    if head is not None:
        head.to(world.device)
    for module in quantized:  # fully_shard moved the weights; the constants go with them
        module.quant_state.to(torch.device(world.device))


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether :func:`shard` cut this model (its gradients are then FSDP's to sum, its state FSDP's to gather)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def peak_memory_gb(device: str) -> float:
    """This process's peak memory: allocated GPU memory on CUDA, else the peak resident set (host memory)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9
