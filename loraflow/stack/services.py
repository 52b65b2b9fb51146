"""The local stack's services: start, health, pidfiles, stop; `up`, `down` and `status`.

Each service runs in its own process group under home/, with its log in home/logs/<name>.log and a
pidfile in home/run/<name>.pid (pid, start time and argv, so that a recycled pid is never taken for ours).
Nothing here changes this process's environment: each service gets its environment explicitly.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil

from loraflow.errors import StackError, UsageError
from loraflow.stack.postgres import (
    as_user,
    database_url,
    ensure_databases,
    init_postgres,
    pg_os_user,
    pg_ready,
    postgres_bindir,
)
from loraflow.stack.settings import (
    CPU_WORKER,
    LOOPBACK,
    MLFLOW,
    POSTGRES,
    PREFECT,
    SERVICES,
    WORKER,
    ServiceStatus,
    StackSettings,
    StackStatus,
    check_backend,
    client_env,
    is_loopback,
    record_path,
    recorded_backend,
    url_host,
)

# The worker polls for scheduled runs every QUERY seconds (Prefect's default 10 s makes every
# deployment run wait up to 10 s before it starts) and heartbeats every HEARTBEAT seconds.
_WORKER_QUERY_SECONDS = 2
_WORKER_HEARTBEAT_SECONDS = 10
# A worker counts as registered while its last heartbeat is younger than this (Prefect itself marks
# a worker offline after 3 missed heartbeats).
_WORKER_FRESH_SECONDS = 3 * _WORKER_HEARTBEAT_SECONDS + 5
_POLL_SECONDS = 0.25
_STOP_GRACE_SECONDS = 10.0
_LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class _Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int | None  # the port it listens on, checked before start; None for the worker
    host: str  # the address it listens on (the workers: none, they only connect)
    port_var: str
    url: str
    healthy: Callable[[], bool]
    user: pwd.struct_passwd | None = None  # run as this OS user (PostgreSQL, when we are root)


def _worker_name(pool: str) -> str:
    return f"loraflow-{pool}"


def _pool_limits(s: StackSettings) -> dict[str, int | None]:
    """Work pools and their concurrency limits: one training run at a time per GPU."""
    return {s.pool: 1, s.cpu_pool: None}


def _services(s: StackSettings) -> dict[str, _Service]:
    base = dict(os.environ)
    prefect_client = {
        **base,
        "PREFECT_HOME": str(s.prefect_home),
        "PREFECT_API_URL": s.prefect_api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    prefect_env = {
        **prefect_client,
        "PREFECT_SERVER_UI_ENABLED": "true",
        # The UI is served by the server but calls the API from the browser: on a port other than
        # 4200, or behind a reverse proxy, it must be told where the API is.
        "PREFECT_SERVER_UI_API_URL": s.ui_api_url or s.prefect_api_url,
        # Bounded history for a stack left running for months: Prefect's own vacuum service deletes old flow
        # runs with their logs and artifacts, as it does old events (Prefect enables only the latter by default).
        # A user's own Prefect setting wins.
        "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": base.get(
            "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED", '["events", "flow_runs"]'
        ),
        "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": base.get(
            "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD", str(s.prefect_history_days * 86400)
        ),
    }
    # The backend store goes in the environment, not argv: its URL may carry a password, and argv is
    # visible to every user on the machine.
    mlflow_env = {**base, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    if s.backend == "postgres":
        prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url(s, PREFECT, "asyncpg")
        mlflow_env["MLFLOW_BACKEND_STORE_URI"] = database_url(s, MLFLOW, "psycopg")
    else:
        mlflow_env["MLFLOW_BACKEND_STORE_URI"] = f"sqlite:///{s.mlflow_dir / 'mlflow.db'}"
    worker_env = {
        # Not the server's environment: flow runs are subprocesses of the worker and must not
        # inherit the database URL. They do inherit client_env: they log to our MLflow.
        **prefect_client,
        **client_env(s),
        "PREFECT_WORKER_QUERY_SECONDS": str(_WORKER_QUERY_SECONDS),
        "PREFECT_WORKER_HEARTBEAT_SECONDS": str(_WORKER_HEARTBEAT_SECONDS),
    }
    py = [sys.executable, "-m"]
    svcs = {
        PREFECT: _Service(
            PREFECT,
            [*py, "prefect", "server", "start", "--host", s.host, "--port", str(s.prefect_port)],
            prefect_env,
            s.prefect_port,
            s.host,
            "LORAFLOW_PREFECT_PORT",
            s.prefect_ui_url,
            lambda: _http_ok(f"{s.prefect_api_url}/health", expect_json=True),
        ),
        MLFLOW: _Service(
            MLFLOW,
            [
                *py,
                "mlflow",
                "server",
                "--artifacts-destination",
                str(s.mlflow_dir / "artifacts"),
                "--host",
                s.host,
                "--port",
                str(s.mlflow_port),
                # Default is 4 workers plus job runners: ~15 processes and ~3 GB; one is plenty locally.
                "--workers",
                "1",
                *mlflow_security_args(s),
            ],
            mlflow_env,
            s.mlflow_port,
            s.host,
            "LORAFLOW_MLFLOW_PORT",
            s.mlflow_url,
            lambda: _http_ok(f"{s.mlflow_url}/health"),
        ),
    }
    for name, pool in ((WORKER, s.pool), (CPU_WORKER, s.cpu_pool)):
        svcs[name] = _Service(
            name,
            [*py, "prefect", "worker", "start", "--pool", pool, "--type", "process", "--name", _worker_name(pool)],
            worker_env,
            None,
            "",
            "",
            f"{s.prefect_ui_url}/work-pools/work-pool/{pool}",
            lambda pool=pool: _worker_registered(s, pool),
        )
    if s.backend == "postgres":
        bindir = postgres_bindir() or Path("/usr/lib/postgresql/bin")  # up() has checked it exists
        svcs[POSTGRES] = _Service(
            POSTGRES,
            # -k "": no Unix socket; TCP on 127.0.0.1 only, whatever LORAFLOW_HOST says: only our two servers
            # connect. Logs go to stderr, i.e. our log file.
            [str(bindir / "postgres"), "-D", str(s.pgdata), "-k", "", "-h", LOOPBACK, "-p", str(s.postgres_port)],
            {**base, "LC_ALL": "C"},
            s.postgres_port,
            LOOPBACK,
            "LORAFLOW_POSTGRES_PORT",
            f"postgresql://{LOOPBACK}:{s.postgres_port}",
            lambda: pg_ready(s),
            pg_os_user(),
        )
    return svcs


def mlflow_security_args(s: StackSettings) -> list[str]:
    """`mlflow server` options of an exposed stack: which Host headers and browser origins it accepts.

    On loopback MLflow's defaults stay (localhost and private addresses, localhost origins; it reads
    MLFLOW_SERVER_ALLOWED_HOSTS itself). Exposed, the lists are explicit: the names those variables give (the
    options would otherwise replace them) plus this machine's addresses that loraflow's own clients use.
    """
    if is_loopback(s.host):
        return []
    own = dict.fromkeys([LOOPBACK, "localhost", "::1", s.client_host])
    hosts = [*s.allowed_hosts, *(f"{url_host(h)}:{s.mlflow_port}" for h in own)]
    args = ["--allowed-hosts", ",".join(dict.fromkeys(hosts))]
    origins = list(s.cors_origins)
    if not is_loopback(s.client_host):  # the UI opened at the bind address posts from there
        origins.append(f"http://{url_host(s.client_host)}:{s.mlflow_port}")
    return args + (["--cors-allowed-origins", ",".join(dict.fromkeys(origins))] if origins else [])


def _http_ok(url: str, expect_json: bool = False) -> bool:
    try:
        # trust_env=False: a proxy from the environment must not sit between us and 127.0.0.1.
        r = httpx.get(url, timeout=2.0, trust_env=False)
    except httpx.HTTPError:
        return False
    if r.status_code != 200:
        return False
    return r.json() is True if expect_json else True


def prefect_client(s: StackSettings):
    # Imported here: Prefect's client costs ~1 s to import and only up/status need it.
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(s.prefect_api_url, httpx_settings={"trust_env": False, "timeout": 5.0})


def _worker_registered(s: StackSettings, pool: str) -> bool:
    """True while our worker is listed in the pool with a recent heartbeat."""
    if not _http_ok(f"{s.prefect_api_url}/health", expect_json=True):
        return False
    from prefect.exceptions import ObjectNotFound

    try:
        with prefect_client(s) as client:
            workers = client.read_workers_for_work_pool(pool)
    except (ObjectNotFound, httpx.HTTPError):
        return False
    now = datetime.now(UTC)
    return any(
        w.name == _worker_name(pool)
        and w.last_heartbeat_time is not None
        and (now - w.last_heartbeat_time).total_seconds() < _WORKER_FRESH_SECONDS
        for w in workers
    )


def ensure_pool(s: StackSettings) -> None:
    """Create the process work pools (gpu: concurrency 1, cpu: unlimited), or fix an existing one's limit."""
    try:
        with prefect_client(s) as client:
            ensure_process_pools(client, _pool_limits(s))
    except httpx.HTTPError as e:
        raise StackError(f"Cannot set up the work pools on {s.prefect_api_url}: {e}") from e


