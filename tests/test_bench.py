"""The validation benchmark runs in its CI size (the 1M-row figures are in docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "validate_throughput.py"


def test_validate_throughput_small():
    spec = importlib.util.spec_from_file_location("validate_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--rows", "2000"])
    assert result["rows"] == 2000 and result["rows_per_s"] > 0
    assert result["peak_rss_mib"] >= result["rss_before_mib"] > 0
