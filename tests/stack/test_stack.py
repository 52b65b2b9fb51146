"""The local stack: settings and pidfile checks (fast), then up/down against real servers (integration).

python -m pytest tests/stack/test_stack.py -q
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import psutil
import pytest

from loraflow.errors import StackError, UsageError
from loraflow.stack.services import down, status, up
from loraflow.stack.settings import MLFLOW_FAIL_FAST, OFFLINE_AND_QUIET, SERVICES, StackSettings, client_env


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (bound to port 0, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def settings(home: Path) -> StackSettings:
    prefect_port, mlflow_port = free_ports(2)
    return StackSettings(home=home, prefect_port=prefect_port, mlflow_port=mlflow_port)


# --- fast -----------------------------------------------------------------------------------------


def test_from_env_defaults_and_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = StackSettings.from_env({})
    assert s.home == tmp_path.resolve() / ".loraflow"
    assert s.prefect_api_url == "http://127.0.0.1:4200/api"
    assert s.prefect_ui_url == "http://127.0.0.1:4200"
    assert s.mlflow_url == "http://127.0.0.1:5000"
    assert s.pool == "gpu"
    assert client_env(s) == {
        "PREFECT_API_URL": "http://127.0.0.1:4200/api",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "LORAFLOW_HOME": str(s.home),
        **MLFLOW_FAIL_FAST,
        **OFFLINE_AND_QUIET,
    }


def test_from_env_reads_home_and_ports(tmp_path):
    env = {"LORAFLOW_HOME": str(tmp_path / "h"), "LORAFLOW_PREFECT_PORT": "4300", "LORAFLOW_MLFLOW_PORT": "5300"}
    s = StackSettings.from_env(env)
    assert (s.home, s.prefect_port, s.mlflow_port) == (tmp_path / "h", 4300, 5300)
    assert s.log_path("mlflow") == tmp_path / "h" / "logs" / "mlflow.log"
    assert s.pid_path("worker") == tmp_path / "h" / "run" / "worker.pid"


def test_from_env_rejects_bad_ports_in_one_error():
    with pytest.raises(UsageError) as e:
        StackSettings.from_env({"LORAFLOW_PREFECT_PORT": "http", "LORAFLOW_MLFLOW_PORT": "70000"})
    assert "LORAFLOW_PREFECT_PORT" in str(e.value) and "LORAFLOW_MLFLOW_PORT" in str(e.value)


def test_recycled_pid_is_not_ours(tmp_path):
    """A pidfile whose pid now belongs to another process (here: pytest) is stale: never signalled."""
    s = settings(tmp_path)
    s.pid_path("prefect").parent.mkdir(parents=True)
    me = psutil.Process()
    record = {"pid": os.getpid(), "create_time": me.create_time() - 100, "argv": me.cmdline()}
    s.pid_path("prefect").write_text(json.dumps(record))
    st = status(s)
    assert not st["prefect"].running and st["prefect"].pid is None
    assert down(s) == []
    assert not s.pid_path("prefect").exists()


def test_status_when_nothing_runs(tmp_path):
    st = status(settings(tmp_path))
    assert [x.name for x in st.services] == list(SERVICES)
    assert not st.all_healthy and not any(x.running for x in st.services)
    assert "stopped" in st.format()


# --- integration: real servers ----------------------------------------------------------------------


def _group_pids(s: StackSettings) -> set[int]:
    pids = set()
    for name in SERVICES:
        p = psutil.Process(json.loads(s.pid_path(name).read_text())["pid"])
        pids |= {p.pid, *(c.pid for c in p.children(recursive=True))}
    return pids


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.integration
def test_up_is_idempotent_and_down_stops_everything(tmp_path):
    from prefect.client.orchestration import SyncPrefectClient

    s = settings(tmp_path)
    try:
        st = up(s, timeout=90)
        assert st.all_healthy, st.format()
        pids = {x.name: x.pid for x in st.services}

        with SyncPrefectClient(s.prefect_api_url) as client:
            pool = client.read_work_pool(s.pool)
            workers = client.read_workers_for_work_pool(s.pool)
            cpu_pool = client.read_work_pool(s.cpu_pool)
            cpu_workers = client.read_workers_for_work_pool(s.cpu_pool)
        assert (pool.type, pool.concurrency_limit) == ("process", 1)
        assert (cpu_pool.type, cpu_pool.concurrency_limit) == ("process", None)
        assert "loraflow-gpu" in {w.name for w in workers}
        assert "loraflow-cpu" in {w.name for w in cpu_workers}
        assert (s.home / "mlflow" / "mlflow.db").exists() and (s.home / "prefect" / "prefect.db").exists()
        # Private state: the home and what holds data or secrets are the owner's alone.
        assert s.home.stat().st_mode & 0o777 == 0o700
        for f in [s.home / "mlflow" / "mlflow.db", s.home / "prefect" / "prefect.db", *s.home.glob("logs/*.log")]:
            assert f.stat().st_mode & 0o077 == 0, f

        again = up(s, timeout=30)
        assert {x.name: x.pid for x in again.services} == pids
        assert status(s) == again
        assert s.prefect_ui_url in again.format()

        # Another stack on the same ports is refused, naming the port and the fix.
        other = StackSettings(home=tmp_path / "other", prefect_port=s.prefect_port, mlflow_port=free_ports(1)[0])
        with pytest.raises(StackError, match=rf"Port {s.prefect_port}\b.*LORAFLOW_PREFECT_PORT"):
            up(other, timeout=30)

        group = _group_pids(s)
    finally:
        stopped = down(s)
    assert stopped == ["worker", "worker-cpu", "mlflow", "prefect"]
    assert not [p for p in group if _alive(p)]
    assert not list((s.home / "run").iterdir())
    assert not status(s).all_healthy
    assert down(s) == []


@pytest.mark.integration
def test_occupied_mlflow_port_stops_what_up_started(tmp_path):
    """Prefect starts first; when the MLflow port is taken, up() stops Prefect again before raising."""
    s = settings(tmp_path)
    with socket.socket() as blocker:
        blocker.bind((s.host, s.mlflow_port))
        blocker.listen()
        with pytest.raises(StackError, match=rf"Port {s.mlflow_port}\b.*mlflow.*LORAFLOW_MLFLOW_PORT"):
            up(s, timeout=30)
    assert not any(x.running for x in status(s).services)
    assert not list((s.home / "run").iterdir())


@pytest.mark.integration
def test_service_that_dies_reports_its_log(tmp_path, monkeypatch):
    s = settings(tmp_path)
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "NOT-A-LEVEL")  # the Prefect server and worker refuse it
    with pytest.raises(StackError, match="prefect service exited") as e:
        up(s, timeout=60)
    assert str(s.log_path("prefect")) in str(e.value)
    assert "NOT-A-LEVEL" in str(e.value)
    assert not any(x.running for x in status(s).services)


@pytest.mark.integration
def test_a_killed_server_is_reported_and_brought_back_by_up(tmp_path):
    """SIGKILL of MLflow's main process leaves its uvicorn child holding the port: status says so, and up() clears
    the orphan and starts the server again without hand cleanup; down() stops what a crashed service left too."""
    s = settings(tmp_path)
    try:
        up(s, timeout=90)
        leader = psutil.Process(status(s)["mlflow"].pid)
        children = leader.children(recursive=True)
        assert children, "mlflow server has no worker processes to orphan"
        leader.kill()
        leader.wait(10)
        crashed = status(s)["mlflow"]
        assert not crashed.running and crashed.orphans == len(children)
        assert "crashed" in status(s).format()
        again = up(s, timeout=90)
        assert again.all_healthy and again["mlflow"].pid != leader.pid
        assert not [c for c in children if _alive(c.pid)]

        prefect = psutil.Process(status(s)["prefect"].pid)
        prefect_children = prefect.children(recursive=True)
        prefect.kill()
        prefect.wait(10)
    finally:
        stopped = down(s)
    assert ("prefect" in stopped) == bool(prefect_children)
    assert not [c for c in prefect_children if _alive(c.pid)]
    assert not [x for x in status(s).services if x.running or x.orphans]


@pytest.mark.integration
def test_local_stack_fixture_serves_mlflow_artifacts(local_stack, tmp_path):
    """The shared fixture is up, and MLflow stores artifacts under the stack's home."""
    from mlflow import MlflowClient

    assert status(local_stack).all_healthy
    client = MlflowClient(tracking_uri=client_env(local_stack)["MLFLOW_TRACKING_URI"])
    run = client.create_run(client.create_experiment("stack-smoke"))
    (tmp_path / "note.txt").write_text("hello")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    assert [f.path for f in client.list_artifacts(run.info.run_id)] == ["note.txt"]
    assert list((local_stack.home / "mlflow" / "artifacts").rglob("note.txt"))
