"""The validate stage: dataset file + data contract -> ValidatedData (split files, digest, reports).

    from tasks.validate import validate
    validate(cfg.data, Path("runs/demo"), tokenizer_path=base.path, max_seq_length=cfg.train.max_seq_length)

Two streaming passes over the file, never the whole file in memory:

1. every row is read (loraflow.datafiles), checked chunk by chunk against the contract's row
   expectations (loraflow.datachecks), and fingerprinted; then duplicates, train/eval leakage and
   repeated answers are computed from the fingerprints and checked with the table expectations;
2. the policy decides: ``fail`` stops at any failed expectation; ``quarantine`` sets the failing
   rows aside (data/quarantine.jsonl, one reason list per row) and goes on while their share is
   within the contract's ``quarantine.max_share``. The second pass writes the deterministic
   train/eval split and gathers example values for the report.

The JSON report, its HTML page (loraflow.datareport) and the quarantine file are written whether
the data passes or not: they are the evidence. Great Expectations, pandas and transformers are
imported lazily: the CLI imports this module for every command.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from loraflow.config import DataConfig
from loraflow.contracts import DEFAULT_CONTRACTS_DIR, Contract, available_contracts, load_contract
from loraflow.datachecks import (
    Fingerprints,
    Outcome,
    SuiteRunner,
    canonical,
    canonical_line,
    dataset_example,
    dataset_features,
)
from loraflow.datafiles import check_source, iter_rows
from loraflow.datareport import format_report, write_html
from loraflow.errors import DataError, UsageError
from loraflow.records import ValidatedData

__all__ = ["ContractViolation", "available_contracts", "load_contract", "validate", "validate_file"]

TOKENIZE_BATCH = 1024
CHUNK_ROWS = 50_000  # rows per GX validation: ~50 MB of records; GX costs ~0.4 s per call


class ContractViolation(DataError):
    """The dataset was read but fails its contract; ``report`` holds the failed expectations."""

    def __init__(self, report: dict[str, Any]):
        self.report = report
        super().__init__(format_report(report))

    @property
    def failures(self) -> list[dict[str, Any]]:
        return self.report["failures"]


def validate(
    cfg: DataConfig,
    run_dir: Path,
    tokenizer_path: str | Path | None = None,
    max_seq_length: int | None = None,
    contracts_dir: Path = DEFAULT_CONTRACTS_DIR,
    chunk_rows: int = CHUNK_ROWS,
) -> ValidatedData:
    """Check cfg.path against its contract and write the train/eval split into run_dir/data.

    With ``tokenizer_path`` (the base model's folder) and ``max_seq_length``, example lengths are
    counted in that tokenizer's tokens through the training template (loraflow.prompts).

    Raises:
        UsageError: the contract is unknown or invalid, or the path is wrong (missing, a directory,
            outside data.allowed_roots, of an unknown or unaccepted format).
        DataError: the file is empty, binary, too large or malformed (the message names the line).
        ContractViolation: the data fails the contract under the configured policy (reports written first).
    """
    if (tokenizer_path is None) != (max_seq_length is None):
        raise UsageError("give both tokenizer_path and max_seq_length to check example lengths, or neither")
    contract = load_contract(cfg.contract, contracts_dir)
    source, kind = check_source(
        Path(cfg.path), cfg.format, cfg.allowed_roots, contract.max_file_bytes, contract.meta["format"].get("accepted")
    )
    out = Path(run_dir).resolve() / "data"
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in ("train", "eval", "quarantine")}
    for p in paths.values():  # never leave a previous attempt's split next to a new report
        p.unlink(missing_ok=True)
    tok = _load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    file_sha = _file_sha256(source)

    runner = SuiteRunner(contract, max_seq_length if tok is not None else None)
    fp, tokens = _first_pass(source, kind, contract, cfg, tok, runner, chunk_rows)
    n = len(fp)
    if n == 0:
        raise DataError(f"dataset file {source} has no rows (only blank lines); it needs at least a few")
    runner.finish_rows()
    is_eval, in_train = _assign_split(np.frombuffer(fp.key, dtype=np.float64), cfg)
    features = dataset_features(fp, is_eval, in_train)
    runner.check_dataset(features)

    failed = runner.failed()
    quarantine = _quarantine_flags(failed, n) if cfg.policy == "quarantine" else None
    reason = _stop_reason(cfg, contract, failed, runner, quarantine, n)
    proceed = reason is None
    split = _second_pass(source, kind, contract, runner, features, fp, quarantine, is_eval, cfg, paths, proceed)
    if proceed and _file_sha256(source) != file_sha:
        raise DataError(f"{source} changed while it was being validated; validate it again once it is complete")
    if proceed and (split["eval_rows"] == 0 or split["train_rows"] == 0):
        reason = (
            f"after quarantine {split['train_rows']} train and {split['eval_rows']} held-out rows remain; "
            f"both splits need rows: fix the quarantined rows or raise data.eval_fraction"
        )
        proceed = False
        for p in (paths["train"], paths["eval"]):
            p.unlink(missing_ok=True)

    report = _report(contract, cfg, source, kind, runner, quarantine, tokens, max_seq_length, tokenizer_path)
    report.update(
        success=proceed,
        status=("passed with quarantine" if report["quarantine"] and report["quarantine"]["rows"] else "passed")
        if proceed
        else "failed",
        reason=reason,
        split={"train_rows": split["train_rows"], "eval_rows": split["eval_rows"]} if proceed else None,
        report_path=str(out / "validation_report.json"),
        html_path=str(out / "validation_report.html"),
    )
    if report["quarantine"] is not None:
        report["quarantine"]["path"] = str(paths["quarantine"]) if paths["quarantine"].exists() else None
    Path(report["report_path"]).write_text(
        json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
    )
    write_html(report, contract, Path(report["html_path"]))
    if not proceed:
        raise ContractViolation(report)
    return ValidatedData(
        source=str(source),
        digest=split["digest"],
        file_sha256=file_sha,
        contract=contract.ref,
        style=contract.style,
        rows=split["rows"],
        train_rows=split["train_rows"],
        eval_rows=split["eval_rows"],
        train_path=str(paths["train"]),
        eval_path=str(paths["eval"]),
        report_path=report["report_path"],
        html_report_path=report["html_path"],
        quarantined_rows=report["quarantine"]["rows"] if report["quarantine"] else 0,
        quarantine_path=report["quarantine"]["path"] if report["quarantine"] else None,
    )


def validate_file(
    path: str,
    contract: str,
    run_dir: Path,
    policy: str = "fail",
    tokenizer_path: str | None = None,
    max_seq_length: int | None = None,
    contracts_dir: Path = DEFAULT_CONTRACTS_DIR,
) -> ValidatedData:
    """`loraflow validate DATA --contract NAME`: the stage with default split settings, any path allowed."""
    cfg = DataConfig(path=str(path), contract=contract, policy=policy)  # type: ignore[arg-type]
    return validate(cfg, run_dir, tokenizer_path, max_seq_length, contracts_dir)


# --------------------------------------------------------------------------------------------
# Pass 1: read, check row expectations chunk by chunk, fingerprint


def _first_pass(
    source: Path,
    kind: str,
    contract: Contract,
    cfg: DataConfig,
    tok: Any,
    runner: SuiteRunner,
    chunk_rows: int,
) -> tuple[Fingerprints, np.ndarray | None]:
    fp = Fingerprints()
    all_tokens = array("q") if tok is not None else None
    chunk: list = []

    def flush() -> None:
        recs = [canonical(r.record, contract.style) for r in chunk]
        start = len(fp)
        for row, rec in zip(chunk, recs, strict=True):
            fp.add(rec, contract.style, cfg.split_seed, row.line)
        counts = _token_counts(tok, recs) if tok is not None else None
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


def _load_tokenizer(path: str | Path) -> Any:
    from loraflow.models import load_tokenizer

    try:
        return load_tokenizer(path)
    except OSError as e:
        raise UsageError(f"cannot load a tokenizer from {path}: {e}; pass the base model's folder") from e


def _token_counts(tok: Any, recs: list[dict[str, Any]]) -> list[int]:
    """Untruncated length of each example in the run's tokens (0 where a row cannot be templated)."""
    from jinja2 import TemplateError

    from loraflow.prompts import segments, token_lengths

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


def _assign_split(keys: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (is_eval, in_train) masks by content hash, over all rows.

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
    return is_eval, ~is_eval


def _quarantine_flags(failed: list[Outcome], n: int) -> dict[str, Any]:
    """Rows failing row- or dataset-level expectations, and which ones each fails."""
    per_row = [o for o in failed if o.check.kind != "table" and not o.error]
    flags = np.zeros((n, len(per_row)), dtype=bool)
    for j, o in enumerate(per_row):
        flags[o.failing_rows(), j] = True
    rows = flags.any(axis=1)
    return {"outcomes": per_row, "flags": flags, "rows": rows, "count": int(rows.sum())}


def _stop_reason(
    cfg: DataConfig,
    contract: Contract,
    failed: list[Outcome],
    runner: SuiteRunner,
    quarantine: dict[str, Any] | None,
    n: int,
) -> str | None:
    if not failed:
        return None
    if quarantine is None:
        return f"policy 'fail': {len(failed)} expectation(s) failed"
    whole = [o.check.label for o in failed if o.check.kind == "table" or o.error]
    if whole:
        return f"policy 'quarantine' cannot set aside rows for {', '.join(whole)}: these concern the whole file"
    share = quarantine["count"] / n
    if share > contract.quarantine_max_share:
        return (
            f"policy 'quarantine' would set aside {quarantine['count']} of {n} rows ({share:.2%}), over the "
            f"contract's quarantine.max_share of {contract.quarantine_max_share:.2%}"
        )
    return None


# --------------------------------------------------------------------------------------------
# Pass 2: write the split and the quarantine file, gather examples for dataset-level failures


def _second_pass(
    source: Path,
    kind: str,
    contract: Contract,
    runner: SuiteRunner,
    features: dict[str, np.ndarray],
    fp: Fingerprints,
    quarantine: dict[str, Any] | None,
    is_eval: np.ndarray,
    cfg: DataConfig,
    paths: dict[str, Path],
    write_split: bool,
) -> dict[str, Any]:
    wanted = runner.example_requests()
    q_rows = quarantine["rows"] if quarantine is not None else np.zeros(len(fp), dtype=bool)
    write_quarantine = quarantine is not None and quarantine["count"] > 0
    if not write_split and not wanted and not write_quarantine:
        return {"rows": 0, "train_rows": 0, "eval_rows": 0, "digest": ""}
    keys = np.frombuffer(fp.key, dtype=np.float64)
    train_idx = np.flatnonzero(~is_eval & ~q_rows)
    if cfg.max_train_rows is not None:  # the rows with the smallest keys, after quarantine
        train_idx = train_idx[np.lexsort((train_idx, keys[train_idx]))][: cfg.max_train_rows]
    in_train = np.zeros(len(fp), dtype=bool)
    in_train[train_idx] = True
    last_wanted = max(wanted, default=-1)
    digest = hashlib.sha256()
    counts = {"rows": 0, "train_rows": 0, "eval_rows": 0}
    files: dict[str, Any] = {}
    try:
        if write_split:
            for name in ("train", "eval"):
                files[name] = _tmp(paths[name]).open("w", encoding="utf-8", errors="backslashreplace")
        if write_quarantine:
            files["quarantine"] = paths["quarantine"].open("w", encoding="utf-8")
        for i, row in enumerate(iter_rows(source, kind, required=contract.columns)):
            if not write_split and not write_quarantine and i > last_wanted:
                break
            rec = canonical(row.record, contract.style)
            for o in wanted.get(i, ()):
                value = dataset_example(o.check.column or "", i, rec, contract.style, features)
                o.examples.append({"row": row.number, "line": row.line, "value": value})
            if q_rows[i]:
                if quarantine is not None:
                    reasons = [_reason(o) for j, o in enumerate(quarantine["outcomes"]) if quarantine["flags"][i, j]]
                    entry = {"row": row.number, "line": row.line, "reasons": reasons, "record": row.record}
                    files["quarantine"].write(json.dumps(entry, ensure_ascii=True, default=str) + "\n")
                continue
            if not write_split:
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
    if write_split:
        for name in ("train", "eval"):
            _tmp(paths[name]).replace(paths[name])
    return {**counts, "digest": digest.hexdigest()}


def _tmp(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".tmp")


def _reason(o: Outcome) -> str:
    return f"{o.check.label}: {o.check.notes}" if o.check.notes else o.check.label


# --------------------------------------------------------------------------------------------
# Report


def _report(
    contract: Contract,
    cfg: DataConfig,
    source: Path,
    kind: str,
    runner: SuiteRunner,
    quarantine: dict[str, Any] | None,
    tokens: np.ndarray | None,
    max_seq_length: int | None,
    tokenizer_path: str | Path | None,
) -> dict[str, Any]:
    results = [o.as_dict() for o in runner.results]
    failures = [o.as_dict() for o in runner.failed()]
    token_stats = None
    if tokens is not None and max_seq_length is not None and len(tokens):
        over = int((tokens > max_seq_length).sum())
        token_stats = {
            "tokenizer": str(tokenizer_path),
            "max_seq_length": max_seq_length,
            "mean": round(float(tokens.mean()), 1),
            "p95": int(np.percentile(tokens, 95)),
            "max": int(tokens.max()),
            "truncated_rows": over,
            "truncated_share": over / len(tokens),
            "histogram": _histogram(tokens, max_seq_length),
        }
    return {
        "contract": contract.ref,
        "contract_owner": contract.owner,
        "source": str(source),
        "format": kind,
        "policy": cfg.policy,
        "rows": runner.rows,
        "evaluated": sum(1 for r in results if not r["skipped"]),
        "failed": len(failures),
        "failures": failures,
        "results": results,
        "not_evaluated": runner.missing_column_checks(),
        "quarantine": None
        if quarantine is None
        else {
            "rows": quarantine["count"],
            "share": quarantine["count"] / max(runner.rows, 1),
            "max_share": contract.quarantine_max_share,
            "path": None,
        },
        "tokens": token_stats,
    }


def _histogram(tokens: np.ndarray, limit: int, bins: int = 12) -> list[dict[str, int]]:
    top = max(int(tokens.max()), limit) + 1
    edges = np.linspace(0, top, bins + 1).round().astype(int)
    counts, _ = np.histogram(tokens, bins=edges)
    return [
        {"from": int(a), "to": int(b), "rows": int(c)} for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)
    ]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
