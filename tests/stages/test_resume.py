"""Resume is proven, not assumed: a run that resumes from a checkpoint computes what an uninterrupted run computes.

On the CPU with one thread the kernels are deterministic, so "the same" means bit-identical: every
step's loss after the resume point, and every adapter tensor at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraflow import tags as T
from loraflow.errors import UsageError
from loraflow.ml import checkpoints
from loraflow.tracking import EventLog, EventReader
from tasks.train import TrainRequest, train
from tests.conftest import LORA
from tests.stages.conftest import TRAIN, loss_curve

ROOT = Path(__file__).resolve().parents[2]


def adapter_tensors(adapter) -> dict[str, torch.Tensor]:
    return load_file(Path(adapter.path) / "adapter_model.safetensors")


def assert_same_run(a, b) -> None:
    assert loss_curve(a) == loss_curve(b)  # exact
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("from_step", [5, 10])
def test_resumed_run_equals_the_uninterrupted_run(trained, tiny_quantized, tiny_data, tmp_path, from_step) -> None:
    """The checkpoints of the session's 15-step run are what a run killed after step 10 (or 5) leaves."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(Path(trained.checkpoints[0]).parent, folder)
    for c in checkpoints.complete(folder):
        if c.step > from_step:
            shutil.rmtree(c.path)  # the run died before writing it
    log = EventLog(tmp_path / "events.jsonl")
    resumed = train(tiny_quantized, tiny_data, LORA, TRAIN, tmp_path / "run", log, checkpoint_dir=folder)
    assert_same_run(resumed, trained)
    tags = [e["tags"] for e in EventReader(log.path).new() if e["kind"] == "tags"]
    assert tags == [{T.RESUMED_FROM: f"step {from_step}: {folder / f'step-{from_step:06d}'}"}]
    metric_steps = [e["step"] for e in EventReader(log.path).new() if e["kind"] == "metrics" and e["step"]]
    assert metric_steps == list(range(from_step + 1, 16))  # only the steps it computed itself


def test_checkpoint_with_the_optimizer_keyed_by_position_resumes(trained, tiny_quantized, tiny_data, tmp_path):
    """Checkpoints hold the optimizer state keyed by parameter name (one format for every placement); those
    written before it held ``optimizer.state_dict()``, keyed by position, and still resume exactly."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(Path(trained.checkpoints[0]).parent, folder)
    newest = checkpoints.latest(folder)
    state = newest.state()
    by_name = state["optimizer"]
    (group,) = by_name["param_groups"]
    names = group["params"]  # the optimizer's order
    assert all(isinstance(k, str) for k in by_name["state"]) and set(by_name["state"]) == set(names)
    state["optimizer"] = {
        "state": {i: by_name["state"][name] for i, name in enumerate(names)},
        "param_groups": [{**group, "params": list(range(len(names)))}],
    }
    torch.save(state, newest.path / checkpoints.STATE)
    resumed = train(tiny_quantized, tiny_data, LORA, TRAIN, tmp_path / "run", checkpoint_dir=folder)
    assert_same_run(resumed, trained)


def test_checkpoint_of_other_versions_is_refused_unless_allowed(trained, tiny_quantized, tiny_data, tmp_path) -> None:
    folder = tmp_path / "checkpoints"
    shutil.copytree(Path(trained.checkpoints[0]).parent, folder)
    newest = checkpoints.latest(folder)
    meta = json.loads((newest.path / "meta.json").read_text())
    meta["versions"]["peft"] = "0.0.1"
    (newest.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match=r"peft 0\.0\.1 -> .* train\.resume_across_versions=true"):
        train(tiny_quantized, tiny_data, LORA, TRAIN, tmp_path / "refused", checkpoint_dir=folder)

    allowed = TRAIN.model_copy(update={"resume_across_versions": True})
    log = EventLog(tmp_path / "events.jsonl")
    resumed = train(tiny_quantized, tiny_data, LORA, allowed, tmp_path / "run", log, checkpoint_dir=folder)
    assert_same_run(resumed, trained)  # the versions did not really change
    tags = next(e["tags"] for e in EventReader(log.path).new() if e["kind"] == "tags")
    assert tags[T.RESUMED_ACROSS_VERSIONS].startswith("peft 0.0.1 -> ")


def test_checkpoint_of_another_run_is_refused(trained, tiny_quantized, tiny_data, tmp_path) -> None:
    folder = tmp_path / "checkpoints"
    shutil.copytree(Path(trained.checkpoints[0]).parent, folder)
    other = TRAIN.model_copy(update={"learning_rate": 5e-3})  # another run: same folder, other key
    with pytest.raises(UsageError, match="belongs to another run .*--fresh"):
        train(tiny_quantized, tiny_data, LORA, other, tmp_path / "run", checkpoint_dir=folder)


def test_bookkeeping_settings_keep_the_run_key(trained, tiny_quantized, tiny_data, tmp_path) -> None:
    """Changing how often to checkpoint or log is not another run: its checkpoints still resume."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(Path(trained.checkpoints[0]).parent, folder)
    cfg = TRAIN.model_copy(update={"checkpoint_every": 3, "keep_checkpoints": 1, "retries": 5, "log_every": 1})
    resumed = train(tiny_quantized, tiny_data, LORA, cfg, tmp_path / "run", checkpoint_dir=folder)
    assert loss_curve(resumed) == loss_curve(trained)
    assert [c.step for c in checkpoints.complete(folder)] == [12]  # 3, 6, 9, 12 written after 10; one kept


