"""The validation benchmark runs in its CI size (the 1M-row figures are in docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "validate_throughput.py"


def test_validate_throughput_small():
    spec = importlib.util.spec_from_file_location("validate_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--rows", "2000"])
    assert result["rows"] == 2000 and result["rows_per_s"] > 0
    assert result["peak_rss_mib"] >= result["rss_before_mib"] > 0


def test_train_throughput_small():
    """The training benchmark's CPU smoke size: every variant trains and the losses agree on identical batches."""
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH.parent / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    results = module.main(["--shape", "tiny", "--seq", "32", "--batch", "2", "--steps", "2", "--warmup", "1"])
    assert [r.variant for r in results] == ["plain", "loraflow full logits", "loraflow"]
    assert all(r.tokens_per_s > 0 and len(r.losses) == 3 for r in results)
    # Same init, same batches: fp32-upcast and bf16-kept non-quantized weights differ only by rounding.
    for other in results[1:]:
        assert max(abs(a - b) for a, b in zip(results[0].losses, other.losses, strict=True)) < 0.05
