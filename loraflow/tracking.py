"""Experiment tracking behind a small protocol; MLflow is the real implementation.

Stages take a :class:`Tracker` and never import MLflow themselves, so the ML core runs where
MLflow is not installed (the GPU image) with :class:`NullTracker`. Runs are addressed by id
through ``MlflowClient``: no global "active run", so a stage can log into its own nested run from
another process (the train flow on the GPU work pool). Params and tags pass through
:func:`loraflow.credentials.redact`: a credential in a URL never becomes an (undeletable) param.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from loraflow import tags as T
from loraflow.credentials import redact


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


class NullTracker:
    """Tracks nothing (benchmarks, the GPU image, unit tests of stage math)."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


NULL_TRACKER = NullTracker()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


class MlflowTracker:
    """Logs to one MLflow run, addressed by id."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        parent: MlflowTracker | None = None,
        tags: dict[str, str] | None = None,
    ) -> MlflowTracker:
        """Create a run (nested under ``parent`` when given) and return a tracker for it."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        all_tags = {"mlflow.runName": run_name, **redact(tags or {})}
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent.run_id
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
        return cls(tracking_uri, run.info.run_id)

    def child(self, name: str) -> MlflowTracker:
        exp_id = self.client.get_run(self.run_id).info.experiment_id
        exp_name = self.client.get_experiment(exp_id).name
        return MlflowTracker.start(self.tracking_uri, exp_name, name, parent=self)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:6000]) for k, v in flatten(params).items()]  # 6000: MLflow's limit
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            # Redact, then cut to MLflow's limit: a cut never leaves half a password unrecognised.
            self.client.set_tag(self.run_id, k, redact(str(v))[:8000])

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    @contextmanager
    def run_status(self) -> Iterator[MlflowTracker]:
        """End the run FINISHED when the block completes, FAILED when it raises."""
        try:
            yield self
        except BaseException:
            self.end("FAILED")
            raise
        self.end("FINISHED")

    @property
    def url(self) -> str:
        """The run's page in the MLflow UI, for people: printed, linked from artifacts, kept in the summary."""
        exp_id = self.client.get_run(self.run_id).info.experiment_id
        base = self.tracking_uri.rstrip("/")
        return redact(f"{base}/#/experiments/{exp_id}/runs/{self.run_id}")


@contextmanager
def stage_run(parent: MlflowTracker, stage: str) -> Iterator[MlflowTracker]:
    """A nested MLflow run for one stage; its wall time goes to the parent as ``stage_seconds/<stage>``.

    The nested run ends FAILED when the stage raises, so a failed stage is visible in the UI, and
    the parent is tagged with the stage and the reason (``loraflow.failed_stage``, ``loraflow.failure``).
    """
    child = parent.child(stage)
    start = time.perf_counter()
    try:
        yield child
    except BaseException as e:
        child.end("FAILED")
        parent.set_tags({T.FAILED_STAGE: stage, T.FAILURE: f"{type(e).__name__}: {e}"})
        raise
    seconds = time.perf_counter() - start
    child.log_metrics({"seconds": seconds})
    parent.log_metrics({f"stage_seconds/{stage}": seconds})
    child.end("FINISHED")
