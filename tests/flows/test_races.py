"""Integration (issue 13, races): two runs started together, as two people pressing Run at once.

Both `loraflow run` commands start at the same moment on the shared test stack, on a base model
that nobody has quantized yet, so both write the quantized-base cache entry at once. Both must
complete and register, their trainings serialised by the `gpu` pool's concurrency limit of 1 (the
two train flow runs never overlap), and the cache entry they raced for must be one valid checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loraflow import tags as T
from tests.flows.conftest import FIXTURE, cli_env, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAMES = ("tiny-race-a", "tiny-race-b")


def test_two_runs_started_together_both_complete_one_training_at_a_time(deployed_stack, tmp_path):
    from mlflow import MlflowClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from loraflow.ml.models import load_quantized
    from loraflow.ml.tiny import build_tiny_llama
    from loraflow.stack.services import prefect_client

    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    # A base of its own (another vocabulary size, so another digest): its 4-bit cache entry does not exist yet.
    base = build_tiny_llama(tmp_path / "tiny", [f"{r['instruction']} {r['output']}" for r in rows] * 3, vocab_size=640)
    configs = [write_config(tmp_path / f"{name}.yaml", base, FIXTURE, model_name=name) for name in NAMES]
    logs = [(tmp_path / f"{name}.out").open("w+") for name in NAMES]  # files: two pipes could fill and block
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", str(c)],
            env=cli_env(deployed_stack),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for c, log in zip(configs, logs, strict=True)
    ]
    for p, log in zip(procs, logs, strict=True):
        p.wait(timeout=1200)
        log.seek(0)
        assert p.returncode == 0, log.read()[-6000:]

    client = MlflowClient(tracking_uri=deployed_stack.mlflow_url)
    run_dirs = []
    for name in NAMES:
        version = client.get_model_version_by_alias(name, "candidate")
        assert version.version == "1" and len(client.search_model_versions(f"name='{name}'")) == 1
        run_dirs.append(client.get_run(version.tags[T.MLFLOW_RUN_ID]).data.tags["mlflow.runName"])
    assert run_dirs[0] != run_dirs[1]

    with prefect_client(deployed_stack) as c:
        trains = [
            r
            for r in c.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["gpu"])), limit=200
            )
            if any(r.parameters["run_dir"].endswith(d) for d in run_dirs)
        ]
    assert len(trains) == 2 and all(r.state.is_completed() for r in trains), [(r.name, r.state_name) for r in trains]
    first, second = sorted(trains, key=lambda r: r.start_time)
    assert first.end_time <= second.start_time, "the gpu pool ran two trainings at once"

    # The cache entry both runs raced to write: one complete checkpoint that loads, no partial folder left.
    import torch

    entries = list((deployed_stack.home / "cache" / "quantized").iterdir())
    assert not [p.name for p in entries if p.name.startswith(".quantize-")]
    mine = [p for p in entries if json.loads((p / "quantized.json").read_text())["base"]["path"] == str(base)]
    assert len(mine) == 1, entries
    model = load_quantized(mine[0])
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape[-1] == 640 and torch.isfinite(logits).all()
