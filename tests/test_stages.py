"""quantize, train, evaluate and merge called directly on a tiny Llama (hidden 64, 2 layers).

The model is quantized once per session (tests/conftest.py) and trained once per session here;
evaluate and merge reuse that adapter. Real bitsandbytes, transformers and peft throughout.
"""

from __future__ import annotations

import json
import math
import shutil
import types
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from peft import PeftModel
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from loraflow.batching import collate, micro_batches
from loraflow.config import BaseModelConfig, EvalConfig, LoraConfig, MergeConfig, QuantConfig, TrainConfig
from loraflow.errors import DataError, StageError
from loraflow.lora4bit import _apply, _fused_forward, fuse_lora_4bit
from loraflow.loss import token_loss_sum
from loraflow.models import (
    checkpoint_bytes,
    dequantize,
    disable_cpu_weight_repacking,
    load_quantized,
    load_tokenizer,
)
from loraflow.prompts import last_user_turn, prompt_text, reference
from loraflow.records import Adapter, QuantizedBase
from loraflow.streaming_merge import merge_in_memory
from tasks.evaluate import evaluate, heldout_loss, rouge_l
from tasks.merge import max_logit_diff, merge
from tasks.quantize import quantize
from tasks.train import encode_all, prepare_for_training, read_jsonl, train
from tests.conftest import make_validated_data, tiny_records, torch_threads