def test_calibration_rows_keep_the_run_key_of_an_uncalibrated_init(
    trained, tiny_quantized, tiny_data, tmp_path
) -> None:
    """lora.calibration_rows only matters to lora.init='cloq': with peft's init it is the same run."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(Path(trained.checkpoints[0]).parent, folder)
    lora = LORA.model_copy(update={"calibration_rows": 7})
    resumed = train(tiny_quantized, tiny_data, lora, TRAIN, tmp_path / "run", checkpoint_dir=folder)
    assert loss_curve(resumed) == loss_curve(trained)
    with pytest.raises(UsageError, match="belongs to another run"):
        cloq = lora.model_copy(update={"init": "cloq"})
        train(tiny_quantized, tiny_data, cloq, TRAIN, tmp_path / "cloq", checkpoint_dir=folder)


def test_half_written_checkpoints_are_ignored_and_cleaned(trained, tmp_path) -> None:
    folder = tmp_path / "checkpoints"
    shutil.copytree(Path(trained.checkpoints[0]).parent, folder)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp = folder / f".tmp-step-000015-{dead.pid}"  # a writer killed mid-write
    tmp.mkdir()
    (tmp / "adapter_model.safetensors").write_bytes(b"partial")
    no_meta = folder / "step-000020"  # never renamed into place by us, but be safe: no meta, no checkpoint
    no_meta.mkdir()
    assert checkpoints.latest(folder).step == 10
    checkpoints.prune(folder, keep=2)
    assert not tmp.exists()


def test_event_reader_leaves_a_partial_line_for_later(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"kind": "a"}\n{"kind": "b"')
    reader = EventReader(path)
    assert [e["kind"] for e in reader.new()] == ["a"]
    with path.open("ab") as f:
        f.write(b"}\n")
    assert [e["kind"] for e in reader.new()] == ["b"]
    assert reader.new() == []


# --- a real kill ---


def trainer(request: Path, events: Path, result: Path) -> subprocess.Popen:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # carried packages stay found
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    argv = [sys.executable, "-m", "tasks.train", str(request), str(events), str(result)]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_step(events: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    reader, last = EventReader(events), 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in reader.new():
            if e["kind"] == "step":
                last = e["step"]
        if last >= step:
            return last
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.005)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.mark.slow
def test_sigkilled_trainer_resumes_to_the_same_adapter(tiny_quantized, tiny_data, tmp_path) -> None:
    """`python -m tasks.train` killed with SIGKILL mid-run, then started again, ends where an uninterrupted one does."""
    cfg = TRAIN.model_copy(update={"max_steps": 40})

    def request(name: str) -> Path:
        run = tmp_path / name
        return TrainRequest(
            base=tiny_quantized, data=tiny_data, lora=LORA, train=cfg, run_dir=str(run), checkpoint_dir=str(run / "ck")
        ).save(run / "request.json")

    whole = trainer(request("whole"), tmp_path / "whole" / "events.jsonl", tmp_path / "whole" / "adapter.json")
    assert whole.wait(timeout=300) == 0, whole.stderr.read().decode()[-2000:]

    req, events, result = request("killed"), tmp_path / "killed" / "events.jsonl", tmp_path / "killed" / "adapter.json"
    first = trainer(req, events, result)
    reached = wait_for_step(events, 12, first)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=30) == -signal.SIGKILL
    assert not result.exists()
    done = checkpoints.latest(tmp_path / "killed" / "ck").step
    assert reached - done < cfg.checkpoint_every + 2  # at most one interval (and the steps seen before the kill)
    second = trainer(req, events, result)
    assert second.wait(timeout=300) == 0, second.stderr.read().decode()[-2000:]

    from loraflow.records import Adapter, load_record

    assert_same_run(load_record(Adapter, result), load_record(Adapter, tmp_path / "whole" / "adapter.json"))
