"""The validate stage: dataset file + data contract -> ValidatedData (split files, digest, report).

    from tasks.validate import validate_file
    validate_file("data/wordnet_definitions.jsonl", "instruction_v1", Path("runs/demo"))

A contract is a folder in data_contracts/ with `contract.yaml` (name, semver version, style,
documented columns and thresholds) and `suite.json` (a Great Expectations 1.x ExpectationSuite).
The stage reads the file with Hugging Face `datasets`, runs the suite on a pandas frame, writes
`data/validation_report.json` (pass or fail) and, on success, a deterministic train/eval split
as JSONL. Great Expectations and `datasets` are imported lazily: they take seconds to import
and the CLI imports this module for every command.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraflow.config import DataConfig
from loraflow.errors import DataError, UsageError
from loraflow.records import ValidatedData

DEFAULT_CONTRACTS_DIR = Path(__file__).resolve().parents[1] / "data_contracts"

# Columns each style hands to training, in the order they are written.
STYLE_COLUMNS = {"alpaca": ("instruction", "input", "output"), "chat": ("messages",)}
SEMVER_RE = re.compile(r"^\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?$")
FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
MAX_EXAMPLES = 5


class ContractViolation(DataError):
    """The dataset was read but fails its contract; ``report`` holds the failed expectations."""

    def __init__(self, report: dict[str, Any]):
        self.report = report
        super().__init__(format_report(report))

    @property
    def failures(self) -> list[dict[str, Any]]:
        return self.report["failures"]


# --------------------------------------------------------------------------------------------
# Contracts


@dataclass(frozen=True)
class Contract:
    """A loaded data contract: its metadata and its Great Expectations suite."""

    name: str
    version: str
    style: str
    path: Path
    meta: dict[str, Any] = field(repr=False)
    suite: Any = field(repr=False)  # great_expectations.ExpectationSuite

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def available_contracts(contracts_dir: Path = DEFAULT_CONTRACTS_DIR) -> list[str]:
    """Names of the contract folders (those holding a contract.yaml)."""
    if not contracts_dir.is_dir():
        return []
    return sorted(p.parent.name for p in contracts_dir.glob("*/contract.yaml"))


def load_contract(name: str, contracts_dir: Path = DEFAULT_CONTRACTS_DIR) -> Contract:
    """Load and check a contract; raise UsageError if it is missing, invalid or lost expectations."""
    folder = contracts_dir / name
    meta_path, suite_path = folder / "contract.yaml", folder / "suite.json"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or not meta_path.is_file():
        names = ", ".join(available_contracts(contracts_dir)) or "none"
        raise UsageError(f"unknown data contract {name!r} in {contracts_dir}; available: {names}")
    try:
        meta = yaml.safe_load(meta_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"contract {meta_path} is not readable YAML: {e}") from e
    problems = _check_meta(meta, name)
    if problems:
        raise UsageError(f"contract {meta_path} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))
    if meta.get("suite", "suite.json") != "suite.json" or not suite_path.is_file():
        raise UsageError(f"contract {name!r} has no expectation suite at {suite_path}")
    try:
        suite_json = json.loads(suite_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"expectation suite {suite_path} is not valid JSON: {e}") from e
    suite = _build_suite(suite_json, suite_path)
    return Contract(name=name, version=str(meta["version"]), style=meta["style"], path=folder, meta=meta, suite=suite)


def _check_meta(meta: Any, name: str) -> list[str]:
    if not isinstance(meta, dict):
        return ["contract.yaml must hold a mapping"]
    problems = []
    if meta.get("name") != name:
        problems.append(f"name: {meta.get('name')!r} does not match its folder {name!r}")
    if not SEMVER_RE.match(str(meta.get("version", ""))):
        problems.append(f"version: {meta.get('version')!r} is not a semver string like '1.0.0' (quote it in YAML)")
    if meta.get("style") not in STYLE_COLUMNS:
        problems.append(f"style: {meta.get('style')!r} is not one of {sorted(STYLE_COLUMNS)}")
    if not isinstance(meta.get("columns"), dict) or not meta["columns"]:
        problems.append("columns: must map each column to its description")
    return problems


def _build_suite(suite_json: Any, suite_path: Path) -> Any:
    import great_expectations as gx
    from great_expectations.exceptions import ExpectationNotFoundError
    from great_expectations.expectations.registry import get_expectation_impl

    if not isinstance(suite_json, dict) or not isinstance(suite_json.get("expectations"), list):
        raise UsageError(f"expectation suite {suite_path} must be an object with an 'expectations' list")
    declared = [e.get("type") if isinstance(e, dict) else None for e in suite_json["expectations"]]
    # GX 1.x drops an expectation it does not know with only a log line; refuse such a suite
    # before GX sees it, so a typo can never silently weaken a contract.
    unknown = []
    for t in declared:
        try:
            get_expectation_impl(t)
        except (ExpectationNotFoundError, TypeError, AttributeError):
            unknown.append(repr(t))
    if unknown:
        raise UsageError(
            f"expectation suite {suite_path} uses unknown expectation type(s) {', '.join(unknown)} "
            f"(great_expectations {gx.__version__}); fix the type names so every check runs"
        )
    try:
        suite = gx.ExpectationSuite(**suite_json)
    except Exception as e:  # GX raises pydantic v1/v2 and its own errors for bad kwargs
        raise UsageError(f"expectation suite {suite_path} is invalid: {e}") from e
    loaded = [e.expectation_type for e in suite.expectations]
    if sorted(loaded) != sorted(declared):
        raise UsageError(
            f"expectation suite {suite_path} declares {len(declared)} expectations but only "
            f"{len(loaded)} loaded; check the ones missing from {sorted(loaded)}"
        )
    return suite


# --------------------------------------------------------------------------------------------
# Reading


def _resolve_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise DataError(
            f"cannot tell the format of {path} from its extension {path.suffix!r}; "
            f"rename it to .jsonl/.json/.csv/.parquet or set data.format"
        )
    return found


def _precheck_jsonl(path: Path) -> None:
    """Name the first bad line: `datasets` only says 'An error occurred while generating the dataset'."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(
                    f"{path} line {lineno} is not valid JSON ({e}); a JSONL file holds one JSON object "
                    f"per line: fix or remove that line"
                ) from e
            if not isinstance(obj, dict):
                raise DataError(
                    f"{path} line {lineno} holds a JSON {type(obj).__name__}, not an object; a JSONL file "
                    f'holds one object per line, e.g. {{"instruction": ..., "input": ..., "output": ...}}'
                )


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide `datasets` progress bars for this read only, restoring the caller's setting."""
    import datasets

    was_disabled = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def read_rows(path: Path, fmt: str, cache_dir: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL/JSON/CSV/Parquet file as dicts, read with Hugging Face `datasets`."""
    if not path.exists():
        raise DataError(
            f"dataset file {path} does not exist; check data.path (relative paths resolve against the config file)"
        )
    if path.is_dir():
        raise DataError(f"dataset path {path} is a directory; point data.path at one JSONL, JSON, CSV or Parquet file")
    kind = _resolve_format(path, fmt)
    try:
        size = path.stat().st_size
        empty = size == 0 or (kind != "parquet" and size < 1 << 16 and not path.read_bytes().strip())
    except OSError as e:
        raise DataError(f"cannot read dataset file {path}: {e.strerror}; check its permissions") from e
    if empty:
        raise DataError(f"dataset file {path} is empty; it needs at least a few rows (see the contract's min_rows)")
    if kind == "jsonl":
        _precheck_jsonl(path)
    import datasets

    builder = "json" if kind in ("jsonl", "json") else kind
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache_dir))
            rows = ds.to_list()
    except Exception as e:  # datasets/pyarrow raise many types for one cause: an unreadable file
        cause: BaseException = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise DataError(
            f"cannot read {path} as {kind}: {detail}. Check that the file is valid {kind.upper()} "
            f"(or set data.format if the extension is misleading)"
        ) from e
    finally:
        # The Arrow cache is a copy of the data: not worth keeping in the run directory.
        shutil.rmtree(cache_dir, ignore_errors=True)
    if not rows:
        raise DataError(f"dataset file {path} has no rows; it needs at least a few (see the contract's min_rows)")
    return rows


# --------------------------------------------------------------------------------------------
# Checking


def _chat_columns(messages: Any) -> dict[str, Any]:
    """Flat columns that the chat suite checks (GX checks columns, not nested lists)."""
    if not isinstance(messages, list):
        return {"chat_roles": "", "chat_min_content_chars": 0, "chat_total_chars": 0, "chat_key": None}
    turns = [_turn(m) for m in messages]
    contents = [t["content"] if isinstance(t["content"], str) else "" for t in turns]
    return {
        "chat_roles": ",".join(str(t["role"]) for t in turns),
        "chat_min_content_chars": min((len(c.strip()) for c in contents), default=0),
        "chat_total_chars": sum(len(c) for c in contents),
        "chat_key": json.dumps(turns, sort_keys=True, ensure_ascii=False),
    }


def _turn(m: Any) -> dict[str, Any]:
    return (
        {"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else {"role": "?", "content": None}
    )


def _frame(rows: list[dict[str, Any]], style: str) -> Any:
    import pandas as pd

    # object dtype: GX then checks each value's Python type (pandas 3 would infer a 'str' dtype
    # that GX's type_list check does not recognise).
    df = pd.DataFrame.from_records(rows).astype(object)
    if style == "chat" and "messages" in df.columns:
        derived = pd.DataFrame.from_records([_chat_columns(r.get("messages")) for r in rows], index=df.index)
        df = pd.concat([df.drop(columns=[c for c in derived.columns if c in df.columns]), derived], axis=1)
    return df


def check_rows(rows: list[dict[str, Any]], contract: Contract, source: str) -> dict[str, Any]:
    """Run the contract's suite on the rows; return a JSON-serialisable report (never raises on failure)."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}  # TQDM_DISABLE does not reach GX
    batch = (
        context.data_sources.add_pandas("loraflow")
        .add_dataframe_asset(contract.name)
        .add_batch_definition_whole_dataframe("all_rows")
        .get_batch(batch_parameters={"dataframe": _frame(rows, contract.style)})
    )
    result = batch.validate(contract.suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20})
    failures, missing_columns = [], set()
    for r in result.results:
        if not r.success and r.expectation_config.type == "expect_column_to_exist":
            missing_columns.add(r.expectation_config.kwargs.get("column"))
    not_evaluated = []
    for r in result.results:
        if r.success:
            continue
        item = _failure(r)
        if item["column"] in missing_columns and item["expectation"] != "expect_column_to_exist":
            not_evaluated.append(item["expectation"] + f" ({item['column']})")
            continue
        failures.append(item)
    return {
        "contract": contract.ref,
        "source": source,
        "success": bool(result.success),
        "rows": len(rows),
        "evaluated": len(result.results),
        "failed": len(failures) + len(not_evaluated),
        "failures": failures,
        "not_evaluated": not_evaluated,
    }


