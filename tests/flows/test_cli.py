"""`loraflow run` refuses what it can tell is wrong before any flow starts: one paragraph, every problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def run_cli(tmp_path: Path, edit) -> subprocess.CompletedProcess:
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["data"]["allowed_roots"] = [str(ROOT / "data")]
    config["data"]["path"] = str(ROOT / "data" / "wordnet_definitions.jsonl")
    edit(config)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"LORAFLOW_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}  # no stack runs there
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(path)], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_a_wrong_config_and_a_stopped_stack_are_one_paragraph(tmp_path):
    done = run_cli(tmp_path, lambda c: c["data"].update(path=str(ROOT / "data" / "missing.jsonl"), contract="nope_v1"))
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "loraflow run: preflight found 3 problems:", done.stderr
    assert "missing.jsonl" in lines[1] + lines[2] + lines[3] and "nope_v1" in done.stderr
    assert "the local stack is not running" in lines[-1] and "loraflow up" in lines[-1]


def test_a_stopped_stack_alone_is_exit_1(tmp_path):
    done = run_cli(tmp_path, lambda c: None)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        "loraflow run: preflight found a problem:",
        f"  - the local stack is not running under {tmp_path / 'home'}: start it with `loraflow up` "
        "(or use `loraflow demo`)",
    ]
