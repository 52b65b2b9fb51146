"""Per-example scores: the evaluate stage's artifact, and the bootstrap intervals the promotion gate decides on.

A mean over a few dozen held-out examples moves with a single answer (on 32 rows, one ROUGE-L score
moving by 0.5 moves the mean by 0.016), so the gate compares two models example by example: the
same examples, each scored by both (a paired comparison), resampled with replacement
``RESAMPLES`` times with a fixed seed. A statistic is a ratio of sums over the resampled examples:
the token-weighted mean for losses (as the reported loss is), the plain mean for ROUGE-L.

The artifact (``eval/examples.jsonl`` of a run) has one line per example and set::

    {"set": "heldout", "index": 0, "tokens": 18, "loss_base": 3.1, "loss_finetuned": 2.4,
     "rouge_l_base": 0.2, "rouge_l_finetuned": 0.5}
    {"set": "general", "index": 0, "tokens": 95, "loss_base": 2.9, "loss_finetuned": 2.95}

ROUGE-L keys appear on the held-out examples that were answered (the first ``eval.generation_rows``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from loraflow.records import ExampleScores, Interval

RESAMPLES = 2000
SEED = 0
HELDOUT, GENERAL = "heldout", "general"
EXAMPLES_FILE = "examples.jsonl"
_CHUNK = 250  # resamples drawn at a time: memory stays at 250 x n indices


def _ratio_stats(parts: list[tuple[np.ndarray, np.ndarray, float]], n: int, resamples: int, seed: int) -> np.ndarray:
    """For each resample of ``n`` examples: sum over parts of sign * sum(num) / sum(den) on the resampled rows."""
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        idx = rng.integers(0, n, size=(min(_CHUNK, resamples - start), n))
        total = np.zeros(len(idx))
        for num, den, sign in parts:
            total += sign * num[idx].sum(axis=1) / np.maximum(den[idx].sum(axis=1), 1e-12)
        out[start : start + len(idx)] = total
    return out


def interval(
    num: list[float] | np.ndarray,
    den: list[float] | np.ndarray,
    other_num: list[float] | np.ndarray | None = None,
    other_den: list[float] | np.ndarray | None = None,
    *,
    level: float,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """Percentile bootstrap interval (two-sided, ``level``) of sum(num)/sum(den), or of its difference to
    sum(other_num)/sum(other_den) computed on the same resampled examples (paired)."""
    a_num, a_den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    parts = [(a_num, a_den, 1.0)]
    if other_num is not None:
        assert other_den is not None
        parts.append((np.asarray(other_num, dtype=float), np.asarray(other_den, dtype=float), -1.0))
        if len(parts[1][0]) != len(a_num):
            raise ValueError(f"paired scores of {len(a_num)} and {len(parts[1][0])} examples")
    if len(a_num) == 0:
        return (math.nan, math.nan)
    stats = _ratio_stats(parts, len(a_num), resamples, seed)
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _loss_parts(s: ExampleScores) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray(s.tokens, dtype=float)
    return np.asarray(s.loss, dtype=float) * tokens, tokens


def loss_interval(s: ExampleScores, level: float, other: ExampleScores | None = None) -> Interval:
    """Interval of the token-weighted mean loss, or of its difference to ``other``'s on the same examples."""
    if other is None:
        return interval(*_loss_parts(s), level=level)
    return interval(*_loss_parts(s), *_loss_parts(other), level=level)


def rouge_l_interval(s: ExampleScores, level: float, other: ExampleScores | None = None) -> Interval:
    """Interval of the mean ROUGE-L, or of its difference to ``other``'s on the same answered examples."""
    ones = np.ones(len(s.rouge_l))
    if other is None:
        return interval(s.rouge_l, ones, level=level)
    return interval(s.rouge_l, ones, other.rouge_l, np.ones(len(other.rouge_l)), level=level)


def write_examples(path: Path, sets: dict[str, dict[str, ExampleScores]]) -> Path:
    """Write ``{set: {"base": scores, "finetuned": scores}}`` as the per-example JSONL artifact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for name, models in sets.items():
            base, tuned = models["base"], models["finetuned"]
            for i, (tokens, lb, lf) in enumerate(zip(tuned.tokens, base.loss, tuned.loss, strict=True)):
                row: dict = {"set": name, "index": i, "tokens": tokens, "loss_base": lb, "loss_finetuned": lf}
                if i < len(tuned.rouge_l):
                    row |= {"rouge_l_base": base.rouge_l[i], "rouge_l_finetuned": tuned.rouge_l[i]}
                f.write(json.dumps(row) + "\n")
    return path


def read_examples(path: Path) -> dict[str, dict[str, ExampleScores]]:
    """The artifact of :func:`write_examples`, back as ``{set: {"base": scores, "finetuned": scores}}``."""
    rows: dict[str, list[dict]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows.setdefault(row["set"], []).append(row)
    out = {}
    for name, items in rows.items():
        items.sort(key=lambda r: r["index"])
        out[name] = {
            model: ExampleScores(
                loss=[r[f"loss_{model}"] for r in items],
                tokens=[r["tokens"] for r in items],
                rouge_l=[r[f"rouge_l_{model}"] for r in items if f"rouge_l_{model}" in r],
            )
            for model in ("base", "finetuned")
        }
    return out
