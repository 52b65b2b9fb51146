"""Validation throughput: the real validate stage on N synthetic Alpaca records.

    python bench/validate_throughput.py                      # 1,000,000 rows (docs/benchmarks.md)
    python bench/validate_throughput.py --rows 20000         # CI-sized
    python bench/validate_throughput.py --rows 100000 --tokenizer DIR --max-seq-length 128

Prints rows/s of `tasks.validate.validate` (both passes, every check of instruction_v1, split
files written) and memory: the process's resident size before validating (interpreter, GX,
pandas) and its peak during validation (getrusage ru_maxrss), so the difference is what the
stage itself holds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def generate(path: Path, rows: int) -> int:
    """Unique, clean records of realistic size (~150 bytes); returns the file size in bytes."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            rec = {
                "instruction": f"Define the synthetic term number {i} as used in field {i % 97}.",
                "input": "" if i % 3 else f"Context sentence {i} for the term.",
                "output": f"A made-up concept {i} that stands for item {i * 7919 % 1000003} in a catalogue.",
            }
            f.write(json.dumps(rec) + "\n")
    return path.stat().st_size


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--tokenizer", help="model folder: also count tokens with its tokenizer")
    p.add_argument("--max-seq-length", type=int, default=128)
    args = p.parse_args(argv)

    from loraflow.config import DataConfig
    from tasks.validate import validate

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic.jsonl"
        size = generate(data, args.rows)
        import great_expectations  # noqa: F401  (imported before the baseline, as any run has it)
        import pandas  # noqa: F401

        before = rss_mib()
        start = time.perf_counter()
        out = validate(
            DataConfig(path=str(data), eval_max_rows=1000),
            Path(tmp) / "run",
            args.tokenizer,
            args.max_seq_length if args.tokenizer else None,
        )
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result = {
        "rows": out.rows,
        "file_mib": round(size / 2**20, 1),
        "seconds": round(seconds, 2),
        "rows_per_s": round(out.rows / seconds),
        "rss_before_mib": round(before),
        "peak_rss_mib": round(peak),
        "tokenizer": bool(args.tokenizer),
    }
    print(
        f"validated {result['rows']:,} rows ({result['file_mib']} MiB) in {result['seconds']} s: "
        f"{result['rows_per_s']:,} rows/s; RSS {result['rss_before_mib']} MiB before, "
        f"peak {result['peak_rss_mib']} MiB (tokenizer: {'yes' if args.tokenizer else 'no'})"
    )
    return result


if __name__ == "__main__":
    main()