def ensure_process_pools(client, limits: dict[str, int | None]) -> None:
    """Create missing process work pools and set their concurrency limits (None: unlimited).

    ``client`` is a sync Prefect client: the local stack's, or one for a team server (`loraflow deploy`).
    """
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    for name, limit in limits.items():
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(
                WorkPoolCreate(name=name, type="process", base_job_template=template, concurrency_limit=limit)
            )
            continue
        if pool.type != "process":
            raise StackError(
                f"Work pool {name!r} has type {pool.type!r}, not 'process'. "
                f"Delete it (`prefect work-pool delete {name}`) or use another LORAFLOW_HOME."
            )
        if pool.concurrency_limit != limit:
            client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=limit))


# --- pidfiles ----------------------------------------------------------------------------------


def _write_pidfile(s: StackSettings, name: str, proc: psutil.Process, argv: list[str]) -> None:
    path = s.pid_path(name)
    tmp = path.with_suffix(".tmp")
    # argv as we passed it, not proc.cmdline(): right after Popen returns, /proc may still show an
    # empty command line while the exec completes.
    tmp.write_text(json.dumps({"pid": proc.pid, "create_time": proc.create_time(), "argv": argv}))
    tmp.replace(path)


def _record(s: StackSettings, name: str) -> dict | None:
    try:
        rec = json.loads(s.pid_path(name).read_text())
        return rec if isinstance(rec, dict) and {"pid", "create_time", "argv"} <= rec.keys() else None
    except (FileNotFoundError, ValueError):
        return None


