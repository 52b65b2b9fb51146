"""register: adapter + lineage + eval -> a registered MLflow model version with alias ``candidate``.

The adapter is logged as a pyfunc model (adapter files as artifacts, the 4-bit base referenced
by path and digest), registered with lineage tags set at creation, and only then given its alias.
If anything after the version's creation fails, the version is deleted again: nobody ever sees a
half-registered model. ``mlflow.transformers.log_model`` is deliberately not used for adapters:
on a PEFT model it reloads with the targeted base weights freshly initialised (DESIGN.md).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from loraflow import tags as T
from loraflow.config import RegisterConfig
from loraflow.records import Adapter, EvalReport, Lineage, MergedModel, QuantizedBase, RegisteredVersion

# The file MLflow logs as the model's code, found without importing it (importing it sets MLflow's model).
MODEL_CODE = importlib.util.find_spec("loraflow.registry.pyfunc_model").origin

# Shown in the MLflow UI, and run once through the loaded model when the version is logged, so a
# version that cannot serve is never registered.
EXAMPLE_PROMPT = 'Define the noun "friendship".'

# What a serving environment needs to load the pyfunc (the loraflow package itself included).
PIP_REQUIREMENTS = [
    "loraflow",
    "torch==2.13.0",
    "transformers==5.24.0",
    "peft==0.21.2",
    "bitsandbytes==0.50.2",
    "accelerate==1.15.0",
]


def register(
    adapter: Adapter,
    base: QuantizedBase,
    evaluation: EvalReport,
    merged: MergedModel,
    lineage: Lineage,
    cfg: RegisterConfig,
    tracking_uri: str,
    max_new_tokens: int,
) -> RegisteredVersion:
    """Log the adapter as a pyfunc model into ``lineage.mlflow_run_id`` and register it."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    client = MlflowClient(tracking_uri=tracking_uri)
    _ensure_registered_model(client, cfg.model_name)
    existing = _registered_before(client, cfg.model_name, lineage.mlflow_run_id, adapter.digest)
    if existing is not None:  # a retry after a timeout, or a re-run that resumed: one adapter, one version
        client.set_registered_model_alias(cfg.model_name, cfg.alias, existing)
        return _record(cfg, existing, lineage.mlflow_run_id)
    # log_model talks to the tracking server through the fluent API, which reads a process-wide URI.
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=lineage.mlflow_run_id):
        info = mlflow.pyfunc.log_model(
            name="adapter",
            python_model=MODEL_CODE,
            input_example=[EXAMPLE_PROMPT],
            artifacts={"adapter": adapter.path},
            model_config={
                "base_model": base.base.name,
                "base_digest": base.base.digest,
                "base_path": base.base.path,
                "quantized_base_path": base.path,
                "trust_remote_code": base.base.trust_remote_code,
                "max_new_tokens": max_new_tokens,
            },
            signature=ModelSignature(
                inputs=Schema([ColSpec("string")]),
                outputs=Schema([ColSpec("string")]),
                params=ParamSchema([ParamSpec("max_new_tokens", "long", max_new_tokens)]),
            ),
            pip_requirements=PIP_REQUIREMENTS,
        )
    tags = {
        **lineage.as_tags(),
        T.ADAPTER_DIGEST: adapter.digest,
        T.MERGED_PATH: merged.path,
        T.MERGE_MAX_ABS_LOGIT_DIFF: f"{merged.max_abs_logit_diff:.6g}",
        T.MERGE_TOLERANCE: f"{merged.tolerance:.6g}",
        T.EVAL_LOSS: f"{evaluation.finetuned.loss:.6g}",
        T.EVAL_ROUGE_L: f"{evaluation.finetuned.rouge_l:.6g}",
        T.BASE_EVAL_LOSS: f"{evaluation.base.loss:.6g}",
        T.BASE_EVAL_ROUGE_L: f"{evaluation.base.rouge_l:.6g}",
        **_interval_tag(T.EVAL_LOSS_INTERVAL, evaluation.finetuned.loss_interval),
        **_interval_tag(T.EVAL_ROUGE_L_INTERVAL, evaluation.finetuned.rouge_l_interval),
    }
    if evaluation.general is not None:
        g = evaluation.general
        tags[T.EVAL_GENERAL_PERPLEXITY] = f"{g.finetuned_perplexity:.6g}"
        tags[T.BASE_EVAL_GENERAL_PERPLEXITY] = f"{g.base_perplexity:.6g}"
        tags |= _interval_tag(T.EVAL_GENERAL_INCREASE_INTERVAL, g.increase_interval)
    version = mlflow.register_model(info.model_uri, cfg.model_name, tags=tags)
    try:
        client.set_registered_model_alias(cfg.model_name, cfg.alias, version.version)
    except Exception:
        client.delete_model_version(cfg.model_name, version.version)  # no half-registered version
        raise
    return _record(cfg, str(version.version), lineage.mlflow_run_id)


def _record(cfg: RegisterConfig, version: str, run_id: str) -> RegisteredVersion:
    return RegisteredVersion(
        name=cfg.model_name,
        version=version,
        alias=cfg.alias,
        model_uri=f"models:/{cfg.model_name}@{cfg.alias}",
        run_id=run_id,
    )


def _registered_before(client, name: str, run_id: str, adapter_digest: str) -> str | None:
    """The version this run already registered for this adapter, if any."""
    for mv in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if mv.tags.get(T.ADAPTER_DIGEST) == adapter_digest and mv.status == "READY":
            return str(mv.version)
    return None


def _interval_tag(tag: str, interval: tuple[float, float] | None) -> dict[str, str]:
    return {tag: f"{interval[0]:.6g},{interval[1]:.6g}"} if interval is not None else {}


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, tags={T.MANAGED: "true"}, description="QLoRA adapters trained and registered by loraflow."
        )


def adapter_files(tracking_uri: str, name: str, alias: str, dst: Path) -> Path:
    """Download a registered version's adapter folder (for ``PeftModel.from_pretrained``)."""
    import mlflow

    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}@{alias}", dst_path=str(dst), tracking_uri=tracking_uri
    )
    return Path(local) / "artifacts" / "adapter"
