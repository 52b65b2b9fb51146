"""Preflight: what a run needs, checked in seconds before any heavy work starts.

    problems = preflight(config, home, tracking_uri, prefect_api_url)

The CLI runs it before it starts the finetune flow (so a wrong path or a stopped server is one
paragraph and an exit code, not a traceback after minutes), and the flow runs it again first
thing, for runs started from the Prefect UI or a schedule. Each problem says what is wrong and how
to fix it; all of them are reported together.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx

from loraflow import tags as T
from loraflow.config import PipelineConfig
from loraflow.data.contracts import read_meta
from loraflow.data.files import check_source
from loraflow.errors import LoraflowError, StackError, UsageError
from loraflow.ml.paths import check_remote_code, resolve_model_path

# A GGUF file is a 4- to 8-bit checkpoint; the converted base is fp32: about this many times larger.
GGUF_TO_FP32 = 8
# Disk a run needs beyond what is cached already: the converted base (GGUF only), the merged model
# (fp32 by default), the 4-bit checkpoint, checkpoints and the run's files, as multiples of the
# fp32 base, plus a fixed margin.
DISK_FACTOR, DISK_MARGIN = 2.5, 512 * 2**20


@dataclass(frozen=True)
class Problem:
    what: str  # one line: what is wrong and how to fix it
    usage: bool  # the config or the command is wrong (exit 2); else the machine or a service (exit 1)


def preflight(
    config: PipelineConfig, home: Path, tracking_uri: str | None, prefect_api_url: str | None = None
) -> list[Problem]:
    """Every problem that would stop this run, found without loading a model or reading the data.

    A server given as None is not asked (the CLI reports a stopped local stack once, on its own).
    """
    base = _base_model(config)
    problems = _data(config) + base + ([] if base else _disk(config, home))
    problems += _mlflow(config, tracking_uri) if tracking_uri else []
    return problems + (_prefect(prefect_api_url) if prefect_api_url else [])


def raise_if_any(problems: list[Problem]) -> None:
    """One error listing every problem: UsageError (exit 2) if any is the config's, else StackError (exit 1)."""
    if not problems:
        return
    text = "preflight found " + ("a problem" if len(problems) == 1 else f"{len(problems)} problems") + ":\n"
    text += "\n".join(f"  - {p.what}" for p in problems)
    raise (UsageError if any(p.usage for p in problems) else StackError)(text)


def _data(config: PipelineConfig) -> list[Problem]:
    """The contract and the file, each reported: an unknown contract still lets the file be checked."""
    problems, limits = [], {}
    try:
        limits = read_meta(config.data.contract)["format"]
    except LoraflowError as e:
        problems.append(Problem(str(e), isinstance(e, UsageError)))
    try:
        check_source(
            Path(config.data.path),
            config.data.format,
            config.data.allowed_roots,
            # with no contract to give a size limit, the file's other checks still run; its size waits for one
            int(limits["max_file_mb"] * 2**20) if limits else None,
            limits.get("accepted"),
        )
    except LoraflowError as e:
        problems.append(Problem(str(e), isinstance(e, UsageError)))
    return problems


def _base_model(config: PipelineConfig) -> list[Problem]:
    b = config.base_model
    try:
        folder = resolve_model_path(b.path, b.allowed_roots)
    except UsageError as e:
        return [Problem(f"base model: {e}", True)]
    if b.source == "gguf":
        if not (folder / str(b.gguf_file)).is_file():
            found = sorted(p.name for p in folder.glob("*.gguf")) or "no .gguf files"
            return [
                Problem(f"base model: GGUF file {folder / str(b.gguf_file)} not found; {folder} holds {found}", True)
            ]
    elif not (folder / "config.json").is_file():
        return [Problem(f"base model: {folder} has no config.json: it is not a Hugging Face model folder", True)]
    else:
        try:
            check_remote_code(folder, b)
        except UsageError as e:
            return [Problem(str(e), True)]
    return []


def base_model_bytes(config: PipelineConfig) -> int:
    """The base model's size in fp32 (estimated from its files)."""
    b = config.base_model
    folder = resolve_model_path(b.path, b.allowed_roots)
    if b.source == "gguf":
        return (folder / str(b.gguf_file)).stat().st_size * GGUF_TO_FP32
    weights = [*folder.glob("*.safetensors"), *folder.glob("*.bin")]
    return sum(f.stat().st_size for f in weights)


def _disk(config: PipelineConfig, home: Path) -> list[Problem]:
    try:
        need = int(base_model_bytes(config) * DISK_FACTOR + DISK_MARGIN)
    except (OSError, UsageError):
        return []
    where = home if home.exists() else next(p for p in home.parents if p.exists())
    free = shutil.disk_usage(where).free
    if free < need:
        return [
            Problem(
                f"{where} has {free / 2**30:.1f} GiB free, and this run needs about {need / 2**30:.1f} GiB "
                "(base model, merged model, checkpoints and caches); free space there or set LORAFLOW_HOME to a "
                "larger disk",
                False,
            )
        ]
    return []


def _mlflow(config: PipelineConfig, tracking_uri: str) -> list[Problem]:
    if not tracking_uri.startswith(("http://", "https://")):
        return []
    from mlflow import MlflowClient  # ~1 s to import: only when there is a server to ask
    from mlflow.exceptions import MlflowException

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(config.tracking.experiment)
        if exp is None:
            client.create_experiment(config.tracking.experiment)
        else:  # a write the run would make anyway: a read-only or unauthorised server is found here
            client.set_experiment_tag(exp.experiment_id, T.PREFLIGHT, "ok")
    except (MlflowException, OSError) as e:
        first = str(e).splitlines()[0][:300]
        return [
            Problem(
                f"MLflow at {tracking_uri} cannot be written to ({first}); start it (`loraflow up`), or fix "
                "tracking.uri and the credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD",
                False,
            )
        ]
    return []


def _prefect(api_url: str) -> list[Problem]:
    try:
        ok = httpx.get(f"{api_url}/health", timeout=5.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        ok = False
    if not ok:
        return [Problem(f"the Prefect server at {api_url} does not answer; start it with `loraflow up`", False)]
    return []
