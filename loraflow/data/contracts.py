"""Data contracts: versioned folders in data_contracts/ holding metadata and a Great Expectations suite.

    contract = load_contract("instruction_v1")       # refuses anything it cannot fully honour
    contract.ref                                       # "instruction_v1@1.1.0", recorded in lineage

A contract folder holds `contract.yaml` (name, semver version, owner, style, file format and
size limit, documented columns, quarantine limit) and `suite.json` (a GX 1.x ExpectationSuite).
Every threshold lives in these two files, none in code.

The validate stage streams a dataset in chunks, so each expectation is sorted here into one of
three kinds (see ``Check.kind``):

- ``table``: row count and column existence, checked once for the whole file;
- ``row``: a column-map expectation on a file column or on a per-row derived column
  (``ROW_COLUMNS``), checked chunk by chunk; its failing rows can be quarantined;
- ``dataset``: an expectation on a column derived by comparing rows with each other
  (``DATASET_COLUMNS``: duplicates, train/eval leakage, repeated answers), checked once.

An expectation that compares rows but is not on a dataset column (e.g. uniqueness of a file
column) cannot be honoured chunk by chunk, so the loader refuses it rather than check it wrongly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from loraflow.errors import UsageError

DEFAULT_CONTRACTS_DIR = Path(__file__).resolve().parents[2] / "data_contracts"

# Columns each style hands to training, in the order they are written.
STYLE_COLUMNS = {"alpaca": ("instruction", "input", "output"), "chat": ("messages",)}
SEMVER_RE = re.compile(r"^\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?$")

# Columns the validate stage derives per row (loraflow.data.checks.row_features) ...
ROW_COLUMNS = {
    "encoding": "'ok', or the first encoding problem: invalid UTF-8, a control or a replacement character",
    "response_equals_prompt": "True when the response repeats the prompt (after normalisation)",
    "tokens": "length in tokens of the templated example, with the run's tokenizer",
    "truncated": "True when `tokens` exceeds the run's max_seq_length",
    "chat_roles": "comma-joined roles of a conversation, e.g. 'system,user,assistant'",
    "chat_last_role": "role of a conversation's last turn",
    "chat_min_content_chars": "shortest stripped turn content (0 for a missing or blank one)",
    "chat_total_chars": "total characters of all turn contents",
}
# ... and by comparing rows with each other (loraflow.data.checks.dataset_features).
DATASET_COLUMNS = {
    "exact_duplicate": "True for a row identical to an earlier row (training columns, canonical JSON)",
    "normalized_duplicate": "True for a row whose prompt equals an earlier row's prompt after normalisation "
    "(Unicode NFKC, case, whitespace, trailing punctuation) but which is not an exact duplicate",
    "leaks_into_train": "True for a held-out row whose normalised prompt also appears in the train split",
    "response_repeats": "number of rows sharing this row's normalised response",
}
TOKEN_COLUMNS = {"tokens", "truncated"}  # checked only when the run's tokenizer is given
TABLE_TYPES = {"expect_table_row_count_to_be_between", "expect_table_row_count_to_equal", "expect_column_to_exist"}


@dataclass(frozen=True)
class Check:
    """One expectation of a suite, with what the streaming validator needs to know about it."""

    index: int
    type: str
    column: str | None
    kind: Literal["table", "row", "dataset"]
    kwargs: dict[str, Any]
    notes: str
    expectation: Any = field(repr=False)  # great_expectations.expectations.Expectation

    @property
    def label(self) -> str:
        return f"{self.type}({self.column})" if self.column else self.type


@dataclass(frozen=True)
class Contract:
    """A loaded data contract: metadata, GX suite and the classified checks."""

    name: str
    version: str
    style: str
    owner: str
    path: Path
    max_file_bytes: int
    quarantine_max_share: float
    meta: dict[str, Any] = field(repr=False)
    suite: Any = field(repr=False)  # great_expectations.ExpectationSuite
    checks: tuple[Check, ...] = field(repr=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def columns(self) -> tuple[str, ...]:
        """The file columns the contract documents (and the streaming reader keeps)."""
        return tuple(self.meta["columns"])


def available_contracts(contracts_dir: Path = DEFAULT_CONTRACTS_DIR) -> list[str]:
    """Names of the contract folders (those holding a contract.yaml)."""
    if not contracts_dir.is_dir():
        return []
    return sorted(p.parent.name for p in contracts_dir.glob("*/contract.yaml"))


def read_meta(name: str, contracts_dir: Path = DEFAULT_CONTRACTS_DIR) -> dict[str, Any]:
    """A contract's checked contract.yaml, without building its suite (no Great Expectations import: the
    CLI's preflight uses it); raise UsageError if the contract is unknown or its metadata invalid."""
    meta_path = contracts_dir / name / "contract.yaml"
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
    return meta


