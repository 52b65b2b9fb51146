"""The local stack behind `loraflow up` / `down` / `status`: a Prefect server, an MLflow server and
a Prefect worker on the GPU work pool, all on 127.0.0.1 with their state under one home folder.
With the `postgres` backend a fourth service, a private PostgreSQL server, holds both servers'
databases instead of SQLite files.

The Prefect and MLflow servers have no authentication of their own, so they listen on loopback unless
LORAFLOW_HOST names another address *and* LORAFLOW_ALLOW_REMOTE=1 says that is meant (README "Exposing
the stack"); PostgreSQL listens on 127.0.0.1 always: only those two servers talk to it.

    home/stack.json         the backend this home was created with ("sqlite" or "postgres"); fixed
    home/prefect/           PREFECT_HOME of the server and the worker (SQLite prefect.db)
    home/mlflow/            mlflow.db and artifacts/ (artifacts stay files with either backend)
    home/postgres/data/     PGDATA (postgres backend; owned by the OS user `postgres` when run as root)
    home/postgres/password  the database role's password (mode 0600)
    home/logs/<name>.log    each service's stdout + stderr (the previous run's kept as .log.1)
    home/run/<name>.pid     JSON: pid, process start time and argv, so that a recycled pid is never
                            taken for ours

Nothing here changes this process's environment: each service gets its environment explicitly,
and clients get theirs from `client_env`.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from loraflow.errors import StackError, UsageError

PREFECT = "prefect"
MLFLOW = "mlflow"
WORKER = "worker"  # the gpu pool's worker (training)
CPU_WORKER = "worker-cpu"  # the cpu pool's worker (finetune flows started from the UI or a schedule)
POSTGRES = "postgres"
SERVICES = (PREFECT, MLFLOW, WORKER, CPU_WORKER)  # the sqlite backend's; the postgres backend starts POSTGRES first

Backend = Literal["sqlite", "postgres"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
# One database per server, both owned by one role.
DATABASES = (PREFECT, MLFLOW)
LOOPBACK = "127.0.0.1"
_YES, _NO = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class StackSettings:
    """Where the local stack keeps its state and which ports it listens on."""

    home: Path  # all state: databases, artifacts, logs, pidfiles
    host: str = LOOPBACK  # the Prefect and MLflow servers listen here (LORAFLOW_HOST)
    allow_remote: bool = False  # a host other than loopback is meant (LORAFLOW_ALLOW_REMOTE=1)
    # Exposed (allow_remote), the MLflow server accepts these Host headers and browser origins besides its own
    # addresses (MLflow's MLFLOW_SERVER_ALLOWED_HOSTS / MLFLOW_SERVER_CORS_ALLOWED_ORIGINS, comma-separated).
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    # Where browsers reach the Prefect API when that is not where loraflow's clients do (a reverse proxy; Prefect's
    # PREFECT_SERVER_UI_API_URL); None: prefect_api_url.
    ui_api_url: str | None = None
    prefect_port: int = 4200  # Prefect API + UI
    mlflow_port: int = 5000  # MLflow tracking + registry + artifact proxy
    pool: str = "gpu"  # the process work pool (concurrency 1) that the training worker serves
    cpu_pool: str = "cpu"  # the process work pool of the orchestrating flows (no concurrency limit)
    backend: Backend = "sqlite"  # where Prefect and MLflow keep their databases; fixed per home
    postgres_port: int = 5432  # the private PostgreSQL server (postgres backend only)
    # Prefect deletes flow runs (with their logs and artifacts) this many days after they end, and its events
    # after 7 (LORAFLOW_PREFECT_HISTORY_DAYS). The audit trail is MLflow's and is never pruned.
    prefect_history_days: int = 90

    def __post_init__(self) -> None:
        if problem := bind_problem(self.host, self.allow_remote):
            raise UsageError(problem)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], backend: Backend | None = None) -> StackSettings:
        """Read LORAFLOW_HOME (default ./.loraflow), LORAFLOW_{PREFECT,MLFLOW,POSTGRES}_PORT, LORAFLOW_HOST
        (default 127.0.0.1), LORAFLOW_ALLOW_REMOTE, LORAFLOW_PREFECT_HISTORY_DAYS (default 90), MLflow's
        MLFLOW_SERVER_{ALLOWED_HOSTS,CORS_ALLOWED_ORIGINS}
        and Prefect's PREFECT_SERVER_UI_API_URL.

        The backend is the one recorded in the home; ``backend`` (from `up --backend`) picks it for
        a new home and must match the recorded one otherwise (UsageError).
        """
        home = Path(environ.get("LORAFLOW_HOME") or ".loraflow").expanduser().resolve()
        ports = {}
        problems = []
        host = (environ.get("LORAFLOW_HOST") or LOOPBACK).strip().strip("[]")
        allow = (environ.get("LORAFLOW_ALLOW_REMOTE") or "").strip().lower()
        if allow not in _YES + _NO:
            problems.append(f"LORAFLOW_ALLOW_REMOTE={allow!r} is neither 1 nor 0")
        elif problem := bind_problem(host, allow in _YES):
            problems.append(problem)
        days = (environ.get("LORAFLOW_PREFECT_HISTORY_DAYS") or str(cls.prefect_history_days)).strip()
        if not days.isdigit() or int(days) < 1:
            problems.append(f"LORAFLOW_PREFECT_HISTORY_DAYS={days!r} is not a whole number of days (1 or more)")
        for var, default in (
            ("LORAFLOW_PREFECT_PORT", cls.prefect_port),
            ("LORAFLOW_MLFLOW_PORT", cls.mlflow_port),
            ("LORAFLOW_POSTGRES_PORT", cls.postgres_port),
        ):
            raw = environ.get(var) or str(default)
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                problems.append(f"{var}={raw!r} is not a TCP port (1-65535)")
            else:
                ports[var] = int(raw)
        if problems:
            raise UsageError("; ".join(problems))
        recorded = recorded_backend(home)
        check_backend(home, recorded, backend)
        return cls(
            home=home,
            host=host,
            allow_remote=allow in _YES,
            allowed_hosts=_listed(environ.get("MLFLOW_SERVER_ALLOWED_HOSTS")),
            cors_origins=_listed(environ.get("MLFLOW_SERVER_CORS_ALLOWED_ORIGINS")),
            ui_api_url=environ.get("PREFECT_SERVER_UI_API_URL") or None,
            prefect_port=ports["LORAFLOW_PREFECT_PORT"],
            mlflow_port=ports["LORAFLOW_MLFLOW_PORT"],
            backend=backend or recorded or "sqlite",
            postgres_port=ports["LORAFLOW_POSTGRES_PORT"],
            prefect_history_days=int(days),
        )

    @property
    def services(self) -> tuple[str, ...]:
        """This backend's services in start order."""
        return (POSTGRES, *SERVICES) if self.backend == "postgres" else SERVICES

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def postgres_dir(self) -> Path:
        return self.home / "postgres"

    @property
    def pgdata(self) -> Path:
        return self.postgres_dir / "data"

    @property
    def client_host(self) -> str:
        """The address clients connect to: the bind address, or loopback when the servers listen on every
        interface (0.0.0.0, ::), which is no address to connect to."""
        ip = _ip(self.host)
        if ip is not None and ip.is_unspecified:
            return "::1" if ip.version == 6 else LOOPBACK
        return self.host

    @property
    def prefect_api_url(self) -> str:
        return f"http://{url_host(self.client_host)}:{self.prefect_port}/api"

    @property
    def prefect_ui_url(self) -> str:
        return f"http://{url_host(self.client_host)}:{self.prefect_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{url_host(self.client_host)}:{self.mlflow_port}"

    def log_path(self, service: str) -> Path:
        return self.home / "logs" / f"{service}.log"

    def pid_path(self, service: str) -> Path:
        return self.home / "run" / f"{service}.pid"


