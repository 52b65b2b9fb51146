"""Data contracts that catch what breaks fine-tuning: one test per failure class, on data built here.

Each test asserts the exact violation reported and that nothing was handed on to training (no
train/eval split written; the flow-level "nothing registered" is tests/flows/test_pipeline.py's job).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from loraflow.config import DataConfig, load_config
from loraflow.data.checks import canonical, canonical_line, split_key
from loraflow.data.validation import ContractViolation
from loraflow.errors import DataError, UsageError
from loraflow.ml.models import load_tokenizer
from loraflow.ml.prompts import encode
from tasks.validate import validate

ROOT = Path(__file__).resolve().parents[2]


def rows_(n: int = 120) -> list[dict]:
    return [
        {"instruction": f"Define the test word number {i}.", "input": "", "output": f"The answer for word {i}."}
        for i in range(n)
    ]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def violation(tmp_path: Path, rows: list[dict] | None = None, path: Path | None = None, **kw) -> ContractViolation:
    path = path or write(tmp_path / "data.jsonl", rows or [])
    with pytest.raises(ContractViolation) as info:
        validate(
            DataConfig(path=str(path), **{k: v for k, v in kw.items() if k in DataConfig.model_fields}),
            tmp_path / "run",
            **{k: v for k, v in kw.items() if k not in DataConfig.model_fields},
        )
    assert_nothing_written(tmp_path)
    return info.value


def assert_nothing_written(tmp_path: Path) -> None:
    data = tmp_path / "run" / "data"
    assert not (data / "train.jsonl").exists() and not (data / "eval.jsonl").exists()
    assert (data / "validation_report.json").is_file() and (data / "validation_report.html").is_file()


def failure(err: ContractViolation, column: str) -> dict:
    (hit,) = [f for f in err.failures if f["column"] == column]
    return hit


def failed_columns(err: ContractViolation) -> set[str]:
    return {f["column"] for f in err.failures}


# ---------------------------------------------------------------------------- checks


def test_blank_and_whitespace_only_fields(tmp_path):
    rows = rows_()
    rows[3]["output"] = " \t "
    rows[6]["input"] = "   "  # empty input is fine; whitespace-only is a broken field
    err = violation(tmp_path, rows)
    assert failed_columns(err) == {"output", "input"}
    assert failure(err, "output")["examples"] == [{"row": 4, "line": 4, "value": " \t "}]
    assert failure(err, "input")["examples"] == [{"row": 7, "line": 7, "value": "   "}]
    assert failure(err, "input")["expectation"] == "expect_column_values_to_match_regex"


def test_exact_and_normalised_duplicates(tmp_path):
    rows = rows_()
    rows[10] = dict(rows[2])  # byte-identical
    rows[11]["instruction"] = "  DEFINE the test   word number 5!"  # same prompt as row 6 after normalisation
    err = violation(tmp_path, rows)
    assert failed_columns(err) == {"exact_duplicate", "normalized_duplicate"}
    assert failure(err, "exact_duplicate")["examples"][0]["row"] == 11
    assert failure(err, "exact_duplicate")["examples"][0]["value"].startswith("same row as row 3:")
    assert failure(err, "normalized_duplicate")["examples"][0]["value"].startswith("same prompt as row 6:")
    assert failure(err, "normalized_duplicate")["observed"] == "1 of 120 rows"


def test_train_eval_leakage(tmp_path):
    rows = rows_(200)
    held_out = next(i for i, r in enumerate(rows) if split_key(canonical_line(canonical(r, "alpaca")), 0) < 0.05)
    # The same question with another answer: a different row, so the split hashes it elsewhere.
    variant = None
    for k in range(50):
        cand = {**rows[held_out], "instruction": rows[held_out]["instruction"].upper(), "output": f"Other {k}."}
        if split_key(canonical_line(canonical(cand, "alpaca")), 0) >= 0.05:
            variant = cand
            break
    rows.append(variant)
    err = violation(tmp_path, rows)
    leak = failure(err, "leaks_into_train")
    assert leak["unexpected_count"] == 1 and leak["examples"][0]["row"] == held_out + 1
    assert "held-out prompt also in the train split" in leak["examples"][0]["value"]


def test_token_length_uses_the_runs_tokenizer_and_reports_truncated_share(tmp_path, tiny_model_dir):
    rows = rows_()
    for r in rows[:5]:
        r["output"] = "Hello, Ann! Nice to meet you. " * 20
    err = violation(tmp_path, rows, tokenizer_path=str(tiny_model_dir), max_seq_length=64)
    tok = load_tokenizer(tiny_model_dir)
    expected = len(encode(tok, canonical(rows[0], "alpaca"), 10**9).input_ids)
    truncated = failure(err, "truncated")
    assert truncated["observed"] == "5 of 120 rows"
    assert truncated["examples"][0] == {"row": 1, "line": 1, "value": f"{expected} tokens > max_seq_length 64"}
    stats = err.report["tokens"]
    assert (stats["truncated_rows"], stats["max"], stats["max_seq_length"]) == (5, expected, 64)
    assert abs(stats["truncated_share"] - 5 / 120) < 1e-12
    # Under the contract's 1% share, the same file passes (and the share is still reported).
    ok = rows_()
    ok[0]["output"] = rows[0]["output"]
    out = validate(DataConfig(path=str(write(tmp_path / "ok.jsonl", ok))), tmp_path / "ok", str(tiny_model_dir), 64)
    assert json.loads(Path(out.report_path).read_text())["tokens"]["truncated_rows"] == 1


def test_encoding_problems(tmp_path):
    lines = [json.dumps(r).encode() for r in rows_()]
    lines[2] = lines[2].replace(b"answer", b"an\xffswer")  # invalid UTF-8 in the raw bytes
    lines[4] = json.dumps({**rows_()[4], "output": "bell \x07 char"}).encode()
    lines[6] = json.dumps({**rows_()[6], "instruction": "Define caf\ufffd."}).encode()
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    err = violation(tmp_path, path=path)
    assert failed_columns(err) == {"encoding"}
    assert [e["value"] for e in failure(err, "encoding")["examples"]] == [
        "invalid UTF-8 byte 0xff in output at character 6",
        "control character U+0007 in output at character 5",
        "replacement character U+FFFD in instruction at character 10 (decoded with errors upstream)",
    ]


def test_label_sanity(tmp_path):
    rows = rows_()
    rows[1]["output"] = rows[1]["instruction"].lower()  # parrots the prompt
    for r in rows[20:32]:
        r["output"] = "I cannot help with that."  # one answer for 12 prompts (limit 10)
    err = violation(tmp_path, rows)
    assert failed_columns(err) == {"response_equals_prompt", "response_repeats"}
    assert failure(err, "response_equals_prompt")["examples"] == [
        {"row": 2, "line": 2, "value": "define the test word number 1."}
    ]
    repeats = failure(err, "response_repeats")
    assert repeats["observed"] == "12 of 120 rows" and repeats["expected"] == {"max_value": 10.0}
    assert repeats["examples"][0]["value"] == "12 prompts share the answer 'I cannot help with that.'"


def test_chat_role_order_and_final_assistant_turn(tmp_path):
    def convo(i):
        return {"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}!"}]}

    rows = [convo(i) for i in range(120)]
    rows[2]["messages"] = rows[2]["messages"][::-1]  # assistant first
    rows[5]["messages"] = rows[5]["messages"] + [{"role": "user", "content": "and?"}]  # ends with the user
    err = violation(tmp_path, rows, contract="chat_v1")
    assert failed_columns(err) == {"chat_roles", "chat_last_role"}
    assert [e["value"] for e in failure(err, "chat_roles")["examples"]] == ["assistant,user", "user,assistant,user"]
    assert [e["row"] for e in failure(err, "chat_last_role")["examples"]] == [3, 6]


# ---------------------------------------------------------------------------- policies


def bad_rows() -> list[dict]:
    rows = rows_(200)
    rows[3]["output"] = " "
    rows[7]["output"] = "ring \x07"
    rows[9] = dict(rows[8])
    return rows


def test_quarantine_sets_rows_aside_with_reasons_and_continues(tmp_path):
    path = write(tmp_path / "data.jsonl", bad_rows())
    out = validate(DataConfig(path=str(path), policy="quarantine"), tmp_path / "run")
    assert out.quarantined_rows == 3 and out.rows == 197 and out.train_rows + out.eval_rows == 197
    entries = [json.loads(x) for x in Path(out.quarantine_path).read_text().splitlines()]
    assert [(e["line"], e["reasons"]) for e in entries] == [
        (4, ["expect_column_values_to_match_regex(output): not blank"]),
        (
            8,
            [
                "expect_column_values_to_be_in_set(encoding): "
                "no invalid UTF-8, control characters or replacement characters"
            ],
        ),
        (10, ["expect_column_values_to_be_in_set(exact_duplicate): identical rows weigh an example twice"]),
    ]
    assert entries[0]["record"] == bad_rows()[3]
    kept = {
        json.dumps(json.loads(x)) for f in (out.train_path, out.eval_path) for x in Path(f).read_text().splitlines()
    }
    assert json.dumps(bad_rows()[3]) not in kept and json.dumps(bad_rows()[8]) in kept
    report = json.loads(Path(out.report_path).read_text())
    assert report["status"] == "passed with quarantine" and report["quarantine"]["rows"] == 3


def test_quarantine_over_the_contracts_share_stops_the_run(tmp_path):
    rows = bad_rows()
    for r in rows[100:110]:
        r["output"] = ""  # 13 of 200 rows = 6.5% > 5%
    err = violation(tmp_path, rows, policy="quarantine")
    assert "would set aside 13 of 200 rows (6.50%), over the contract's quarantine.max_share of 5.00%" in str(err)
    assert len((tmp_path / "run" / "data" / "quarantine.jsonl").read_text().splitlines()) == 13


def test_fail_policy_stops_at_the_same_data(tmp_path):
    err = violation(tmp_path, bad_rows())
    assert failed_columns(err) == {"output", "encoding", "exact_duplicate"}
    assert "nothing was trained or registered" in str(err)
    assert not (tmp_path / "run" / "data" / "quarantine.jsonl").exists()


def test_quarantine_cannot_fix_a_missing_column(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "output"} for r in rows_()]
    err = violation(tmp_path, rows, policy="quarantine")
    assert [f["expectation"] for f in err.failures] == ["expect_column_to_exist"]
    assert "cannot set aside rows for expect_column_to_exist(output)" in str(err)


# ---------------------------------------------------------------------------- reports


def test_reports_render_offline_and_name_failures(tmp_path):
    err = violation(tmp_path, bad_rows())
    html = (tmp_path / "run" / "data" / "validation_report.html").read_text()
    for forbidden in ("http://", "https://", "<script", "<link", "src="):
        assert forbidden not in html
    assert "<style>" in html and "FAILED" in html and "exact_duplicate" in html and "line 4: &#x27; &#x27;" in html
    assert "control character U+0007" in html and "loraflow data maintainers" in html
    from loraflow.data.report import markdown

    md = markdown(err.report, "http://mlflow/run/1")
    assert "| expectation | column | expected | observed | examples |" in md
    assert "| expect_column_values_to_match_regex | output | regex=\\S | 1 of 200 rows (0.50%) | line 4: ' ' |" in md
    assert "[http://mlflow/run/1](http://mlflow/run/1)" in md


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("setup", "error", "message"),
    [
        (lambda p: p / "missing.jsonl", UsageError, r"missing.jsonl does not exist; check data.path"),
        (lambda p: p, UsageError, r"is a directory; point data.path at one JSONL"),
        (lambda p: _file(p / "empty.jsonl", b""), DataError, r"empty.jsonl is empty \(0 bytes\)"),
        (
            lambda p: _file(p / "cut.jsonl", b'{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "x'),
            DataError,
            r"cut.jsonl line 2 is not valid JSON \(Unterminated string.*cut short",
        ),
        (
            lambda p: _file(p / "bad.jsonl", b'{"instruction": "a"}\n{"instruction": "b",, }\n{}\n'),
            DataError,
            r"bad.jsonl line 2 is not valid JSON \(Expecting property name.*column 21\).*fix or remove that line",
        ),
        (
            lambda p: _file(p / "wrong.csv", b"prompt,input,output\nhi,,there\n"),
            DataError,
            r"wrong.csv line 1 \(the CSV header\) lacks instruction: it has columns \['prompt', 'input', 'output'\]",
        ),
        (lambda p: _file(p / "data.jsonl.gz", b"\x1f\x8b\x08\x00rest", ".jsonl"), DataError, r"is gzip-compressed"),
        (lambda p: _file(p / "blob.jsonl", b"\x00\x01\x02binary"), DataError, r"blob.jsonl is not a text file"),
    ],
    ids=["missing", "directory", "empty", "truncated", "malformed", "csv-header", "gzip", "binary"],
)
def test_bad_input_gets_one_clear_error(tmp_path, setup, error, message):
    path = setup(tmp_path)
    with pytest.raises(error, match=message) as info:
        validate(DataConfig(path=str(path), format="jsonl" if path.suffix == ".gz" else "auto"), tmp_path / "run")
    assert info.value.exit_code == (2 if error is UsageError else 1)
    assert "\n" not in str(info.value)  # one paragraph
    assert not (tmp_path / "run" / "data" / "train.jsonl").exists()


def _file(path: Path, content: bytes, _suffix: str = "") -> Path:
    path.write_bytes(content)
    return path


def test_two_gigabyte_file_is_refused_before_reading(tmp_path):
    big = tmp_path / "big.jsonl"
    with big.open("wb") as f:
        f.truncate(2 * 1024**3)  # sparse: no disk space used
    with pytest.raises(DataError, match=r"big.jsonl is 2.0 GiB, over the contract's limit of 1.0 GiB") as info:
        validate(DataConfig(path=str(big)), tmp_path / "run")
    assert "split it into smaller shards" in str(info.value)


def test_path_outside_allowed_roots_is_a_usage_error(tmp_path):
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir(), outside.mkdir()
    data = write(outside / "data.jsonl", rows_())
    link = inside / "link.jsonl"
    link.symlink_to(data)  # a symlink cannot smuggle a file in
    for path in (data, link):
        with pytest.raises(UsageError, match=r"outside the allowed data roots") as info:
            validate(DataConfig(path=str(path), allowed_roots=[str(inside)]), tmp_path / "run")
        assert info.value.exit_code == 2
    assert validate(DataConfig(path=str(data), allowed_roots=[str(outside)]), tmp_path / "run").rows == 120


def test_config_file_defaults_allowed_roots_to_its_project(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.data.allowed_roots == [str(ROOT)] and cfg.data.policy == "fail"


# ---------------------------------------------------------------------------- CLI


def test_cli_prints_summary_and_exit_codes(tmp_path, capsys):
    good = write(tmp_path / "good.jsonl", rows_())
    assert main(["validate", str(good), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "passed all 21 expectations" in out and "validation_report.html" in out

    bad = write(tmp_path / "bad.jsonl", bad_rows())
    assert main(["validate", str(bad), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "FAILED: 3 of 21 expectations failed" in err and "line 4: ' '" in err
    assert str(tmp_path / "b" / "data" / "validation_report.html") in err
    assert main(["validate", str(bad), "--out", str(tmp_path / "c"), "--policy", "quarantine"]) == 0
    assert "3 quarantined" in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "d")]) == 2


def test_cli_never_prints_a_traceback_on_bad_input(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(bytes(range(256)) * 10)
    cmd = [sys.executable, "-m", "flows.cli", "validate", str(tmp_path / "bin.jsonl"), "--out", str(tmp_path / "o")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("loraflow validate: ") and "is not a text file" in result.stderr