def _our_process(s: StackSettings, name: str) -> psutil.Process | None:
    """The live process recorded in name's pidfile, or None (the pidfile stays until :func:`_clear_dead`)."""
    rec = _record(s, name)
    if rec is None:
        return None
    try:
        proc = psutil.Process(int(rec["pid"]))
        same = (
            proc.create_time() == rec["create_time"]
            and proc.cmdline() in (rec["argv"], [])  # [] while its exec is still in progress
            and proc.status() != psutil.STATUS_ZOMBIE
        )
    except (ValueError, TypeError, psutil.Error):
        same = False
    return proc if same else None


def _orphans(s: StackSettings, name: str) -> list[psutil.Process]:
    """Processes left in the process group of a service whose leader died.

    Each service is started as the leader of its own process group; when the leader is killed, its
    children stay in that group (MLflow's uvicorn worker, holding the port). They are recognised by
    the group id and by having started after the recorded leader, so a recycled pid is never taken.
    """
    rec = _record(s, name)
    if rec is None or _our_process(s, name) is not None:
        return []
    pgid, since = int(rec["pid"]), float(rec["create_time"])
    # Linux never hands out a pid that is still some group's id: a live process with our leader's pid
    # means the group is gone and the pid was recycled, so nothing in group `pgid` is ours.
    with contextlib.suppress(psutil.Error):
        if psutil.Process(pgid).status() != psutil.STATUS_ZOMBIE:
            return []
    found = []
    for p in psutil.process_iter(["create_time"]):
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(p.pid) == pgid and p.info["create_time"] >= since and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def _clear_dead(s: StackSettings, name: str) -> list[int]:
    """Kill what a dead service left running and remove its pidfile; return the pids killed."""
    left = _orphans(s, name)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=10)
    if _our_process(s, name) is None:
        s.pid_path(name).unlink(missing_ok=True)
    return [p.pid for p in left]


