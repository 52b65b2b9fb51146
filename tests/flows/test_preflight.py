"""Preflight on its own: every problem a run would meet, found in seconds, each with its fix."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest

from flows import preflight as P
from loraflow.config import load_config
from loraflow.errors import StackError, UsageError

ROOT = Path(__file__).resolve().parents[2]


def demo(**sets: str):
    return load_config(ROOT / "configs" / "demo.yaml", [f"{k}={v}" for k, v in sets.items()])


def whats(problems) -> str:
    return "\n".join(p.what for p in problems)


def test_the_demo_config_passes(tmp_path):
    assert P.preflight(demo(), tmp_path, None) == []


def test_an_unknown_contract_does_not_hide_a_missing_file(tmp_path):
    problems = P.preflight(demo(**{"data.contract": "nope_v1", "data.path": "../data/missing.jsonl"}), tmp_path, None)
    assert len(problems) == 2 and all(p.usage for p in problems)
    assert "unknown data contract 'nope_v1'" in problems[0].what and "instruction_v1" in problems[0].what
    assert "missing.jsonl does not exist" in problems[1].what


def test_a_missing_gguf_file_names_what_the_folder_holds(tmp_path):
    problems = P.preflight(demo(**{"base_model.gguf_file": "Other.gguf"}), tmp_path, None)
    assert len(problems) == 1 and "Other.gguf not found" in problems[0].what
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in problems[0].what


def test_a_folder_that_is_not_a_model(tmp_path):
    config = demo(**{"base_model.source": "hf", "base_model.path": str(tmp_path)})
    problems = P.preflight(config, tmp_path, None)
    assert "is outside the allowed model roots" in whats(problems)  # the roots first: nothing outside is read
    config = config.model_copy(
        update={"base_model": config.base_model.model_copy(update={"allowed_roots": [str(tmp_path)]})}
    )
    problems = P.preflight(config, tmp_path, None)
    assert whats(problems) == f"base model: {tmp_path} has no config.json: it is not a Hugging Face model folder"


def test_too_little_disk_is_the_machines_problem_with_the_figures(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(P.shutil, "disk_usage", lambda _: usage(2**40, 2**40, 2**20))  # 1 MiB free
    problems = P.preflight(demo(), tmp_path / "home", None)
    assert len(problems) == 1 and not problems[0].usage
    assert "0.0 GiB free" in problems[0].what and "LORAFLOW_HOME" in problems[0].what
    with pytest.raises(StackError):
        P.raise_if_any(problems)


def test_one_config_problem_makes_the_whole_report_a_usage_error(tmp_path):
    problems = [P.Problem("a machine problem", False), P.Problem("a config problem", True)]
    with pytest.raises(UsageError, match=r"preflight found 2 problems:\n  - a machine problem\n  - a config problem"):
        P.raise_if_any(problems)
