"""Prefect's history on a stack left running for months: its own vacuum service bounds it (issue 21)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loraflow.errors import UsageError
from loraflow.stack.services import _services
from loraflow.stack.settings import PREFECT, StackSettings

VACUUM = "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED"
PERIOD = "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD"


def prefect_reads(env: dict[str, str]) -> tuple[list[str], float]:
    """What Prefect's own settings make of the server's environment."""
    code = (
        "import json; from prefect.settings import get_current_settings as g; v = g().server.services.db_vacuum; "
        "print(json.dumps([sorted(v.enabled), v.retention_period.total_seconds()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    enabled, seconds = json.loads(out)
    return enabled, seconds


def test_the_server_deletes_flow_runs_after_90_days_by_default(tmp_path):
    env = _services(StackSettings.from_env({"LORAFLOW_HOME": str(tmp_path)}))[PREFECT].env
    assert prefect_reads(env) == (["events", "flow_runs"], 90 * 86400)


def test_the_window_is_a_setting_and_a_users_prefect_setting_wins(tmp_path, monkeypatch):
    s = StackSettings.from_env({"LORAFLOW_HOME": str(tmp_path), "LORAFLOW_PREFECT_HISTORY_DAYS": "30"})
    assert prefect_reads(_services(s)[PREFECT].env) == (["events", "flow_runs"], 30 * 86400)
    monkeypatch.setenv(VACUUM, '["events"]')
    monkeypatch.setenv(PERIOD, "7200")
    assert prefect_reads(_services(s)[PREFECT].env) == (["events"], 7200)


@pytest.mark.parametrize("days", ["0", "-3", "ninety", "1.5"])
def test_a_window_that_is_not_whole_days_is_refused(tmp_path, days):
    with pytest.raises(UsageError, match=f"LORAFLOW_PREFECT_HISTORY_DAYS='{days}' is not a whole number of days"):
        StackSettings.from_env({"LORAFLOW_HOME": str(tmp_path), "LORAFLOW_PREFECT_HISTORY_DAYS": days})
