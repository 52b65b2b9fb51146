"""The checks behind a data contract: derived columns, and Great Expectations run chunk by chunk.

A dataset is streamed once through :class:`SuiteRunner`. Each chunk becomes a small pandas frame
holding the contract's file columns and the per-row derived columns (encoding, label sanity,
token length, chat structure), and GX checks the contract's ``row`` expectations on it; failing
row numbers and a few example values are kept per expectation, counts are summed. Only compact
per-row fingerprints (8-byte hashes, the split key) outlive a chunk. After the pass, the
``dataset`` columns (duplicates, train/eval leakage, repeated answers) are computed from those
fingerprints with numpy, and GX checks them and the ``table`` expectations once, on a frame of
those compact columns only. Memory is bounded by the chunk size plus ~40 bytes per row.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loraflow.data.contracts import DATASET_COLUMNS, TOKEN_COLUMNS, Check, Contract
from loraflow.data.files import Row

MAX_EXAMPLES = 5
_TRAILING = " .!?,;:"
# Lone surrogates come from undecodable bytes (read with surrogateescape) or from "\udcxx" escapes.
_SURROGATE = re.compile("[\ud800-\udfff]")
_BAD_CHAR = re.compile("[\ud800-\udfff\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


# --------------------------------------------------------------------------------------------
# Per-row views of a record


def canonical(record: dict[str, Any], style: str) -> dict[str, Any]:
    """The columns a style trains on, normalised (a null alpaca input becomes '')."""
    if style == "chat":
        messages = record.get("messages")
        return {"messages": [_turn(m) for m in messages] if isinstance(messages, list) else messages}
    return {
        "instruction": record.get("instruction"),
        "input": record.get("input") or "",
        "output": record.get("output"),
    }


def canonical_line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def _turn(m: Any) -> dict[str, Any]:
    return (
        {"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else {"role": "?", "content": None}
    )


def texts(rec: dict[str, Any], style: str) -> list[tuple[str, str]]:
    """(field name, text) of every string the model will see."""
    if style == "chat":
        msgs = rec["messages"] if isinstance(rec["messages"], list) else []
        return [(f"messages[{i}].content", m["content"]) for i, m in enumerate(msgs) if isinstance(m["content"], str)]
    return [(k, rec[k]) for k in ("instruction", "input", "output") if isinstance(rec[k], str)]


def prompt_and_response(rec: dict[str, Any], style: str) -> tuple[str, str]:
    """The prompt (everything before the last turn) and the response (the last assistant turn)."""
    if style == "chat":
        msgs = rec["messages"] if isinstance(rec["messages"], list) else []
        body = [f"{m['role']}: {m['content']}" for m in msgs]
        last = msgs[-1] if msgs and msgs[-1]["role"] == "assistant" else None
        if last is None:
            return "\n".join(body), ""
        return "\n".join(body[:-1]), str(last["content"])
    prompt = str(rec["instruction"]) + ("\n" + str(rec["input"]) if rec["input"] else "")
    return prompt, str(rec["output"])


def normalize(text: str) -> str:
    """Text as duplicate checks compare it: NFKC, case-folded, whitespace collapsed, no trailing punctuation."""
    if not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    return " ".join(text.casefold().split()).rstrip(_TRAILING)


def encoding_problem(fields: list[tuple[str, str]]) -> str:
    """'ok', or the first encoding problem in the record's text, where it is."""
    for name, text in fields:
        m = _BAD_CHAR.search(text)
        if m is None:
            continue
        code = ord(m.group())
        if 0xDC80 <= code <= 0xDCFF:
            return f"invalid UTF-8 byte 0x{code - 0xDC00:02x} in {name} at character {m.start()}"
        if 0xD800 <= code <= 0xDFFF:
            return f"unpaired UTF-16 surrogate U+{code:04X} in {name} at character {m.start()}"
        if code == 0xFFFD:
            return f"replacement character U+FFFD in {name} at character {m.start()} (decoded with errors upstream)"
        return f"control character U+{code:04X} in {name} at character {m.start()}"
    return "ok"


