"""Shared by the flow tests: a tiny Llama base, run configs for it, and the `loraflow` CLI against the test stack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import yaml

from loraflow.stack.services import down, status, up
from tests.stack.test_stack import settings

FIXTURE = Path(__file__).parents[1] / "fixtures" / "instructions_small.jsonl"
MODEL_NAME = "tiny-wordnet"


def cli_env(stack) -> dict[str, str]:
    """The environment of a `loraflow` command pointed at the test stack."""
    return {
        **os.environ,
        "LORAFLOW_HOME": str(stack.home),
        "LORAFLOW_PREFECT_PORT": str(stack.prefect_port),
        "LORAFLOW_MLFLOW_PORT": str(stack.mlflow_port),
    }


def cli(stack, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], env=cli_env(stack), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from loraflow.ml.tiny import build_tiny_llama

    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    texts = [f"{r['instruction']} {r['output']}" for r in rows] * 3
    return build_tiny_llama(tmp_path_factory.mktemp("pipeline") / "tiny", texts, vocab_size=768)


def write_config(path: Path, base: Path, data: Path, model_name: str = MODEL_NAME) -> Path:
    """A run config for the tiny base. Its training seed is derived from `model_name`: the stage cache keys on
    what a stage computes (not on the registry name), so two tests on the shared stack with the same training
    would otherwise share a cached train stage, and a test that asserts a fresh run would see a cache hit."""
    # max_seq_length 96: the fixture's longest example is 91 tokens with the tiny tokenizer, and the
    # contract refuses data whose share over max_seq_length exceeds 1%.
    cfg = {
        "base_model": {
            "name": "tiny-llama-test",
            "source": "hf",
            "path": str(base),
            "allowed_roots": [str(base.parent)],  # built in a tmp folder, not in the config's project
        },
        "data": {
            "path": str(data),
            "contract": "instruction_v1",
            "eval_fraction": 0.05,
            "eval_max_rows": 8,
            "allowed_roots": [str(data.parent)],  # the config lives elsewhere
        },
        "lora": {"r": 4, "alpha": 8},
        "train": {
            "learning_rate": 5e-3,
            "max_steps": 6,
            "batch_size": 4,
            "max_seq_length": 96,
            "checkpoint_every": 3,
            "seed": zlib.crc32(model_name.encode()) % 100_000,
        },
        "eval": {"batch_size": 8, "max_new_tokens": 6},
        "merge": {"verify_rows": 4, "tolerance": 1e-3},
        "registry": {"model_name": model_name},
        "tracking": {"experiment": "loraflow-tests"},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def deployed_stack(local_stack):
    result = cli(local_stack, "up")
    assert result.returncode == 0, result.stderr
    return local_stack


@pytest.fixture
def own_stack(tmp_path):
    s = settings(tmp_path / "home")
    try:
        up(s, timeout=120)
        done = subprocess.run([sys.executable, "-m", "flows.cli", "up"], env=cli_env(s), capture_output=True)
        assert done.returncode == 0, done.stderr
        yield s
    finally:
        down(s)


def crash_mlflow(s) -> None:
    """SIGKILL the whole MLflow server (its process group: the CLI process and the uvicorn worker), so that
    nothing answers on its port until `up` starts it again."""
    os.killpg(status(s)["mlflow"].pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _answers(s.mlflow_url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _answers(s.mlflow_url), "the MLflow server still answers after SIGKILL"


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False
