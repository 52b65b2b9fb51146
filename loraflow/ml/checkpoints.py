"""Training checkpoints that a killed run resumes from: complete or absent, never half written.

A checkpoint is a folder ``step-NNNNNN`` holding the adapter (``save_pretrained``), the optimizer and
scheduler states, every RNG state the loop draws from, the position in the data order (the step:
the batch stream is a pure function of the seed, so it is replayed, not stored), the loss curve so
far, and ``meta.json`` with the library versions and the run key it belongs to. It is written into
a hidden temporary folder, each file fsynced, then renamed into place and the parent folder fsynced:
after a crash at any instant the folder either holds a complete checkpoint or none. Only the newest
``keep`` are kept.

Across numbers of ranks (loraflow/ml/distributed.py): only rank 0 writes, and a checkpoint of a
data-parallel run also holds every rank's RNG states (``rng_ranks``) and ``world_size`` in its meta.
The data position is the step alone (every rank replays the same global stream and takes its share),
and adapter, optimizer and scheduler are the same on every rank, so a checkpoint written on N ranks
resumes on M. What "exactly" means then:

- the same number of ranks: each rank gets its own RNG states back, so the run continues bit for bit
  as the uninterrupted one would (on deterministic kernels);
- another number: the data order, learning rate, optimizer moments and adapter continue exactly; the
  losses continue as an N-rank run and an M-rank run of the same global batch agree (the order of the
  sums differs: within the tolerance tests/stages/test_distributed.py states). Rank r takes rank r's
  RNG states where the old run had a rank r, else a stream derived from the seed state and r. LoRA
  dropout masks are drawn per rank for its rows, so with dropout > 0 they differ from what the old
  run would have drawn: the same distribution, not the same masks (with dropout 0 nothing is drawn).

One format whatever the placement: the adapter is written in peft's format from its whole tensors and
the optimizer state keyed by parameter name, both gathered through torch's distributed state-dict API
(``get_model_state_dict`` / ``get_optimizer_state_dict`` with ``full_state_dict``). Under FSDP
(``train.distributed='fsdp'``) that gathers every rank's shards to rank 0's host memory; without it the
same calls just copy. Loading (:func:`restore`) hands the whole tensors to ``set_model_state_dict`` /
``set_optimizer_state_dict``, which keep each rank's shard under FSDP. So a checkpoint of 2 FSDP ranks
resumes on 1 process, on DDP ranks or on 3 FSDP ranks, and the other way round. Optimizer states keyed by
position (written before this format) are read too.

Resuming across a change of torch, transformers, peft, bitsandbytes or loraflow is refused with a
message naming what changed: such a change can alter the loss curve silently (the failure users of
other trainers report). ``allow_version_change`` resumes anyway, and the caller records that.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from loraflow.errors import UsageError
from loraflow.ml.merge import ADAPTER_WEIGHTS

META = "meta.json"
STATE = "trainer_state.pt"
PREFIX = "step-"
VERSIONED = ("torch", "transformers", "peft", "bitsandbytes", "loraflow")


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose change can change a resumed run's numbers."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk."""

    path: Path
    step: int
    meta: dict[str, Any]

    def state(self) -> dict[str, Any]:
        """Optimizer, scheduler and RNG states (loaded on the CPU; the optimizer moves them back)."""
        return torch.load(self.path / STATE, map_location="cpu", weights_only=False)

    def check_compatible(self, run_key: str, allow_version_change: bool) -> dict[str, tuple[str, str]]:
        """Refuse a checkpoint of another run; return the version changes (empty when none).

        Raises:
            UsageError: the checkpoint belongs to another run, or versions changed and that is not allowed.
        """
        if self.meta.get("run_key") != run_key:
            raise UsageError(
                f"checkpoint {self.path} belongs to another run (key {self.meta.get('run_key', '?')[:12]}, this "
                f"run {run_key[:12]}); remove it or start over with `--fresh`"
            )
        then = self.meta.get("versions", {})
        changed = {k: (then.get(k, "?"), v) for k, v in library_versions().items() if then.get(k) != v}
        if changed and not allow_version_change:
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise UsageError(
                f"checkpoint {self.path} (step {self.step}) was written with other library versions ({what}); "
                "a resumed run could continue a different loss curve. Start over with `--fresh`, or resume anyway "
                "with train.resume_across_versions=true (recorded in MLflow)."
            )
        return changed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    folder: Path,
    step: int,
    model: torch.nn.Module,
    adapter: dict[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically into ``folder`` and prune it to the newest ``keep``.

    ``adapter`` is :func:`adapter_tensors` of ``model``; ``state["optimizer"]`` :func:`optimizer_state`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:06d}"
    tmp = folder / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=adapter)
        torch.save(state, tmp / STATE)
        (tmp / META).write_text(json.dumps({**meta, "step": step, "versions": library_versions()}, indent=2))
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
        if final.exists():  # the same step written by an earlier attempt: identical by determinism
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(folder, keep)
    return final


