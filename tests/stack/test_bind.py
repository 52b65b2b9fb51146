"""Where the local stack listens: loopback unless LORAFLOW_HOST says otherwise and LORAFLOW_ALLOW_REMOTE=1 means it.

python -m pytest tests/stack/test_bind.py -q
"""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from loraflow.errors import UsageError
from loraflow.stack.postgres import database_url
from loraflow.stack.services import _services, down, status, up
from loraflow.stack.settings import MLFLOW, POSTGRES, PREFECT, StackSettings, client_env
from tests.stack.test_stack import free_ports


def _argv(s: StackSettings, name: str) -> list[str]:
    return _services(s)[name].argv


def _option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def _remote(tmp_path, host: str, allow: str = "1") -> StackSettings:
    env = {"LORAFLOW_HOME": str(tmp_path), "LORAFLOW_HOST": host, "LORAFLOW_ALLOW_REMOTE": allow}
    return StackSettings.from_env(env)


def test_the_stack_listens_on_loopback_by_default(tmp_path):
    s = StackSettings.from_env({"LORAFLOW_HOME": str(tmp_path)})
    assert (s.host, s.allow_remote) == ("127.0.0.1", False)
    assert _option(_argv(s, PREFECT), "--host") == _option(_argv(s, MLFLOW), "--host") == "127.0.0.1"
    # MLflow keeps its own defaults there (localhost and private addresses): no option replaces them.
    assert "--allowed-hosts" not in _argv(s, MLFLOW) and "--cors-allowed-origins" not in _argv(s, MLFLOW)
    # Other loopback spellings need no permission either.
    for host in ("localhost", "127.0.0.2", "::1"):
        assert StackSettings.from_env({"LORAFLOW_HOME": str(tmp_path), "LORAFLOW_HOST": host}).host == host


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "mlflow.example.com"])
def test_any_other_address_is_refused_without_allow_remote(tmp_path, host):
    for allow in ("", "0"):
        with pytest.raises(UsageError) as e:
            _remote(tmp_path, host, allow)
        message = str(e.value)
        assert message.startswith(f"LORAFLOW_HOST={host} would let other machines reach the Prefect and MLflow")
        assert "no authentication of their own" in message  # why
        assert "set LORAFLOW_ALLOW_REMOTE=1" in message and 'README "Exposing the stack"' in message  # how
        assert e.value.exit_code == 2
    # Settings built in code are held to the same rule.
    with pytest.raises(UsageError, match="LORAFLOW_ALLOW_REMOTE=1"):
        StackSettings(home=tmp_path, host=host)


def test_allow_remote_is_a_yes_or_no_and_the_host_an_address(tmp_path):
    with pytest.raises(UsageError, match="LORAFLOW_ALLOW_REMOTE='maybe' is neither 1 nor 0"):
        _remote(tmp_path, "0.0.0.0", allow="maybe")
    with pytest.raises(UsageError, match="is not an address or host name"):
        StackSettings.from_env({"LORAFLOW_HOME": str(tmp_path), "LORAFLOW_HOST": "http://0.0.0.0"})


def test_every_interface_allowed_clients_still_use_loopback(tmp_path):
    env = {
        "LORAFLOW_HOME": str(tmp_path),
        "LORAFLOW_HOST": "0.0.0.0",
        "LORAFLOW_ALLOW_REMOTE": "1",
        "MLFLOW_SERVER_ALLOWED_HOSTS": "mlflow.example.com:5000, mlflow.example.com",
        "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS": "https://mlflow.example.com",
        "PREFECT_SERVER_UI_API_URL": "https://prefect.example.com/api",
    }
    s = StackSettings.from_env(env)
    assert (s.host, s.allow_remote) == ("0.0.0.0", True)
    # 0.0.0.0 is no address to connect to: loraflow's clients use loopback.
    assert (s.prefect_api_url, s.mlflow_url) == ("http://127.0.0.1:4200/api", "http://127.0.0.1:5000")
    assert client_env(s)["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"

    prefect, mlflow = _argv(s, PREFECT), _argv(s, MLFLOW)
    assert _option(prefect, "--host") == _option(mlflow, "--host") == "0.0.0.0"
    # MLflow checks Host headers and origins: the names given, plus the addresses our own clients use.
    assert _option(mlflow, "--allowed-hosts") == (
        "mlflow.example.com:5000,mlflow.example.com,127.0.0.1:5000,localhost:5000,[::1]:5000"
    )
    assert _option(mlflow, "--cors-allowed-origins") == "https://mlflow.example.com"
    # The Prefect UI calls its API where the browser reaches it (a reverse proxy here).
    assert _services(s)[PREFECT].env["PREFECT_SERVER_UI_API_URL"] == "https://prefect.example.com/api"

    # PostgreSQL stays on loopback whatever the servers do: only they connect to it.
    pg = dataclasses.replace(s, backend="postgres")
    assert _option(_argv(pg, POSTGRES), "-h") == "127.0.0.1"
    assert "@127.0.0.1:5432/mlflow" in database_url(pg, "mlflow")


def test_a_remote_address_is_where_clients_and_browsers_go(tmp_path):
    s = _remote(tmp_path, "10.1.2.3")
    assert (s.prefect_api_url, s.mlflow_url) == ("http://10.1.2.3:4200/api", "http://10.1.2.3:5000")
    mlflow = _argv(s, MLFLOW)
    assert _option(mlflow, "--allowed-hosts") == "127.0.0.1:5000,localhost:5000,[::1]:5000,10.1.2.3:5000"
    assert _option(mlflow, "--cors-allowed-origins") == "http://10.1.2.3:5000"  # the UI opened there posts from there
    assert _services(s)[PREFECT].env["PREFECT_SERVER_UI_API_URL"] == "http://10.1.2.3:4200/api"

    v6 = _remote(tmp_path, "[fd00::5]")
    assert v6.host == "fd00::5" and v6.mlflow_url == "http://[fd00::5]:5000"
    assert _option(_argv(v6, MLFLOW), "--allowed-hosts").endswith(",[fd00::5]:5000")


@pytest.mark.integration
def test_an_exposed_mlflow_server_accepts_only_the_hosts_it_was_given(tmp_path):
    """A real stack on 0.0.0.0: loraflow's clients (via 127.0.0.1) and the named host get in; another Host
    header (what a DNS-rebinding page sends) gets MLflow's 403."""
    prefect_port, mlflow_port = free_ports(2)
    s = StackSettings(
        home=tmp_path,
        host="0.0.0.0",
        allow_remote=True,
        allowed_hosts=(f"mlflow.example.com:{mlflow_port}",),
        prefect_port=prefect_port,
        mlflow_port=mlflow_port,
    )
    search = f"{s.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        assert up(s, timeout=120).all_healthy
        assert httpx.get(search, trust_env=False).status_code == 200
        named = httpx.get(search, headers={"Host": f"mlflow.example.com:{mlflow_port}"}, trust_env=False)
        assert named.status_code == 200
        foreign = httpx.get(search, headers={"Host": f"attacker.example:{mlflow_port}"}, trust_env=False)
        assert foreign.status_code == 403 and "Invalid Host header" in foreign.text
    finally:
        down(s)
    assert not any(x.running for x in status(s).services)
