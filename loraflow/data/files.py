"""Dataset files: checked before they are opened, then streamed row by row.

    path, kind = check_source(Path("data/x.jsonl"), "auto", allowed_roots=None, max_bytes=1 << 30, accepted=...)
    for row in iter_rows(path, kind, required=("instruction", "output")):
        row.number, row.line, row.record

Nothing here loads a whole file: JSONL is read line by line, CSV and Parquet in Arrow record
batches. (A JSON array cannot be streamed without a parser we do not ship; it is read whole,
within the contract's size limit: prefer JSONL for large data.)

Every problem is one paragraph naming the file, the line or column when known, and what to do.
Path problems (missing, a directory, outside the allowed roots, unknown format) are usage errors
(exit 2); content problems (empty, binary, too large, malformed) are data errors (exit 1).
Bytes that are not valid UTF-8 do not stop the read: they are decoded with ``surrogateescape``
so that the encoding check can report (or quarantine) the row that holds them.
"""

from __future__ import annotations

import csv
import json
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.config import check_inside_roots
from loraflow.errors import DataError, UsageError

FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
SNIFF_BYTES = 8192
MAX_LINE_BYTES = 64 << 20  # one JSONL record; a longer "line" is a binary or a broken file
BATCH_ROWS = 8192
BINARY_MAGIC = {
    b"\x1f\x8b": "gzip-compressed",
    b"PK\x03\x04": "a zip archive",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ": "xz-compressed",
    b"\x28\xb5\x2f\xfd": "zstd-compressed",
    b"PAR1": "a Parquet file",
    b"\x89PNG": "a PNG image",
    b"%PDF": "a PDF document",
    b"\x7fELF": "an executable",
}


@dataclass(frozen=True)
class Row:
    number: int  # 1-based record number in the file
    line: int | None  # physical line, where the format has lines (JSONL)
    record: dict[str, Any]


def resolve_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise UsageError(
            f"cannot tell the format of {path} from its extension {path.suffix!r}; "
            f"rename it to .jsonl/.json/.csv/.parquet or set data.format"
        )
    return found


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def check_source(
    path: Path, fmt: str, allowed_roots: list[str] | None, max_bytes: int | None, accepted: list[str] | None = None
) -> tuple[Path, str]:
    """Refuse a path before reading it; return the resolved path and its format.

    ``max_bytes`` None: no size limit to check yet (preflight with a contract it could not read).
    """
    source = check_inside_roots(path, allowed_roots, what="dataset file", kind="data", setting="data.allowed_roots")
    try:
        st = source.stat()
    except FileNotFoundError:
        raise UsageError(
            f"dataset file {source} does not exist; check data.path (relative paths resolve against the config file)"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read dataset file {source}: {e.strerror}; check its permissions") from e
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(
            f"dataset path {source} is a directory; point data.path at one JSONL, JSON, CSV or Parquet file"
        )
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"dataset path {source} is not a regular file (a pipe or device?); copy the data to a file")
    kind = resolve_format(source, fmt)
    if accepted and kind not in accepted:
        raise UsageError(
            f"{source} is {kind}, but the data contract accepts only {', '.join(accepted)}; "
            f"convert the file (JSONL is preferred) or choose another contract"
        )
    if st.st_size == 0:
        raise DataError(f"dataset file {source} is empty (0 bytes); it needs at least a few rows (see the contract)")
    if max_bytes is not None and st.st_size > max_bytes:
        raise DataError(
            f"dataset file {source} is {_human(st.st_size)}, over the contract's limit of {_human(max_bytes)} "
            f"(format.max_file_mb in contract.yaml); split it into smaller shards, or raise the limit in a new "
            f"contract version if this machine can take it"
        )
    try:
        with source.open("rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        raise DataError(f"cannot read dataset file {source}: {e.strerror}; check its permissions") from e
    _sniff(source, kind, head)
    return source, kind


def _sniff(source: Path, kind: str, head: bytes) -> None:
    if kind == "parquet":
        if not head.startswith(b"PAR1"):
            raise DataError(
                f"{source} is not a Parquet file (it does not start with the Parquet magic bytes 'PAR1'); "
                f"check the file, or set data.format to its real format"
            )
        return
    for magic, what in BINARY_MAGIC.items():
        if head.startswith(magic):
            raise DataError(
                f"{source} is {what}, not {kind.upper()} text; decompress or convert it first "
                f"(or set data.format if it really is {what.split()[-1]})"
            )
    if b"\x00" in head:
        raise DataError(
            f"{source} is not a text file (it holds NUL bytes in its first {len(head)} bytes); "
            f"a {kind.upper()} dataset must be UTF-8 text: check that this is the file you meant"
        )


def iter_rows(path: Path, kind: str, required: tuple[str, ...] = ()) -> Iterator[Row]:
    """Rows of a checked file, in file order, streamed; raise DataError naming the line when one is broken."""
    readers = {"jsonl": _iter_jsonl, "json": _iter_json, "csv": _iter_csv, "parquet": _iter_parquet}
    yield from readers[kind](path, required)


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="surrogateescape")


