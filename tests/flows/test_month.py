"""A month of nightly retraining on a stack of its own, some nights killed on purpose: what it leaves behind.

    make month        # all 30 nights (LORAFLOW_MONTH_NIGHTS=30); prints the month's report
    python -m pytest tests/flows/test_month.py -s     # 12 nights, as `make test` runs it

Every night the dataset grows by a row (so each night trains anew), a flow run of the finetune
deployment starts as the nightly schedule would start it, with the promotion gate on, and the
retention window is 4 runs. On some nights
something is killed: the trainer (the run resumes), the CLI (the run goes on without it), the MLflow
server (the run waits for it), the finetune flow's own process (the run crashes; the next command
closes what it left open). At the end nothing may be left RUNNING in MLflow or Prefect, what retention
manages (run folders, merged models, checkpoints, caches) must have stopped growing once its window
filled, what is kept for good (Prefect's history, MLflow's ledger and adapters, logs) may grow only by
what a night records, and the champion with its lineage must be intact.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType

from loraflow import tags as T
from loraflow.stack.services import prefect_client, up
from loraflow.tracking import EventReader
from tests.flows.conftest import FIXTURE, cli_env, crash_mlflow, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.month]

# 12 by default (`make test`: every kind of kill, the retention window filled twice; 7.5 min on a quiet 2-core VM);
# `make month` runs 30.
NIGHTS = int(os.environ.get("LORAFLOW_MONTH_NIGHTS", "12"))
KEEP_RUNS = 4
# The nights when something is killed (6, 12, 18 and 24 of 30; 2, 4, 7 and 9 of 12).
KILL_TRAINER, KILL_CLI, KILL_MLFLOW, KILL_FLOW = (NIGHTS * k // 5 for k in range(1, 5))
NAME = "tiny-nightly"
FINAL = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def usage(home: Path) -> dict[str, int]:
    """Bytes per part of the home: what retention manages (runs, cache) and what is kept for good."""
    parts = {p.name: du(p) for p in home.iterdir() if p.is_dir()}
    return {**parts, "total": du(home)}


def night_config(tmp_path: Path, base: Path, night: int) -> Path:
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    rows += [
        {"instruction": f"Define night {i}.", "input": "", "output": f"The night numbered {i}."} for i in range(night)
    ]
    data = tmp_path / "data" / "nightly.jsonl"
    data.parent.mkdir(exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(tmp_path / "nightly.yaml", base, data, model_name=NAME)
    cfg = yaml.safe_load(config.read_text())
    cfg["train"].update(max_steps=4, checkpoint_every=2)
    # The train flow runs inside the finetune flow here, to keep a night short; the gpu pool's hop is
    # what tests/flows/test_resume.py kills through.
    cfg["orchestration"] = {"train_on": "in_process"}
    cfg["promotion"] = {"enabled": True, "min_improvement": {"loss": 0.0}, "max_regression": {"rouge_l": 1.0}}
    cfg["retention"] = {"keep_runs": KEEP_RUNS, "keep_merged": 1}
    config.write_text(yaml.safe_dump(cfg))
    return config


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def newest_events(home: Path, before: set[Path]) -> Path | None:
    new = [p for p in (home / "runs").glob("*/train/events.jsonl") if p.parent.parent not in before]
    return new[0] if new else None


def test_a_month_of_nightly_runs(own_stack, tiny_base, tmp_path):
    from mlflow import MlflowClient

    from loraflow.config import load_config

    s = own_stack
    env = cli_env(s)
    with prefect_client(s) as c:
        deployment = c.read_deployment_by_name("finetune/cpu")
    disk, outcomes = [], []
    started = time.monotonic()
    for night in range(1, NIGHTS + 1):
        config = night_config(tmp_path, tiny_base, night)
        before = set((s.home / "runs").glob("*")) if (s.home / "runs").exists() else set()
        if night == KILL_CLI:  # this night through `loraflow run`, killed once training has started
            cli = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "run", str(config)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_for(lambda b=before: newest_events(s.home, b), 600, f"night {night}'s training")
            cli.kill()  # the run goes on without the command that started it
            cli.wait()
            # The run folder's name ends with its flow run id's head (the schedule's future runs have none).
            head = newest_events(s.home, before).parent.parent.name.rsplit("-", 1)[-1]
            with prefect_client(s) as c:
                runs = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["finetune"])), limit=200)
            run_id = next(r.id for r in runs if str(r.id).startswith(head))
        else:  # as the nightly schedule starts it: a flow run of the deployment
            parameters = {
                "config": load_config(config).model_dump(mode="json"),
                "home": str(s.home),
                "tracking_uri": s.mlflow_url,
            }
            with prefect_client(s) as c:
                run_id = c.create_flow_run_from_deployment(deployment.id, parameters=parameters).id
        if night in (KILL_TRAINER, KILL_MLFLOW, KILL_FLOW):
            events = wait_for(lambda b=before: newest_events(s.home, b), 600, f"night {night}'s trainer")
            reader = EventReader(events)
            trainer = wait_for(lambda r=reader: next((e for e in r.new() if e["kind"] == "started"), None), 300, "pid")
            if night == KILL_TRAINER:
                os.kill(trainer["pid"], signal.SIGKILL)
            elif night == KILL_MLFLOW:
                crash_mlflow(s)
                time.sleep(5)
                up(s, timeout=120)
            else:
                engine = wait_for(lambda ev=events: _engine_of(ev.parent.parent), 300, "the finetune flow's process")
                engine.kill()
        final = wait_for(lambda r=run_id: _final(s, r), 1200, f"night {night} to end")
        outcomes.append((night, final))
        assert final == ("Crashed" if night == KILL_FLOW else "Completed"), outcomes
        disk.append(usage(s.home))

    done = subprocess.run([sys.executable, "-m", "flows.cli", "status"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    # `loraflow runs` finds the nights newest first; the schedule's future runs are one line at the end.
    listed = subprocess.run(
        [sys.executable, "-m", "flows.cli", "runs", "--limit", "5"], env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    rows = listed.stdout.splitlines()
    assert rows[1].split()[1] == "Completed" and str(run_id) in rows[1], listed.stdout  # the last night
    assert not any("Scheduled" in row for row in rows[1:6]), listed.stdout
    wall = time.monotonic() - started

    client = MlflowClient(tracking_uri=s.mlflow_url)
    experiments = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=1000)
    assert [(r.info.run_name, r.info.run_id) for r in running] == []
    with prefect_client(s) as c:  # the schedule's future runs are Scheduled: every other state must be final
        open_runs = c.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=FINAL))),
            limit=200,
        )
    assert [(r.name, r.state_name) for r in open_runs if r.state_type != StateType.SCHEDULED] == []

    # Disk, per part of the home after each night (MB).
    table = {part: [round(d.get(part, 0) / 2**20, 2) for d in disk] for part in disk[-1]}
    # What retention manages (run folders with their merged models and checkpoints, the stage caches): flat
    # once the retention window has filled (the first nights also build the caches).
    managed = [d.get("runs", 0) + d.get("cache", 0) for d in disk]
    # A night that leaves less (a crashed run has no merged model) is a dip, not growth: the bound is on the
    # window's median.
    window = managed[KEEP_RUNS + 2 :]
    assert max(window) <= 1.15 * statistics.median(window), table
    # What is kept for good grows by what a night records, not by what it computes: Prefect's history (until its
    # vacuum, LORAFLOW_PREFECT_HISTORY_DAYS), MLflow's runs and each version's adapter, the services' logs. A merged
    # model or a checkpoint landing outside retention's reach would show here.
    kept = [d["total"] - m for d, m in zip(disk, managed, strict=True)]
    per_night = (kept[-1] - kept[0]) / (len(kept) - 1)
    assert per_night < 2 * 2**20, table

    aliases = client.get_registered_model(NAME).aliases
    champion = client.get_model_version(NAME, aliases["champion"])
    assert all(champion.tags.get(t) for t in T.REQUIRED_LINEAGE)
    merged = Path(champion.tags[T.MERGED_PATH])
    assert (merged / "config.json").is_file(), "retention removed what the champion needs"
    history = subprocess.run(
        [sys.executable, "-m", "flows.cli", "history", NAME, "--json"], env=env, capture_output=True, text=True
    )
    assert history.returncode == 0 and json.loads(history.stdout)["aliases"]["champion"] == champion.version
    versions = len(client.search_model_versions(f"name='{NAME}'"))
    print(
        f"\nmonth: {NIGHTS} nights in {wall / 60:.1f} min; outcomes {outcomes}; champion version "
        f"{champion.version}; {versions} versions registered; kept for good: +{per_night / 2**20:.2f} MB a night; "
        f"LORAFLOW_HOME after each night (MB): {table}"
    )


def _final(s, flow_run_id):
    with prefect_client(s) as c:
        state = c.read_flow_run(flow_run_id).state
    return state.name if state is not None and state.is_final() else None


def _engine_of(run_dir: Path) -> psutil.Process | None:
    """The process of the finetune flow run that owns ``run_dir`` (its name ends with the flow run id's head)."""
    head = run_dir.name.rsplit("-", 1)[-1]
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "prefect.engine" in " ".join(p.info["cmdline"] or []) and p.environ().get(
                "PREFECT__FLOW_RUN_ID", ""
            ).startswith(head):
                return p
        except psutil.Error:
            continue
    return None
