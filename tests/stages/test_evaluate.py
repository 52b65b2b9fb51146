"""The evaluate stage: base and fine-tuned metrics on the held-out split, samples."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow import scores
from loraflow.config import EvalConfig
from loraflow.errors import DataError
from loraflow.ml.examples import encode_all, read_jsonl
from loraflow.ml.models import (
    load_quantized,
)
from loraflow.ml.prompts import last_user_turn, reference
from loraflow.ml.scoring import heldout_loss, rouge_l, text_losses
from tasks.evaluate import evaluate, general_passages
from tests.conftest import (
    torch_threads,
    write_jsonl,
)
from tests.stages.conftest import TRAIN

# --- evaluate ---

EVAL = EvalConfig(batch_size=4, max_new_tokens=8, generation_rows=3)
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
# General text for the forgetting guard: words the tiny tokenizer knows, in sentences the adapter never saw.
GENERAL = ["You are a helpful AI assistant.", "What is two plus two? Four.", "Nice to meet you, Bob and Eve."]


@pytest.fixture(scope="session")
def general_text(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("general") / "general.jsonl", [{"text": t} for t in GENERAL])


@pytest.fixture(scope="session")
def evaluated(trained, tiny_quantized, tiny_data, general_text, tmp_path_factory):
    cfg = EVAL.model_copy(update={"general_text": str(general_text)})
    with torch_threads(1):
        return evaluate(tiny_quantized, trained, tiny_data, cfg, TRAIN.max_seq_length, tmp_path_factory.mktemp("eval"))


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


def test_evaluate_writes_per_example_scores_that_add_up_to_the_metrics(evaluated, tiny_data) -> None:
    per_example = scores.read_examples(Path(evaluated.examples_path))
    assert set(per_example) == {"heldout", "general"}
    rows = len(read_jsonl(tiny_data.eval_path))
    for name in ("base", "finetuned"):
        heldout, m = per_example["heldout"][name], getattr(evaluated, name)
        assert len(heldout.loss) == rows and len(heldout.rouge_l) == EVAL.generation_rows
        assert heldout.mean_loss() == pytest.approx(m.loss, rel=1e-6) and sum(heldout.tokens) == m.tokens
        assert heldout.mean_rouge_l() == pytest.approx(m.rouge_l, rel=1e-12)
        assert m.loss_interval[0] <= m.loss <= m.loss_interval[1]
        assert m.rouge_l_interval[0] <= m.rouge_l <= m.rouge_l_interval[1]
        assert len(per_example["general"][name].loss) == len(GENERAL)


def test_evaluate_scores_general_text_perplexity_of_both_models(evaluated, general_text, tiny_quantized, tok) -> None:
    g = evaluated.general
    assert g.passages == len(GENERAL) and g.path == str(general_text)
    per_example = scores.read_examples(Path(evaluated.examples_path))["general"]
    assert g.tokens == sum(per_example["base"].tokens) == sum(len(tok(t)["input_ids"]) - 1 for t in GENERAL)
    assert g.base_perplexity == pytest.approx(math.exp(per_example["base"].mean_loss()), rel=1e-9)
    assert g.increase == pytest.approx(g.finetuned_perplexity / g.base_perplexity - 1, rel=1e-6)
    assert g.increase_interval[0] <= g.increase <= g.increase_interval[1]
    # The base's number is the plain 4-bit model's perplexity on the passages.
    plain = load_quantized(tiny_quantized.path, cpu_repack=True).eval()
    with torch_threads(1):
        alone = text_losses(plain, tok, GENERAL, TRAIN.max_seq_length, 2)
    assert math.exp(alone.mean_loss()) == pytest.approx(g.base_perplexity, rel=1e-5)


def test_general_text_file_problems_are_data_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        general_passages(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="non-empty 'text'"):
        general_passages(str(write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"passage": "no"}])))


def test_the_shipped_general_text_is_small_and_well_formed() -> None:
    shipped = Path(__file__).resolve().parents[2] / "data" / "general_text.jsonl"
    texts = general_passages(str(shipped))
    assert len(texts) == 300 and shipped.stat().st_size < 1_000_000
    assert all(300 <= len(t) <= 1000 for t in texts) and len(set(texts)) == len(texts)


@pytest.mark.skipif(
    not (PYTHON_DOCS / "tutorial").is_dir(), reason="Python 3.11 docs not installed (apt-get install python3.11-doc)"
)
def test_general_text_derivation_reproduces_the_shipped_file(tmp_path) -> None:
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "general.jsonl"
    cmd = [sys.executable, str(root / "scripts" / "derive_general_text.py"), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    assert out.read_bytes() == (root / "data" / "general_text.jsonl").read_bytes()


def test_rouge_l_helper() -> None:
    assert rouge_l(["Hello, Ann! Nice to meet you."], ["Hello, Ann! Nice to meet you."]) == [1.0]
    assert rouge_l(["apple banana"], ["cherry date"]) == [0.0]
    assert rouge_l(["the cat sat", "a b"], ["the cat sat", "a c"]) == [1.0, 0.5]
    with pytest.raises(ValueError):
        rouge_l(["a"], ["a", "b"])
