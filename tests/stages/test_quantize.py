"""The quantize stage on the tiny Llama: NF4 + double quantization, the cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import bitsandbytes as bnb
import torch

from loraflow.config import BaseModelConfig, QuantConfig
from loraflow.ml.models import (
    checkpoint_bytes,
    load_quantized,
    prepare_base,
)
from loraflow.records import QuantizedBase
from tasks.quantize import quantize
from tests.conftest import (
    PROJECTIONS,
    linear4bit,
)

# --- quantize ---


def test_quantize_writes_nf4_double_quant_linear4bit(tiny_quantized: QuantizedBase, tiny_model_dir: Path) -> None:
    assert tiny_quantized.reused is False
    assert tiny_quantized.compute_dtype == "bfloat16"
    model = load_quantized(tiny_quantized.path)
    layers = linear4bit(model)
    assert {n.rsplit(".", 1)[-1] for n in layers} == PROJECTIONS
    assert len(layers) == 2 * len(PROJECTIONS)  # two decoder layers; lm_head stays full precision
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    for m in layers.values():
        qs = m.weight.quant_state
        assert m.weight.dtype == torch.uint8
        assert qs.quant_type == "nf4"
        assert qs.nested is True  # double quantization: the absmax constants are quantized too
        assert qs.dtype == torch.bfloat16  # saved; a CPU without bf16 runs it in fp32 (cpu_compute_dtype)
    qc = json.loads((Path(tiny_quantized.path) / "config.json").read_text())["quantization_config"]
    assert qc["load_in_4bit"] is True
    assert qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] is True
    assert qc["bnb_4bit_compute_dtype"] == "bfloat16"
    assert tiny_quantized.bytes_before == checkpoint_bytes(tiny_model_dir)
    assert 0 < tiny_quantized.bytes_after < tiny_quantized.bytes_before
    assert (Path(tiny_quantized.path) / "tokenizer.json").is_file()


def test_quantize_reuses_cached_checkpoint(tiny_quantized, tiny_model_dir, tiny_cache_dir) -> None:
    record = Path(tiny_quantized.path) / "quantized.json"
    before = record.read_bytes()
    again = quantize(
        prepare_base(BaseModelConfig(name="tiny-llama", path=str(tiny_model_dir)), tiny_cache_dir),
        QuantConfig(),
        tiny_cache_dir,
    )
    assert again.reused is True
    assert again.path == tiny_quantized.path
    assert again.model_dump(exclude={"reused", "seconds"}) == tiny_quantized.model_dump(exclude={"reused", "seconds"})
    assert record.read_bytes() == before  # not rewritten
    assert sorted(p.name for p in (tiny_cache_dir / "quantized").iterdir() if p.name.startswith(".")) == []


def test_reused_checkpoint_path_points_into_the_cache_it_was_found_in(
    tiny_quantized, tiny_model_dir, tiny_cache_dir, tmp_path
) -> None:
    moved = tmp_path / "moved-cache"
    shutil.copytree(tiny_cache_dir, moved)
    again = quantize(
        prepare_base(BaseModelConfig(name="tiny-llama", path=str(tiny_model_dir)), moved), QuantConfig(), moved
    )
    assert again.reused is True
    assert again.path == str(moved / "quantized" / Path(tiny_quantized.path).name)


def test_changed_quant_config_gets_its_own_cache_dir(tiny_quantized, tiny_model_dir, tiny_cache_dir) -> None:
    q = QuantConfig(quant_type="fp4", double_quant=False)
    other = quantize(
        prepare_base(BaseModelConfig(name="tiny-llama", path=str(tiny_model_dir)), tiny_cache_dir), q, tiny_cache_dir
    )
    assert other.reused is False
    assert other.path != tiny_quantized.path
    assert other.quant_hash != tiny_quantized.quant_hash
    assert Path(other.path).parent == Path(tiny_quantized.path).parent
    assert other.base.digest == tiny_quantized.base.digest
    for m in linear4bit(load_quantized(other.path)).values():
        assert m.weight.quant_state.quant_type == "fp4"
        assert m.weight.quant_state.nested is False
