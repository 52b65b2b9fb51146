"""Which registered version serves: alias moves and rollback, race-safe and audited.

Aliases (MLflow stages are deprecated): ``candidate`` (set by register), ``champion`` (what serves:
``models:/NAME@champion``) and ``previous-champion`` (what rollback restores). Everything here works
on an explicit ``MlflowClient``; nothing touches MLflow's process-wide state. Only registered models
that loraflow created (tag ``loraflow.managed``) are ever changed.

Race safety. MLflow has no compare-and-set on aliases, so every alias move of a model is made by
:func:`commit` or :func:`rollback` inside :class:`ModelLock` and sequenced in the audit ledger:

1. The lock is an MLflow experiment named ``loraflow-lock/<model>``. Experiment names are unique in
   the tracking store (a database constraint), so ``create_experiment`` succeeds for exactly one
   caller; the others wait (``promotion.lock_timeout_s``). Release renames the experiment away and
   deletes it. The lock carries a lease: a holder that died is cleared once its lease has run out.
2. Under the lock, the live ``champion`` must still be the version the gate compared against;
   otherwise a concurrent promotion won while this gate ran, and this one is refused.
3. The move is then claimed as ``move.<n+1>`` in the ledger, an immutable MLflow param (see
   loraflow/registry/audit.py), and only the claimer moves the aliases. This holds even when a lease expired
   under a stalled holder and another process took the lock: the two cannot claim the same number.

Guarantee: against one tracking server, of any number of promotions and rollbacks racing on one
model, each alias move is made by exactly one of them, after checking the state it was decided on;
the losers are refused with the reason and change nothing; the ledger lists every move in order.
Limits: alias edits made outside loraflow (MLflow UI or API) are neither prevented nor audited; a
stalled holder whose lease (2 minutes; a move takes about a second) expired between its claim and
its alias writes lets the next operation complete that recorded move first (:func:`settle`).

Reader's view. ``previous-champion`` is set before ``champion``; each is one server write, and
``champion`` is only ever set to a version whose files were checked moments before and which passed
the gate (or, forced, passed its integrity checks): a reader sees the old champion or the new one.
"""

from __future__ import annotations

import random
import time
import uuid

from loraflow import tags as T
from loraflow.errors import RegistryError, UsageError
from loraflow.records import PromotionResult, Verdict
from loraflow.registry import audit
from loraflow.registry.audit import AuditRecord
from loraflow.registry.gate import Assessment, files_check
from loraflow.registry.versions import CHAMPION, PREVIOUS, aliases, get_version, managed_model

LOCK_PREFIX = "loraflow-lock/"
LOCK_LEASE_S = 120.0


class ModelLock:
    """Mutual exclusion for one registered model's alias moves, held as the MLflow experiment
    ``loraflow-lock/<model>`` (see the module docstring for what it guarantees)."""

    def __init__(self, client, model: str, owner: str, timeout_s: float, lease_s: float = LOCK_LEASE_S):
        self.client, self.model, self.owner = client, model, owner
        self.timeout_s, self.lease_s = timeout_s, lease_s
        self.name = LOCK_PREFIX + model
        self.token = uuid.uuid4().hex
        self.exp_id: str | None = None

    def __enter__(self) -> ModelLock:
        from mlflow.exceptions import MlflowException

        deadline = time.monotonic() + self.timeout_s
        while True:
            tags = {"loraflow.lock.token": self.token, T.LOCK_OWNER: self.owner}
            tags[T.LOCK_EXPIRES] = f"{time.time() + self.lease_s:.3f}"
            try:
                self.exp_id = self.client.create_experiment(self.name, tags=tags)
                return self
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            holder = self.client.get_experiment_by_name(self.name)
            if holder is None:
                continue  # released in between
            expires = float(holder.tags.get(T.LOCK_EXPIRES, "0"))
            if holder.lifecycle_stage != "active" or expires < time.time():
                self._clear(holder.experiment_id, restore=holder.lifecycle_stage != "active")  # a dead holder
                continue
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"another promotion or rollback of {self.model} holds its lock (owner "
                    f"{holder.tags.get(T.LOCK_OWNER, '?')}, lease until {time.ctime(expires)}); "
                    "try again when it has finished, or raise promotion.lock_timeout_s"
                )
            time.sleep(random.uniform(0.05, 0.25))

    def __exit__(self, *exc: object) -> None:
        exp = self.client.get_experiment(self.exp_id)
        if exp.name == self.name and exp.tags.get(T.LOCK_TOKEN) == self.token:
            self._clear(self.exp_id)
        # else our lease ran out and another process cleared the lock: nothing of ours to release

    def _clear(self, exp_id: str, restore: bool = False) -> None:
        from mlflow.exceptions import MlflowException

        # Experiment names stay taken by deleted experiments: rename first so the name is free again.
        if self.client.get_experiment(exp_id).name != self.name:
            return  # another waiter cleared this stale lock a moment ago
        if restore:
            self.client.restore_experiment(exp_id)
        self.client.rename_experiment(exp_id, f"loraflow-lock-released/{self.model}/{uuid.uuid4().hex}")
        try:
            self.client.delete_experiment(exp_id)
        except MlflowException:
            if self.client.get_experiment(exp_id).lifecycle_stage != "deleted":  # not just a concurrent clearer
                raise


# --- alias moves ---


def _ledger(client, name: str) -> tuple[str, list[AuditRecord]]:
    run_id = audit.ledger_id(client, name) or audit.create_ledger(client, name)
    return run_id, audit.read_ledger(client, run_id)


