"""GPU: the CUDA 4-bit kernels under the real stage code (skipped without CUDA; run on the lent H200).

python -m pytest tests/test_gpu.py -m gpu -q
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


def test_quantize_train_evaluate_merge_on_cuda(tiny_model_dir, tiny_data, tmp_path):
    import bitsandbytes as bnb
    import torch

    from loraflow.config import BaseModelConfig, EvalConfig, LoraConfig, MergeConfig, QuantConfig, TrainConfig
    from loraflow.ml.models import load_quantized, prepare_base
    from tasks.evaluate import evaluate
    from tasks.merge import merge
    from tasks.quantize import quantize
    from tasks.train import train

    base = quantize(
        prepare_base(BaseModelConfig(name="tiny", path=str(tiny_model_dir)), tmp_path / "cache"),
        QuantConfig(),
        tmp_path / "cache",
    )
    model = load_quantized(base.path)
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert layer.weight.device.type == "cuda"
    train_cfg = TrainConfig(max_steps=12, learning_rate=5e-3, batch_size=4)
    adapter = train(base, tiny_data, LoraConfig(r=4), train_cfg, tmp_path / "run")
    report = evaluate(base, adapter, tiny_data, EvalConfig(max_new_tokens=4), 64, tmp_path / "run")
    assert report.finetuned.loss < report.base.loss
    merged = merge(base, adapter, tiny_data, MergeConfig(), tmp_path / "run")
    assert merged.max_abs_logit_diff < 1e-3
    assert torch.cuda.max_memory_allocated() > 0


@pytest.mark.parametrize(
    "update",
    [
        {"memory_profile": "lean"},
        {"memory_profile": "balanced", "compile": "on"},
        {"memory_profile": "lean", "compile": "on"},
    ],
)
def test_memory_profiles_and_compile_give_the_same_curve_on_cuda(tiny_model_dir, tiny_data, tmp_path, update):
    """On CUDA the lean profile moves layer inputs through pinned memory on a side stream, and
    'auto' compiles the layers: neither may change what a step computes."""
    import json

    from loraflow.config import BaseModelConfig, LoraConfig, QuantConfig, TrainConfig
    from loraflow.ml.models import prepare_base
    from tasks.quantize import quantize
    from tasks.train import train

    base = quantize(
        prepare_base(BaseModelConfig(name="tiny", path=str(tiny_model_dir)), tmp_path / "cache"),
        QuantConfig(),
        tmp_path / "cache",
    )
    cfg = TrainConfig(max_steps=6, learning_rate=5e-3, batch_size=4, memory_profile="fast", compile="off")

    def curve(c: TrainConfig, name: str) -> list[float]:
        adapter = train(base, tiny_data, LoraConfig(r=4), c, tmp_path / name)
        return [row["loss"] for row in json.loads(open(adapter.loss_curve_path).read())]

    reference = curve(cfg, "reference")
    other = curve(cfg.model_copy(update=update), "other")
    assert other == pytest.approx(reference, rel=2e-3)  # bf16 compute: kernels may round differently


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_tiled_mlps_under_offloaded_layers_on_cuda(tiny_quantized, dropout):
    """``lean`` on CUDA (layer inputs through pinned memory on a side stream) with 7-token MLP tiles:
    the loss and gradients of the same tiles computed with every activation kept (so the same dropout masks)."""
    from tests.ml.test_memory import loss_and_grads, max_rel_error

    ref_loss, ref = loss_and_grads(tiny_quantized.path, "lean", 7, dropout=dropout, loop=True, device="cuda:0")
    loss, grads = loss_and_grads(tiny_quantized.path, "lean", 7, dropout=dropout, device="cuda:0")
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert max_rel_error(grads, ref) < 1e-4


def test_fused_lora_layers_compute_what_peft_computes_on_cuda(tiny_quantized):
    """The fused LoRA-on-4-bit operator (loraflow/ml/lora4bit.py) on the CUDA kernels of bitsandbytes:
    peft's loss and gradients, the model computing in fp32."""
    from tests.ml.test_lora4bit import fused_vs_peft

    fused, group_sizes, ref_loss, loss, errors = fused_vs_peft(tiny_quantized.path, "cuda:0")
    assert fused == 2 * 7
    assert group_sizes == [1, 1, 1, 1, 2, 2, 3, 3]
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_fused_operator_dequantizes_bit_for_bit_like_bitsandbytes(nested, dtype_name):
    """On training-sized inputs the operator calls bitsandbytes' dequantization kernels directly
    (loraflow/ml/lora4bit.py, _Quant): its base product and its dequantized weight must be exactly
    those of bitsandbytes' own Linear4bit forward and dequantize_4bit."""
    import bitsandbytes as bnb
    import torch

    from loraflow.ml.lora4bit import _GEMM_4BIT_MAX_ROWS, _operator_inputs, _Quant

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(1024, 384, bias=False, compute_dtype=dtype, compress_statistics=nested)
    layer = layer.to(dtype).cuda()  # quantizes, keeping dtype as the state's
    qs = layer.weight.quant_state
    assert (qs.nested, qs.dtype) == (nested, dtype)
    quant = _Quant(*_operator_inputs([layer])[:9])
    x = torch.randn(_GEMM_4BIT_MAX_ROWS + 512, 1024, device="cuda", dtype=dtype)
    with torch.no_grad():
        assert torch.equal(quant.product(x, 0), layer(x))
    assert torch.equal(quant.weight(0, dtype), bnb.functional.dequantize_4bit(layer.weight.data, qs))


