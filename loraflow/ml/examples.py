"""Examples as the training and scoring code reads them: JSONL records, encoded with the run's template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from loraflow.ml.prompts import Encoded, encode


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_all(tok: PreTrainedTokenizerBase, records: list[dict[str, Any]], max_length: int) -> list[Encoded]:
    """Encode records, dropping those whose response was truncated away entirely."""
    encoded = [encode(tok, r, max_length) for r in records]
    return [e for e in encoded if e.label_tokens > 0]
