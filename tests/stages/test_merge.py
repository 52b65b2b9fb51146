"""The merge stage: the merged model matches 4-bit base + adapter; over tolerance nothing is saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loraflow.config import MergeConfig
from loraflow.errors import StageError
from loraflow.ml.examples import read_jsonl
from loraflow.ml.merge import max_logit_diff, merge_in_memory
from loraflow.ml.models import (
    dequantize,
    load_quantized,
)
from loraflow.ml.prompts import prompt_text, reference
from tasks.merge import merge
from tests.conftest import (
    linear4bit,
    torch_threads,
)

# --- merge ---


@pytest.fixture(scope="session")
def merged(trained, tiny_quantized, tiny_data, tmp_path_factory):
    with torch_threads(1):
        return merge(tiny_quantized, trained, tiny_data, MergeConfig(), tmp_path_factory.mktemp("merge"))


def eval_batch(tok, data) -> dict[str, torch.Tensor]:
    """The held-out prompts + references, tokenized the way merge() checks them."""
    texts = [prompt_text(tok, r) + reference(r) for r in read_jsonl(data.eval_path)]
    return dict(tok(texts, return_tensors="pt", padding=True, add_special_tokens=False))


def test_merge_matches_4bit_base_plus_adapter(merged) -> None:
    assert merged.dtype == "float32"
    assert merged.tolerance == MergeConfig().tolerance
    assert 0.0 <= merged.max_abs_logit_diff < 1e-4


def test_merged_dir_is_a_plain_hf_model(merged, trained, tiny_quantized, tiny_data, tok) -> None:
    out = Path(merged.path)
    assert out.name == "merged"
    assert not (out.parent / ".merged-tmp").exists()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (out / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert linear4bit(loaded) == {}
    assert all(p.dtype == torch.float32 for p in loaded.parameters())

    batch = eval_batch(tok, tiny_data)
    in_memory = merge_in_memory(tiny_quantized.path, trained.path).eval()
    assert max_logit_diff(loaded, in_memory, batch) <= 1e-6
    reference_model = PeftModel.from_pretrained(
        load_quantized(tiny_quantized.path, compute_dtype="float32"), trained.path
    ).eval()
    assert max_logit_diff(loaded, reference_model, batch) < 1e-4
    # ... and it is not just the base: the adapter is folded in.
    plain_base = dequantize(load_quantized(tiny_quantized.path), torch.float32).eval()
    assert max_logit_diff(loaded, plain_base, batch) > 1e-2


def test_merge_over_tolerance_raises_and_saves_nothing(merged, trained, tiny_quantized, tiny_data, tmp_path) -> None:
    adapter = trained
    if merged.max_abs_logit_diff == 0.0:
        # Bit-exact merge on this machine: blow the adapter up so that fp32 rounding shows.
        corrupt = tmp_path / "corrupt-adapter"
        corrupt.mkdir()
        for f in Path(trained.path).iterdir():
            (corrupt / f.name).write_bytes(f.read_bytes())
        tensors = load_file(corrupt / "adapter_model.safetensors")
        from safetensors.torch import save_file

        save_file({k: v * 1e4 for k, v in tensors.items()}, corrupt / "adapter_model.safetensors")
        adapter = trained.model_copy(update={"path": str(corrupt)})
    run_dir = tmp_path / "run"
    with pytest.raises(StageError, match=r"merge check failed: .* \(tolerance merge\.tolerance=1e-12\)"):
        merge(tiny_quantized, adapter, tiny_data, MergeConfig(tolerance=1e-12), run_dir)
    assert not (run_dir / "merged").exists()
    assert not (run_dir / ".merged-tmp").exists()
