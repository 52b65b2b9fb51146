"""The postgres backend's private PostgreSQL server: cluster creation, its role and databases.

home/postgres/data/     PGDATA (owned by the OS user `postgres` when run as root)
home/postgres/password  the database role's password (mode 0600)
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import stat
import subprocess
from pathlib import Path

from loraflow.errors import StackError
from loraflow.stack.settings import DATABASES, LOOPBACK, StackSettings

_PG_ROLE = "loraflow"
# PostgreSQL refuses to run as root; run as root, loraflow runs initdb and the server as this OS user
# (created by Debian's postgresql package).
_PG_OS_USER = "postgres"


def postgres_bindir() -> Path | None:
    """The folder with PostgreSQL's initdb and postgres programs: from PATH, else Debian's newest
    /usr/lib/postgresql/<version>/bin (Debian keeps them off PATH); None when not installed."""
    candidates = []
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(d) for d in sorted(versions, key=lambda d: int(Path(d).parent.name or 0), reverse=True)]
    for d in candidates:
        if all(os.access(d / exe, os.X_OK) for exe in ("initdb", "postgres")):
            return d
    return None


def pg_password(s: StackSettings) -> str:
    # Missing before the first `up`; only status() builds the services then, and it never connects.
    path = s.postgres_dir / "password"
    return path.read_text().strip() if path.exists() else ""


def database_url(s: StackSettings, database: str, driver: str = "psycopg") -> str:
    """SQLAlchemy URL of one of the stack's PostgreSQL databases, e.g. driver "asyncpg" for Prefect."""
    return f"postgresql+{driver}://{_PG_ROLE}:{pg_password(s)}@{LOOPBACK}:{s.postgres_port}/{database}"


def conninfo(s: StackSettings, database: str) -> str:
    return f"host={LOOPBACK} port={s.postgres_port} dbname={database} user={_PG_ROLE} password={pg_password(s)}"


def pg_os_user() -> pwd.struct_passwd | None:
    """The OS user to run PostgreSQL as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(_PG_OS_USER)
    except KeyError as e:
        raise StackError(
            f"PostgreSQL refuses to run as root, and there is no OS user {_PG_OS_USER!r} to run it as. "
            f"Install Debian's postgresql package (it creates one) or `useradd --system {_PG_OS_USER}`."
        ) from e


def as_user(user: pwd.struct_passwd | None) -> dict:
    """subprocess arguments that run a child as ``user`` with exactly its own groups."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": os.getgrouplist(user.pw_name, user.pw_gid)}


def blocked_for(user: pwd.struct_passwd, path: Path) -> Path | None:
    """The first folder above ``path`` that ``user`` cannot enter, or None."""
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for d in reversed(path.parents):
        st = d.stat()
        if st.st_uid == user.pw_uid:
            ok = st.st_mode & 0o100
        elif st.st_gid in groups:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return d
    return None


def init_postgres(s: StackSettings) -> None:
    """Create the cluster under home/postgres once: role `loraflow` with a random password,
    password (scram) authentication on 127.0.0.1 only, no Unix socket."""
    if (s.pgdata / "PG_VERSION").exists():
        return
    bindir = postgres_bindir()
    if bindir is None:
        raise StackError(
            "The postgres backend needs PostgreSQL's initdb and postgres programs, found neither on PATH nor "
            "under /usr/lib/postgresql/*/bin. Install them (`apt-get install postgresql`) or use the sqlite backend."
        )
    user = pg_os_user()
    if s.pgdata.exists() and any(s.pgdata.iterdir()):
        raise StackError(
            f"{s.pgdata} holds files but no PostgreSQL cluster (an interrupted first start?). "
            "Remove that folder and run `loraflow up` again."
        )
    s.postgres_dir.mkdir(parents=True, exist_ok=True)
    password_file = s.postgres_dir / "password"
    if not password_file.exists():
        password_file.touch(mode=0o600)
        password_file.write_text(secrets.token_urlsafe(24) + "\n")
    s.pgdata.mkdir(mode=0o700, exist_ok=True)
    pwfile = s.postgres_dir / "initdb-pwfile"  # initdb reads the password as the server's OS user
    pwfile.touch(mode=0o600)
    pwfile.write_text(pg_password(s) + "\n")
    if user is not None:
        # Only traversal for the postgres user: home and home/postgres stay unlistable to others.
        for d in (s.home, s.postgres_dir):
            d.chmod(stat.S_IMODE(d.stat().st_mode) | 0o001)
        for path in (s.pgdata, pwfile):
            os.chown(path, user.pw_uid, user.pw_gid)
        if (blocked := blocked_for(user, s.pgdata)) is not None:
            pwfile.unlink()
            raise StackError(
                f"PostgreSQL refuses to run as root, so loraflow runs it as the OS user {_PG_OS_USER!r}, who cannot "
                f"enter {blocked} (mode {blocked.stat().st_mode & 0o777:o}). Let it (`chmod o+x {blocked}`) or set "
                "LORAFLOW_HOME to a folder under one that other users can enter, e.g. /srv or /var/tmp."
            )
    argv = [
        str(bindir / "initdb"),
        *("--pgdata", str(s.pgdata), "--username", _PG_ROLE, "--pwfile", str(pwfile)),
        *("--auth-host=scram-sha-256", "--auth-local=peer", "--encoding=UTF8", "--locale=C", "--no-instructions"),
    ]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=s.postgres_dir, **as_user(user))
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        shutil.rmtree(s.pgdata, ignore_errors=True)
        raise StackError(f"initdb failed for {s.pgdata}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def pg_ready(s: StackSettings) -> bool:
    import psycopg  # here: only the postgres backend needs it

    try:
        with psycopg.connect(conninfo(s, "postgres"), connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def ensure_databases(s: StackSettings) -> None:
    """Create the prefect and mlflow databases that do not exist yet."""
    import psycopg
    from psycopg import sql

    try:
        with psycopg.connect(conninfo(s, "postgres"), autocommit=True, connect_timeout=5) as conn:
            have = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
            for db in DATABASES:
                if db not in have:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    except psycopg.Error as e:
        raise StackError(
            f"Cannot create the databases {DATABASES} on PostgreSQL at {LOOPBACK}:{s.postgres_port}: {e}"
        ) from e