# --- up / down / status ------------------------------------------------------------------------


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers do: a port held only by TIME_WAIT connections is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _log_tail(path: Path, n: int = _LOG_TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(lines[-n:]) or "(empty log)"


def _start(s: StackSettings, svc: _Service) -> psutil.Process:
    if svc.port is not None and not _port_free(svc.host, svc.port):
        raise StackError(
            f"Port {svc.port} on {svc.host} (for the {svc.name} server) is taken by a process that this stack "
            f"(home {s.home}) did not start. Stop it, run `loraflow down` if it is another loraflow stack, or "
            f"choose another port with {svc.port_var}=<port>."
        )
    log = s.log_path(svc.name)
    if log.exists():
        log.replace(log.with_suffix(".log.1"))
    with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
        popen = subprocess.Popen(
            svc.argv,
            env=svc.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: down() signals the whole group
            cwd=s.home,
            umask=0o077,  # databases, artifacts, run folders: the owner's alone
            **as_user(svc.user),
        )
    proc = psutil.Process(popen.pid)
    _write_pidfile(s, svc.name, proc, svc.argv)
    return proc


def _wait_healthy(s: StackSettings, svcs: list[_Service], deadline: float) -> None:
    pending = list(svcs)
    while pending:
        for svc in list(pending):
            if _our_process(s, svc.name) is None:
                raise StackError(
                    f"The {svc.name} service exited during start. Last lines of {s.log_path(svc.name)}:\n"
                    f"{_log_tail(s.log_path(svc.name))}"
                )
            if svc.healthy():
                pending.remove(svc)
        if pending and time.monotonic() > deadline:
            svc = pending[0]
            raise StackError(
                f"The {svc.name} service did not become healthy in time ({svc.url}). "
                f"Last lines of {s.log_path(svc.name)}:\n{_log_tail(s.log_path(svc.name))}"
            )
        if pending:
            time.sleep(_POLL_SECONDS)


def _start_missing(s: StackSettings, svcs: list[_Service], started: list[str]) -> None:
    """Start those of ``svcs`` not running (clearing what a crashed one left first), adding each to ``started``
    as it starts: if a later one fails, up() stops the ones already started."""
    for svc in svcs:
        if _our_process(s, svc.name) is None:
            _clear_dead(s, svc.name)
            _start(s, svc)
            started.append(svc.name)


def up(s: StackSettings, timeout: float = 120) -> StackStatus:
    """Start whatever of the stack is not running and wait until every service is healthy.

    Idempotent: services already running (started by us, per their pidfiles) are left alone.
    If a service fails, the services this call started are stopped again and StackError is raised
    with the end of its log.
    """
    ports = {"LORAFLOW_PREFECT_PORT": s.prefect_port, "LORAFLOW_MLFLOW_PORT": s.mlflow_port}
    if s.backend == "postgres":
        ports["LORAFLOW_POSTGRES_PORT"] = s.postgres_port
    if len(set(ports.values())) < len(ports):
        raise UsageError(
            "The servers need a port each, but " + ", ".join(f"{k}={v}" for k, v in ports.items()) + ": "
            "set those variables to different ports."
        )
    check_backend(s.home, recorded_backend(s.home), s.backend)
    deadline = time.monotonic() + timeout
    for d in (s.prefect_home, s.mlflow_dir / "artifacts", s.log_path("x").parent, s.pid_path("x").parent):
        d.mkdir(parents=True, exist_ok=True)
    make_private(s)
    if s.backend == "postgres":
        init_postgres(s)
    record_path(s.home).write_text(json.dumps({"backend": s.backend}) + "\n")
    svcs = _services(s)
    started: list[str] = []
    try:
        if s.backend == "postgres":
            _start_missing(s, [svcs[POSTGRES]], started)
            _wait_healthy(s, [svcs[POSTGRES]], deadline)
            ensure_databases(s)
        # The two servers start side by side (Prefect takes ~11 s on a first start); the pool
        # needs the Prefect server, and the worker needs the pool.
        servers = [svcs[PREFECT], svcs[MLFLOW]]
        _start_missing(s, servers, started)
        _wait_healthy(s, servers, deadline)
        ensure_pool(s)
        workers = [svcs[WORKER], svcs[CPU_WORKER]]
        _start_missing(s, workers, started)
        _wait_healthy(s, workers, deadline)
    except BaseException:
        _stop_in_order(s, started)
        for name in started:
            _clear_dead(s, name)
        raise
    return status(s)


def make_private(s: StackSettings) -> None:
    """The home, its databases, logs and password file readable by their owner only (also in a home made
    before this rule: their modes are set again). The postgres backend adds traversal for its OS user."""
    # PostgreSQL runs as its own OS user when we are root: it may pass through the home, not list it.
    s.home.chmod(0o701 if s.backend == "postgres" and os.geteuid() == 0 else 0o700)
    private = [s.prefect_home / "prefect.db", s.mlflow_dir / "mlflow.db", s.postgres_dir / "password"]
    private += [*s.log_path("x").parent.glob("*.log*"), *s.prefect_home.glob("prefect.db-*")]
    for f in private:
        if f.is_file():
            f.chmod(0o600)


def _stop(s: StackSettings, names: list[str]) -> list[str]:
    """Stop the process groups of those names whose pidfile names a live process of ours, together;
    return the names stopped."""
    leaders = {name: proc for name in names if (proc := _our_process(s, name)) is not None}
    procs: list[psutil.Process] = []
    for proc in leaders.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            procs += [proc, *proc.children(recursive=True)]
    for sig, grace in ((signal.SIGTERM, _STOP_GRACE_SECONDS), (signal.SIGKILL, 5.0)):
        for name, proc in leaders.items():
            with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
                if name == POSTGRES and sig == signal.SIGTERM:
                    # The postmaster alone, with SIGINT: its "fast shutdown" stops its own children in
                    # order (a SIGTERM would be a "smart" one that waits for clients; signalling the
                    # whole group would race the postmaster with its checkpointer).
                    proc.send_signal(signal.SIGINT)
                else:
                    os.killpg(proc.pid, sig)  # pgid == pid: started with start_new_session
        for p in procs:  # a child that left its group still gets the signal, but only once:
            # Prefect's worker takes a second SIGTERM as "kill now".
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                if os.getpgid(p.pid) not in {proc.pid for proc in leaders.values()}:
                    p.send_signal(sig)
        # wait_procs reaps our own children (up() and down() in one process, e.g. in tests).
        _, procs = psutil.wait_procs(procs, timeout=grace)
        if not procs:
            break
    if procs:
        raise StackError(f"Could not stop {', '.join(leaders)} (pids {[p.pid for p in procs]}); kill them by hand.")
    for name in leaders:
        s.pid_path(name).unlink(missing_ok=True)
    return list(leaders)


def _stop_in_order(s: StackSettings, names: list[str]) -> list[str]:
    """Stop those of ``names`` that run: the worker first, while the Prefect server can still hear it
    leave; then both servers together; PostgreSQL last, once its clients are gone."""
    stopped = []
    for step in ([WORKER, CPU_WORKER], [MLFLOW, PREFECT], [POSTGRES]):
        stopped += _stop(s, [n for n in step if n in names])
    return stopped


def down(s: StackSettings) -> list[str]:
    """Stop the services that `up` started, and what a crashed one left running; return the names stopped."""
    stopped = _stop_in_order(s, [POSTGRES, *SERVICES])
    return stopped + [name for name in (POSTGRES, *SERVICES) if name not in stopped and _clear_dead(s, name)]


def status(s: StackSettings) -> StackStatus:
    """The state of each service: pid, process alive, healthy, URL and log path."""
    svcs = _services(s)
    out = []
    for name in s.services:
        svc = svcs[name]
        proc = _our_process(s, name)
        running = proc is not None
        healthy = running and svc.healthy()
        orphans = len(_orphans(s, name))
        out.append(
            ServiceStatus(name, proc.pid if proc else None, running, healthy, svc.url, s.log_path(name), orphans)
        )
    return StackStatus(tuple(out))