def _failure(r: Any) -> dict[str, Any]:
    cfg = r.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
    column = kwargs.pop("column", None) or ", ".join(kwargs.pop("column_list", []) or []) or "(table)"
    res = r.result or {}
    error = _exception_message(r.exception_info)
    if cfg.type == "expect_column_to_exist":
        observed = "column missing"
    elif error:
        observed = f"error: {error}"
    elif "unexpected_count" in res:
        observed = f"{res['unexpected_count']} of {res.get('element_count', '?')} rows"
    else:
        observed = res.get("observed_value")
    examples: list[Any] = []
    for v in res.get("partial_unexpected_list") or []:
        shown = _short(v)
        if shown not in examples:
            examples.append(shown)
        if len(examples) == MAX_EXAMPLES:
            break
    return {
        "expectation": cfg.type,
        "column": column,
        "expected": kwargs,
        "observed": observed,
        "unexpected_count": res.get("unexpected_count"),
        "unexpected_percent": res.get("unexpected_percent"),
        "examples": examples,
    }


def _exception_message(info: Any) -> str | None:
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return info.get("exception_message")
    for v in info.values():
        if isinstance(v, dict) and v.get("raised_exception"):
            return v.get("exception_message")
    return None


def _short(value: Any, limit: int = 80) -> Any:
    if isinstance(value, float) and math.isnan(value):  # pandas' null; NaN is not valid JSON
        return None
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}... ({len(value)} chars)"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return _short(json.dumps(value, ensure_ascii=False, default=str), limit)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_report(report: dict[str, Any]) -> str:
    """The report as a few lines for a terminal: a header and one table row per failed expectation."""
    head = f"{report['source']} against {report['contract']} ({report['rows']} rows): "
    if report["success"]:
        return head + f"passed all {report['evaluated']} expectations"
    lines = [head + f"{report['failed']} of {report['evaluated']} expectations failed"]
    table = [("expectation", "column", "expected", "observed", "examples")]
    for f in report["failures"]:
        expected = ", ".join(f"{k}={v}" for k, v in f["expected"].items()) or "-"
        examples = ", ".join(_clip(repr(e), 40) for e in f["examples"]) or "-"
        table.append((f["expectation"], f["column"], expected, str(f["observed"]), examples))
    widths = [min(max(len(row[i]) for row in table), 48) for i in range(4)]
    for row in table:
        cells = [_clip(row[i], widths[i]).ljust(widths[i]) for i in range(4)] + [_clip(row[4], 100)]
        lines.append("  " + "  ".join(cells).rstrip())
    if report["not_evaluated"]:
        lines.append(f"  not evaluated (column missing): {', '.join(report['not_evaluated'])}")
    where = f"; full report: {report['report_path']}" if report.get("report_path") else ""
    lines.append(f"Fix these rows (or choose another contract){where}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Canonical records, digest and split


def canonical_records(rows: list[dict[str, Any]], style: str) -> list[dict[str, Any]]:
    """The columns a style trains on, normalised (a null alpaca input becomes '')."""
    if style == "chat":
        return [{"messages": [_turn(m) for m in r["messages"]]} for r in rows]
    return [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]} for r in rows]


