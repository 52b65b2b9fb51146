"""The evaluate stage: base and fine-tuned metrics on the held-out split, samples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loraflow.config import EvalConfig
from loraflow.ml.examples import encode_all, read_jsonl
from loraflow.ml.models import (
    load_quantized,
)
from loraflow.ml.prompts import last_user_turn, reference
from loraflow.ml.scoring import heldout_loss, rouge_l
from tasks.evaluate import evaluate
from tests.conftest import (
    torch_threads,
)
from tests.stages.conftest import TRAIN

# --- evaluate ---

EVAL = EvalConfig(batch_size=4, max_new_tokens=8, generation_rows=3)


@pytest.fixture(scope="session")
def evaluated(trained, tiny_quantized, tiny_data, tmp_path_factory):
    with torch_threads(1):
        return evaluate(tiny_quantized, trained, tiny_data, EVAL, TRAIN.max_seq_length, tmp_path_factory.mktemp("eval"))


def test_evaluate_reports_base_and_finetuned(evaluated, tiny_data, tiny_quantized, tok) -> None:
    records = read_jsonl(tiny_data.eval_path)
    response_tokens = sum(e.label_tokens for e in encode_all(tok, records, TRAIN.max_seq_length))
    for m in (evaluated.base, evaluated.finetuned):
        assert m.tokens == response_tokens
        assert m.generated == 3
        assert m.perplexity == math.exp(m.loss)
        assert 0.0 <= m.rouge_l <= 1.0
    # The held-out rows repeat training rows, so the adapter must help on both metrics.
    assert evaluated.finetuned.loss < evaluated.base.loss
    assert evaluated.improved
    # "base" is the same model with the adapter switched off: it scores as the plain 4-bit model.
    plain = load_quantized(tiny_quantized.path, cpu_repack=True).eval()
    loss, tokens = heldout_loss(plain, tok, records, TRAIN.max_seq_length, EVAL.batch_size)
    assert tokens == response_tokens
    assert evaluated.base.loss == pytest.approx(loss, rel=1e-6)


def test_evaluate_writes_one_sample_per_generation_row(evaluated, tiny_data) -> None:
    rows = [json.loads(line) for line in Path(evaluated.samples_path).read_text().splitlines()]
    records = read_jsonl(tiny_data.eval_path)[:3]
    assert len(rows) == EVAL.generation_rows
    for row, rec in zip(rows, records, strict=True):
        assert set(row) == {"prompt", "reference", "base", "finetuned", "rouge_l_base", "rouge_l_finetuned"}
        assert row["prompt"] == last_user_turn(rec)
        assert row["reference"] == reference(rec)
        assert row["rouge_l_base"] == rouge_l([row["base"]], [row["reference"]])[0]
        assert row["rouge_l_finetuned"] == rouge_l([row["finetuned"]], [row["reference"]])[0]
    for name in ("base", "finetuned"):
        mean = sum(r[f"rouge_l_{name}"] for r in rows) / len(rows)
        assert getattr(evaluated, name).rouge_l == pytest.approx(mean, rel=1e-12)


def test_rouge_l_helper() -> None:
    assert rouge_l(["Hello, Ann! Nice to meet you."], ["Hello, Ann! Nice to meet you."]) == [1.0]
    assert rouge_l(["apple banana"], ["cherry date"]) == [0.0]
    assert rouge_l(["the cat sat", "a b"], ["the cat sat", "a c"]) == [1.0, 0.5]
    with pytest.raises(ValueError):
        rouge_l(["a"], ["a", "b"])
