"""The trainer as a process of its own (flows/trainer.py): its result, its refusals, its crashes."""

from __future__ import annotations

import pytest

from flows.trainer import TrainerCrashed, run_attempt
from loraflow.config import PipelineConfig
from loraflow.errors import StageError
from loraflow.tracking import NULL_TRACKER
from tests.conftest import LORA, make_validated_data, tiny_records
from tests.stages.conftest import TRAIN


def config_with(train) -> PipelineConfig:
    return PipelineConfig(
        base_model={"name": "tiny", "path": "/unused"},
        data={"path": "/unused"},
        lora=LORA,
        train=train,
        registry={"model_name": "tiny"},
    )


def test_an_attempt_returns_the_trainers_adapter(tiny_quantized, tiny_data, tmp_path, capsys):
    cfg = config_with(TRAIN.model_copy(update={"max_steps": 3}))
    adapter = run_attempt(cfg, tiny_quantized, tiny_data, tmp_path / "run", tmp_path / "ck", NULL_TRACKER, 1)
    assert adapter.steps == 3 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    out = capsys.readouterr().out
    assert "trainer started (attempt 1" in out and "train step 3/3" in out


def test_a_refused_run_is_not_a_crash(tiny_quantized, tmp_path):
    """Too little data is the data's problem: the attempt fails with the trainer's message, and is not retried."""
    data = make_validated_data(tmp_path / "data", tiny_records()[:2], tiny_records()[:1])
    with pytest.raises(StageError, match="only 2 training examples") as e:
        run_attempt(config_with(TRAIN), tiny_quantized, data, tmp_path / "run", tmp_path / "ck", NULL_TRACKER, 1)
    assert not isinstance(e.value, TrainerCrashed)
