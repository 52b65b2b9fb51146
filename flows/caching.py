"""Skipping unchanged stages on a re-run, visibly.

A stage's cache key is a digest of everything its output depends on (data digest, base digest,
its config sections, the adapter's files, the loraflow version). The record it produced is kept
under ``<LORAFLOW_HOME>/cache/stages/<stage>/<key>.json``; a later run with the same key reuses it, as long
as the files the record points at still exist. A reuse shows up as a task run in state `Cached`
in the Prefect UI (with the run it came from) and as a `loraflow.cached.<stage>` tag on the
MLflow run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

import loraflow
from loraflow import tags as T
from loraflow.records import Record, load_record
from loraflow.tracking import MlflowTracker

R = TypeVar("R", bound=Record)


def cache_dir_of(run_dir: Path) -> Path:
    """``<LORAFLOW_HOME>/cache`` for a run directory ``<LORAFLOW_HOME>/runs/<name>``."""
    return run_dir.parent.parent / "cache"


def cache_key(*parts: object) -> str:
    """Digest of JSON-able parts (records, dicts, strings) plus the loraflow version."""
    payload = [p.model_dump(mode="json") if isinstance(p, Record) else p for p in parts]
    blob = json.dumps([loraflow.__version__, *payload], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@task(name="reuse", cache_policy=NO_CACHE)
def _reuse(stage: str, key: str, source: str):
    return Completed(name="Cached", message=f"{stage}: inputs unchanged (key {key[:12]}), reused {source}")


def _cached(record_type: type[R], entry: Path) -> R | None:
    """The cached record, or None when there is none or it was written by an older loraflow (a cache miss)."""
    try:
        return load_record(record_type, entry)
    except FileNotFoundError:
        return None
    except ValueError:  # pydantic's ValidationError: another schema; the stage runs again and replaces it
        return None


def reuse_or_run(
    stage: str,
    key: str,
    record_type: type[R],
    cache_dir: Path,
    parent: MlflowTracker,
    run: Callable[[], R],
    paths: Callable[[R], list[str]],
) -> R:
    """Return the cached record of ``stage`` for ``key`` if its files still exist, else run and cache it."""
    entry = cache_dir / "stages" / stage / f"{key}.json"
    record = _cached(record_type, entry)
    if record is not None and all(Path(p).exists() for p in paths(record)):
        source = paths(record)[0] if paths(record) else str(entry)
        _reuse.with_options(name=stage)(stage, key, source)
        parent.set_tags({T.cached(stage): source})
        return record
    record = run()
    record.save(entry)
    return record
