"""Shared test setup. Offline hygiene first: nothing in the suite may reach the Hub."""

from __future__ import annotations

import os

from loraflow.stack.settings import OFFLINE_AND_QUIET  # noqa: E402  (no third-party import before it)

for _key, _value in OFFLINE_AND_QUIET.items():  # as the CLI and every process of the stack
    os.environ.setdefault(_key, _value)

from loraflow.noise import silence_known_noise  # noqa: E402

silence_known_noise()  # what the entry points silence, the suite silences too: nothing else is hidden


def pytest_configure(config):
    """pytest resets warning filters for each test: give it loraflow/noise.py's list, the one source."""
    from loraflow.noise import WARNINGS

    for category, message in WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is available (the lent H200 machine, never CI)."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- local stack fixture ---
# A real Prefect server, MLflow server and worker on free ports, shared by the whole session
# (~12 s to start). Tests get the settings and point their clients at it with client_env(s).

import pytest  # noqa: E402  (kept inside this block so that it stays self-contained)


def _local_stack_ports() -> tuple[int, int]:
    import socket

    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        return a.getsockname()[1], b.getsockname()[1]


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    """StackSettings of a running local stack; stopped with down() at the end of the session."""
    from loraflow.stack.services import down, up
    from loraflow.stack.settings import StackSettings

    prefect_port, mlflow_port = _local_stack_ports()
    s = StackSettings(
        home=tmp_path_factory.mktemp("loraflow-stack"), prefect_port=prefect_port, mlflow_port=mlflow_port
    )
    try:
        up(s, timeout=120)
        yield s
    finally:
        down(s)


# --- end local stack fixture ---


# --- tiny model fixtures ---
# A random Llama (hidden 64, 2 layers) with a BPE tokenizer trained on the records below, a
# small repetitive instruction dataset, and the model quantized once per session. Building and
# quantizing take well under a second; the stage tests share them.

import contextlib  # noqa: E402
import json  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from loraflow.config import LoraConfig  # noqa: E402

TINY_NAMES = ["Ann", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal"]


def tiny_records() -> list[dict[str, str]]:
    """Eight near-identical alpaca records: easy to fit, so a few steps visibly lower the loss."""
    return [
        {"instruction": f"Say hello to {n}.", "input": "", "output": f"Hello, {n}! Nice to meet you."}
        for n in TINY_NAMES
    ]


def tiny_corpus() -> list[str]:
    """Tokenizer training text: the records as the fallback template renders them, plus some chat words."""
    texts = [f"### User:\n{r['instruction']}\n### Response:\n{r['output']}" for r in tiny_records()]
    texts += ["### System:\nYou are a helpful AI assistant.", "user assistant system: What is two plus two? Four."]
    return texts * 5


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run tiny-model work on ``n`` intra-op threads, restoring the count afterwards.

    Tiny matrices gain nothing from threads, and on a busy 2-core machine two spinning OpenMP
    threads make a 15-step training run 10x slower than one thread does.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_validated_data(folder: Path, train_rows: list[dict], eval_rows: list[dict]):
    """A ValidatedData record over the given rows (the validate stage is not needed for stage tests)."""
    from loraflow.records import ValidatedData

    train_path = write_jsonl(folder / "train.jsonl", train_rows)
    eval_path = write_jsonl(folder / "eval.jsonl", eval_rows)
    return ValidatedData(
        source=str(train_path),
        digest="0" * 64,
        file_sha256="0" * 64,
        contract="instruction_v1@1",
        style="alpaca",
        rows=len(train_rows) + len(eval_rows),
        train_rows=len(train_rows),
        eval_rows=len(eval_rows),
        train_path=str(train_path),
        eval_path=str(eval_path),
        report_path=str(folder / "report.json"),
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Directory of a saved tiny full-precision Llama and its tokenizer (no chat template)."""
    from loraflow.ml.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-model") / "model", tiny_corpus(), hidden=64, layers=2)


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="session")
def tiny_quantized(tiny_model_dir, tiny_cache_dir):
    """QuantizedBase of the tiny model (NF4 + double quant, bf16 compute), quantized once per session."""
    from loraflow.config import BaseModelConfig, QuantConfig
    from loraflow.ml.models import prepare_base
    from tasks.quantize import quantize

    with torch_threads(1):
        return quantize(
            prepare_base(BaseModelConfig(name="tiny-llama", path=str(tiny_model_dir)), tiny_cache_dir),
            QuantConfig(),
            tiny_cache_dir,
        )


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """ValidatedData: 16 training rows (the eight records twice) and 4 held-out rows."""
    records = tiny_records()
    return make_validated_data(tmp_path_factory.mktemp("tiny-data"), records * 2, records[:4])


@pytest.fixture(scope="session")
def tok(tiny_quantized):
    from loraflow.ml.models import load_tokenizer

    return load_tokenizer(tiny_quantized.path)


# Dropout off so that a saved adapter reproduces the losses seen during training exactly.
LORA = LoraConfig(dropout=0.0)
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def linear4bit(model):
    """name -> bitsandbytes Linear4bit layer of a model."""
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def records_batch(tok, n: int = 4):
    """The first n tiny records encoded and collated as training sees them."""
    from loraflow.ml.batching import collate
    from loraflow.ml.examples import encode_all

    return collate(encode_all(tok, tiny_records()[:n], 64), tok.pad_token_id)


def model_inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


# --- end tiny model fixtures ---