def _set_aliases(client, name: str, champion: str, previous: str | None) -> None:
    # previous-champion first: a reader of `champion` sees the old or the new version, never a gap.
    if previous is not None:
        client.set_registered_model_alias(name, PREVIOUS, previous)
    client.set_registered_model_alias(name, CHAMPION, champion)
    if previous is None and PREVIOUS in aliases(client, name):
        client.delete_registered_model_alias(name, PREVIOUS)


def settle(client, name: str, ledger: str, records: list[AuditRecord]) -> None:
    """Finish a recorded move whose aliases were never set (its writer died after claiming it)."""
    done = audit.moves(records)
    if done and done[-1].done_at is None:
        last = done[-1]
        _set_aliases(client, name, last.to_version, last.previous_champion)
        audit.mark_done(client, ledger, last.seq)


def _refuse(client, ledger: str, record: AuditRecord, message: str, verdict: Verdict | None) -> PromotionResult:
    audit.append_refusal(client, ledger, record.model_copy(update={"action": "refused", "seq": None}))
    return PromotionResult(
        model=record.model,
        action="promote",
        version=record.version,
        promoted=False,
        forced=record.forced,
        champion=record.from_version,
        previous_champion=aliases(client, record.model).get(PREVIOUS),
        message=message,
        verdict=verdict,
    )


def commit(
    client, assessment: Assessment, *, actor: str, reason: str, force: bool, flow_run_id: str | None
) -> PromotionResult:
    """Move `champion` to the assessed candidate if the gate passed (or ``force``), under the model's lock.

    A refusal (gate failed, champion moved meanwhile, already champion) is recorded in the ledger too.
    """
    candidate, verdict = assessment.candidate, assessment.verdict
    name = candidate.name
    if force and not reason.strip():
        raise UsageError("a forced promotion needs a reason (--reason TEXT): it is written to the audit trail")
    expected = assessment.champion.version if assessment.champion else None
    with ModelLock(client, name, actor, assessment.rules.lock_timeout_s):
        ledger, records = _ledger(client, name)
        settle(client, name, ledger, records)
        live = aliases(client, name)
        current = live.get(CHAMPION)
        record = AuditRecord(
            seq=audit.next_seq(records),
            action="promote",
            model=name,
            version=candidate.version,
            from_version=current,
            to_version=candidate.version,
            previous_champion=current,
            who=actor,
            at=audit.now_utc(),
            reason=reason,
            forced=force,
            verdict=verdict,
            flow_run_id=flow_run_id,
        )
        integrity = [c for c in verdict.failures if c.kind == "integrity"]
        refusal = None
        if current == candidate.version:
            refusal = f"version {candidate.version} is already the champion of {name}"
        elif current != expected:
            refusal = (
                f"champion of {name} moved from {expected or 'none'} to {current or 'none'} while the gate ran "
                "(a concurrent promotion won); run the promotion again to compare against the new champion"
            )
        elif integrity:
            refusal = "refused (--force never overrides these): " + "; ".join(c.detail for c in integrity)
        elif not verdict.passed and not force:
            refusal = "refused by the gate: " + "; ".join(f"{c.name}: {c.detail}" for c in verdict.failures)
        else:
            files = files_check(client, get_version(client, name, candidate.version))  # still there, just now?
            if not files.passed:
                refusal = f"refused: {files.detail}"
        if refusal:
            return _refuse(client, ledger, record.model_copy(update={"to_version": current}), refusal, verdict)
        audit.append_move(client, ledger, record)  # the compare-and-set: only one writer gets this seq
        _set_aliases(client, name, candidate.version, current)
        audit.mark_done(client, ledger, record.seq)
    how = ("FORCED; gate " + ("passed anyway" if verdict.passed else "failed")) if force else "gate passed"
    return PromotionResult(
        model=name,
        action="promote",
        version=candidate.version,
        promoted=True,
        forced=force,
        champion=candidate.version,
        previous_champion=current,
        message=f"{name}: champion {current or 'none'} -> {candidate.version} ({how})",
        verdict=verdict,
        audit_seq=record.seq,
    )


def rollback(
    client, name: str, *, actor: str, reason: str, flow_run_id: str | None, lock_timeout_s: float
) -> PromotionResult:
    """Point `champion` back at `previous-champion`; `previous-champion` becomes the one before that.

    No gate: the version already passed it when it became champion. Its files are checked again.
    """
    managed_model(client, name)
    with ModelLock(client, name, actor, lock_timeout_s):
        ledger, records = _ledger(client, name)
        settle(client, name, ledger, records)
        live = aliases(client, name)
        current, target = live.get(CHAMPION), live.get(PREVIOUS)
        if target is None:
            raise RegistryError(f"{name} has no {PREVIOUS} to roll back to (champion: {current or 'none'})")
        files = files_check(client, get_version(client, name, target))
        if not files.passed:
            raise RegistryError(f"cannot roll {name} back to version {target}: {files.detail}")
        # The champion before `target` came in, as the ledger remembers it (None: target was the first).
        before = next((r.from_version for r in reversed(audit.moves(records)) if r.to_version == target), None)
        before = before if before not in (target, current) else None
        record = AuditRecord(
            seq=audit.next_seq(records),
            action="rollback",
            model=name,
            version=target,
            from_version=current,
            to_version=target,
            previous_champion=before,
            who=actor,
            at=audit.now_utc(),
            reason=reason or "rollback",
            flow_run_id=flow_run_id,
        )
        audit.append_move(client, ledger, record)
        _set_aliases(client, name, target, before)
        audit.mark_done(client, ledger, record.seq)
    return PromotionResult(
        model=name,
        action="rollback",
        version=target,
        promoted=True,
        champion=target,
        previous_champion=before,
        message=f"{name}: champion {current or 'none'} -> {target} (rollback)",
        audit_seq=record.seq,
    )
