"""Training over ranks on the CPU: torchrun, 2 gloo ranks of the tiny Llama, DDP and FSDP, against 1 process.

Two ranks on the same global batch compute the same steps as one process up to the order of
floating-point sums (each rank runs its half of the rows; the gradients are summed across ranks):
the loss curve agrees within LOSS_TOLERANCE, the adapter within ADAPTER_TOLERANCE, and it loads and
merges as a single-process adapter does. FSDP (4-bit base and adapter sharded) computes what DDP
computes: the same rows per rank, the same sums, within FSDP_VS_DDP. A checkpoint written on 2 ranks
resumes on 1, and one written by 1 process resumes on 2 FSDP ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows.trainer import ranks_to_launch, trainer_command
from loraflow.config import MergeConfig, PipelineConfig, TrainConfig
from loraflow.errors import StageError, UsageError
from loraflow.ml import checkpoints, distributed
from loraflow.ml.batching import collate_packed, packed_micro_batches
from loraflow.ml.distributed import RANK_PEAK_MEMORY_GB, RANK_TOKENS_PER_S, World
from loraflow.ml.examples import encode_all
from loraflow.ml.loss import token_loss_sum
from loraflow.ml.memory import PROFILES
from loraflow.ml.models import load_quantized
from loraflow.ml.training import prepare_for_training
from loraflow.records import Adapter, load_record
from loraflow.tracking import EventLog, EventReader
from tasks.merge import merge
from tasks.train import TrainRequest, train
from tests.conftest import LORA, PROJECTIONS, linear4bit, records_batch, tiny_records
from tests.stages.conftest import TRAIN, loss_curve

ROOT = Path(__file__).resolve().parents[2]
STEPS = 10  # the session's 1-process run (TRAIN, 15 steps) checkpointed the adapter after step 10
DDP = TRAIN.model_copy(update={"max_steps": STEPS, "distributed": "ddp", "gpus": 2})
# Step 1 agrees exactly; after it the sums in another order (bf16 products of half the rows, gradients
# added across ranks) drift: measured on this CPU, at most 4.6e-4 in a loss of ~5 over 10 steps at
# lr 1e-2, and 0.62% (relative Frobenius norm) in the adapter tensors, where AdamW turns near-zero
# gradients of either sign into steps of the full learning rate. The bounds leave about 4x room.
LOSS_TOLERANCE = 2e-3
ADAPTER_TOLERANCE = 0.025
FSDP = DDP.model_copy(update={"distributed": "fsdp"})
# FSDP's reduce-scatter adds the same two per-rank gradients DDP's all-reduce adds; only the gradient norm
# for clipping is summed in another order (per shard, then across ranks). Measured: the curves and the
# adapters of the two runs were identical on this CPU. The bound allows the norm's rounding.
FSDP_VS_DDP = 1e-5


def torchrun(ranks: int, request: Path, events: Path, result: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # carried packages stay found
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone"]
    argv += ["-m", "tasks.train", str(request), str(events), str(result)]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def run_on_ranks(ranks: int, cfg: TrainConfig, base, data, run: Path, checkpoints_from: Path | None = None) -> Adapter:
    """``python -m tasks.train`` under torchrun on ``ranks`` gloo ranks, checkpointing into ``run/ck``
    (seeded with a copy of ``checkpoints_from``: the run resumes from its newest checkpoint)."""
    run.mkdir(parents=True, exist_ok=True)
    if checkpoints_from is not None:
        shutil.copytree(checkpoints_from, run / "ck")
    request = TrainRequest(
        base=base, data=data, lora=LORA, train=cfg, run_dir=str(run), checkpoint_dir=str(run / "ck")
    ).save(run / "request.json")
    done = torchrun(ranks, request, run / "events.jsonl", run / "adapter.json")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return load_record(Adapter, run / "adapter.json")


@pytest.fixture(scope="module")
def two_ranks(tiny_quantized, tiny_data, tmp_path_factory) -> tuple[Adapter, Path]:
    """A 10-step DDP run on 2 gloo ranks, checkpointed after step 5; its adapter and event log."""
    run = tmp_path_factory.mktemp("ddp")
    return run_on_ranks(2, DDP, tiny_quantized, tiny_data, run), run / "events.jsonl"


@pytest.fixture(scope="module")
def two_fsdp_ranks(tiny_quantized, tiny_data, tmp_path_factory) -> tuple[Adapter, Path]:
    """The same run with the 4-bit base and the adapter sharded over the 2 ranks (FSDP2)."""
    run = tmp_path_factory.mktemp("fsdp")
    return run_on_ranks(2, FSDP, tiny_quantized, tiny_data, run), run / "events.jsonl"


def adapter_after(trained: Adapter, step: int) -> dict[str, torch.Tensor]:
    ck = next(c for c in checkpoints.complete(Path(trained.checkpoints[0]).parent) if c.step == step)
    return load_file(ck.path / "adapter_model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest relative difference |a - b| / |b| (Frobenius norms) over the adapter's tensors."""
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).norm() / b[k].float().norm()) for k in a)


