"""MLflow outages on a stack of their own: the server SIGKILLed during training, then back or gone for good.

python -m pytest tests/flows/test_outage.py -q      # ~3 min on 2 cores
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from loraflow.stack.services import up
from loraflow.tracking import EventReader
from tests.flows.conftest import FIXTURE, cli_env, crash_mlflow, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def steps(reader: EventReader, seen: list[int]) -> int:
    seen += [e["step"] for e in reader.new() if e["kind"] == "step"]
    return seen[-1] if seen else 0


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def start_run(s, base, tmp_path, name: str, run_name: str, max_steps: int, outage_s: float) -> subprocess.Popen:
    config = write_config(tmp_path / f"{run_name}.yaml", base, FIXTURE, model_name=name)
    cfg = yaml.safe_load(config.read_text())
    cfg["run_name"] = run_name
    cfg["train"].update(max_steps=max_steps, checkpoint_every=25, log_every=1)
    cfg["tracking"]["outage_timeout_s"] = outage_s
    config.write_text(yaml.safe_dump(cfg))
    argv = [sys.executable, "-m", "flows.cli", "run", str(config)]
    return subprocess.Popen(argv, env=cli_env(s), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_training_goes_on_through_an_mlflow_restart(own_stack, tiny_base, tmp_path):
    from mlflow import MlflowClient

    s, name, max_steps = own_stack, "tiny-outage", 150
    proc = start_run(s, tiny_base, tmp_path, name, "outage", max_steps, outage_s=300)
    reader, seen = EventReader(s.home / "runs" / "outage" / "train" / "events.jsonl"), []
    try:
        wait_until(lambda: steps(reader, seen) >= 5, 600, "step 5")
        crash_mlflow(s)
        down_at, down_since = steps(reader, seen), time.monotonic()
        wait_until(lambda: steps(reader, seen) >= down_at + 10, 300, "training to go on without MLflow")
        outage = time.monotonic() - down_since
        up(s, timeout=120)  # clears the orphaned worker that holds the port, starts the server again
        out, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-5000:]
    client = MlflowClient(tracking_uri=s.mlflow_url)
    (version,) = client.search_model_versions(f"name='{name}'")
    runs = client.search_runs([client.get_experiment_by_name("loraflow-tests").experiment_id])
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    train = next(r for r in runs if r.info.run_name == "train" and r.info.status == "FINISHED")
    history = client.get_metric_history(train.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, max_steps + 1))  # buffered, then delivered
    print(f"outage test: MLflow down for {outage:.1f} s from step {down_at}; version {version.version} registered")


def test_mlflow_gone_for_good_then_a_rerun_registers_without_retraining(own_stack, tiny_base, tmp_path):
    from mlflow import MlflowClient

    s, name = own_stack, "tiny-gone"
    proc = start_run(s, tiny_base, tmp_path, name, "gone", 40, outage_s=10)
    reader, seen = EventReader(s.home / "runs" / "gone" / "train" / "events.jsonl"), []
    try:
        wait_until(lambda: steps(reader, seen) >= 3, 600, "step 3")
        crash_mlflow(s)
        out, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 1, out[-5000:]
    assert "stayed unreachable" in out and "run the same config again" in out, out[-3000:]

    up(s, timeout=120)
    again = start_run(s, tiny_base, tmp_path, name, "gone-again", 40, outage_s=10)
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out[-5000:]
    assert "already finished in an earlier run" in out
    assert not (s.home / "runs" / "gone-again" / "train" / "events.jsonl").exists()  # no trainer started
    assert len(MlflowClient(tracking_uri=s.mlflow_url).search_model_versions(f"name='{name}'")) == 1
