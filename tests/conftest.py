"""Shared test setup. Offline hygiene first: nothing in the suite may reach the Hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


# --- local stack fixture ---
# A real Prefect server, MLflow server and worker on free ports, shared by the whole session
# (~12 s to start). Tests get the settings and point their clients at it with client_env(s).

import pytest  # noqa: E402  (kept inside this block so that it stays self-contained)


def _local_stack_ports() -> tuple[int, int]:
    import socket

    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        return a.getsockname()[1], b.getsockname()[1]


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    """StackSettings of a running local stack; stopped with down() at the end of the session."""
    from loraflow.stack import StackSettings, down, up

    prefect_port, mlflow_port = _local_stack_ports()
    s = StackSettings(
        home=tmp_path_factory.mktemp("loraflow-stack"), prefect_port=prefect_port, mlflow_port=mlflow_port
    )
    try:
        up(s, timeout=120)
        yield s
    finally:
        down(s)


# --- end local stack fixture ---