PLACEMENTS = ["two_ranks", "two_fsdp_ranks"]  # the module's fixtures: DDP and FSDP on 2 ranks


def adapter_of(adapter: Adapter) -> dict[str, torch.Tensor]:
    return load_file(Path(adapter.path) / "adapter_model.safetensors")


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_two_ranks_train_what_one_process_trains(placement, request, trained) -> None:
    adapter, _ = request.getfixturevalue(placement)
    ranks, single = loss_curve(adapter), loss_curve(trained)[:STEPS]
    assert len(ranks) == STEPS
    assert max(abs(a - b) for a, b in zip(ranks, single, strict=True)) < LOSS_TOLERANCE
    assert ranks[-1] < ranks[0] - 0.5  # it did learn
    assert max_diff(adapter_of(adapter), adapter_after(trained, STEPS)) < ADAPTER_TOLERANCE
    assert adapter.steps == STEPS


def test_fsdp_computes_what_ddp_computes(two_ranks, two_fsdp_ranks) -> None:
    (ddp, _), (fsdp, _) = two_ranks, two_fsdp_ranks
    assert max(abs(a - b) for a, b in zip(loss_curve(fsdp), loss_curve(ddp), strict=True)) < FSDP_VS_DDP
    assert max_diff(adapter_of(fsdp), adapter_of(ddp)) < FSDP_VS_DDP
    # the whole adapter, gathered from both ranks' shards, in peft's format
    assert json.loads((Path(fsdp.path) / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_rank_zero_reports_every_rank(placement, request) -> None:
    _, events = request.getfixturevalue(placement)
    found = EventReader(events).new()
    assert [e["ranks"] for e in found if e["kind"] == "started"] == [2]  # one writer: rank 0
    assert [e["step"] for e in found if e["kind"] == "step"] == list(range(1, STEPS + 1))
    metrics: dict[str, float] = {}
    for e in found:
        if e["kind"] == "metrics":
            metrics.update(e["metrics"])
    for rank in (0, 1):
        assert metrics[RANK_TOKENS_PER_S.format(rank=rank)] > 0
        assert metrics[RANK_PEAK_MEMORY_GB.format(rank=rank)] > 0
    assert metrics["train/ranks"] == 2


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_two_rank_adapter_merges_like_a_single_process_one(placement, request, tiny_quantized, tiny_data, tmp_path):
    adapter, _ = request.getfixturevalue(placement)
    merged = merge(tiny_quantized, adapter, tiny_data, MergeConfig(), tmp_path / "merge")
    assert 0.0 <= merged.max_abs_logit_diff < 1e-4  # what test_merge.py asks of the 1-process adapter


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_checkpoint_of_two_ranks_resumes_on_one(placement, request, trained, tiny_quantized, tiny_data, tmp_path):
    adapter, _ = request.getfixturevalue(placement)
    folder = tmp_path / "ck"
    shutil.copytree(Path(adapter.path).parent / "ck", folder)
    (ck,) = checkpoints.complete(folder)
    assert ck.step == 5 and ck.meta["world_size"] == 2
    assert len(ck.state()["rng_ranks"]) == 2
    one = DDP.model_copy(update={"distributed": "none", "gpus": None})  # the same run key: placement is not identity
    log = EventLog(tmp_path / "events.jsonl")
    resumed = train(tiny_quantized, tiny_data, LORA, one, tmp_path / "run", log, checkpoint_dir=folder)
    assert any(e["kind"] == "tags" for e in EventReader(log.path).new())  # it did resume
    curve, ranks, single = loss_curve(resumed), loss_curve(adapter), loss_curve(trained)[:STEPS]
    assert curve[:5] == ranks[:5]  # restored from the checkpoint as written
    assert max(abs(a - b) for a, b in zip(curve[5:], ranks[5:], strict=True)) < LOSS_TOLERANCE
    assert max(abs(a - b) for a, b in zip(curve, single, strict=True)) < LOSS_TOLERANCE
    assert max_diff(adapter_of(resumed), adapter_after(trained, STEPS)) < ADAPTER_TOLERANCE


def test_checkpoint_of_one_process_resumes_on_two_fsdp_ranks(trained, tiny_quantized, tiny_data, tmp_path) -> None:
    """The session's 1-process run (15 steps) checkpointed after step 10: its last 5 steps on 2 FSDP ranks."""
    (ck,) = [c for c in checkpoints.complete(Path(trained.checkpoints[0]).parent) if c.step == 10]
    cfg = TRAIN.model_copy(update={"distributed": "fsdp", "gpus": 2})  # TRAIN's run key
    resumed = run_on_ranks(2, cfg, tiny_quantized, tiny_data, tmp_path, checkpoints_from=ck.path.parent)
    curve, single = loss_curve(resumed), loss_curve(trained)
    assert curve[:10] == single[:10]  # restored from the checkpoint as written
    assert max(abs(a - b) for a, b in zip(curve[10:], single[10:], strict=True)) < LOSS_TOLERANCE
    assert max_diff(adapter_of(resumed), adapter_of(trained)) < ADAPTER_TOLERANCE


# --- the parts, without processes ---


@contextlib.contextmanager
def one_rank(store: Path, device: str = "cpu") -> Iterator[World]:
    """A process group of this process alone (gloo on the CPU, nccl on CUDA): what ``torchrun --nproc-per-node 1``
    gives a rank."""
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, store=dist.FileStore(str(store), 1), rank=0, world_size=1)
    try:
        yield World(0, 1, 0, device)
    finally:
        dist.destroy_process_group()


def sharded_vs_whole(world: World, base, tok, fused: bool, profile: str, packed: bool, compile: str) -> None:
    """Train-step loss and LoRA gradients of a model sharded over ``world`` (one rank) against the same model whole,
    loaded as tasks/train.py loads each: the whole one on its device, the sharded one in host memory first.
    Bit for bit on the CPU; on CUDA within rounding (cuBLAS may pick other kernels for the gathered buffers)."""
    from torch._dynamo.utils import counters
    from torch.distributed.tensor import DTensor

    torch._dynamo.reset()
    counters.clear()

    def build(sharded: bool) -> torch.nn.Module:
        host = world.device != "cpu" and sharded
        loaded = (
            load_quantized(base.path, device="cpu", compute_dtype=base.compute_dtype)
            if host
            else load_quantized(base.path, device=world.device)
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = prepare_for_training(loaded, LORA, profile, compile, fused=fused, device=world.device)
            g = torch.Generator().manual_seed(1)  # on the CPU: the same values for a model on any device
            with torch.no_grad():  # B away from zero: the adapter takes part in the loss
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        if sharded:
            distributed.shard(model, world)
        return model

    whole, sharded = build(False), build(True)
    assert distributed.is_sharded(sharded) and not distributed.is_sharded(whole)
    layer = linear4bit(sharded)["base_model.model.model.layers.0.self_attn.q_proj.base_layer"]
    assert isinstance(layer.weight, DTensor) and layer.weight.dtype == layer.compute_dtype  # stored as it computes
    assert layer.weight.device == torch.device(world.device) and layer.quant_state.absmax.device == layer.weight.device
    if packed:  # two rows of several examples each, position ids restarting per example
        rows = next(packed_micro_batches(encode_all(tok, tiny_records(), 64), 2, 64, seed=0))
        batch = collate_packed(rows, tok.pad_token_id)
        assert batch["position_ids"].eq(0).sum() > 2
    else:
        batch = records_batch(tok)
    exact = world.device == "cpu"
    for _ in range(2):
        losses = []
        for model in (whole, sharded):
            model.zero_grad(set_to_none=True)
            loss_sum, n = token_loss_sum(model, batch)
            (loss_sum / n).backward()
            losses.append(loss_sum.detach())
        grads = {n: p.grad for n, p in whole.named_parameters() if p.requires_grad}
        got = {n: p.grad.full_tensor() for n, p in sharded.named_parameters() if p.requires_grad}
        assert got.keys() == grads.keys()
        if exact:
            assert torch.equal(losses[1], losses[0])
            assert [k for k in got if not torch.equal(got[k], grads[k])] == []
        else:
            assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-4)
            assert max_diff(got, grads) < 1e-2
    if compile == "on":
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] >= 2  # it did compile: the whole model's layers, the sharded's
    gathered, reference = checkpoints.adapter_tensors(sharded), checkpoints.adapter_tensors(whole)
    assert gathered.keys() == reference.keys() and len(gathered) == 4 * len(PROJECTIONS)
    assert all(torch.equal(gathered[k], reference[k]) for k in gathered)  # the same init, on every device


