"""Integration: the whole finetune flow through the CLI, against a real local Prefect server, MLflow
server and gpu-pool worker (the `local_stack` fixture), on a tiny Llama and the small fixture dataset.

The flow runs exactly as a user runs it: `loraflow up` (deploys the train flow), then `loraflow run`
in its own process; training goes through `run_deployment` to the worker. Assertions read the
results back through the MLflow and Prefect APIs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraflow import tags as T
from tests.flows.conftest import FIXTURE, MODEL_NAME, cli, write_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def finetune_run(deployed_stack, tiny_base, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("cfg") / "run.yaml", tiny_base, FIXTURE)
    result = cli(deployed_stack, "run", str(config))
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    summaries = sorted((deployed_stack.home / "runs").glob(f"{MODEL_NAME}-*/summary.json"))
    from loraflow.records import RunSummary, load_record

    return result, load_record(RunSummary, summaries[-1])


def test_run_registers_candidate_with_lineage(deployed_stack, finetune_run):
    from mlflow import MlflowClient

    result, summary = finetune_run
    assert f"Registered model: {MODEL_NAME}  version {summary.version.version}" in result.stdout
    assert deployed_stack.mlflow_url in result.stdout and deployed_stack.prefect_ui_url in result.stdout

    client = MlflowClient(tracking_uri=deployed_stack.mlflow_url)
    mv = client.get_model_version_by_alias(MODEL_NAME, "candidate")
    assert mv.version == summary.version.version
    for tag in T.REQUIRED_LINEAGE:
        assert mv.tags.get(tag), f"missing lineage tag {tag}"
    assert mv.tags[T.CONTRACT].startswith("instruction_v1@")
    assert mv.tags[T.MLFLOW_RUN_ID] == summary.version.run_id
    assert mv.tags[T.FLOW_RUN_ID] == summary.flow_run_id
    assert client.get_registered_model(MODEL_NAME).tags.get(T.MANAGED) == "true"

    parent = client.get_run(summary.version.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.max_steps"] == "6"
    stages = {
        r.data.tags["mlflow.runName"]: r
        for r in client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
    }
    assert set(stages) == {"validate", "quantize", "train", "evaluate", "merge", "register"}
    assert all(r.info.status == "FINISHED" for r in stages.values())
    losses = client.get_metric_history(stages["train"].info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "data", "eval"} <= artifacts
    # The per-example scores go with the run and the version points at them: the gate pairs on them.
    assert mv.tags[T.EVAL_EXAMPLES] == f"runs:/{parent.info.run_id}/eval/examples.jsonl"
    assert "eval/examples.jsonl" in {a.path for a in client.list_artifacts(parent.info.run_id, "eval")}
    train_artifacts = {a.path for a in client.list_artifacts(stages["train"].info.run_id, "train")}
    assert {"train/loss_curve.png", "train/loss_curve.json"} <= train_artifacts
    assert abs(stages["merge"].data.metrics["merge/max_abs_logit_diff"] - summary.merged.max_abs_logit_diff) < 1e-12
    assert summary.merged.max_abs_logit_diff <= 1e-3


def test_train_ran_on_the_gpu_pool(deployed_stack, finetune_run):
    """Training went through the `train/gpu` deployment, as a flow run picked up by the pool's worker."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter

    _, summary = finetune_run
    with SyncPrefectClient(deployed_stack.prefect_api_url) as client:
        deployment = client.read_deployment_by_name("train/gpu")
        assert deployment.work_pool_name == "gpu"
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["gpu"])),
            flow_run_filter=FlowRunFilter(),
        )
        assert any(r.state and r.state.is_completed() and r.parameters["run_dir"] == summary.run_dir for r in runs)
        parent = client.read_flow_run(summary.flow_run_id)
        assert parent.state.is_completed()