def complete(folder: Path) -> list[Checkpoint]:
    """The complete checkpoints in ``folder``, oldest first (leftover temporary folders are ignored)."""
    found = []
    if not folder.is_dir():
        return found
    for d in folder.iterdir():
        if not d.name.startswith(PREFIX) or not (d / META).is_file() or not (d / STATE).is_file():
            continue
        try:
            meta = json.loads((d / META).read_text())
        except ValueError:
            continue
        found.append(Checkpoint(d, int(meta["step"]), meta))
    return sorted(found, key=lambda c: c.step)


def latest(folder: Path) -> Checkpoint | None:
    done = complete(folder)
    return done[-1] if done else None


def prune(folder: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` complete checkpoints, and temporary folders of dead writers."""
    removed = []
    for c in complete(folder)[:-keep]:
        shutil.rmtree(c.path, ignore_errors=True)
        removed.append(c.path)
    for d in folder.glob(f".tmp-{PREFIX}*"):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rng_states() -> dict[str, Any]:
    """Every RNG state the training loop draws from (dropout: torch's CPU and CUDA generators)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def rng_of_rank(state: dict[str, Any], rank: int) -> dict[str, Any]:
    """The RNG states rank ``rank`` resumes with (see the module docstring); rank 0's are ``state["rng"]``."""
    ranks = state.get("rng_ranks") or [state["rng"]]
    if rank < len(ranks):
        return ranks[rank]
    with torch.random.fork_rng(devices=[]):  # a stream of its own, derived from rank 0's state and the rank
        torch.set_rng_state(state["rng"]["torch"])
        return {"seed": int(torch.randint(0, 2**62, (1,)).item()) + rank}


def set_rng_states(states: dict[str, Any]) -> None:
    if "seed" in states:  # a derived stream (rng_of_rank): every device's generator seeded from it
        torch.manual_seed(states["seed"])
        return
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# Whole tensors, gathered to rank 0's host memory when the model is sharded (FSDP); a plain copy otherwise.
_WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def trainable_names(model: torch.nn.Module) -> list[str]:
    """The trainable parameters' names, in the order of ``model.parameters()`` (the optimizer's order)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) weights, whole and on the CPU, keyed by the model's parameter names.

    A collective when the model is sharded: every rank calls it; rank 0 gets the tensors, the others nothing.
    ``model.save_pretrained(folder, state_dict=...)`` writes them in peft's format.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    trainable = set(trainable_names(model))
    return {k: v for k, v in get_model_state_dict(model, options=options).items() if k in trainable}


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, whole and on the CPU (a collective when sharded, as above)."""
    return get_optimizer_state_dict(model, optimizer, options=_WHOLE)


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> dict[str, Any]:
    """Load a checkpoint's adapter and optimizer state into ``model`` and ``optimizer``; return its state.

    Every rank reads the files and keeps its own shard (FSDP) or the whole (otherwise). peft writes the
    adapter's keys without the adapter's name (``...lora_A.weight`` for ``...lora_A.default.weight``).

    Raises:
        UsageError: the checkpoint's adapter does not hold exactly this model's trainable weights.
    """
    state = checkpoint.state()
    saved = load_file(checkpoint.path / ADAPTER_WEIGHTS)
    names = trainable_names(model)
    adapter = model.active_adapter if hasattr(model, "active_adapter") else "default"
    keys = {name: _saved_key(name, adapter) for name in names}
    if set(keys.values()) != set(saved):
        missing, extra = sorted(set(keys.values()) - set(saved)), sorted(set(saved) - set(keys.values()))
        raise UsageError(
            f"checkpoint {checkpoint.path} does not hold this model's adapter (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); remove it or start over with `--fresh`"
        )
    whole = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, {name: saved[key] for name, key in keys.items()}, options=whole)
    set_optimizer_state_dict(model, optimizer, _by_name(state["optimizer"], names), options=whole)
    return state


def _saved_key(name: str, adapter: str) -> str:
    """A parameter's key in peft's saved adapter: the adapter's name taken out, as peft's
    ``get_peft_model_state_dict`` does (``q_proj.lora_A.default.weight`` -> ``q_proj.lora_A.weight``)."""
    head, _, last = name.rpartition(".")
    return head if last == adapter else f"{head.removesuffix(f'.{adapter}')}.{last}"


def _by_name(optim: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state keyed by parameter position (``optimizer.state_dict()``) keyed by name instead."""
    if all(isinstance(k, str) for k in optim["state"]):
        return optim
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in optim["param_groups"]]
    return {"state": {names[i]: v for i, v in optim["state"].items()}, "param_groups": groups}
