"""register: adapter + lineage + eval -> a registered MLflow model version with alias ``candidate``.

The adapter is logged as a pyfunc model (adapter files as artifacts, the 4-bit base referenced
by path and digest), registered with lineage tags set at creation, and only then given its alias.
If anything after the version's creation fails, the version is deleted again: nobody ever sees a
half-registered model. ``mlflow.transformers.log_model`` is deliberately not used for adapters:
on a PEFT model it reloads with the targeted base weights freshly initialised (DESIGN.md).
"""

from __future__ import annotations

from pathlib import Path

from loraflow import tags as T
from loraflow.config import RegisterConfig
from loraflow.records import Adapter, EvalReport, Lineage, MergedModel, QuantizedBase, RegisteredVersion

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

    from loraflow.registry.serving import AdapterModel

    client = MlflowClient(tracking_uri=tracking_uri)
    _ensure_registered_model(client, cfg.model_name)
    # log_model talks to the tracking server through the fluent API, which reads a process-wide URI.
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=lineage.mlflow_run_id):
        info = mlflow.pyfunc.log_model(
            name="adapter",
            python_model=AdapterModel(),
            artifacts={"adapter": adapter.path},
            model_config={
                "base_model": base.base.name,
                "base_digest": base.base.digest,
                "base_path": base.base.path,
                "quantized_base_path": base.path,
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
    return RegisteredVersion(
        name=cfg.model_name,
        version=str(version.version),
        alias=cfg.alias,
        model_uri=f"models:/{cfg.model_name}@{cfg.alias}",
        run_id=lineage.mlflow_run_id,
    )


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