def _canonical_line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def content_digest(records: list[dict[str, Any]]) -> str:
    """sha256 of the rows as sorted-key JSON, newline-joined in file order (independent of file format)."""
    return hashlib.sha256("\n".join(_canonical_line(r) for r in records).encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _row_key(record: dict[str, Any], seed: int) -> float:
    """A uniform number in [0, 1) from the row's content and the seed: independent of row position."""
    h = hashlib.sha256(f"{seed}\n{_canonical_line(record)}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_records(records: list[dict[str, Any]], cfg: DataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic (train, eval) split by content hash; both keep file order.

    A row goes to eval when its key is below eval_fraction, so adding or reordering rows moves no
    other row. Beyond eval_max_rows the eval rows with the largest keys go back to train. With two
    or more rows, eval holds at least one (the smallest key) and train at least one.
    """
    keys = [_row_key(r, cfg.split_seed) for r in records]
    by_key = sorted(range(len(records)), key=lambda i: (keys[i], i))
    eval_idx = [i for i in by_key if keys[i] < cfg.eval_fraction][: cfg.eval_max_rows]
    if not eval_idx and len(records) >= 2:
        eval_idx = by_key[:1]
    if len(eval_idx) == len(records) and eval_idx:
        eval_idx = eval_idx[:-1]
    in_eval = set(eval_idx)
    train_idx = [i for i in by_key if i not in in_eval]
    if cfg.max_train_rows is not None:
        train_idx = train_idx[: cfg.max_train_rows]
    keep_train = set(train_idx)
    train = [r for i, r in enumerate(records) if i in keep_train]
    evals = [r for i, r in enumerate(records) if i in in_eval]
    return train, evals


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------
# The stage


def validate(cfg: DataConfig, run_dir: Path, contracts_dir: Path = DEFAULT_CONTRACTS_DIR) -> ValidatedData:
    """Check cfg.path against its contract and write the train/eval split into run_dir/data.

    Raises:
        UsageError: the contract is unknown or invalid.
        DataError: the file is missing, empty or unreadable.
        ContractViolation: the data fails the contract (the report is written first).
    """
    contract = load_contract(cfg.contract, contracts_dir)
    source = Path(cfg.path).resolve()
    out = Path(run_dir).resolve() / "data"
    rows = read_rows(source, cfg.format, cache_dir=out / "hf_cache")
    report = check_rows(rows, contract, str(source))
    report_path = out / "validation_report.json"
    report["report_path"] = str(report_path)
    out.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    if not report["success"]:
        raise ContractViolation(report)

    records = canonical_records(rows, contract.style)
    train, evals = split_records(records, cfg)
    train_path, eval_path = out / "train.jsonl", out / "eval.jsonl"
    _write_jsonl(train_path, train)
    _write_jsonl(eval_path, evals)
    return ValidatedData(
        source=str(source),
        digest=content_digest(records),
        file_sha256=_file_sha256(source),
        contract=contract.ref,
        style=contract.style,
        rows=len(records),
        train_rows=len(train),
        eval_rows=len(evals),
        train_path=str(train_path),
        eval_path=str(eval_path),
        report_path=str(report_path),
    )


def validate_file(
    path: str, contract: str, run_dir: Path, contracts_dir: Path = DEFAULT_CONTRACTS_DIR
) -> ValidatedData:
    """`loraflow validate DATA --contract NAME`: the stage with default split settings."""
    return validate(DataConfig(path=str(path), contract=contract), run_dir, contracts_dir)