def load_contract(name: str, contracts_dir: Path = DEFAULT_CONTRACTS_DIR) -> Contract:
    """Load and check a contract; raise UsageError if it is missing, invalid or lost expectations."""
    folder = contracts_dir / name
    suite_path = folder / "suite.json"
    meta = read_meta(name, contracts_dir)
    if meta.get("suite", "suite.json") != "suite.json" or not suite_path.is_file():
        raise UsageError(f"contract {name!r} has no expectation suite at {suite_path}")
    try:
        suite_json = json.loads(suite_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"expectation suite {suite_path} is not valid JSON: {e}") from e
    suite = _build_suite(suite_json, suite_path)
    checks = _classify(suite, suite_path, meta)
    return Contract(
        name=name,
        version=str(meta["version"]),
        style=meta["style"],
        owner=str(meta["owner"]),
        path=folder,
        max_file_bytes=int(meta["format"]["max_file_mb"] * 1024 * 1024),
        quarantine_max_share=float(meta["quarantine"]["max_share"]),
        meta=meta,
        suite=suite,
        checks=checks,
    )


def _check_meta(meta: Any, name: str) -> list[str]:
    if not isinstance(meta, dict):
        return ["contract.yaml must hold a mapping"]
    problems = []
    if meta.get("name") != name:
        problems.append(f"name: {meta.get('name')!r} does not match its folder {name!r}")
    if not SEMVER_RE.match(str(meta.get("version", ""))):
        problems.append(f"version: {meta.get('version')!r} is not a semver string like '1.0.0' (quote it in YAML)")
    if not isinstance(meta.get("owner"), str) or not meta["owner"].strip():
        problems.append("owner: name the team or person who answers for this contract")
    if meta.get("style") not in STYLE_COLUMNS:
        problems.append(f"style: {meta.get('style')!r} is not one of {sorted(STYLE_COLUMNS)}")
    columns = meta.get("columns")
    if not isinstance(columns, dict) or not columns:
        problems.append("columns: must map each column to its type and description")
    else:
        for col, spec in columns.items():
            if not isinstance(spec, dict) or not str(spec.get("description", "")).strip():
                problems.append(f"columns.{col}: needs a description of what the column means")
    fmt = meta.get("format")
    limit = fmt.get("max_file_mb") if isinstance(fmt, dict) else None
    if not isinstance(limit, (int, float)) or isinstance(limit, bool) or limit <= 0:
        problems.append("format.max_file_mb: the largest dataset file accepted, in MiB (a positive number)")
    quarantine = meta.get("quarantine")
    share = quarantine.get("max_share") if isinstance(quarantine, dict) else None
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 <= share <= 1:
        problems.append("quarantine.max_share: share of rows the quarantine policy may set aside (0 to 1)")
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


def _classify(suite: Any, suite_path: Path, meta: dict[str, Any]) -> tuple[Check, ...]:
    from great_expectations.expectations.expectation import ColumnMapExpectation

    file_columns = set(meta["columns"])
    checks, problems = [], []
    for i, e in enumerate(suite.expectations):
        cfg = e.configuration
        kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
        column = kwargs.get("column")
        if cfg.type in TABLE_TYPES:
            kind = "table"
        elif column in DATASET_COLUMNS:
            kind = "dataset"
        elif isinstance(e, ColumnMapExpectation) and cfg.type != "expect_column_values_to_be_unique":
            kind = "row"
            if column not in file_columns and column not in ROW_COLUMNS:
                problems.append(
                    f"{cfg.type} checks column {column!r}, which is neither documented under `columns` in "
                    f"contract.yaml nor a derived column ({', '.join(sorted(ROW_COLUMNS))})"
                )
        else:
            problems.append(
                f"{cfg.type}({column}) compares rows with each other, which the streaming validator cannot do "
                f"chunk by chunk; use the dataset-level columns instead ({', '.join(sorted(DATASET_COLUMNS))})"
            )
            continue
        notes = (e.meta or {}).get("notes", "") if isinstance(e.meta, dict) else ""
        checks.append(Check(i, cfg.type, column, kind, kwargs, str(notes), e))
    if problems:
        raise UsageError(
            f"expectation suite {suite_path} cannot be checked:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return tuple(checks)
