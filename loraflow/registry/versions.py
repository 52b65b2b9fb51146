"""Reading the registry: loraflow-managed models, their versions, lineage and evaluation settings.

Aliases (MLflow stages are deprecated): ``candidate`` (set by register), ``champion`` (what serves:
``models:/NAME@champion``) and ``previous-champion`` (what rollback restores). Everything here works
on an explicit ``MlflowClient``; nothing touches MLflow's process-wide state. Only registered models
that loraflow created (tag ``loraflow.managed``) are ever changed.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from loraflow import scores
from loraflow import tags as T
from loraflow.config import ConfigError, EvalConfig, GateMetric, PipelineConfig, config_from_dict
from loraflow.errors import UsageError
from loraflow.records import ExampleScores

CANDIDATE = "candidate"
CHAMPION = "champion"
PREVIOUS = "previous-champion"
# Held-out metrics (the gate's) and the general-text perplexity of the forgetting guard, by tag.
METRIC_TAGS = {"loss": T.EVAL_LOSS, "rouge_l": T.EVAL_ROUGE_L, "general_perplexity": T.EVAL_GENERAL_PERPLEXITY}
BASE_METRIC_TAGS = {
    "loss": T.BASE_EVAL_LOSS,
    "rouge_l": T.BASE_EVAL_ROUGE_L,
    "general_perplexity": T.BASE_EVAL_GENERAL_PERPLEXITY,
}
INTERVAL_TAGS = {
    "loss": T.EVAL_LOSS_INTERVAL,
    "rouge_l": T.EVAL_ROUGE_L_INTERVAL,
    "general_increase": T.EVAL_GENERAL_INCREASE_INTERVAL,
}
HIGHER_IS_BETTER: dict[GateMetric, bool] = {"loss": False, "rouge_l": True}


@dataclass(frozen=True)
class VersionInfo:
    """A registered model version with loraflow lineage, as read from the registry."""

    name: str
    version: str
    tags: dict[str, str]
    run_id: str
    created_ms: int

    def _floats(self, tags: dict[str, str]) -> dict[str, float]:
        return {m: float(self.tags[t]) for m, t in tags.items() if self.tags.get(t)}

    @property
    def intervals(self) -> dict[str, tuple[float, float]]:
        """Bootstrap intervals of the version's own metrics (evaluate stage), where recorded."""
        out = {}
        for m, t in INTERVAL_TAGS.items():
            if self.tags.get(t):
                low, high = self.tags[t].split(",")
                out[m] = (float(low), float(high))
        return out

    @property
    def metrics(self) -> dict[str, float]:
        return self._floats(METRIC_TAGS)

    @property
    def base_metrics(self) -> dict[str, float]:
        return self._floats(BASE_METRIC_TAGS)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class EvalSetting:
    """What a version's held-out metrics were computed on; two versions are comparable when these match."""

    split_uri: str | None
    split_sha256: str | None
    contract: str | None
    eval: EvalConfig | None
    max_seq_length: int | None

    def same_as(self, other: EvalSetting) -> bool:
        mine = (self.split_sha256, self.contract, self.eval, self.max_seq_length)
        return None not in mine and mine == (other.split_sha256, other.contract, other.eval, other.max_seq_length)


def managed_model(client, name: str):
    """The registered model ``name``, if loraflow created it; UsageError otherwise."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UsageError(f"no registered model named {name!r} on {client.tracking_uri}") from e
        raise
    if model.tags.get(T.MANAGED) != "true":
        raise UsageError(
            f"registered model {name!r} was not created by loraflow (no {T.MANAGED} tag): loraflow leaves it untouched"
        )
    return model


def aliases(client, name: str) -> dict[str, str]:
    """Alias -> version of a registered model (``search_model_versions`` leaves aliases out; this does not)."""
    return dict(client.get_registered_model(name).aliases)


def parse_version_ref(name: str, ref: str | int) -> str:
    """'3', or 'models:/NAME/3': the version number, refusing a version of another model."""
    text = str(ref).strip()
    m = re.fullmatch(r"models:/([^/@]+)/(\d+)", text)
    if m:
        if m.group(1) != name:
            raise UsageError(f"{text} is a version of registered model {m.group(1)!r}, not of {name!r}")
        return m.group(2)
    if not text.isdigit():
        raise UsageError(f"version {text!r} is not a version number (e.g. --version 3 or models:/{name}/3)")
    return text


def get_version(client, name: str, ref: str | int) -> VersionInfo:
    """A version of a loraflow-managed model that carries loraflow lineage; clear errors otherwise."""
    from mlflow.exceptions import MlflowException

    managed_model(client, name)
    version = parse_version_ref(name, ref)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UsageError(
                f"{name} has no version {version} (never registered, or deleted); `loraflow history {name}` lists them"
            ) from e
        raise
    missing = [t for t in T.REQUIRED_LINEAGE if not mv.tags.get(t)]
    if missing:
        raise UsageError(
            f"version {version} of {name} has no loraflow lineage (missing tags {', '.join(missing)}): only versions "
            "registered by loraflow's register stage can be promoted"
        )
    if mv.status != "READY":
        raise UsageError(f"version {version} of {name} is {mv.status}, not READY")
    return VersionInfo(name, str(mv.version), dict(mv.tags), mv.tags[T.MLFLOW_RUN_ID], mv.creation_timestamp)


def version_or_none(client, name: str, version: str | None) -> VersionInfo | None:
    return None if version is None else get_version(client, name, version)


def run_config(client, run_id: str) -> PipelineConfig | None:
    """The config a version was trained with (config.yaml of its MLflow run); None if unreadable."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "config.yaml", tmp)
            return config_from_dict(yaml.safe_load(Path(path).read_text()) or {}, source=f"run {run_id} config.yaml")
        except (MlflowException, OSError, ConfigError):  # absent, or written by an older schema
            return None


def eval_setting(client, info: VersionInfo) -> EvalSetting:
    import mlflow
    from mlflow.exceptions import MlflowException

    split_uri = info.tags.get(T.EVAL_SPLIT) or None
    split_sha = None
    if split_uri:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(split_uri, dst_path=tmp, tracking_uri=client.tracking_uri)
                split_sha = hashlib.sha256(Path(local).read_bytes()).hexdigest()
            except (MlflowException, OSError):
                split_uri = None
    cfg = run_config(client, info.run_id)
    return EvalSetting(
        split_uri=split_uri,
        split_sha256=split_sha,
        contract=info.tags.get(T.CONTRACT),
        eval=cfg.eval if cfg else None,
        max_seq_length=cfg.train.max_seq_length if cfg else None,
    )


def version_examples(client, info: VersionInfo) -> dict[str, dict[str, ExampleScores]]:
    """The per-example scores of a version's evaluation (loraflow/scores.py); {} when it has none.

    Versions registered before loraflow logged them have no such artifact: the gate then compares means.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = info.tags.get(T.EVAL_EXAMPLES)
    if not uri:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(uri, dst_path=tmp, tracking_uri=client.tracking_uri)
            return scores.read_examples(Path(local))
        except (MlflowException, OSError, ValueError, KeyError):  # gone, or not this format: means only
            return {}
