"""Retention plans on a home laid out as runs leave it: what goes, what stays and why."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from loraflow.config import RetentionConfig
from loraflow.registry.retention import plan

DAY = 86400.0


def make_run(home: Path, name: str, started: float, finished: bool = True, merged_mb: int = 1) -> Path:
    run = home / "runs" / name
    for sub in ("adapter", "merged", "data", "train"):
        (run / sub).mkdir(parents=True)
    (run / "merged" / "model.safetensors").write_bytes(b"\0" * (merged_mb << 20))
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 1024)
    (run / "config.yaml").write_text("x: 1\n")
    if finished:
        (run / "summary.json").write_text("{}")
    for p in [run, *run.rglob("*")]:
        os.utime(p, (started, started))
    return run


def test_keeps_the_newest_runs_and_merged_models_and_what_the_aliases_need(tmp_path) -> None:
    now = time.time()
    runs = [make_run(tmp_path, f"r{i}", now - (10 - i) * DAY) for i in range(10)]  # r9 newest
    champion = runs[1]
    rules = RetentionConfig(keep_runs=3, keep_merged=1)
    p = plan(tmp_path, rules, {champion: "m version 2 is champion"}, now)
    removed = set(p.remove)
    assert {r for r in runs if r in removed} == set(runs[:1] + runs[2:7])  # 7 older ones, but the champion's
    assert champion not in removed and (champion / "merged") not in removed
    assert runs[9] / "merged" not in removed  # the newest merged model stays
    assert {runs[8] / "merged", runs[7] / "merged"} <= removed
    assert p.protected == {champion: "m version 2 is champion"}
    assert p.bytes >= 7 * (1 << 20)
    assert "m version 2 is champion" in p.format()


def test_a_run_still_going_is_never_removed(tmp_path) -> None:
    now = time.time()
    old = [make_run(tmp_path, f"old{i}", now - (5 - i) * DAY) for i in range(3)]
    going = make_run(tmp_path, "going", now - 2 * DAY, finished=False)
    os.utime(going / "train", (now - 60, now - 60))  # the trainer wrote a minute ago
    stale = make_run(tmp_path, "stale", now - 6 * DAY, finished=False)  # crashed long ago
    p = plan(tmp_path, RetentionConfig(keep_runs=1, keep_merged=1, active_hours=12), {}, now)
    assert going not in p.remove and p.protected[going] == "still running"
    assert stale in p.remove and old[0] in p.remove


def test_finished_trainings_lose_their_checkpoints_and_dead_cache_entries_go(tmp_path) -> None:
    now = time.time()
    gone = make_run(tmp_path, "gone", now - 5 * DAY)
    make_run(tmp_path, "kept", now - DAY)
    finished = tmp_path / "cache" / "train" / "aaaa"
    (finished / "checkpoints" / "step-000050").mkdir(parents=True)
    (finished / "finished.json").write_text("{}")
    running = tmp_path / "cache" / "train" / "bbbb"
    (running / "checkpoints" / "step-000050").mkdir(parents=True)
    entry = tmp_path / "cache" / "stages" / "train" / "k.json"
    entry.parent.mkdir(parents=True)
    entry.write_text(json.dumps({"path": str(gone / "adapter"), "steps": 3}))
    p = plan(tmp_path, RetentionConfig(keep_runs=1), {}, now)
    assert finished / "checkpoints" in p.remove and running / "checkpoints" not in p.remove
    assert gone in p.remove and entry in p.remove
