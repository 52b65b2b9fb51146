"""The streaming merge (loraflow/ml/merge.py) on the tiny Llama: same weights as the in-memory merge.

The reference is the in-memory path it replaced: the whole 4-bit model dequantized with
:func:`loraflow.ml.models.dequantize`, then peft's ``merge_and_unload``. Adapters here are random
(nonzero B), saved by peft itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from loraflow.config import BaseModelConfig, QuantConfig
from loraflow.errors import StageError
from loraflow.ml.merge import INDEX, WEIGHTS, merge_in_memory, stream_merge
from loraflow.ml.models import load_quantized, prepare_base
from tasks.quantize import quantize
from tests.conftest import torch_threads

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def make_adapter(base_path: str | Path, out: Path, seed: int = 0, **lora) -> Path:
    """A random LoRA adapter (A and B both nonzero) on the 4-bit base, saved by peft."""
    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 8, "target_modules": PROJECTIONS, "init_lora_weights": False} | lora
    model = get_peft_model(load_quantized(base_path, device="cpu"), LoraConfig(**options))
    model.save_pretrained(out)
    return out


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            tensors.update({k: h.get_tensor(k).clone() for k in h.keys()})  # noqa: SIM118 (not a dict)
    return tensors


def test_dequantized_weights_equal_loraflow_dequantize_exactly(tiny_quantized, tmp_path) -> None:
    result = stream_merge(tiny_quantized.path, None, tmp_path / "out")
    assert result.files == [WEIGHTS] and result.adapted_modules == 0
    written = read_all(tmp_path / "out")
    reference = merge_in_memory(tiny_quantized.path, None).state_dict()
    assert written.keys() == reference.keys()
    for k, v in reference.items():
        assert written[k].dtype == torch.float32
        assert torch.equal(written[k], v), k
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (tmp_path / "out" / "generation_config.json").is_file()


@pytest.mark.parametrize(
    "lora",
    [
        {},
        {"use_rslora": True, "lora_alpha": 3},
        {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 5}},
    ],
    ids=["alpha-over-r", "rslora", "rank-and-alpha-patterns"],
)
def test_streaming_merge_equals_merge_and_unload(tiny_quantized, tmp_path, lora) -> None:
    adapter = make_adapter(tiny_quantized.path, tmp_path / "adapter", **lora)
    result = stream_merge(tiny_quantized.path, adapter, tmp_path / "out")
    assert result.adapted_modules == 2 * len(PROJECTIONS)
    written = read_all(tmp_path / "out")
    merged = merge_in_memory(tiny_quantized.path, adapter).state_dict()
    base = merge_in_memory(tiny_quantized.path, None).state_dict()
    assert written.keys() == merged.keys()
    for k in merged:
        assert (written[k] - merged[k]).abs().max().item() <= 1e-6, k
    # The adapter is really folded in: every projection moved.
    moved = {k for k in merged if (written[k] - base[k]).abs().max() > 1e-3}
    assert moved == {k for k in merged if k.split(".")[-2] in PROJECTIONS}


def test_shards_are_bounded_and_the_index_is_complete(tiny_quantized, tmp_path) -> None:
    adapter = make_adapter(tiny_quantized.path, tmp_path / "adapter")
    limit = 60_000  # bytes; the tiny model is ~480 kB in fp32, its largest tensor 90 kB (embeddings)
    result = stream_merge(tiny_quantized.path, adapter, tmp_path / "sharded", max_shard_bytes=limit)
    out = tmp_path / "sharded"
    assert len(result.files) >= 5 and not (out / WEIGHTS).exists()
    index = json.loads((out / INDEX).read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == sorted(result.files) == sorted(set(index["weight_map"].values()))
    assert all(f == f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files))

    total = 0
    for f in files:
        with safe_open(out / f, framework="pt") as h:
            keys = list(h.keys())
            sizes = [h.get_tensor(k).nbytes for k in keys]
        assert all(index["weight_map"][k] == f for k in keys)
        assert sum(sizes) <= limit or len(keys) == 1, f  # only a lone oversized tensor may exceed it
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total == result.total_bytes

    # Same tensors as one unsharded file, and from_pretrained reads the sharded folder.
    stream_merge(tiny_quantized.path, adapter, tmp_path / "single")
    single = read_all(tmp_path / "single")
    assert index["weight_map"].keys() == single.keys()
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in single.items())


def test_output_dtype_is_a_cast_of_the_fp32_merge(tiny_quantized, tmp_path) -> None:
    adapter = make_adapter(tiny_quantized.path, tmp_path / "adapter")
    stream_merge(tiny_quantized.path, adapter, tmp_path / "fp32")
    stream_merge(tiny_quantized.path, adapter, tmp_path / "bf16", dtype=torch.bfloat16)
    fp32, bf16 = read_all(tmp_path / "fp32"), read_all(tmp_path / "bf16")
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, fp32[k].to(torch.bfloat16)) for k, v in bf16.items())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.fixture(scope="module")
def tied_quantized(tiny_model_dir, tmp_path_factory):
    """A tiny Llama whose output head is tied to its input embeddings, quantized like the others."""
    folder = tmp_path_factory.mktemp("tied")
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder / "model")
    for f in tiny_model_dir.glob("tokenizer*"):
        shutil.copy(f, folder / "model" / f.name)
    with torch_threads(1):
        return quantize(
            prepare_base(BaseModelConfig(name="tied", path=str(folder / "model")), folder / "cache"),
            QuantConfig(),
            folder / "cache",
        )


def test_tied_embeddings_stay_tied(tied_quantized, tmp_path) -> None:
    adapter = make_adapter(tied_quantized.path, tmp_path / "adapter")
    stream_merge(tied_quantized.path, adapter, tmp_path / "out")
    written = read_all(tmp_path / "out")
    assert "lm_head.weight" not in written
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    merged = merge_in_memory(tied_quantized.path, adapter).eval()
    ids = torch.arange(1, 33).reshape(2, 16)
    with torch.no_grad():
        assert (loaded(ids).logits - merged(ids).logits).abs().max().item() <= 1e-5


def test_an_adapter_on_a_tied_output_head_is_refused(tied_quantized, tmp_path) -> None:
    # peft itself warns about such an adapter as it builds it: the warnings this test expects, not noise.
    with pytest.warns(UserWarning) as made:
        adapter = make_adapter(tied_quantized.path, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    assert any("tie_word_embeddings=True" in str(w.message) for w in made)
    with pytest.raises(StageError, match=r"lm_head: adapted, but its weight is tied"):
        stream_merge(tied_quantized.path, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_or_foreign_adapters_are_refused_with_every_problem(tiny_quantized, tied_quantized, tmp_path):
    dora = make_adapter(tiny_quantized.path, tmp_path / "dora", use_dora=True)
    with pytest.raises(StageError, match=r"(?s)does not support: \['use_dora'\].*lora_magnitude_vector"):
        stream_merge(tiny_quantized.path, dora, tmp_path / "out")
    # An adapter of another model: module shapes differ from this base's.
    wide = make_adapter(tied_quantized.path, tmp_path / "wide")
    config = json.loads((tmp_path / "wide" / "adapter_config.json").read_text())
    (tmp_path / "wide" / "adapter_config.json").write_text(json.dumps(config | {"r": 2}))
    with pytest.raises(StageError, match=r"q_proj: lora_A \(4, 64\), lora_B \(64, 4\) do not fit r=2"):
        stream_merge(tiny_quantized.path, wide, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_output_folder(tiny_quantized, tmp_path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(StageError, match="is not empty"):
        stream_merge(tiny_quantized.path, None, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