@dataclass(frozen=True)
class ServiceStatus:
    """One service as `status` sees it; pid is None when no process of ours is running."""

    name: str
    pid: int | None
    running: bool
    healthy: bool
    url: str
    log: Path
    orphans: int = 0  # processes a crashed service left running (`loraflow up` or `down` clears them)


@dataclass(frozen=True)
class StackStatus:
    """The state of every service of the stack, in start order."""

    services: tuple[ServiceStatus, ...]

    @property
    def all_healthy(self) -> bool:
        return all(s.healthy for s in self.services)

    def __getitem__(self, name: str) -> ServiceStatus:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)

    def format(self) -> str:
        """A small table for the terminal."""
        rows = [("SERVICE", "PID", "STATE", "URL", "LOG")]
        for s in self.services:
            state = "healthy" if s.healthy else ("unhealthy" if s.running else "stopped")
            if s.orphans:
                state = f"crashed, {s.orphans} orphaned process(es)"
            rows.append((s.name, str(s.pid or "-"), state, s.url, str(s.log)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows)
        return "\n".join(lines)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None  # a host name


def url_host(host: str) -> str:
    """``host`` as it goes into a URL or a Host header: an IPv6 address in brackets."""
    return f"[{host.strip('[]')}]" if ":" in host else host


def _listed(raw: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (raw or "").split(",") if x.strip())


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or the name localhost: reachable from this machine only."""
    ip = _ip(host)
    return host.lower() == "localhost" if ip is None else ip.is_loopback


def bind_problem(host: str, allow_remote: bool) -> str | None:
    """Why the servers may not listen on ``host`` (None: they may): anything but loopback needs allow_remote."""
    if not host or any(c.isspace() or c in "/@" for c in host):
        return f"LORAFLOW_HOST={host!r} is not an address or host name to listen on (e.g. 127.0.0.1)"
    if is_loopback(host) or allow_remote:
        return None
    return (
        f"LORAFLOW_HOST={host} would let other machines reach the Prefect and MLflow servers, which have no "
        "authentication of their own: whoever reaches them can read every run and register or promote models. "
        "The stack listens on 127.0.0.1 unless told otherwise. To expose it on purpose, set LORAFLOW_ALLOW_REMOTE=1 "
        'as well (and keep the servers behind a reverse proxy with authentication: README "Exposing the stack"); '
        "otherwise unset LORAFLOW_HOST."
    )


def client_env(s: StackSettings) -> dict[str, str]:
    """The environment variables a client process needs to use this stack."""
    return {
        "PREFECT_API_URL": s.prefect_api_url,
        "MLFLOW_TRACKING_URI": s.mlflow_url,
        "LORAFLOW_HOME": str(s.home),
        **MLFLOW_FAIL_FAST,
        **OFFLINE_AND_QUIET,
    }


# Offline and quiet: the Hub is unreachable, telemetry has nowhere to go, and progress bars of
# libraries (transformers' "Writing model shards") are noise in logs. Every process of the stack and
# the CLI gets these.
OFFLINE_AND_QUIET = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# Each MLflow request gives up after ~3 s of retries instead of MLflow's ~4 minutes: loraflow waits out an
# outage itself, buffering metrics and retrying registration for tracking.outage_timeout_s.
MLFLOW_FAIL_FAST = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


# --- backend ------------------------------------------------------------------------------------


def record_path(home: Path) -> Path:
    return home / "stack.json"


def recorded_backend(home: Path) -> Backend | None:
    """The backend the stack under ``home`` was created with, or None for a new home."""
    path = record_path(home)
    try:
        backend = json.loads(path.read_text())["backend"]
    except FileNotFoundError:
        # A home from before the backend was recorded holds SQLite databases.
        legacy = (home / "prefect" / "prefect.db").exists() or (home / "mlflow" / "mlflow.db").exists()
        return "sqlite" if legacy else None
    except (ValueError, KeyError, TypeError) as e:
        raise StackError(f'{path} is damaged ({e}); it should read {{"backend": "sqlite"}} or "postgres".') from e
    if backend not in BACKENDS:
        raise StackError(f"{path} names backend {backend!r}; loraflow knows {', '.join(BACKENDS)}.")
    return backend


def check_backend(home: Path, recorded: Backend | None, requested: Backend | None) -> None:
    if recorded is not None and requested is not None and requested != recorded:
        raise UsageError(
            f"LORAFLOW_HOME {home} holds a stack with the {recorded} backend (its Prefect and MLflow databases "
            f"live there), so it cannot run with --backend {requested}. Leave --backend out (or pass "
            f"--backend {recorded}) to use this home, or set LORAFLOW_HOME to another folder for a {requested} stack."
        )
