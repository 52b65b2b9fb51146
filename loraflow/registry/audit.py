"""The audit ledger of a registered model's alias moves: append-only, kept in MLflow itself.

One MLflow run per registered model, the *ledger*, in the experiment ``loraflow-audit``; the
registered model's tag ``loraflow.audit_run_id`` points at it (and the run's tag
``loraflow.audit.model`` points back). Every entry is one *param* of that run:

    move.000001 = {"seq": 1, "action": "promote", "from_version": null, "to_version": "1", ...}
    done.000001 = 2026-11-28T16:01:02.123456+00:00     the aliases were set (see registry.settle)
    refused.20261128T160102123456.3fa9c2d1 = {...}      a refused promotion, with the gate's verdict

MLflow params are immutable: the server refuses to change a logged value, so nothing written
through the API can rewrite the trail, and logging ``move.<n+1>`` is a compare-and-set that two
writers cannot both win (``append_move`` turns a lost one into :class:`RegistryError`).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Literal

from pydantic import Field

from loraflow import tags as T
from loraflow.errors import RegistryError, UsageError
from loraflow.records import Record, Verdict

AUDIT_EXPERIMENT = "loraflow-audit"
_MAX_PARAM = 6000  # MLflow's limit on a param value


class AuditRecord(Record):
    """One alias move (or refused attempt) of a registered model, as stored in its ledger."""

    seq: int | None = Field(description="Position among the model's alias moves (None for a refusal).")
    action: Literal["promote", "rollback", "refused"]
    model: str
    version: str = Field(description="The version promoted, restored or refused.")
    from_version: str | None = Field(description="`champion` before.")
    to_version: str | None = Field(description="`champion` after (unchanged for a refusal).")
    previous_champion: str | None = Field(description="`previous-champion` after.")
    who: str = Field(description="The configured identity, else the OS user.")
    at: str = Field(description="When, ISO 8601 in UTC.")
    reason: str
    forced: bool = False
    verdict: Verdict | None = None
    flow_run_id: str | None = Field(description="The Prefect flow run that made the move.")
    token: str = Field(default_factory=lambda: uuid.uuid4().hex, description="Unique id of this entry.")
    done_at: str | None = Field(None, description="When the aliases were set (read from done.<seq>; not stored).")

    @property
    def when(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.at)


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _encode(record: AuditRecord) -> str:
    text = record.model_dump_json(exclude={"done_at"})
    if len(text) > _MAX_PARAM and record.verdict is not None:  # shorten the check details, keep the numbers
        checks = [c.model_copy(update={"detail": c.detail[:60]}) for c in record.verdict.checks]
        shorter = record.model_copy(update={"verdict": record.verdict.model_copy(update={"checks": checks})})
        text = shorter.model_dump_json(exclude={"done_at"})
    if len(text) > _MAX_PARAM:
        raise RegistryError(f"audit record of {len(text)} characters exceeds MLflow's {_MAX_PARAM}: shorten the reason")
    return text


def ledger_id(client, model: str) -> str | None:
    """The ledger run of ``model``, or None before its first alias move."""
    return client.get_registered_model(model).tags.get(T.AUDIT_RUN_ID)


def create_ledger(client, model: str) -> str:
    """Create the ledger run of ``model`` and point the registered model at it (call under the model's lock)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if exp is None:
        try:
            exp_id = client.create_experiment(AUDIT_EXPERIMENT, tags={"mlflow.note.content": _EXPERIMENT_NOTE})
        except MlflowException as e:  # another model's first move created it a moment ago
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp_id = client.get_experiment_by_name(AUDIT_EXPERIMENT).experiment_id
    else:
        exp_id = exp.experiment_id
    run = client.create_run(
        exp_id, run_name=f"ledger:{model}", tags={T.AUDIT_MODEL: model, "mlflow.note.content": _LEDGER_NOTE}
    )
    client.set_terminated(run.info.run_id)  # params can still be appended; the UI shows no endless "running"
    client.set_registered_model_tag(model, T.AUDIT_RUN_ID, run.info.run_id)
    return run.info.run_id


_EXPERIMENT_NOTE = "loraflow's audit trail: one run per registered model; each alias move is an immutable param."
_LEDGER_NOTE = "Append-only: params move.<seq> (alias moves), done.<seq>, refused.<time>.<id>. Do not delete."


def read_ledger(client, run_id: str) -> list[AuditRecord]:
    """Every entry of a ledger: moves in sequence order, then refusals in time order."""
    params = client.get_run(run_id).data.params
    moves, refusals = [], []
    for key, value in params.items():
        kind, _, rest = key.partition(".")
        if kind == "move":
            record = AuditRecord.model_validate_json(value)
            moves.append(record.model_copy(update={"done_at": params.get(f"done.{rest}")}))
        elif kind == "refused":
            refusals.append(AuditRecord.model_validate_json(value))
    return sorted(moves, key=lambda r: r.seq or 0) + sorted(refusals, key=lambda r: r.at)


def moves(records: list[AuditRecord]) -> list[AuditRecord]:
    return [r for r in records if r.seq is not None]


def next_seq(records: list[AuditRecord]) -> int:
    return max((r.seq or 0 for r in records), default=0) + 1


def append_move(client, run_id: str, record: AuditRecord) -> None:
    """Claim ``move.<seq>`` for ``record``; raise RegistryError when another writer holds that number."""
    from mlflow.exceptions import MlflowException

    key, value = f"move.{record.seq:06d}", _encode(record)
    try:
        client.log_param(run_id, key, value)
        return
    except MlflowException as e:  # a lost compare-and-set, or a failed request whose write may have landed
        stored = client.get_run(run_id).data.params.get(key)
        if stored == value:
            return
        if stored is None:
            raise
        winner = AuditRecord.model_validate_json(stored)
        raise RegistryError(
            f"audit sequence {record.seq} of {record.model} was taken by a concurrent {winner.action} of version "
            f"{winner.version} by {winner.who}: nothing was changed by this one; look at `loraflow history "
            f"{record.model}` and try again if still wanted"
        ) from e


def mark_done(client, run_id: str, seq: int) -> None:
    client.log_param(run_id, f"done.{seq:06d}", now_utc())


def append_refusal(client, run_id: str, record: AuditRecord) -> None:
    stamp = record.when.strftime("%Y%m%dT%H%M%S%f")
    client.log_param(run_id, f"refused.{stamp}.{record.token[:8]}", _encode(record))


def champion_at(records: list[AuditRecord], when: dt.datetime) -> str | None:
    """The version that held `champion` at ``when`` according to the ledger (None: no champion yet)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    champion = None
    for r in moves(records):
        if r.when > when:
            break
        champion = r.to_version
    return champion


def parse_when(text: str) -> dt.datetime:
    """An ISO date or date-time; a date alone means the end of that day, and no zone means UTC."""
    try:
        if len(text.strip()) == 10:
            return dt.datetime.combine(dt.date.fromisoformat(text.strip()), dt.time.max, dt.UTC)
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError as e:
        raise UsageError(f"--at {text!r} is not an ISO date or date-time (e.g. 2026-03-01 or 2026-03-01T12:00)") from e
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)
