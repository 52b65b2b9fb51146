"""Unit tests of the validate stage: contracts, reading, checks, digest and split."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraflow.config import DataConfig
from loraflow.data.contracts import DEFAULT_CONTRACTS_DIR, available_contracts, load_contract
from loraflow.data.validation import ContractViolation
from loraflow.errors import DataError, UsageError
from tasks.validate import validate, validate_file

ROOT = Path(__file__).resolve().parents[2]
WORDNET = Path("/usr/share/wordnet")


def make_rows(n: int = 120, start: int = 0) -> list[dict]:
    return [
        {"instruction": f"Define the test word number {i}.", "input": "", "output": f"The answer for word {i}."}
        for i in range(start, start + n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(tmp_path: Path, rows: list[dict], name: str = "data.jsonl", **cfg) -> object:
    path = write_jsonl(tmp_path / name, rows)
    return validate(DataConfig(path=str(path), **cfg), tmp_path / "run")


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------- passing data


def test_passing_data_returns_counts_digest_and_writes_split(tmp_path):
    rows = make_rows(120)
    out = run(tmp_path, rows)
    assert (out.rows, out.contract, out.style) == (120, "instruction_v1@1.1.0", "alpaca")
    assert out.train_rows + out.eval_rows == 120 and out.eval_rows >= 1
    canonical = "\n".join(json.dumps(r, sort_keys=True) for r in rows).encode()
    assert out.digest == hashlib.sha256(canonical).hexdigest()
    assert out.file_sha256 == hashlib.sha256((tmp_path / "data.jsonl").read_bytes()).hexdigest()
    train, evals = read_jsonl(out.train_path), read_jsonl(out.eval_path)
    assert (len(train), len(evals)) == (out.train_rows, out.eval_rows)
    assert sorted(map(json.dumps, train + evals)) == sorted(map(json.dumps, rows))
    for p in (out.source, out.train_path, out.eval_path, out.report_path):
        assert Path(p).is_absolute()
    report = json.loads(Path(out.report_path).read_text())
    assert report["success"] is True and report["failures"] == []
    assert not (tmp_path / "run" / "data" / "hf_cache").exists()


def test_split_is_deterministic_and_stable_under_reordering_and_additions(tmp_path):
    rows = make_rows(400)
    for sub in "abc":
        (tmp_path / sub).mkdir()
    a = run(tmp_path / "a", rows)
    b = run(tmp_path / "b", rows[::-1])
    c = run(tmp_path / "c", rows + make_rows(200, start=400))
    eval_a = {r["instruction"] for r in read_jsonl(a.eval_path)}
    assert eval_a == {r["instruction"] for r in read_jsonl(b.eval_path)}
    assert eval_a <= {r["instruction"] for r in read_jsonl(c.eval_path)}
    assert a.digest != b.digest  # row order is part of the content digest
    again = run(tmp_path / "a", rows)
    assert Path(again.eval_path).read_bytes() == Path(a.eval_path).read_bytes()
    assert Path(again.train_path).read_bytes() == Path(a.train_path).read_bytes()


def test_eval_cap_and_train_cap(tmp_path):
    out = run(tmp_path, make_rows(200), eval_fraction=0.4, eval_max_rows=7, max_train_rows=50)
    assert (out.eval_rows, out.train_rows) == (7, 50)
    first_eval = read_jsonl(out.eval_path)
    other_seed = run(tmp_path, make_rows(200), eval_fraction=0.4, eval_max_rows=7, split_seed=1)
    assert read_jsonl(other_seed.eval_path) != first_eval


def test_digest_changes_with_content_not_with_format(tmp_path):
    rows = make_rows(120)
    base = run(tmp_path, rows)
    changed = [dict(r) for r in rows]
    changed[17]["output"] += " Edited."
    assert run(tmp_path, changed, name="changed.jsonl").digest != base.digest

    import pandas as pd

    csv = tmp_path / "data.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)  # the empty inputs come back as nulls
    parquet = tmp_path / "data.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    for path in (csv, parquet):
        out = validate(DataConfig(path=str(path)), tmp_path / "run")
        assert out.digest == base.digest
        assert out.file_sha256 != base.file_sha256


# ---------------------------------------------------------------------------- violations


def _missing_output(rows):
    return [{k: v for k, v in r.items() if k != "output"} for r in rows]


def _set(i, key, value):
    def edit(rows):
        rows[i][key] = value
        return rows

    return edit


def _duplicate(rows):
    rows[5]["instruction"] = rows[9]["instruction"]
    return rows


VIOLATIONS = {
    "missing column": (_missing_output, "expect_column_to_exist", "output"),
    "null output": (_set(3, "output", None), "expect_column_values_to_not_be_null", "output"),
    "blank output": (_set(3, "output", "   "), "expect_column_values_to_match_regex", "output"),
    "duplicate instruction": (_duplicate, "expect_column_values_to_be_in_set", "normalized_duplicate"),
    "too few rows": (lambda rows: rows[:40], "expect_table_row_count_to_be_between", "(table)"),
    "too long output": (_set(0, "output", "x" * 9000), "expect_column_value_lengths_to_be_between", "output"),
    "output not a string": (_set(2, "output", 42), "expect_column_values_to_be_in_type_list", "output"),
}


@pytest.mark.parametrize("case", list(VIOLATIONS), ids=list(VIOLATIONS))
def test_violation_raises_contract_violation_naming_expectation_and_column(tmp_path, case):
    edit, expectation, column = VIOLATIONS[case]
    if case == "output not a string":
        # Arrow needs one type per column: mixed str/int only survives in CSV as text, so use
        # a whole column of numbers.
        edit = lambda rows: [{**r, "output": i} for i, r in enumerate(rows)]  # noqa: E731
    with pytest.raises(ContractViolation) as info:
        run(tmp_path, edit(make_rows(120)))
    err = info.value
    assert isinstance(err, DataError)
    hits = [f for f in err.failures if f["expectation"] == expectation and f["column"] == column]
    assert hits, err.failures
    text = str(err)
    assert expectation in text and column in text and "instruction_v1@1.1.0" in text
    report = json.loads((tmp_path / "run" / "data" / "validation_report.json").read_text())
    assert report["success"] is False and report["failures"] == err.failures
    assert not (tmp_path / "run" / "data" / "train.jsonl").exists()


def test_violation_report_shows_examples_and_counts(tmp_path):
    rows = make_rows(120)
    rows[4]["output"] = rows[7]["output"] = "  "
    with pytest.raises(ContractViolation) as info:
        run(tmp_path, rows)
    (blank,) = [f for f in info.value.failures if f["expectation"] == "expect_column_values_to_match_regex"]
    assert blank["unexpected_count"] == 2
    assert blank["examples"] == [{"row": 5, "line": 5, "value": "  "}, {"row": 8, "line": 8, "value": "  "}]
    assert "2 of 120 rows" in str(info.value)


def test_missing_column_does_not_repeat_every_check_on_it(tmp_path):
    with pytest.raises(ContractViolation) as info:
        run(tmp_path, _missing_output(make_rows(120)))
    assert [f["expectation"] for f in info.value.failures] == ["expect_column_to_exist"]
    assert info.value.report["not_evaluated"]


# ---------------------------------------------------------------------------- unreadable files


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="nope.jsonl.*does not exist"):
        validate(DataConfig(path=str(tmp_path / "nope.jsonl")), tmp_path / "run")


def test_directory(tmp_path):
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(UsageError, match="folder.jsonl is a directory"):
        validate(DataConfig(path=str(tmp_path / "folder.jsonl")), tmp_path / "run")


@pytest.mark.parametrize(("content", "message"), [("", "is empty"), ("\n\n  \n", "has no rows")])
def test_empty_file(tmp_path, content, message):
    (tmp_path / "empty.jsonl").write_text(content)
    with pytest.raises(DataError, match=f"empty.jsonl {message}"):
        validate(DataConfig(path=str(tmp_path / "empty.jsonl")), tmp_path / "run")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(make_rows(1)[0]) + "\n" + '{"instruction": "x",\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2 is not valid JSON") as info:
        validate(DataConfig(path=str(path)), tmp_path / "run")
    assert info.value.__cause__ is not None
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 1 holds a JSON list"):
        validate(DataConfig(path=str(path)), tmp_path / "run")


def test_corrupt_parquet_and_unknown_extension(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match=r"bad.parquet is not a Parquet file"):
        validate(DataConfig(path=str(tmp_path / "bad.parquet")), tmp_path / "run")
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(UsageError, match="data.txt.*set data.format"):
        validate(DataConfig(path=str(tmp_path / "data.txt")), tmp_path / "run")


# ---------------------------------------------------------------------------- contracts


def copy_contract(tmp_path: Path, name: str = "instruction_v1") -> Path:
    contracts = tmp_path / "contracts"
    shutil.copytree(DEFAULT_CONTRACTS_DIR / name, contracts / name)
    return contracts


def test_unknown_expectation_type_is_refused(tmp_path):
    contracts = copy_contract(tmp_path)
    suite_path = contracts / "instruction_v1" / "suite.json"
    suite = json.loads(suite_path.read_text())
    suite["expectations"].append({"type": "expect_column_values_to_be_awesome", "kwargs": {"column": "output"}})
    suite_path.write_text(json.dumps(suite))
    with pytest.raises(UsageError, match="expect_column_values_to_be_awesome"):
        load_contract("instruction_v1", contracts)


def test_invalid_expectation_kwargs_and_bad_metadata_are_refused(tmp_path):
    contracts = copy_contract(tmp_path)
    suite_path = contracts / "instruction_v1" / "suite.json"
    suite = json.loads(suite_path.read_text())
    suite["expectations"][1]["kwargs"]["colum"] = "typo"
    suite_path.write_text(json.dumps(suite))
    with pytest.raises(UsageError, match="suite.json is invalid"):
        load_contract("instruction_v1", contracts)
    meta_path = contracts / "instruction_v1" / "contract.yaml"
    meta = yaml.safe_load(meta_path.read_text())
    meta.update(version="one", style="sharegpt")
    meta_path.write_text(yaml.safe_dump(meta))
    with pytest.raises(UsageError, match=r"(?s)version.*style"):
        load_contract("instruction_v1", contracts)


def test_unknown_contract_lists_available_ones(tmp_path):
    with pytest.raises(UsageError, match=r"unknown data contract 'instruction_v9'.*chat_v1, instruction_v1"):
        validate_file(str(tmp_path / "x.jsonl"), "instruction_v9", tmp_path / "run")
    assert available_contracts() == ["chat_v1", "instruction_v1"]


@pytest.mark.parametrize("name", ["instruction_v1", "chat_v1"])
def test_shipped_contract_thresholds_match_suite(name):
    contract = load_contract(name)
    by_type: dict[str, list[dict]] = {}
    for e in contract.suite.expectations:
        cfg = e.configuration
        by_type.setdefault(cfg.type, []).append(cfg.kwargs)
    thresholds = contract.meta["thresholds"]
    (rows,) = by_type["expect_table_row_count_to_be_between"]
    assert (rows["min_value"], rows["max_value"]) == (thresholds["min_rows"], thresholds["max_rows"])
    for kw in by_type.get("expect_column_value_lengths_to_be_between", []):
        assert [kw["min_value"], kw["max_value"]] == thresholds[f"{kw['column']}_length"]
    assert set(contract.meta["columns"]) <= {kw["column"] for kw in by_type["expect_column_to_exist"]}


# ---------------------------------------------------------------------------- chat


def chat_rows(n: int = 120) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "You define words."},
                {"role": "user", "content": f"Define word {i}."},
                {"role": "assistant", "content": f"Word {i} means {i}."},
            ]
        }
        for i in range(n)
    ]


def test_chat_contract_passes_and_checks_role_order(tmp_path):
    out = run(tmp_path, chat_rows(), contract="chat_v1")
    assert (out.style, out.contract, out.rows) == ("chat", "chat_v1@1.1.0", 120)
    assert read_jsonl(out.train_path)[0]["messages"][0] == {"role": "system", "content": "You define words."}
    rows = chat_rows()
    rows[3]["messages"] = rows[3]["messages"][:2]  # ends with the user
    rows[8]["messages"][2]["content"] = " "
    with pytest.raises(ContractViolation) as info:
        run(tmp_path, rows, contract="chat_v1")
    failed = {(f["expectation"], f["column"]) for f in info.value.failures}
    assert failed == {
        ("expect_column_values_to_match_regex", "chat_roles"),
        ("expect_column_values_to_be_in_set", "chat_last_role"),
        ("expect_column_values_to_be_between", "chat_min_content_chars"),
    }
    by_column = {f["column"]: f for f in info.value.failures}
    assert by_column["chat_last_role"]["examples"] == [{"row": 4, "line": 4, "value": "user"}]
    assert by_column["chat_roles"]["examples"] == [{"row": 4, "line": 4, "value": "system,user"}]


# ---------------------------------------------------------------------------- shipped data


def test_shipped_dataset_and_fixture_pass_instruction_v1(tmp_path):
    out = validate_file(str(ROOT / "data" / "wordnet_definitions.jsonl"), "instruction_v1", tmp_path / "run")
    assert (out.rows, out.eval_rows, out.train_rows) == (3000, 64, 2936)
    small = validate_file(
        str(ROOT / "tests" / "fixtures" / "instructions_small.jsonl"), "instruction_v1", tmp_path / "s"
    )
    assert small.rows == 160 and small.eval_rows >= 1


@pytest.mark.skipif(
    not (WORDNET / "index.noun").is_file(), reason="WordNet 3.0 not installed (apt-get install wordnet-base)"
)
def test_derivation_script_is_reproducible(tmp_path):
    script = ROOT / "scripts" / "derive_wordnet_dataset.py"
    outs = []
    for name in ("a.jsonl", "b.jsonl"):
        cmd = [sys.executable, str(script), "--out", str(tmp_path / name), "--n", "200", "--seed", "3"]
        subprocess.run(cmd, check=True, capture_output=True)
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]
    records = [json.loads(line) for line in outs[0].decode().splitlines()]
    assert len(records) == 200 and len({r["instruction"] for r in records}) == 200
    for r in records:
        assert r["instruction"].startswith("Define the ") and r["input"] == ""
        assert r["output"][0].isupper() and r["output"].endswith((".", "!", "?")) and '"' not in r["output"]


def test_module_imports_without_prefect_or_gx():
    code = "import sys, tasks.validate; assert not {'prefect', 'great_expectations', 'datasets'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