def row_features(rec: dict[str, Any], style: str) -> dict[str, Any]:
    """The per-row derived columns (loraflow.data.contracts.ROW_COLUMNS) other than the token ones."""
    prompt, response = prompt_and_response(rec, style)
    out: dict[str, Any] = {
        "encoding": encoding_problem(texts(rec, style)),
        "response_equals_prompt": bool(response.strip()) and _same_text(prompt, response, rec, style),
    }
    if style == "chat":
        msgs = rec["messages"] if isinstance(rec["messages"], list) else []
        contents = [m["content"] if isinstance(m["content"], str) else "" for m in msgs]
        out.update(
            chat_roles=",".join(str(m["role"]) for m in msgs),
            chat_last_role=str(msgs[-1]["role"]) if msgs else "",
            chat_min_content_chars=min((len(c.strip()) for c in contents), default=0),
            chat_total_chars=sum(len(c) for c in contents),
        )
    return out


def _same_text(prompt: str, response: str, rec: dict[str, Any], style: str) -> bool:
    r = normalize(response)
    if style == "chat":
        msgs = rec["messages"]
        users = [m["content"] for m in msgs[:-1] if m["role"] == "user" and isinstance(m["content"], str)]
        return bool(users) and normalize(users[-1]) == r
    candidates = [rec["instruction"], rec["input"], prompt]
    return any(isinstance(c, str) and c.strip() and normalize(c) == r for c in candidates)


def _h64(text: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big", signed=True
    )


