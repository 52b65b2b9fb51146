"""The validation passes behind the validate stage: one dataset file against its contract.

Two streaming passes over the file, never the whole file in memory:

1. every row is read (loraflow.data.files), checked chunk by chunk against the contract's row
   expectations (loraflow.data.checks), and fingerprinted; then duplicates, train/eval leakage and
   repeated answers are computed from the fingerprints and checked with the table expectations;
2. the policy decides: ``fail`` stops at any failed expectation; ``quarantine`` sets the failing
   rows aside (data/quarantine.jsonl, one reason list per row) and goes on while their share is
   within the contract's ``quarantine.max_share``. The second pass writes the deterministic
   train/eval split and gathers example values for the report.

The JSON report, its HTML page (loraflow.data.report) and the quarantine file are written whether
the data passes or not: they are the evidence.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from loraflow.config import DataConfig
from loraflow.data.checks import (
    Fingerprints,
    Outcome,
    SuiteRunner,
    canonical,
    canonical_line,
    dataset_example,
    dataset_features,
)
from loraflow.data.contracts import Contract
from loraflow.data.files import Row, iter_rows
from loraflow.data.report import format_report, write_html
from loraflow.errors import DataError
from loraflow.hashing import sha256_file
from loraflow.records import Record

TOKENIZE_BATCH = 1024
CHUNK_ROWS = 50_000  # rows per GX validation: ~50 MB of records; GX costs ~0.4 s per call


# --------------------------------------------------------------------------------------------
# Typed results


class QuarantineSummary(Record):
    rows: int = Field(description="Rows set aside (or that would be, when the run stopped).")
    share: float = Field(description="Their share of all rows.")
    max_share: float = Field(description="The contract's quarantine.max_share.")
    path: str | None = Field(None, description="quarantine.jsonl, when rows were set aside.")


class TokenStats(Record):
    tokenizer: str
    max_seq_length: int
    mean: float
    p95: int
    max: int
    truncated_rows: int
    truncated_share: float
    histogram: list[dict[str, int]]


class SplitCounts(Record):
    """What the second pass wrote: kept rows, each side's rows and the digest of the kept content."""

    rows: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    digest: str = ""


class ValidationReport(Record):
    """The report the validate stage writes as JSON, and renders as text, Markdown and HTML."""

    contract: str
    contract_owner: str
    source: str
    format: str
    policy: str
    rows: int
    evaluated: int
    failed: int
    failures: list[dict[str, Any]]
    results: list[dict[str, Any]]
    not_evaluated: list[str]
    quarantine: QuarantineSummary | None
    tokens: TokenStats | None
    success: bool
    status: str = Field(description="'passed', 'passed with quarantine' or 'failed'.")
    reason: str | None
    split: dict[str, int] | None
    report_path: str
    html_path: str


class ContractViolation(DataError):
    """The dataset was read but fails its contract; ``report`` holds the failed expectations."""

    def __init__(self, report: dict[str, Any]):
        self.report = report
        super().__init__(format_report(report))

    @property
    def failures(self) -> list[dict[str, Any]]:
        return self.report["failures"]


@dataclass(frozen=True)
class Quarantine:
    """Rows failing row- or dataset-level expectations, and which of those each fails."""

    outcomes: list[Outcome]
    flags: np.ndarray  # rows x outcomes
    rows: np.ndarray  # any flag set

    @property
    def count(self) -> int:
        return int(self.rows.sum())

    def reasons(self, i: int) -> list[str]:
        return [_reason(o) for j, o in enumerate(self.outcomes) if self.flags[i, j]]


@dataclass(frozen=True)
class Outputs:
    """Where the second pass writes: the split files (only when the data passed) and the quarantine file."""

    train: Path
    eval: Path
    quarantine: Path
    write_split: bool

    def clear(self) -> None:
        """Never leave a previous attempt's split next to a new report."""
        for p in (self.train, self.eval, self.quarantine):
            p.unlink(missing_ok=True)


@dataclass(frozen=True)
class Validated:
    """The outcome of :func:`check_file`: the report as written, and the split when the data passed."""

    report: ValidationReport
    split: SplitCounts
    outputs: Outputs
    file_sha256: str


# --------------------------------------------------------------------------------------------
# The whole check


