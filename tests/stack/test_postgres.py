"""The postgres backend: a private PostgreSQL server under LORAFLOW_HOME holds the Prefect and MLflow
databases. Fast checks of how the backend is chosen and kept, then the whole pipeline on it.

python -m pytest tests/stack/test_postgres.py -q            # needs Debian's postgresql package for the last ones
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import yaml

from loraflow.errors import StackError, UsageError
from loraflow.stack.postgres import database_url, postgres_bindir
from loraflow.stack.services import down, status, up
from loraflow.stack.settings import SERVICES, StackSettings, recorded_backend
from tests.stack.test_stack import free_ports

FIXTURE = Path(__file__).parents[1] / "fixtures" / "instructions_small.jsonl"
MODEL_NAME = "tiny-pg"

needs_postgres = pytest.mark.skipif(
    postgres_bindir() is None,
    reason="PostgreSQL's initdb/postgres not found on PATH or under /usr/lib/postgresql/*/bin "
    "(apt-get install postgresql)",
)


# --- fast: choosing and keeping the backend -----------------------------------------------------------


def test_backend_defaults_to_sqlite_and_reads_the_postgres_port(tmp_path):
    s = StackSettings.from_env({"LORAFLOW_HOME": str(tmp_path), "LORAFLOW_POSTGRES_PORT": "6543"})
    assert (s.backend, s.postgres_port, s.services) == ("sqlite", 6543, SERVICES)
    pg = StackSettings.from_env({"LORAFLOW_HOME": str(tmp_path)}, backend="postgres")
    assert (pg.backend, pg.postgres_port, pg.services) == ("postgres", 5432, ("postgres", *SERVICES))
    with pytest.raises(UsageError, match="LORAFLOW_POSTGRES_PORT"):
        StackSettings.from_env({"LORAFLOW_HOME": str(tmp_path), "LORAFLOW_POSTGRES_PORT": "pg"})


def test_recorded_backend_is_kept_and_a_switch_is_refused(tmp_path):
    home = tmp_path / "h"
    assert recorded_backend(home) is None
    home.mkdir()
    (home / "stack.json").write_text(json.dumps({"backend": "postgres"}))
    assert StackSettings.from_env({"LORAFLOW_HOME": str(home)}).backend == "postgres"
    with pytest.raises(UsageError, match=r"postgres backend.*cannot run with --backend sqlite.*LORAFLOW_HOME"):
        StackSettings.from_env({"LORAFLOW_HOME": str(home)}, backend="sqlite")
    # up() checks too, for settings built without from_env.
    with pytest.raises(UsageError, match="cannot run with --backend sqlite"):
        up(StackSettings(home=home, prefect_port=1, mlflow_port=2))


def test_home_from_before_the_record_is_sqlite(tmp_path):
    (tmp_path / "prefect").mkdir()
    (tmp_path / "prefect" / "prefect.db").touch()
    assert recorded_backend(tmp_path) == "sqlite"
    with pytest.raises(UsageError, match="sqlite backend"):
        StackSettings.from_env({"LORAFLOW_HOME": str(tmp_path)}, backend="postgres")


def test_damaged_record_is_reported(tmp_path):
    (tmp_path / "stack.json").write_text('{"backend": "oracle"}')
    with pytest.raises(StackError, match="oracle"):
        recorded_backend(tmp_path)


def test_ports_must_differ(tmp_path):
    s = StackSettings(home=tmp_path, prefect_port=4300, mlflow_port=5300, backend="postgres", postgres_port=4300)
    with pytest.raises(UsageError, match="LORAFLOW_POSTGRES_PORT=4300"):
        up(s)


@needs_postgres
@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another OS user")
def test_root_home_the_postgres_user_cannot_enter_is_refused_clearly():
    locked = Path(tempfile.mkdtemp(prefix="loraflow-locked-"))  # mode 0700, owned by root
    try:
        s = StackSettings(home=locked / "home", prefect_port=4300, mlflow_port=5300, backend="postgres")
        with pytest.raises(StackError, match=rf"'postgres', who cannot enter {locked} .*chmod o\+x {locked}"):
            up(s)
        assert not any((s.home / "run").iterdir())
        assert not (s.pgdata / "PG_VERSION").exists()
    finally:
        shutil.rmtree(locked)


# --- integration: the whole pipeline on PostgreSQL ------------------------------------------------------


@pytest.fixture
def pg_home():
    """A new home that PostgreSQL's OS user can reach when we are root (pytest's tmp folders are 0700)."""
    top = Path(tempfile.mkdtemp(prefix="loraflow-pg-"))
    top.chmod(0o711)
    yield top / "home"
    shutil.rmtree(top, ignore_errors=True)


def _cli(env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _write_config(path: Path, base: Path) -> Path:
    data = shutil.copy(FIXTURE, path.parent / FIXTURE.name)  # beside the config: inside its allowed data roots
    cfg = {
        "base_model": {"name": "tiny-llama-pg", "source": "hf", "path": str(base)},
        "data": {"path": str(data), "contract": "instruction_v1", "eval_fraction": 0.05, "eval_max_rows": 8},
        "lora": {"r": 4, "alpha": 8},
        "train": {"learning_rate": 5e-3, "max_steps": 4, "batch_size": 4, "max_seq_length": 128, "checkpoint_every": 2},
        "eval": {"batch_size": 8, "max_new_tokens": 4},
        "merge": {"verify_rows": 4, "tolerance": 1e-3},
        "registry": {"model_name": MODEL_NAME},
        "tracking": {"experiment": "loraflow-pg-tests"},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(s: StackSettings, database: str, query: str) -> list[tuple]:
    import psycopg

    url = database_url(s, database).replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


def _group_pids(s: StackSettings) -> set[int]:
    pids = set()
    for name in s.services:
        p = psutil.Process(json.loads(s.pid_path(name).read_text())["pid"])
        pids |= {p.pid, *(c.pid for c in p.children(recursive=True))}
    return pids


@needs_postgres
@pytest.mark.integration
def test_pipeline_on_postgres(pg_home, tmp_path):
    from mlflow import MlflowClient

    from loraflow.ml.tiny import build_tiny_llama

    ports = free_ports(3)
    env = {
        "LORAFLOW_HOME": str(pg_home),
        "LORAFLOW_PREFECT_PORT": str(ports[0]),
        "LORAFLOW_MLFLOW_PORT": str(ports[1]),
        "LORAFLOW_POSTGRES_PORT": str(ports[2]),
    }
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    base = build_tiny_llama(tmp_path / "tiny", [f"{r['instruction']} {r['output']}" for r in rows] * 3, vocab_size=768)
    config = _write_config(tmp_path / "run.yaml", base)
    s = StackSettings.from_env(env, backend="postgres")
    pids: set[int] = set()
    try:
        started = _cli(env, "up", "--backend", "postgres")
        assert started.returncode == 0, started.stderr[-3000:]
        assert "postgres" in started.stdout

        # The backend is recorded: status and run find it without --backend; a switch is refused.
        assert StackSettings.from_env(env) == s
        st = status(s)
        assert st.all_healthy and [x.name for x in st.services] == ["postgres", *SERVICES], st.format()
        with pytest.raises(UsageError, match="postgres backend"):
            StackSettings.from_env(env, backend="sqlite")

        # Both servers keep their state in PostgreSQL, none in SQLite files.
        assert ("gpu", "process") in _rows(s, "prefect", "SELECT name, type FROM work_pool")
        client = MlflowClient(tracking_uri=s.mlflow_url)
        client.create_experiment("made-through-the-server")
        assert ("made-through-the-server",) in _rows(s, "mlflow", "SELECT name FROM experiments")
        assert not list(pg_home.rglob("*.db"))

        ran = _cli(env, "run", str(config))
        assert ran.returncode == 0, f"stdout:\n{ran.stdout[-3000:]}\nstderr:\n{ran.stderr[-5000:]}"
        mv = client.get_model_version_by_alias(MODEL_NAME, "candidate")
        assert f"Registered model: {MODEL_NAME}  version {mv.version}" in ran.stdout
        aliases = _rows(s, "mlflow", "SELECT name, alias, version FROM registered_model_aliases")
        assert (MODEL_NAME, "candidate", int(mv.version)) in aliases
        flow_runs = _rows(s, "prefect", "SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id")
        assert {("finetune", "COMPLETED"), ("train", "COMPLETED")} <= set(flow_runs)

        pids = _group_pids(s)
        stopped = _cli(env, "down")
        assert stopped.returncode == 0, stopped.stderr
        assert "worker, worker-cpu, mlflow, prefect, postgres" in stopped.stdout
    finally:
        down(s)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not list((pg_home / "run").iterdir())
    assert not (s.pgdata / "postmaster.pid").exists()  # a clean shutdown