def test_registered_model_loads_with_plain_mlflow_and_peft(deployed_stack, finetune_run, tmp_path):
    import mlflow
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from loraflow.ml.models import load_quantized
    from tasks.register import adapter_files

    mlflow.set_tracking_uri(deployed_stack.mlflow_url)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@candidate")
    answers = model.predict(['Define the noun "dog".', 'Define the verb "run".'])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)

    adapter_dir = adapter_files(deployed_stack.mlflow_url, MODEL_NAME, "candidate", tmp_path)
    _, summary = finetune_run
    downloaded = load_file(adapter_dir / "adapter_model.safetensors")
    trained = load_file(Path(summary.run_dir) / "adapter" / "adapter_model.safetensors")
    assert downloaded.keys() == trained.keys() and all(torch.equal(downloaded[k], trained[k]) for k in trained)
    base_path = next((deployed_stack.home / "cache" / "quantized").iterdir())
    peft_model = PeftModel.from_pretrained(load_quantized(base_path), adapter_dir)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained: lora_B starts at zero


def test_contract_violation_registers_nothing(deployed_stack, tiny_base, tmp_path):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    for r in rows[:10]:
        r["output"] = "   "  # blank answers: the contract must stop the run
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(tmp_path / "bad.yaml", tiny_base, bad, model_name="never-registered")
    result = cli(deployed_stack, "run", str(config))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "output" in result.stderr and "contract" in result.stderr.lower()

    client = MlflowClient(tracking_uri=deployed_stack.mlflow_url)
    with pytest.raises(MlflowException):
        client.get_registered_model("never-registered")
    run_dir = next((deployed_stack.home / "runs").glob("never-registered-*"))
    assert not (run_dir / "adapter").exists() and not (run_dir / "merged").exists()
    failed = client.search_runs(
        [client.get_experiment_by_name("loraflow-tests").experiment_id],
        filter_string=f"tags.mlflow.runName = '{run_dir.name}'",
    )
    assert failed and failed[0].info.status == "FAILED"
    # The evidence stays with the run: reports in MLflow, a Prefect artifact naming the failure.
    logged = {a.path for a in client.list_artifacts(failed[0].info.run_id, "data")}
    assert {"data/validation_report.json", "data/validation_report.html"} <= logged
    assert (run_dir / "data" / "validation_report.html").is_file()
    assert not (run_dir / "data" / "train.jsonl").exists()
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with SyncPrefectClient(deployed_stack.prefect_api_url) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["data-contract"]))
        )
    assert any("| expect_column_values_to_match_regex | output |" in (a.data or "") for a in artifacts)


def test_bad_config_fails_before_any_work(deployed_stack, tiny_base, tmp_path):
    config = write_config(tmp_path / "typo.yaml", tiny_base, FIXTURE)
    result = cli(deployed_stack, "run", str(config), "--set", "train.learnin_rate=0.1", "--set", "lora.r=0")
    assert result.returncode == 2
    assert "train.learnin_rate" in result.stderr and "lora.r" in result.stderr
    assert not list((deployed_stack.home / "runs").glob("tiny-wordnet-*typo*"))


def test_rerun_skips_unchanged_stages_visibly(deployed_stack, finetune_run, tiny_base, tmp_path_factory):
    """Same data, base and config sections: train, evaluate and merge are reused, and say so."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    _, first = finetune_run
    config = write_config(tmp_path_factory.mktemp("rerun") / "run.yaml", tiny_base, FIXTURE)
    result = cli(deployed_stack, "run", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=deployed_stack.mlflow_url)
    second = client.get_model_version_by_alias(MODEL_NAME, "candidate")
    assert int(second.version) == int(first.version.version) + 1
    tags = client.get_run(second.tags[T.MLFLOW_RUN_ID]).data.tags
    assert tags["loraflow.cached.train"] == str(Path(first.run_dir) / "adapter")
    assert tags["loraflow.cached.merge"] == first.merged.path
    assert "loraflow.cached.evaluate" in tags
    # A reused evaluation still puts its per-example scores into the new run, for the gate.
    run_id = second.tags[T.MLFLOW_RUN_ID]
    assert "eval/examples.jsonl" in {a.path for a in client.list_artifacts(run_id, "eval")}
    with SyncPrefectClient(deployed_stack.prefect_api_url) as prefect:
        flow_run_id = second.tags[T.FLOW_RUN_ID]
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    cached = {t.name.split("-")[0] for t in task_runs if t.state and t.state.name == "Cached"}
    assert {"train", "evaluate", "merge"} <= cached