SHARDED_CASES = {  # fused, memory profile, packed rows, compile
    "fused": (True, "balanced", False, "off"),
    "peft": (False, "balanced", False, "off"),
    "lean": (True, "lean", False, "off"),
    "tiled": (True, "lean", False, "off"),  # every MLP in 5-token tiles (the profile tiles only long rows)
    "packed": (True, "fast", True, "off"),
    "compiled": (True, "balanced", False, "on"),
}


@pytest.mark.parametrize("case", SHARDED_CASES)
def test_sharded_4bit_model_computes_what_the_whole_one_computes(
    tiny_quantized, tok, tmp_path, monkeypatch, case
) -> None:
    """One rank cuts nothing, yet every weight goes the FSDP way: DTensor, all-gather before each layer's forward
    and backward, freed after, bitsandbytes' quant_state re-attached to the gathered 4-bit weight. Loss and
    gradients must equal the unsharded model's bit for bit, twice (the second time from freed, re-gathered weights),
    through the fused LoRA operator and peft's own layers, with recomputed or offloaded layers, on packed rows,
    with tiled MLPs, and with compiled layers, which must compile without a graph break (loraflow/ml/lora4bit.py)."""
    if case == "tiled":
        tiled = dataclasses.replace(PROFILES["lean"], mlp_tile_tokens=5, mlp_tile_above=0)
        monkeypatch.setitem(PROFILES, "lean", tiled)
    with one_rank(tmp_path / "store") as world:
        sharded_vs_whole(world, tiny_quantized, tok, *SHARDED_CASES[case])