# --- train.distributed='fsdp' on CUDA (loraflow/ml/distributed.py) ---


@pytest.mark.parametrize("case", ["fused", "lean", "compiled"])
def test_sharded_4bit_model_computes_what_the_whole_one_computes_on_cuda(tiny_quantized, tok, tmp_path, case):
    """FSDP2 with one rank on the GPU (nccl): the 4-bit weights loaded in host memory, stored in bf16, moved to
    the GPU as fully_shard cuts them, gathered before each layer runs; the train step's loss and LoRA gradients
    against the same model loaded whole on the GPU (tests/stages/test_distributed.py checks the same on the CPU)."""
    from tests.stages.test_distributed import SHARDED_CASES, one_rank, sharded_vs_whole

    with one_rank(tmp_path / "store", "cuda:0") as world:
        sharded_vs_whole(world, tiny_quantized, tok, *SHARDED_CASES[case])


@pytest.mark.parametrize("update", [{}, {"memory_profile": "lean", "compile": "on"}], ids=["fast", "lean-compiled"])
def test_fsdp_through_torchrun_on_cuda(tiny_quantized, tiny_data, tmp_path, update):
    """train.distributed='fsdp' as the train flow runs it: torchrun, one rank on the GPU; the loss falls as it does
    in one process, rank 0 reports its GPU memory, and the adapter gathered from the shards merges."""
    from loraflow.config import MergeConfig
    from loraflow.ml.distributed import RANK_PEAK_MEMORY_GB
    from loraflow.tracking import EventReader
    from tasks.merge import merge
    from tasks.train import train
    from tests.conftest import LORA
    from tests.stages.conftest import TRAIN, loss_curve
    from tests.stages.test_distributed import ADAPTER_TOLERANCE, adapter_of, max_diff, run_on_ranks

    cfg = TRAIN.model_copy(update={"max_steps": 12, "checkpoint_every": None, **update})
    sharded = run_on_ranks(1, cfg.model_copy(update={"distributed": "fsdp", "gpus": 1}), tiny_quantized, tiny_data,
                           tmp_path / "fsdp")  # fmt: skip
    one = train(tiny_quantized, tiny_data, LORA, cfg, tmp_path / "one")
    curve = loss_curve(sharded)
    assert curve[-1] < curve[0] - 0.5
    assert curve == pytest.approx(loss_curve(one), rel=2e-3)  # bf16 kernels may round differently
    assert max_diff(adapter_of(sharded), adapter_of(one)) < ADAPTER_TOLERANCE
    metrics = {}
    for e in EventReader(tmp_path / "fsdp" / "events.jsonl").new():
        if e["kind"] == "metrics":
            metrics.update(e["metrics"])
    assert 0 < metrics[RANK_PEAK_MEMORY_GB.format(rank=0)] < 1  # GPU memory of a tiny model
    merged = merge(tiny_quantized, sharded, tiny_data, MergeConfig(), tmp_path / "fsdp")
    assert merged.max_abs_logit_diff < 1e-3
