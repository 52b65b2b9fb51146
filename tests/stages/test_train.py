"""The train stage on the tiny Llama: loss, adapter format, checkpoints, determinism, packing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraflow.errors import DataError
from loraflow.ml.memory import PROFILES
from loraflow.records import Adapter
from tasks.train import train
from tests.conftest import (
    LORA,
    PROJECTIONS,
    make_validated_data,
    model_inputs,
    tiny_records,
)
from tests.stages.conftest import TRAIN, lora_on_fresh_base, loss_curve, step_loss, training_batches

# --- train ---


def test_train_loss_decreases(trained: Adapter) -> None:
    curve = loss_curve(trained)
    assert len(curve) == trained.steps == 15
    assert curve[-1] < 0.9 * curve[0]
    assert sum(curve[-3:]) < sum(curve[:3])
    assert trained.final_loss == curve[-1]  # log_every=1: the last window is the last step
    assert trained.train_examples == 16
    assert trained.epochs == 15 / 4
    assert trained.trained_tokens > 0


def test_adapter_is_standard_peft(trained: Adapter, tiny_quantized) -> None:
    adapter_dir = Path(trained.path)
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert (adapter_dir / "tokenizer.json").is_file()
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["r"] == LORA.r
    assert cfg["lora_alpha"] == LORA.alpha
    # 'all-linear' is resolved to the adapted modules' names (every projection of every layer).
    assert {name.rsplit(".", 1)[-1] for name in cfg["target_modules"]} == PROJECTIONS
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert len(saved) == 2 * 2 * len(PROJECTIONS)  # lora_A and lora_B per adapted layer
    assert all(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)  # trained, not the zero init

    # Loaded onto a fresh 4-bit base, every adapter tensor arrives (none silently re-initialised).
    model = lora_on_fresh_base(tiny_quantized, adapter_dir)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)
    for k, t in saved.items():
        torch.testing.assert_close(loaded[k.replace(".weight", ".default.weight")], t, rtol=0, atol=0)


def test_checkpoints_every_n_steps(trained: Adapter) -> None:
    names = [Path(c).name for c in trained.checkpoints]
    assert names == ["step-000005", "step-000010"]  # the final step goes to adapter/ instead
    for c, step in zip(trained.checkpoints, (5, 10), strict=True):
        assert (Path(c) / "adapter_config.json").is_file()
        assert (Path(c) / "adapter_model.safetensors").is_file()
        state = torch.load(Path(c) / "trainer_state.pt", weights_only=False)
        assert json.loads((Path(c) / "meta.json").read_text())["step"] == step
        assert set(state) == {"optimizer", "scheduler", "rng", "loop"}
        assert state["scheduler"]["last_epoch"] == step
        assert [row["step"] for row in state["loop"]["curve"]] == list(range(1, step + 1))


def test_saved_adapters_reproduce_the_training_losses(trained, tiny_quantized, tiny_data, tok, tmp_path) -> None:
    """A checkpoint or final adapter, loaded onto a fresh 4-bit base, is the model that trained.

    The loss that train() recorded at step k+1 was computed by the model after k steps; a saved
    adapter from step k must give the same loss on the same batch.
    """
    curve = loss_curve(trained)
    batches = training_batches(tok, tiny_data, TRAIN)
    assert trained.trained_tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    ck10 = lora_on_fresh_base(tiny_quantized, trained.checkpoints[1])
    assert step_loss(ck10, batches[10]) == pytest.approx(curve[10], rel=1e-6)

    # A 5-step run with the same seed ends where the 15-step run was at step 5.
    short_cfg = TRAIN.model_copy(update={"max_steps": 5, "checkpoint_every": None})
    short = train(tiny_quantized, tiny_data, LORA, short_cfg, tmp_path / "short")
    assert loss_curve(short) == curve[:5]
    final = load_file(Path(short.path) / "adapter_model.safetensors")
    ck5 = load_file(Path(trained.checkpoints[0]) / "adapter_model.safetensors")
    assert final.keys() == ck5.keys()
    assert all(torch.equal(final[k], ck5[k]) for k in final)
    model = lora_on_fresh_base(tiny_quantized, short.path)
    assert step_loss(model, batches[5]) == pytest.approx(curve[5], rel=1e-6)

    # And the adapter changes the model's logits: it is not a no-op.
    model.eval()
    with torch.no_grad():
        inputs = model_inputs(batches[0])
        tuned = model(**inputs).logits
        with model.disable_adapter():
            plain = model(**inputs).logits
        assert (tuned - plain).abs().max().item() > 1e-2


def test_same_seed_same_curve_other_seed_other_curve(trained, tiny_quantized, tiny_data, tmp_path) -> None:
    rng = torch.get_rng_state()
    again = train(tiny_quantized, tiny_data, LORA, TRAIN, tmp_path / "again")
    assert torch.equal(torch.get_rng_state(), rng)  # seeding stays inside train()
    assert loss_curve(again) == loss_curve(trained)  # exact
    assert again.final_loss == trained.final_loss

    other_cfg = TRAIN.model_copy(update={"seed": 1, "max_steps": 5, "checkpoint_every": None})
    other = train(tiny_quantized, tiny_data, LORA, other_cfg, tmp_path / "other")
    assert loss_curve(other) != loss_curve(trained)[:5]


@pytest.mark.parametrize(
    "update",
    [
        {"memory_profile": "balanced"},
        {"memory_profile": "lean"},
        {"memory_profile": "lean", "compile": "on"},
        {"batch_size": 2, "grad_accum": 2},
    ],
    ids=["recompute-layers", "recompute-layers-offloaded", "compiled-layers-offloaded", "grad-accum"],
)
def test_equivalent_settings_give_the_same_curve(trained, tiny_quantized, tiny_data, tmp_path, update) -> None:
    """Recomputing activations (with the layer inputs offloaded or not), compiling the layers, or
    splitting a batch of 4 into 2 x 2 token-weighted micro-batches, changes how a step is computed
    but not what it computes."""
    cfg = TRAIN.model_copy(update={"max_steps": 5, "checkpoint_every": None, **update})
    other = train(tiny_quantized, tiny_data, LORA, cfg, tmp_path / "run")
    # bf16 compute: compiled kernels keep fused intermediates in fp32, eager ones round each to bf16
    rel = 1e-3 if update.get("compile") == "on" else 1e-4
    assert loss_curve(other) == pytest.approx(loss_curve(trained)[:5], rel=rel)


@pytest.mark.parametrize("compile", ["off", "on"])
def test_tiled_mlps_give_the_same_curve(trained, tiny_quantized, tiny_data, tmp_path, monkeypatch, compile) -> None:
    """``lean`` with every MLP run in 5-token tiles (the profile tiles only long micro-batches), eager and
    in compiled layers (the tiles are a graph break there), trains what the untiled run trains."""
    monkeypatch.setitem(PROFILES, "lean", dataclasses.replace(PROFILES["lean"], mlp_tile_tokens=5, mlp_tile_above=0))
    update = {"max_steps": 5, "checkpoint_every": None, "memory_profile": "lean", "compile": compile}
    cfg = TRAIN.model_copy(update=update)
    other = train(tiny_quantized, tiny_data, LORA, cfg, tmp_path / "run")
    rel = 1e-3 if compile == "on" else 1e-4
    assert loss_curve(other) == pytest.approx(loss_curve(trained)[:5], rel=rel)


class _Params:
    """A tracker that keeps the params it is given."""

    def __init__(self) -> None:
        self.params: dict = {}

    def log_params(self, params: dict) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass


def test_cloq_init_is_calibrated_on_training_rows_deterministically_and_recorded(
    trained, tiny_quantized, tiny_data, tmp_path
) -> None:
    lora = LORA.model_copy(update={"init": "cloq", "calibration_rows": 5})
    cfg = TRAIN.model_copy(update={"max_steps": 3, "checkpoint_every": None})
    tracker, rng = _Params(), torch.get_rng_state()
    cloq = train(tiny_quantized, tiny_data, lora, cfg, tmp_path / "cloq", tracker)
    assert torch.equal(torch.get_rng_state(), rng)
    assert tracker.params["lora"]["init"] == "cloq" and tracker.params["lora"]["calibration_rows"] == 5
    assert loss_curve(train(tiny_quantized, tiny_data, lora, cfg, tmp_path / "again")) == loss_curve(cloq)
    assert loss_curve(cloq)[0] != loss_curve(trained)[0]  # same batches, another start: B @ A is not zero


def test_packed_training_fills_rows_with_real_tokens(trained, tiny_quantized, tiny_data, tmp_path) -> None:
    """With packing, a step of 3 rows of at most 64 tokens holds two ~25-token examples a row: more real
    tokens than a step of 4 padded examples, and the loss still falls."""
    cfg = TRAIN.model_copy(update={"packing": True, "batch_size": 3, "checkpoint_every": None})
    packed = train(tiny_quantized, tiny_data, LORA, cfg, tmp_path / "packed")
    curve = loss_curve(packed)
    assert len(curve) == packed.steps == 15
    assert sum(curve[-3:]) < sum(curve[:3])
    assert packed.trained_tokens > trained.trained_tokens


@pytest.mark.parametrize(
    ("rows", "max_seq_length", "kept"),
    [(tiny_records()[:2], 64, 2), (tiny_records(), 8, 0)],
    ids=["too-few-rows", "all-responses-truncated"],
)
def test_too_few_examples_is_a_data_error(tiny_quantized, tmp_path, rows, max_seq_length, kept) -> None:
    data = make_validated_data(tmp_path / "data", rows, rows[:1])
    cfg = TRAIN.model_copy(update={"max_seq_length": max_seq_length})
    with pytest.raises(DataError, match=f"only {kept} training examples .* fewer than one batch of 4"):
        train(tiny_quantized, data, LORA, cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "adapter").exists()