def check_file(
    source: Path,
    kind: str,
    contract: Contract,
    cfg: DataConfig,
    out: Path,
    tok: Any = None,
    max_seq_length: int | None = None,
    tokenizer_name: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> Validated:
    """Run both passes over ``source`` and write the report (JSON + HTML) and, when it passes, the split.

    Raises:
        DataError: the file has no rows, or changed while it was read.
        ContractViolation: the data fails the contract under the configured policy (reports written first).
    """
    out.mkdir(parents=True, exist_ok=True)
    outputs = Outputs(out / "train.jsonl", out / "eval.jsonl", out / "quarantine.jsonl", write_split=False)
    outputs.clear()
    file_sha = sha256_file(source)

    runner = SuiteRunner(contract, max_seq_length if tok is not None else None)
    fp, tokens = first_pass(source, kind, contract, cfg.split_seed, tok, runner, chunk_rows)
    n = len(fp)
    if n == 0:
        raise DataError(f"dataset file {source} has no rows (only blank lines); it needs at least a few")
    runner.finish_rows()
    keys = np.frombuffer(fp.key, dtype=np.float64)
    is_eval = assign_split(keys, cfg)
    features = dataset_features(fp, is_eval, ~is_eval)
    runner.check_dataset(features)

    failed = runner.failed()
    quarantine = quarantine_of(failed, n) if cfg.policy == "quarantine" else None
    reason = stop_reason(cfg, contract, failed, quarantine, n)
    outputs = Outputs(outputs.train, outputs.eval, outputs.quarantine, write_split=reason is None)
    q_rows = quarantine.rows if quarantine is not None else np.zeros(n, dtype=bool)
    in_train = train_rows(keys, is_eval, q_rows, cfg.max_train_rows)
    examples = ExampleCollector(runner.example_requests(), contract.style, features)
    split = second_pass(lambda: iter_rows(source, kind, required=contract.columns), contract.style,
                        is_eval, in_train, quarantine, examples, outputs)  # fmt: skip
    if outputs.write_split and sha256_file(source) != file_sha:
        raise DataError(f"{source} changed while it was being validated; validate it again once it is complete")
    if outputs.write_split and (split.eval_rows == 0 or split.train_rows == 0):
        reason = (
            f"after quarantine {split.train_rows} train and {split.eval_rows} held-out rows remain; "
            f"both splits need rows: fix the quarantined rows or raise data.eval_fraction"
        )
        outputs.train.unlink(missing_ok=True)
        outputs.eval.unlink(missing_ok=True)

    passed = reason is None
    q_summary = None
    if quarantine is not None:
        q_summary = QuarantineSummary(
            rows=quarantine.count,
            share=quarantine.count / max(runner.rows, 1),
            max_share=contract.quarantine_max_share,
            path=str(outputs.quarantine) if outputs.quarantine.exists() else None,
        )
    results = [o.as_dict() for o in runner.results]
    failures = [o.as_dict() for o in runner.failed()]
    report = ValidationReport(
        contract=contract.ref,
        contract_owner=contract.owner,
        source=str(source),
        format=kind,
        policy=cfg.policy,
        rows=runner.rows,
        evaluated=sum(1 for r in results if not r["skipped"]),
        failed=len(failures),
        failures=failures,
        results=results,
        not_evaluated=runner.missing_column_checks(),
        quarantine=q_summary,
        tokens=token_stats(tokens, max_seq_length, tokenizer_name) if tokens is not None else None,
        success=passed,
        status=("passed with quarantine" if q_summary and q_summary.rows else "passed") if passed else "failed",
        reason=reason,
        split={"train_rows": split.train_rows, "eval_rows": split.eval_rows} if passed else None,
        report_path=str(out / "validation_report.json"),
        html_path=str(out / "validation_report.html"),
    )
    text = json.dumps(report.model_dump(), indent=2, ensure_ascii=False, default=str)  # GX values may be numpy
    Path(report.report_path).write_text(text + "\n", encoding="utf-8")
    as_dict = json.loads(text)
    write_html(as_dict, contract, Path(report.html_path))
    if not passed:
        raise ContractViolation(as_dict)
    return Validated(report, split, outputs, file_sha)


# --------------------------------------------------------------------------------------------
# Pass 1: read, check row expectations chunk by chunk, fingerprint


def first_pass(
    source: Path, kind: str, contract: Contract, seed: int, tok: Any, runner: SuiteRunner, chunk_rows: int
) -> tuple[Fingerprints, np.ndarray | None]:
    """Fingerprints of every row and, with a tokenizer, each example's untruncated token count."""
    fp = Fingerprints()
    all_tokens = array("q") if tok is not None else None
    chunk: list[Row] = []

    def flush() -> None:
        recs = [canonical(r.record, contract.style) for r in chunk]
        start = len(fp)
        for row, rec in zip(chunk, recs, strict=True):
            fp.add(rec, contract.style, seed, row.line)
        counts = token_counts(tok, recs) if tok is not None else None
        if all_tokens is not None and counts is not None:
            all_tokens.extend(counts)
        runner.check_chunk(chunk, recs, counts, start)

    for row in iter_rows(source, kind, required=contract.columns):
        chunk.append(row)
        if len(chunk) == chunk_rows:
            flush()
            chunk = []
    if chunk:
        flush()
    return fp, (np.frombuffer(all_tokens, dtype=np.int64) if all_tokens is not None else None)


def token_counts(tok: Any, recs: list[dict[str, Any]]) -> list[int]:
    """Untruncated length of each example in the run's tokens (0 where a row cannot be templated)."""
    from jinja2 import TemplateError

    from loraflow.ml.prompts import segments, token_lengths

    counts: list[int] = []
    for i in range(0, len(recs), TOKENIZE_BATCH):  # bounded: token id lists cost ~100 bytes a token
        pieces = []
        for rec in recs[i : i + TOKENIZE_BATCH]:
            try:
                pieces.append(segments(tok, rec))
            except (TypeError, KeyError, AttributeError, ValueError, TemplateError):
                pieces.append([])  # a row with missing or non-string fields; other expectations report it
        counts += token_lengths(tok, pieces)
    return counts


# --------------------------------------------------------------------------------------------
# Split and policy


def assign_split(keys: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Deterministic is_eval mask by content hash, over all rows.

    A row goes to eval when its key is below eval_fraction, so adding or reordering rows moves no
    other row. Beyond eval_max_rows the eval rows with the largest keys go back to train. With two
    or more rows, eval holds at least one (the smallest key) and train at least one. Quarantine
    later only removes rows, so it can never move a row across the split.
    """
    n = len(keys)
    order = np.lexsort((np.arange(n), keys))
    eval_idx = order[keys[order] < cfg.eval_fraction][: cfg.eval_max_rows]
    if len(eval_idx) == 0 and n >= 2:
        eval_idx = order[:1]
    if len(eval_idx) == n and n:
        eval_idx = eval_idx[:-1]
    is_eval = np.zeros(n, dtype=bool)
    is_eval[eval_idx] = True
    return is_eval


def train_rows(keys: np.ndarray, is_eval: np.ndarray, quarantined: np.ndarray, cap: int | None) -> np.ndarray:
    """The rows trained on: not held out, not quarantined, and with ``cap`` the ones with the smallest keys."""
    idx = np.flatnonzero(~is_eval & ~quarantined)
    if cap is not None:
        idx = idx[np.lexsort((idx, keys[idx]))][:cap]
    in_train = np.zeros(len(keys), dtype=bool)
    in_train[idx] = True
    return in_train


def quarantine_of(failed: list[Outcome], n: int) -> Quarantine:
    """Rows failing row- or dataset-level expectations, and which ones each fails."""
    per_row = [o for o in failed if o.check.kind != "table" and not o.error]
    flags = np.zeros((n, len(per_row)), dtype=bool)
    for j, o in enumerate(per_row):
        flags[o.failing_rows(), j] = True
    return Quarantine(per_row, flags, flags.any(axis=1))


def stop_reason(
    cfg: DataConfig, contract: Contract, failed: list[Outcome], quarantine: Quarantine | None, n: int
) -> str | None:
    """Why the run stops under the policy, or None when it goes on."""
    if not failed:
        return None
    if quarantine is None:
        return f"policy 'fail': {len(failed)} expectation(s) failed"
    whole = [o.check.label for o in failed if o.check.kind == "table" or o.error]
    if whole:
        return f"policy 'quarantine' cannot set aside rows for {', '.join(whole)}: these concern the whole file"
    share = quarantine.count / n
    if share > contract.quarantine_max_share:
        return (
            f"policy 'quarantine' would set aside {quarantine.count} of {n} rows ({share:.2%}), over the "
            f"contract's quarantine.max_share of {contract.quarantine_max_share:.2%}"
        )
    return None


# --------------------------------------------------------------------------------------------
# Pass 2: write the split and the quarantine file, gather examples for dataset-level failures


@dataclass
class ExampleCollector:
    """Example values for the failed dataset-level expectations, gathered as the second pass meets their rows."""

    wanted: dict[int, list[Outcome]]
    style: str
    features: dict[str, np.ndarray]

    @property
    def last(self) -> int:
        return max(self.wanted, default=-1)

    def see(self, i: int, row: Row, rec: dict[str, Any]) -> None:
        for o in self.wanted.get(i, ()):
            value = dataset_example(o.check.column or "", i, rec, self.style, self.features)
            o.examples.append({"row": row.number, "line": row.line, "value": value})


def second_pass(
    rows: Callable[[], Iterator[Row]],
    style: str,
    is_eval: np.ndarray,
    in_train: np.ndarray,
    quarantine: Quarantine | None,
    examples: ExampleCollector,
    outputs: Outputs,
) -> SplitCounts:
    """Read ``rows()`` again: write the split (atomically) and the quarantine file, collect examples."""
    write_quarantine = quarantine is not None and quarantine.count > 0
    if not outputs.write_split and not examples.wanted and not write_quarantine:
        return SplitCounts()
    q_rows = quarantine.rows if quarantine is not None else np.zeros(len(is_eval), dtype=bool)
    digest = hashlib.sha256()
    counts = {"rows": 0, "train_rows": 0, "eval_rows": 0}
    files: dict[str, Any] = {}
    try:
        if outputs.write_split:
            for name, path in (("train", outputs.train), ("eval", outputs.eval)):
                files[name] = _tmp(path).open("w", encoding="utf-8", errors="backslashreplace")
        if write_quarantine:
            files["quarantine"] = outputs.quarantine.open("w", encoding="utf-8")
        for i, row in enumerate(rows()):
            if not outputs.write_split and not write_quarantine and i > examples.last:
                break
            rec = canonical(row.record, style)
            examples.see(i, row, rec)
            if q_rows[i]:
                if quarantine is not None:
                    entry = {"row": row.number, "line": row.line, "reasons": quarantine.reasons(i)}
                    entry["record"] = row.record
                    files["quarantine"].write(json.dumps(entry, ensure_ascii=True, default=str) + "\n")
                continue
            if not outputs.write_split:
                continue
            line = canonical_line(rec)
            digest.update((("\n" if counts["rows"] else "") + line).encode("utf-8", "surrogatepass"))
            counts["rows"] += 1
            side = "eval" if is_eval[i] else "train" if in_train[i] else None
            if side is not None:
                files[side].write(json.dumps(rec, ensure_ascii=False) + "\n")
                counts[f"{side}_rows"] += 1
    finally:
        for f in files.values():
            f.close()
    if outputs.write_split:
        for path in (outputs.train, outputs.eval):
            _tmp(path).replace(path)
    return SplitCounts(**counts, digest=digest.hexdigest() if outputs.write_split else "")


def _tmp(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".tmp")


def _reason(o: Outcome) -> str:
    return f"{o.check.label}: {o.check.notes}" if o.check.notes else o.check.label


# --------------------------------------------------------------------------------------------
# Report


def token_stats(tokens: np.ndarray, max_seq_length: int | None, tokenizer: str | None) -> TokenStats | None:
    if max_seq_length is None or not len(tokens):
        return None
    over = int((tokens > max_seq_length).sum())
    return TokenStats(
        tokenizer=str(tokenizer),
        max_seq_length=max_seq_length,
        mean=round(float(tokens.mean()), 1),
        p95=int(np.percentile(tokens, 95)),
        max=int(tokens.max()),
        truncated_rows=over,
        truncated_share=over / len(tokens),
        histogram=_histogram(tokens, max_seq_length),
    )


def _histogram(tokens: np.ndarray, limit: int, bins: int = 12) -> list[dict[str, int]]:
    top = max(int(tokens.max()), limit) + 1
    edges = np.linspace(0, top, bins + 1).round().astype(int)
    counts, _ = np.histogram(tokens, bins=edges)
    return [
        {"from": int(a), "to": int(b), "rows": int(c)} for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)
    ]