# Dropout off so that a saved adapter reproduces the losses seen during training exactly.
LORA = LoraConfig(dropout=0.0)
# A high constant learning rate: the loss falls visibly in 15 steps, and the state after step k
# does not depend on the total number of steps.
TRAIN = TrainConfig(
    max_steps=15,
    learning_rate=1e-2,
    lr_scheduler="constant",
    batch_size=4,
    max_seq_length=64,
    checkpoint_every=5,
    memory_profile="fast",
)
# transformers 5 renames its gradient-checkpointing API; peft and train.py still use the old names.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning"),
]
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def linear4bit(model: torch.nn.Module) -> dict[str, bnb.nn.Linear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def records_batch(tok, n: int = 4) -> dict[str, torch.Tensor]:
    return collate(encode_all(tok, tiny_records()[:n], 64), tok.pad_token_id)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def loss_curve(adapter: Adapter) -> list[float]:
    return [row["loss"] for row in json.loads(Path(adapter.loss_curve_path).read_text())]


def training_batches(tok, data, cfg: TrainConfig) -> list[dict[str, torch.Tensor]]:
    """The micro-batches train() sees, in order (grad_accum 1: one per step)."""
    stream = micro_batches(encode_all(tok, read_jsonl(data.train_path), cfg.max_seq_length), cfg.batch_size, cfg.seed)
    return [collate(next(stream), tok.pad_token_id) for _ in range(cfg.max_steps)]


def lora_on_fresh_base(base: QuantizedBase, adapter_dir: str | Path) -> torch.nn.Module:
    return PeftModel.from_pretrained(load_quantized(base.path), str(adapter_dir))


def step_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """The training loss of one micro-batch, computed the way train() does (train mode, grad on,
    the fused LoRA layers of loraflow/lora4bit.py)."""
    fuse_lora_4bit(model)
    model.train()
    loss_sum, n = token_loss_sum(model, batch)
    return loss_sum.item() / n


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Every test here on one thread (see torch_threads); session fixtures below use it too."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def trained(tiny_quantized, tiny_data, tmp_path_factory) -> Adapter:
    with torch_threads(1):
        return train(tiny_quantized, tiny_data, LORA, TRAIN, tmp_path_factory.mktemp("run"), progress=False)


@pytest.fixture(scope="session")
def tok(tiny_quantized):
    return load_tokenizer(tiny_quantized.path)


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
    again = quantize(BaseModelConfig(name="tiny-llama", path=str(tiny_model_dir)), QuantConfig(), tiny_cache_dir)
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
    again = quantize(BaseModelConfig(name="tiny-llama", path=str(tiny_model_dir)), QuantConfig(), moved)
    assert again.reused is True
    assert again.path == str(moved / "quantized" / Path(tiny_quantized.path).name)


def test_changed_quant_config_gets_its_own_cache_dir(tiny_quantized, tiny_model_dir, tiny_cache_dir) -> None:
    q = QuantConfig(quant_type="fp4", double_quant=False)
    other = quantize(BaseModelConfig(name="tiny-llama", path=str(tiny_model_dir)), q, tiny_cache_dir)
    assert other.reused is False
    assert other.path != tiny_quantized.path
    assert other.quant_hash != tiny_quantized.quant_hash
    assert Path(other.path).parent == Path(tiny_quantized.path).parent
    assert other.base.digest == tiny_quantized.base.digest
    for m in linear4bit(load_quantized(other.path)).values():
        assert m.weight.quant_state.quant_type == "fp4"
        assert m.weight.quant_state.nested is False


# --- the bitsandbytes CPU repacking workaround (DESIGN.md) ---


def grads_before_and_after_eval(base: QuantizedBase, tok, *, repack: bool):
    """LoRA gradients of one batch, then an eval-mode no-grad forward, then the same gradients again."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = prepare_for_training(load_quantized(base.path), LORA, "fast")
    if repack:  # undo the workaround: bitsandbytes' own default on an AVX512-BF16 CPU
        for m in linear4bit(model).values():
            m.support_avx512bf16_for_cpu = True
    batch = records_batch(tok)

    def grads() -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad(set_to_none=True)
        loss_sum, n = token_loss_sum(model, batch)
        (loss_sum / n).backward()
        return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(**model_inputs(batch))
    after = grads()
    repacked = [
        n for n, m in linear4bit(model).items() if getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    ]
    return before, after, repacked


def test_disable_cpu_weight_repacking_marks_every_linear4bit(tiny_quantized) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_quantized.path)
    assert disable_cpu_weight_repacking(model) == 2 * len(PROJECTIONS)
    assert all(m.support_avx512bf16_for_cpu is False for m in linear4bit(model).values())
    assert all(m.support_avx512bf16_for_cpu is False for m in linear4bit(load_quantized(tiny_quantized.path)).values())


def test_gradients_after_eval_pass_equal_gradients_without_it(tiny_quantized, tok) -> None:
    before, after, repacked = grads_before_and_after_eval(tiny_quantized, tok, repack=False)
    assert repacked == []
    assert before.keys() == after.keys()
    # lora_B starts at zero, so only lora_B has gradients on the first step: one per adapted layer.
    assert sum(bool(g.abs().sum() > 0) for g in before.values()) == 2 * len(PROJECTIONS)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-6, atol=1e-9, msg=k)


@pytest.mark.skipif(
    not has_avx512bf16(),
    reason="this CPU lacks AVX512-BF16, so bitsandbytes never repacks 4-bit weights and the bug cannot occur here",
)
@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered:UserWarning")
def test_without_the_workaround_gradients_after_eval_are_wrong(tiny_quantized, tok) -> None:
    """Proves the test above can fail: with repacking allowed, the eval pass corrupts the gradients."""
    before, after, repacked = grads_before_and_after_eval(tiny_quantized, tok, repack=True)
    assert len(repacked) == 2 * len(PROJECTIONS)
    worst = max((after[k] - before[k]).abs().max().item() for k in before)
    assert worst > 1e-3


# --- train ---


def test_train_loss_decreases(trained: Adapter) -> None:
    curve = loss_curve(trained)
    assert len(curve) == trained.steps == 15
    assert curve[-1] < 0.9 * curve[0]
    assert sum(curve[-3:]) < sum(curve[:3])
    assert trained.final_loss == curve[-1]  # log_every=1: the last window is the last step
    assert trained.train_examples == 16
    assert trained.epochs == 15 / 4
    assert trained.trained_tokens > 0


def test_adapter_is_standard_peft(trained: Adapter, tiny_quantized) -> None:
    adapter_dir = Path(trained.path)
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert (adapter_dir / "tokenizer.json").is_file()
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["r"] == LORA.r
    assert cfg["lora_alpha"] == LORA.alpha
    # 'all-linear' is resolved to the adapted modules' names (every projection of every layer).
    assert {name.rsplit(".", 1)[-1] for name in cfg["target_modules"]} == PROJECTIONS
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert len(saved) == 2 * 2 * len(PROJECTIONS)  # lora_A and lora_B per adapted layer
    assert all(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)  # trained, not the zero init

    # Loaded onto a fresh 4-bit base, every adapter tensor arrives (none silently re-initialised).
    model = lora_on_fresh_base(tiny_quantized, adapter_dir)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)
    for k, t in saved.items():
        torch.testing.assert_close(loaded[k.replace(".weight", ".default.weight")], t, rtol=0, atol=0)


def test_checkpoints_every_n_steps(trained: Adapter) -> None:
    names = [Path(c).name for c in trained.checkpoints]
    assert names == ["step-000005", "step-000010"]  # the final step goes to adapter/ instead
    for c, step in zip(trained.checkpoints, (5, 10), strict=True):
        assert (Path(c) / "adapter_config.json").is_file()
        assert (Path(c) / "adapter_model.safetensors").is_file()
        state = torch.load(Path(c) / "trainer_state.pt", weights_only=False)
        assert state["step"] == step
        assert set(state) == {"step", "optimizer", "scheduler", "torch_rng"}
        assert state["scheduler"]["last_epoch"] == step


def test_saved_adapters_reproduce_the_training_losses(trained, tiny_quantized, tiny_data, tok, tmp_path) -> None:
    """A checkpoint or final adapter, loaded onto a fresh 4-bit base, is the model that trained.

    The loss that train() recorded at step k+1 was computed by the model after k steps; a saved
    adapter from step k must give the same loss on the same batch.
    """
    curve = loss_curve(trained)
    batches = training_batches(tok, tiny_data, TRAIN)
    assert trained.trained_tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    ck10 = lora_on_fresh_base(tiny_quantized, trained.checkpoints[1])
    assert step_loss(ck10, batches[10]) == pytest.approx(curve[10], rel=1e-6)

    # A 5-step run with the same seed ends where the 15-step run was at step 5.
    short_cfg = TRAIN.model_copy(update={"max_steps": 5, "checkpoint_every": None})
    short = train(tiny_quantized, tiny_data, LORA, short_cfg, tmp_path / "short", progress=False)
    assert loss_curve(short) == curve[:5]
    final = load_file(Path(short.path) / "adapter_model.safetensors")
    ck5 = load_file(Path(trained.checkpoints[0]) / "adapter_model.safetensors")
    assert final.keys() == ck5.keys()
    assert all(torch.equal(final[k], ck5[k]) for k in final)
    model = lora_on_fresh_base(tiny_quantized, short.path)
    assert step_loss(model, batches[5]) == pytest.approx(curve[5], rel=1e-6)

    # And the adapter changes the model's logits: it is not a no-op.
    model.eval()
    with torch.no_grad():
        inputs = model_inputs(batches[0])
        tuned = model(**inputs).logits
        with model.disable_adapter():
            plain = model(**inputs).logits
        assert (tuned - plain).abs().max().item() > 1e-2


def test_same_seed_same_curve_other_seed_other_curve(trained, tiny_quantized, tiny_data, tmp_path) -> None:
    rng = torch.get_rng_state()
    again = train(tiny_quantized, tiny_data, LORA, TRAIN, tmp_path / "again", progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # seeding stays inside train()
    assert loss_curve(again) == loss_curve(trained)  # exact
    assert again.final_loss == trained.final_loss

    other_cfg = TRAIN.model_copy(update={"seed": 1, "max_steps": 5, "checkpoint_every": None})
    other = train(tiny_quantized, tiny_data, LORA, other_cfg, tmp_path / "other", progress=False)
    assert loss_curve(other) != loss_curve(trained)[:5]


@pytest.mark.parametrize(
    "update",
    [
        {"memory_profile": "balanced"},
        {"memory_profile": "lean"},
        {"memory_profile": "lean", "compile": "on"},
        {"batch_size": 2, "grad_accum": 2},
    ],
    ids=["recompute-layers", "recompute-layers-offloaded", "compiled-layers-offloaded", "grad-accum"],
)
def test_equivalent_settings_give_the_same_curve(trained, tiny_quantized, tiny_data, tmp_path, update) -> None:
    """Recomputing activations (with the layer inputs offloaded or not), compiling the layers, or
    splitting a batch of 4 into 2 x 2 token-weighted micro-batches, changes how a step is computed
    but not what it computes."""
    cfg = TRAIN.model_copy(update={"max_steps": 5, "checkpoint_every": None, **update})
    other = train(tiny_quantized, tiny_data, LORA, cfg, tmp_path / "run", progress=False)
    # bf16 compute: compiled kernels keep fused intermediates in fp32, eager ones round each to bf16
    rel = 1e-3 if update.get("compile") == "on" else 1e-4
    assert loss_curve(other) == pytest.approx(loss_curve(trained)[:5], rel=rel)


def test_packed_training_fills_rows_with_real_tokens(trained, tiny_quantized, tiny_data, tmp_path) -> None:
    """With packing, a step of 3 rows of at most 64 tokens holds two ~25-token examples a row: more real
    tokens than a step of 4 padded examples, and the loss still falls."""
    cfg = TRAIN.model_copy(update={"packing": True, "batch_size": 3, "checkpoint_every": None})
    packed = train(tiny_quantized, tiny_data, LORA, cfg, tmp_path / "packed", progress=False)
    curve = loss_curve(packed)
    assert len(curve) == packed.steps == 15
    assert sum(curve[-3:]) < sum(curve[:3])
    assert packed.trained_tokens > trained.trained_tokens


@pytest.mark.parametrize(
    ("rows", "max_seq_length", "kept"),
    [(tiny_records()[:2], 64, 2), (tiny_records(), 8, 0)],
    ids=["too-few-rows", "all-responses-truncated"],
)
def test_too_few_examples_is_a_data_error(tiny_quantized, tmp_path, rows, max_seq_length, kept) -> None:
    data = make_validated_data(tmp_path / "data", rows, rows[:1])
    cfg = TRAIN.model_copy(update={"max_seq_length": max_seq_length})
    with pytest.raises(DataError, match=f"only {kept} training examples .* fewer than one batch of 4"):
        train(tiny_quantized, data, LORA, cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "adapter").exists()


# --- evaluate ---

EVAL = EvalConfig(batch_size=4, max_new_tokens=8, generation_rows=3)


@pytest.fixture(scope="session")
def evaluated(trained, tiny_quantized, tiny_data, tmp_path_factory):
    with torch_threads(1):
        return evaluate(tiny_quantized, trained, tiny_data, EVAL, TRAIN.max_seq_length, tmp_path_factory.mktemp("eval"))


def test_evaluate_reports_base_and_finetuned(evaluated, tiny_data, tiny_quantized, tok) -> None:
    records = read_jsonl(tiny_data.eval_path)
    response_tokens = sum(e.label_tokens for e in encode_all(tok, records, TRAIN.max_seq_length))
    for m in (evaluated.base, evaluated.finetuned):
        assert m.tokens == response_tokens
        assert m.generated == 3
        assert m.perplexity == math.exp(m.loss)
        assert 0.0 <= m.rouge_l <= 1.0
    # The held-out rows repeat training rows, so the adapter must help on both metrics.
    assert evaluated.finetuned.loss < evaluated.base.loss
    assert evaluated.improved
    # "base" is the same model with the adapter switched off: it scores as the plain 4-bit model.
    plain = load_quantized(tiny_quantized.path, cpu_repack=True).eval()
    loss, tokens = heldout_loss(plain, tok, records, TRAIN.max_seq_length, EVAL.batch_size)
    assert tokens == response_tokens
    assert evaluated.base.loss == pytest.approx(loss, rel=1e-6)


def test_evaluate_writes_one_sample_per_generation_row(evaluated, tiny_data) -> None:
    rows = [json.loads(line) for line in Path(evaluated.samples_path).read_text().splitlines()]
    records = read_jsonl(tiny_data.eval_path)[:3]
    assert len(rows) == EVAL.generation_rows
    for row, rec in zip(rows, records, strict=True):
        assert set(row) == {"prompt", "reference", "base", "finetuned", "rouge_l_base", "rouge_l_finetuned"}
        assert row["prompt"] == last_user_turn(rec)
        assert row["reference"] == reference(rec)
        assert row["rouge_l_base"] == rouge_l([row["base"]], [row["reference"]])[0]
        assert row["rouge_l_finetuned"] == rouge_l([row["finetuned"]], [row["reference"]])[0]
    for name in ("base", "finetuned"):
        mean = sum(r[f"rouge_l_{name}"] for r in rows) / len(rows)
        assert getattr(evaluated, name).rouge_l == pytest.approx(mean, rel=1e-12)


def test_rouge_l_helper() -> None:
    assert rouge_l(["Hello, Ann! Nice to meet you."], ["Hello, Ann! Nice to meet you."]) == [1.0]
    assert rouge_l(["apple banana"], ["cherry date"]) == [0.0]
    assert rouge_l(["the cat sat", "a b"], ["the cat sat", "a c"]) == [1.0, 0.5]
    with pytest.raises(ValueError):
        rouge_l(["a"], ["a", "b"])


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


# --- the chunked response-token loss ---


@pytest.mark.parametrize("chunk_tokens", [1, 3, 1024])
def test_chunked_loss_equals_full_logits_loss_and_gradients(tiny_quantized, tok, chunk_tokens) -> None:
    """The output head on labelled positions only, chunk by chunk with recomputation, gives the loss
    and the LoRA gradients of the reference path through the full logits."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = prepare_for_training(load_quantized(tiny_quantized.path), LORA, "fast")
    model.train()
    batch = records_batch(tok)

    def loss_and_grads(chunk):
        model.zero_grad(set_to_none=True)
        loss_sum, n = token_loss_sum(model, batch, chunk_tokens=chunk)
        (loss_sum / n).backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        return loss_sum.item(), n, grads

    ref_loss, ref_n, ref_grads = loss_and_grads(None)
    loss, n, grads = loss_and_grads(chunk_tokens)
    assert n == ref_n > chunk_tokens or chunk_tokens == 1024
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    # The head runs in bf16 on both paths; they round the logits' gradient at different points
    # (before vs after the 1/n scale), so compare each tensor as a whole, at bf16 precision.
    # (lora_A's gradients are exactly zero at the first step: lora_B starts at zero.)
    nonzero = [k for k in ref_grads if ref_grads[k].norm() > 0]
    assert nonzero and all(grads[k].norm() == 0 for k in ref_grads if k not in nonzero)
    for k in nonzero:
        error = (grads[k] - ref_grads[k]).norm() / ref_grads[k].norm()
        assert error < 1e-2, f"{k}: relative gradient error {error:.2e}"


def fused_vs_peft(path: str, device: str) -> tuple[int, float, float, dict[str, float]]:
    """Loss and LoRA gradients of the same adapter with peft's LoRA layers and with the fused ones
    (loraflow/lora4bit.py), the whole model computing in fp32: (layers fused, loss, loss, max
    relative gradient error per tensor)."""
    results = []
    for fused in (False, True):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = load_quantized(path, device=device, compute_dtype="float32")
            model = prepare_for_training(model, LORA, "balanced", fused=fused)
            for name, p in model.named_parameters():
                if "lora_B" in name:  # a trained-looking adapter: B starts at zero
                    torch.nn.init.normal_(p, std=0.05)
        ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        with OperatorCalls() as calls:
            loss_sum, n = token_loss_sum(model, batch)
        (loss_sum / n).backward()
        grads = {k: p.grad.detach().float().cpu() for k, p in model.named_parameters() if p.requires_grad}
        results.append((loss_sum.item(), grads))
    (ref_loss, ref), (loss, grads) = results
    errors = {k: ((grads[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref}
    fused = sum(isinstance(m.forward, types.MethodType) and m.forward.__func__ is _fused_forward
                for m in model.modules())  # fmt: skip
    return fused, sorted(calls.group_sizes), ref_loss, loss, errors


class OperatorCalls(TorchDispatchMode):
    """Records the number of projections in each call of the fused operator."""

    def __init__(self) -> None:
        super().__init__()
        self.group_sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.loraflow.lora_nf4.default:
            self.group_sizes.append(len(args[1]))
        return func(*args, **(kwargs or {}))


def test_fused_lora_layers_compute_what_peft_computes(tiny_quantized) -> None:
    """In fp32 the fused LoRA-on-4-bit operator gives peft's loss and gradients (to rounding): the
    base product is bitsandbytes' own, the LoRA terms and the backward are written out by hand.
    The projections that read one input (q/k/v, gate/up) go through one operator call."""
    fused, group_sizes, ref_loss, loss, errors = fused_vs_peft(tiny_quantized.path, "cpu")
    assert fused == 2 * 7  # every projection of both layers
    assert group_sizes == [1, 1, 1, 1, 2, 2, 3, 3]  # per layer: q/k/v, o, gate/up and down
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("names", [["down_proj"], ["gate_proj", "up_proj"]])
def test_fused_lora_dropout_is_the_reference_dropout_with_the_same_mask(tiny_quantized, names) -> None:
    """With dropout, the operator's outputs and their gradients for x, A and B are those of
    x @ W_i.T + s_i * ((x * mask_i / (1 - p)) @ A_i.T) @ B_i.T, with the keep-masks (one per
    projection of a group) drawn from the same seed."""
    model = load_quantized(tiny_quantized.path, compute_dtype="float32")
    bases = [getattr(model.model.layers[0].mlp, name) for name in names]
    ws = []
    for base in bases:
        base.weight.quant_state.dtype = torch.float32  # the backward's dequantization at full precision too
        ws.append(bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, ws[0].shape[1], generator=g, requires_grad=True)
    a = [torch.randn(4, w.shape[1], generator=g, requires_grad=True) for w in ws]
    b = [torch.randn(w.shape[0], 4, generator=g, requires_grad=True) for w in ws]
    upstream = [torch.randn(6, w.shape[0], generator=g) for w in ws]
    p, s = 0.3, [0.5, 2.0][: len(ws)]
    leaves = [x, *a, *b]

    def run(fn):
        for t in leaves:
            t.grad = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            ys = fn()
        torch.autograd.backward(ys, upstream)
        return [y.detach() for y in ys], [t.grad.clone() for t in leaves]

    def reference():
        masks = torch.empty((len(ws), *x.shape), dtype=torch.bool).bernoulli_(1 - p)
        terms = zip(ws, s, masks, a, b, strict=True)
        return [x @ w.T + si * ((x * m / (1 - p)) @ ai.T) @ bi.T for w, si, m, ai, bi in terms]

    ys, grads = run(lambda: _apply(x, bases, a, b, s, p))
    ys_ref, grads_ref = run(reference)
    assert not torch.equal(ys[0], run(lambda: _apply(x, bases, a, b, s, 0.0))[0][0])  # dropout did something
    for got, want in zip(ys + grads, ys_ref + grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_cpu_without_bf16_instructions_computes_in_fp32(tiny_quantized, monkeypatch) -> None:
    """bf16 matrix products on a CPU without AVX512-BF16 take a slow generic path (131 s for one
    demo step on an AVX2 EPYC, loraflow/models.py): there a bf16 model loads in fp32; elsewhere,
    and for an explicit compute_dtype, as saved."""
    import bitsandbytes.functional

    from loraflow.models import cpu_compute_dtype

    for has_bf16, expected in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda v=has_bf16: v)
        assert cpu_compute_dtype(torch.float32) is None
        model = load_quantized(tiny_quantized.path, device="cpu")
        layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
        assert model.get_input_embeddings().weight.dtype == expected
        assert layer.compute_dtype == expected
    explicit = load_quantized(tiny_quantized.path, device="cpu", compute_dtype="bfloat16")
    assert explicit.get_input_embeddings().weight.dtype == torch.bfloat16
