"""Experiment tracking behind a small protocol; MLflow is the real implementation.

Stages take a :class:`Tracker` and never import MLflow themselves, so the ML core runs where
MLflow is not installed (the GPU image) with :class:`NullTracker`. Runs are addressed by id
through ``MlflowClient``: no global "active run", so a stage can log into its own nested run from
another process (the train flow on the GPU work pool). Params and tags pass through
:func:`loraflow.credentials.redact`: a credential in a URL never becomes an (undeletable) param.
"""

from __future__ import annotations

import json
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


class EventLog:
    """A Tracker that appends each call as one JSON line to a file, for another process to replay.

    The trainer runs in a process of its own (tasks/train.py) and may be killed at any instant; the
    train flow reads the lines it wrote (:class:`EventReader`) and forwards them to MLflow and the
    logs. A line is written whole with one ``write`` of an unbuffered file, so a reader sees
    complete lines and at most one partial last line, which it leaves for later.
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115  (open for the trainer's lifetime)

    def event(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"kind": kind, "time": time.time(), **fields}, default=str) + "\n"
        self._file.write(line.encode())

    def log_params(self, params: dict[str, Any]) -> None:
        self.event("params", params=params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.event("metrics", metrics=metrics, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.event("artifact", path=str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.event("tags", tags=tags)


class EventReader:
    """Reads the complete lines an :class:`EventLog` has written since the last call."""

    def __init__(self, path: Path, offset: int = 0):
        self.path, self.offset = path, offset

    def new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # a partial last line waits for its end
        self.offset += end
        return [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]


def replay(event: dict[str, Any], tracker: Tracker) -> None:
    """Apply one :class:`EventLog` line to ``tracker`` (events that are not tracker calls are skipped)."""
    kind = event["kind"]
    if kind == "params":
        tracker.log_params(event["params"])
    elif kind == "metrics":
        tracker.log_metrics(event["metrics"], event["step"])
    elif kind == "artifact":
        tracker.log_artifact(event["path"], event["artifact_path"])
    elif kind == "tags":
        tracker.set_tags(event["tags"])


class BufferedTracker:
    """Forwards to ``inner``; while the tracking server cannot be reached, keeps the calls in order.

    Training must not stop because MLflow restarted: a call that fails is queued with every call
    after it, and the queue is retried at most every ``retry_every_s`` on later calls.
    :meth:`flush` then waits for the server up to a deadline and raises the last error if it never
    comes back, so a run ends FAILED with a clear message instead of hanging or dropping metrics.
    """

    def __init__(self, inner: Tracker, retry_every_s: float = 5.0):
        self.inner = inner
        self.retry_every_s = retry_every_s
        self.pending: list[tuple[str, tuple[Any, ...]]] = []
        self.last_error: Exception | None = None
        self._next_try = 0.0

    def _call(self, name: str, *args: Any) -> None:
        self.pending.append((name, args))
        if time.monotonic() >= self._next_try:
            self._drain()

    def _drain(self) -> bool:
        while self.pending:
            name, args = self.pending[0]
            try:
                getattr(self.inner, name)(*args)
            except Exception as e:  # noqa: BLE001  (any failure of the server: kept and retried, see flush)
                self.last_error = e
                self._next_try = time.monotonic() + self.retry_every_s
                return False
            self.pending.pop(0)
        self.last_error = None
        return True

    def flush(self, timeout_s: float) -> None:
        """Deliver every queued call, waiting up to ``timeout_s`` for the server; raise its error after that."""
        deadline = time.monotonic() + timeout_s
        while not self._drain():
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"the tracking server did not accept {len(self.pending)} queued call(s) within {timeout_s:.0f} s: "
                    f"{self.last_error}"
                ) from self.last_error
            time.sleep(min(self.retry_every_s, max(0.0, deadline - time.monotonic())))

    def log_params(self, params: dict[str, Any]) -> None:
        self._call("log_params", params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._call("log_metrics", metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", path, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("set_tags", tags)


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
        except BaseException as e:
            self.end_failed(e)
            raise
        self.end("FINISHED")

    def end_failed(self, error: BaseException, tags: dict[str, str] | None = None) -> None:
        """Mark the run FAILED (with ``tags``) while ``error`` propagates; if MLflow cannot be reached, say so on
        the error instead of replacing it (a run left RUNNING is closed by the next reconciliation)."""
        try:
            if tags:
                self.set_tags(tags)
            self.end("FAILED")
        except Exception as e:  # noqa: BLE001  (the original error is the one to report)
            error.add_note(f"MLflow run {self.run_id} could not be marked FAILED: {type(e).__name__}: {e}")

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
        child.end_failed(e)
        try:
            parent.set_tags({T.FAILED_STAGE: stage, T.FAILURE: f"{type(e).__name__}: {e}"})
        except Exception as tag_error:  # noqa: BLE001  (MLflow away: the stage's own error is the one to report)
            e.add_note(f"the failed stage could not be recorded in MLflow: {tag_error}")
        raise
    seconds = time.perf_counter() - start
    child.log_metrics({"seconds": seconds})
    parent.log_metrics({f"stage_seconds/{stage}": seconds})
    child.end("FINISHED")
