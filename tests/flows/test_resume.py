"""Kill tests on the real local stack: the trainer SIGKILLed twice at random steps, the run completes by itself.

python -m pytest tests/flows/test_resume.py -q      # ~2 min on 2 cores
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

from loraflow import tags as T
from loraflow.stack.services import prefect_client
from loraflow.tracking import EventReader
from tests.flows.conftest import FIXTURE, cli_env, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS, EVERY = 40, 4


def kill_at(events: EventReader, target: int, seen: list[dict], timeout: float = 300) -> dict:
    """Wait for a trainer to reach step ``target``, SIGKILL it, and return what it had reported."""
    deadline = time.monotonic() + timeout
    pid, last = None, 0
    while time.monotonic() < deadline:
        for e in events.new():
            seen.append(e)
            if e["kind"] == "started":
                pid, last = e["pid"], 0
            elif e["kind"] == "step":
                last = e["step"]
        if pid is not None and last >= target:
            os.kill(pid, signal.SIGKILL)
            return {"pid": pid, "step": last}
        time.sleep(0.005)
    raise AssertionError(f"the trainer did not reach step {target} within {timeout} s; events: {seen[-5:]}")


def test_trainer_killed_twice_the_run_completes_by_itself(deployed_stack, tiny_base, tmp_path):
    from mlflow import MlflowClient

    name = "tiny-killed"
    config = write_config(tmp_path / "run.yaml", tiny_base, FIXTURE, model_name=name)
    cfg = yaml.safe_load(config.read_text())
    cfg["run_name"] = f"killed-{os.getpid()}"
    cfg["train"].update(max_steps=STEPS, checkpoint_every=EVERY, retries=2)
    config.write_text(yaml.safe_dump(cfg))
    run_dir = deployed_stack.home / "runs" / cfg["run_name"]
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    first, second = rng.randint(EVERY + 1, STEPS // 2), rng.randint(STEPS // 2 + 2, STEPS - 2)

    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(config)],
        env=cli_env(deployed_stack),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        events, seen = EventReader(run_dir / "train" / "events.jsonl"), []
        kills = [kill_at(events, first, seen), kill_at(events, second, seen)]
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    wall = time.monotonic() - started
    seen += events.new()
    assert proc.returncode == 0, f"seed {seed}, kills {kills}\n{out[-5000:]}"

    # Each attempt after a kill resumed from a checkpoint at most one interval behind the step reached.
    resumed = [int(e["tags"][T.RESUMED_FROM].split()[1].rstrip(":")) for e in seen if e["kind"] == "tags"]
    assert len(resumed) == 2, (seed, seen)
    redone = [k["step"] - r for k, r in zip(kills, resumed, strict=True)]
    assert all(0 <= d <= EVERY for d in redone), (seed, kills, resumed)
    assert [e["kind"] for e in seen].count("started") == 3
    curve = json.loads((run_dir / "train" / "loss_curve.json").read_text())
    assert [row["step"] for row in curve] == list(range(1, STEPS + 1))

    # Exactly one version registered; no MLflow run left RUNNING; the train run's history is whole.
    client = MlflowClient(tracking_uri=deployed_stack.mlflow_url)
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    parent = client.get_run(summary["version"]["run_id"])
    runs = client.search_runs([parent.info.experiment_id], max_results=1000)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    train_run = next(
        r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id and r.info.run_name == "train"
    )
    assert train_run.info.status == "FINISHED"
    assert train_run.data.tags[T.RESUMED_FROM].startswith(f"step {resumed[-1]}:")
    history = client.get_metric_history(train_run.info.run_id, "train/loss")
    assert sorted({m.step for m in history}) == list(range(1, STEPS + 1))

    # Prefect tells the story: the train flow run completed after its attempt task ran three times.
    with prefect_client(deployed_stack) as c:
        train = [r for r in c.read_flow_runs() if r.parameters.get("run_dir") == str(run_dir)]
        assert len(train) == 1 and train[0].state.is_completed()
        tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[train[0].id])))
        logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[train[0].id])))
    messages = "\n".join(log.message for log in logs)
    assert messages.count("resuming from step") == 2 and "train step" in messages
    attempt = next(t for t in tasks if t.name.startswith("train-attempt"))
    assert attempt.state.is_completed() and attempt.run_count == 3
    print(
        f"kill test: seed {seed}, killed at steps {[k['step'] for k in kills]}, resumed from {resumed}, "
        f"redone {redone} steps, wall {wall:.0f} s"
    )