def split_key(line: str, seed: int) -> float:
    """A uniform number in [0, 1) from the row's content and the seed: independent of row position."""
    h = hashlib.sha256(f"{seed}\n{line}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


@dataclass
class Fingerprints:
    """Compact per-row data kept across the whole file (about 40 bytes a row)."""

    content: array = field(default_factory=lambda: array("q"))
    prompt: array = field(default_factory=lambda: array("q"))
    response: array = field(default_factory=lambda: array("q"))
    key: array = field(default_factory=lambda: array("d"))
    line: array = field(default_factory=lambda: array("q"))

    def add(self, rec: dict[str, Any], style: str, seed: int, line: int | None) -> None:
        text = canonical_line(rec)
        prompt, response = prompt_and_response(rec, style)
        self.content.append(_h64(text))
        self.prompt.append(_h64(normalize(prompt)))
        self.response.append(_h64(normalize(response)))
        self.key.append(split_key(text, seed))
        self.line.append(line if line is not None else -1)

    def __len__(self) -> int:
        return len(self.key)


def _groups(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row: the index of the first row with the same hash, and the size of that group."""
    n = len(h)
    order = np.argsort(h, kind="stable")
    sorted_h = h[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_h[1:] != sorted_h[:-1]
    gid = np.cumsum(starts) - 1
    first_sorted = order[starts][gid]
    sizes = np.diff(np.append(np.flatnonzero(starts), n))[gid]
    first, size = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    first[order], size[order] = first_sorted, sizes
    return first, size


def dataset_features(fp: Fingerprints, is_eval: np.ndarray, in_train: np.ndarray) -> dict[str, np.ndarray]:
    """The dataset-level derived columns (loraflow.data.contracts.DATASET_COLUMNS), plus the partner rows."""
    content = np.frombuffer(fp.content, dtype=np.int64)
    prompt = np.frombuffer(fp.prompt, dtype=np.int64)
    response = np.frombuffer(fp.response, dtype=np.int64)
    idx = np.arange(len(content))
    first_content, _ = _groups(content)
    first_prompt, _ = _groups(prompt)
    exact = first_content != idx
    # Distinct prompts per answer: exact duplicates do not count twice.
    pairs = np.unique(np.stack([response, prompt], axis=1), axis=0)
    resp_vals, resp_counts = np.unique(pairs[:, 0], return_counts=True)
    repeats = resp_counts[np.searchsorted(resp_vals, response)]
    return {
        "exact_duplicate": exact,
        "normalized_duplicate": (first_prompt != idx) & ~exact,
        "leaks_into_train": is_eval & np.isin(prompt, prompt[in_train]),
        "response_repeats": repeats,
        "_first_content": first_content,
        "_first_prompt": first_prompt,
    }


# --------------------------------------------------------------------------------------------
# Running the suite


@dataclass
class Outcome:
    """One expectation's result over the whole dataset."""

    check: Check
    success: bool = True
    element_count: int = 0
    missing_count: int = 0
    unexpected_count: int = 0
    observed: Any = None
    error: str | None = None
    skipped: str | None = None
    rows: list[np.ndarray] = field(default_factory=list, repr=False)  # failing 0-based row indices
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def unexpected_percent(self) -> float | None:
        if self.check.kind == "table":
            return None
        denom = self.element_count - self.missing_count
        return 100.0 * self.unexpected_count / denom if denom else 0.0

    def failing_rows(self) -> np.ndarray:
        return np.concatenate(self.rows) if self.rows else np.zeros(0, dtype=np.int64)

    def as_dict(self) -> dict[str, Any]:
        c = self.check
        expected = {k: v for k, v in c.kwargs.items() if k != "column"}
        if self.skipped:
            observed = f"skipped: {self.skipped}"
        elif self.error:
            observed = f"error: {self.error}"
        elif c.type == "expect_column_to_exist":
            observed = "present" if self.success else "column missing"
        elif c.kind == "table":
            observed = self.observed
        else:
            observed = f"{self.unexpected_count} of {self.element_count} rows"
        return {
            "expectation": c.type,
            "column": c.column or "(table)",
            "kind": c.kind,
            "notes": c.notes,
            "success": self.success,
            "skipped": self.skipped,
            "expected": expected,
            "observed": observed,
            "unexpected_count": None if c.kind == "table" else self.unexpected_count,
            "unexpected_percent": self.unexpected_percent,
            "examples": self.examples,
        }


class SuiteRunner:
    """Runs a contract's suite over a stream of chunks, then once over the dataset-level frame."""

    def __init__(self, contract: Contract, token_limit: int | None):
        import great_expectations as gx

        self.contract = contract
        self.token_limit = token_limit
        self.outcomes = {c.index: Outcome(c) for c in contract.checks}
        self.seen_columns: set[str] = set()
        self.rows = 0
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = {"globally": False}  # TQDM_DISABLE does not reach GX
        self._batch_definition = (
            context.data_sources.add_pandas("loraflow")
            .add_dataframe_asset(contract.name)
            .add_batch_definition_whole_dataframe("rows")
        )
        row_checks = [c for c in contract.checks if c.kind == "row"]
        if token_limit is None:
            for c in row_checks:
                if c.column in TOKEN_COLUMNS:
                    self.outcomes[c.index].skipped = "no tokenizer given (the flow passes the base model's)"
            row_checks = [c for c in row_checks if c.column not in TOKEN_COLUMNS]
        self._row_suite = _suite(gx, f"{contract.name}-rows", row_checks)
        self._dataset_suite = _suite(gx, f"{contract.name}-dataset", [c for c in contract.checks if c.kind != "row"])

    # -- pass over the file

    def check_chunk(self, rows: list[Row], recs: list[dict[str, Any]], tokens: list[int] | None, start: int) -> None:
        """Check one chunk (``recs`` are the canonical records of ``rows``; ``start`` its first row index)."""
        import pandas as pd

        for row in rows:
            self.seen_columns.update(row.record)
        style = self.contract.style
        columns: dict[str, Any] = {
            col: pd.Series([_gx_safe(r.record.get(col)) for r in rows], dtype=object) for col in self.contract.columns
        }
        features = [row_features(rec, style) for rec in recs]
        for name in features[0] if features else ():
            columns[name] = pd.Series([f[name] for f in features])
        if tokens is not None and self.token_limit is not None:
            columns["tokens"] = pd.Series(tokens, dtype="int64")
            columns["truncated"] = pd.Series([t > self.token_limit for t in tokens], dtype=bool)
        frame = pd.DataFrame(columns)
        frame.index = pd.RangeIndex(start, start + len(rows))
        self.rows += len(rows)
        if not self._row_suite.expectations:
            return
        result = self._validate(frame, self._row_suite)
        for r in result.results:
            out = self.outcomes[r.expectation_config.meta["loraflow_index"]]
            res = r.result or {}
            error = _exception_message(r.exception_info)
            if error:
                out.error = out.error or error
                continue
            out.element_count += int(res.get("element_count") or 0)
            out.missing_count += int(res.get("missing_count") or 0)
            unexpected = [int(i) for i in res.get("unexpected_index_list") or []]
            out.unexpected_count += int(res.get("unexpected_count") or 0)
            if unexpected:
                out.rows.append(np.asarray(unexpected, dtype=np.int64))
            for i in unexpected[: MAX_EXAMPLES - len(out.examples)]:
                row = rows[i - start]
                value = _example_value(out.check, row.record, recs[i - start], frame.loc[i], self.token_limit, style)
                out.examples.append({"row": row.number, "line": row.line, "value": value})

    def finish_rows(self) -> None:
        """Decide row expectations over all chunks (``mostly`` counts over the whole dataset)."""
        for out in self.outcomes.values():
            c = out.check
            if c.kind != "row" or out.skipped:
                continue
            if c.column in self.contract.columns and c.column not in self.seen_columns:
                out.skipped = f"column {c.column!r} is missing"
                out.rows, out.examples, out.unexpected_count = [], [], 0
                continue
            if out.error:
                out.success = False
                continue
            denom = out.element_count - out.missing_count
            mostly = float(c.kwargs.get("mostly") or 1.0)
            out.success = denom == 0 or (1.0 - out.unexpected_count / denom) >= mostly - 1e-12

    def check_dataset(self, features: dict[str, np.ndarray]) -> None:
        """Check table and dataset expectations once, on a frame of compact columns."""
        import pandas as pd

        columns: dict[str, Any] = {k: v for k, v in features.items() if k in DATASET_COLUMNS}
        for col in self.contract.columns:  # stand-ins so that expect_column_to_exist sees the file's columns
            if col in self.seen_columns:
                columns[col] = np.zeros(self.rows, dtype=bool)
        frame = pd.DataFrame(columns, index=pd.RangeIndex(self.rows))
        if not self._dataset_suite.expectations:
            return
        result = self._validate(frame, self._dataset_suite)
        for r in result.results:
            out = self.outcomes[r.expectation_config.meta["loraflow_index"]]
            res = r.result or {}
            out.error = _exception_message(r.exception_info)
            out.success = bool(r.success) and out.error is None
            out.observed = res.get("observed_value")
            out.element_count = int(res.get("element_count") or 0)
            out.missing_count = int(res.get("missing_count") or 0)
            out.unexpected_count = int(res.get("unexpected_count") or 0)
            unexpected = res.get("unexpected_index_list") or []
            if unexpected:
                out.rows = [np.asarray(unexpected, dtype=np.int64)]
        missing = [c for c in self.contract.columns if c not in self.seen_columns]
        if missing:  # duplicates or repeats of an absent column say nothing
            for out in self.outcomes.values():
                if out.check.kind == "dataset":
                    out.skipped = f"column(s) {', '.join(map(repr, missing))} missing"
                    out.success, out.rows, out.examples, out.unexpected_count = True, [], [], 0

    def _validate(self, frame: Any, suite: Any) -> Any:
        batch = self._batch_definition.get_batch(batch_parameters={"dataframe": frame})
        return batch.validate(suite, result_format={"result_format": "COMPLETE", "partial_unexpected_count": 0})

    # -- results

    @property
    def results(self) -> list[Outcome]:
        return [self.outcomes[c.index] for c in self.contract.checks]

    def example_requests(self) -> dict[int, list[Outcome]]:
        """Row index -> failed dataset-level outcomes that want it as an example (read in a second pass)."""
        wanted: dict[int, list[Outcome]] = {}
        for o in self.results:
            if o.check.kind == "dataset" and not o.success and o.rows:
                for i in o.rows[0][:MAX_EXAMPLES]:
                    wanted.setdefault(int(i), []).append(o)
        return wanted

    def failed(self) -> list[Outcome]:
        """Failed expectations; a column missing from the file counts once, not once per check on it."""
        return [o for o in self.results if not o.success and not o.skipped]

    def missing_column_checks(self) -> list[str]:
        return [o.check.label for o in self.results if o.skipped and o.skipped.startswith("column")]


def _gx_safe(value: Any) -> Any:
    """Lone surrogates (undecodable bytes) replaced by U+FFFD: pandas' Arrow-backed string ops refuse them.

    The ``encoding`` column is computed from the original text, so the row is still reported.
    """
    if isinstance(value, str) and _SURROGATE.search(value):
        return _SURROGATE.sub("\ufffd", value)
    return value


def _suite(gx: Any, name: str, checks: list[Check]) -> Any:
    expectations = []
    for c in checks:
        meta = {**(c.expectation.meta or {}), "loraflow_index": c.index}
        expectations.append({"type": c.type, "kwargs": c.kwargs, "meta": meta})
    return gx.ExpectationSuite(name=name, expectations=expectations)


def _example_value(
    check: Check, record: dict[str, Any], rec: dict[str, Any], derived: Any, token_limit: int | None, style: str
) -> Any:
    col = check.column
    if col in ("tokens", "truncated"):
        return f"{int(derived['tokens'])} tokens > max_seq_length {token_limit}"
    if col == "response_equals_prompt":
        return short(prompt_and_response(rec, style)[1])
    if col in derived.index and col not in record:
        return short(derived[col], 160)
    return short(record.get(col))


def dataset_example(column: str, i: int, rec: dict[str, Any], style: str, features: dict[str, np.ndarray]) -> str:
    """What a dataset-level check found at row index ``i``, in words."""
    prompt, response = prompt_and_response(rec, style)
    if column == "exact_duplicate":
        return f"same row as row {int(features['_first_content'][i]) + 1}: {short(prompt, 60)!r}"
    if column == "normalized_duplicate":
        return f"same prompt as row {int(features['_first_prompt'][i]) + 1}: {short(prompt, 60)!r}"
    if column == "leaks_into_train":
        return f"held-out prompt also in the train split: {short(prompt, 60)!r}"
    if column == "response_repeats":
        return f"{int(features['response_repeats'][i])} prompts share the answer {short(response, 60)!r}"
    return str(short(features[column][i]))


def _exception_message(info: Any) -> str | None:
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return info.get("exception_message")
    for v in info.values():
        if isinstance(v, dict) and v.get("raised_exception"):
            return v.get("exception_message")
    return None


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def short(value: Any, limit: int = 80) -> Any:
    """A value as a report shows it: JSON-safe, long text clipped, invalid UTF-8 escaped."""
    if isinstance(value, float) and math.isnan(value):  # pandas' null; NaN is not valid JSON
        return None
    if isinstance(value, str):
        value = _BAD_CHAR.sub(_escape, value)
        return f"{value[:limit]}... ({len(value)} chars)" if len(value) > limit else value
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return short(json.dumps(value, ensure_ascii=False, default=str), limit)