def test_fsdp_refuses_lora_outside_the_decoder_layers(tiny_quantized) -> None:
    """The output head stays whole on every rank: a LoRA adapter on it would be trained unsummed. Refused before
    any collective (so no process group is needed here)."""
    lora = LORA.model_copy(update={"target_modules": ["q_proj", "lm_head"]})
    model = prepare_for_training(load_quantized(tiny_quantized.path), lora, "fast")
    with pytest.raises(
        UsageError, match=r"lie outside them: \['base_model.model.lm_head.lora_A.*use train.distributed='ddp'"
    ):
        distributed.shard(model, World(0, 1, 0, "cpu"))


def test_rows_split_the_global_batch() -> None:
    shares = [World(r, 3, r, "cpu").rows(8) for r in range(3)]
    assert shares == [slice(0, 3), slice(3, 6), slice(6, 8)]
    with pytest.raises(UsageError, match="raise train.batch_size to at least 3"):
        World(0, 3, 0, "cpu").rows(2)


def test_rank_rng_on_resume() -> None:
    a, b = {"torch": torch.get_rng_state()}, {"torch": torch.manual_seed(7).get_state()}
    two = {"rng": a, "rng_ranks": [a, b]}
    assert checkpoints.rng_of_rank(two, 0) is a and checkpoints.rng_of_rank(two, 1) is b
    one = {"rng": a}  # written by one process, resumed on 2: rank 1 gets a stream of its own
    assert checkpoints.rng_of_rank(one, 0) is a
    derived = checkpoints.rng_of_rank(one, 1)
    assert derived == checkpoints.rng_of_rank(one, 1) and derived != checkpoints.rng_of_rank(one, 2)


@pytest.mark.parametrize("placement", ["ddp", "fsdp"])
def test_trainer_command_uses_torchrun_for_ranks(placement) -> None:
    base = {"base_model": {"name": "t", "path": "m"}, "data": {"path": "d"}, "registry": {"model_name": "x"}}
    plain = PipelineConfig.model_validate({**base, "train": {"max_steps": 1}})
    assert trainer_command(plain, ["R", "E", "A"]) == [sys.executable, "-m", "tasks.train", "R", "E", "A"]
    ranked = PipelineConfig.model_validate({**base, "train": {"max_steps": 1, "distributed": placement, "gpus": 2}})
    argv = trainer_command(ranked, ["R", "E", "A"])
    assert argv[1:7] == ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m"]
    assert argv[7:] == ["tasks.train", "R", "E", "A"]
    assert ranks_to_launch(None, 4) == 4 and ranks_to_launch(None, 0) == 1 and ranks_to_launch(3, 0) == 3
    with pytest.raises(StageError, match="sees 2 GPU"):
        ranks_to_launch(4, 2)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"gpus": 2}, "needs train.distributed='ddp' or 'fsdp'"),
        ({"distributed": "ddp", "gpus": 4, "batch_size": 2}, "at least the number of ranks"),
    ],
)
def test_config_refuses_what_does_not_run(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(max_steps=1, **settings)


def test_placement_keeps_the_run_identity() -> None:
    assert DDP.identity() == DDP.model_copy(update={"distributed": "none", "gpus": None}).identity()