def _iter_jsonl(path: Path, required: tuple[str, ...]) -> Iterator[Row]:
    number = 0
    with path.open("rb") as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise DataError(
                    f"{path} line {lineno} is longer than {_human(MAX_LINE_BYTES)}; a JSONL file holds one "
                    f"record per line: check that the file is JSONL (one object per line, newline-separated)"
                )
            if not raw.strip():
                continue
            try:
                obj = json.loads(_decode(raw))
            except json.JSONDecodeError as e:
                truncated = not raw.endswith(b"\n") and f.read(1) == b""
                hint = (
                    " The file ends in the middle of this record: it was probably cut short while being "
                    "written or copied; copy it again or drop the last line."
                    if truncated
                    else " A JSONL file holds one JSON object per line: fix or remove that line."
                )
                raise DataError(f"{path} line {lineno} is not valid JSON ({e.msg} at column {e.colno}).{hint}") from e
            if not isinstance(obj, dict):
                raise DataError(
                    f"{path} line {lineno} holds a JSON {type(obj).__name__}, not an object; a JSONL file "
                    f'holds one object per line, e.g. {{"instruction": ..., "input": ..., "output": ...}}'
                )
            number += 1
            yield Row(number, lineno, obj)


def _iter_json(path: Path, required: tuple[str, ...]) -> Iterator[Row]:
    try:
        data = json.loads(_decode(path.read_bytes()))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path} line {e.lineno} is not valid JSON ({e.msg} at column {e.colno}); a .json dataset holds one "
            f"array of objects: fix the file, or convert it to JSONL (one object per line)"
        ) from e
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}, a common wrapper
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; a .json dataset must be an array of objects")
    for i, obj in enumerate(data, start=1):
        if not isinstance(obj, dict):
            raise DataError(f"{path} item {i} is a JSON {type(obj).__name__}, not an object; every item must be one")
        yield Row(i, None, obj)


def _iter_csv(path: Path, required: tuple[str, ...]) -> Iterator[Row]:
    import pyarrow as pa
    from pyarrow import csv as pacsv

    with path.open("r", encoding="utf-8", errors="surrogateescape", newline="") as f:
        header = next(csv.reader(f), [])
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing or len(set(header)) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        problem = f"lacks {', '.join(missing)}" if missing else f"repeats {', '.join(dupes)}"
        raise DataError(
            f"{path} line 1 (the CSV header) {problem}: it has columns {header}, and the data contract needs "
            f"{', '.join(required)}. Rename the header's columns (it must be the first line), or choose the "
            f"contract that matches this file"
        )
    # Binary columns: invalid UTF-8 then reaches the encoding check instead of failing the whole read.
    options = pacsv.ConvertOptions(column_types={h: pa.binary() for h in header})
    number = 0
    try:
        reader = pacsv.open_csv(path, convert_options=options, read_options=pacsv.ReadOptions(block_size=1 << 22))
        for batch in reader:
            for rec in batch.to_pylist():
                number += 1
                yield Row(number, None, {k: _decode(v) if isinstance(v, bytes) else v for k, v in rec.items()})
    except pa.ArrowInvalid as e:
        detail = str(e).strip().splitlines()[0]
        raise DataError(
            f"{path} cannot be read as CSV after row {number}: {detail}. Every row needs as many fields as the "
            f"header; quote fields that hold commas, quotes or newlines"
        ) from e


def _iter_parquet(path: Path, required: tuple[str, ...]) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            for rec in batch.to_pylist():
                number += 1
                yield Row(number, None, rec)
    except (pa.ArrowException, OSError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"cannot read {path} as Parquet after row {number}: {detail}. Check that the file is complete "
            f"(copy it again) or set data.format if the extension is misleading"
        ) from e
