"""Which registered version serves: the promotion gate, alias moves, rollback and history.

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
   loraflow/audit.py), and only the claimer moves the aliases. This holds even when a lease expired
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

import datetime as dt
import hashlib
import random
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import Field

from loraflow import audit
from loraflow.audit import AuditRecord
from loraflow.config import ConfigError, EvalConfig, GateMetric, PipelineConfig, PromotionConfig, config_from_dict
from loraflow.errors import RegistryError, UsageError
from loraflow.records import GateCheck, PromotionResult, Record, Verdict

CANDIDATE = "candidate"
CHAMPION = "champion"
PREVIOUS = "previous-champion"
MANAGED_TAG = "loraflow.managed"  # tasks/register.py sets it on the registered models it creates
LINEAGE_TAGS = (
    "loraflow.data_digest",
    "loraflow.contract",
    "loraflow.base_model",
    "loraflow.base_digest",
    "loraflow.config_hash",
    "loraflow.code_version",
    "loraflow.flow_run_id",
    "loraflow.mlflow_run_id",
)
METRIC_TAGS: dict[GateMetric, str] = {"loss": "loraflow.eval_loss", "rouge_l": "loraflow.eval_rouge_l"}
BASE_METRIC_TAGS: dict[GateMetric, str] = {"loss": "loraflow.base_eval_loss", "rouge_l": "loraflow.base_eval_rouge_l"}
HIGHER_IS_BETTER: dict[GateMetric, bool] = {"loss": False, "rouge_l": True}
LOCK_PREFIX = "loraflow-lock/"
LOCK_LEASE_S = 120.0
_EPS = 1e-9  # metrics from tags are printed with 6 significant digits


@dataclass(frozen=True)
class VersionInfo:
    """A registered model version with loraflow lineage, as read from the registry."""

    name: str
    version: str
    tags: dict[str, str]
    run_id: str
    created_ms: int

    def _floats(self, tags: dict[GateMetric, str]) -> dict[str, float]:
        return {m: float(self.tags[t]) for m, t in tags.items() if self.tags.get(t)}

    @property
    def metrics(self) -> dict[str, float]:
        return self._floats(METRIC_TAGS)

    @property
    def base_metrics(self) -> dict[str, float]:
        return self._floats(BASE_METRIC_TAGS)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class EvalSetting:
    """What a version's held-out metrics were computed on; two versions are comparable when these match."""

    split_uri: str | None
    split_sha256: str | None
    contract: str | None
    eval: EvalConfig | None
    max_seq_length: int | None

    def same_as(self, other: EvalSetting) -> bool:
        mine = (self.split_sha256, self.contract, self.eval, self.max_seq_length)
        return None not in mine and mine == (other.split_sha256, other.contract, other.eval, other.max_seq_length)


# Re-scores a version on a held-out split: (version, split URI, eval settings, max length) -> metrics.
Rescorer = Callable[[VersionInfo, str, EvalConfig, int], dict[str, float]]


@dataclass(frozen=True)
class Assessment:
    """The gate's work before any alias moves: the two versions and the verdict."""

    candidate: VersionInfo
    champion: VersionInfo | None
    verdict: Verdict
    rules: PromotionConfig = field(repr=False)


# --- reading the registry ---


def managed_model(client, name: str):
    """The registered model ``name``, if loraflow created it; UsageError otherwise."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UsageError(f"no registered model named {name!r} on {client.tracking_uri}") from e
        raise
    if model.tags.get(MANAGED_TAG) != "true":
        raise UsageError(
            f"registered model {name!r} was not created by loraflow (no {MANAGED_TAG} tag): "
            "loraflow leaves it untouched"
        )
    return model


def aliases(client, name: str) -> dict[str, str]:
    """Alias -> version of a registered model (``search_model_versions`` leaves aliases out; this does not)."""
    return dict(client.get_registered_model(name).aliases)


def parse_version_ref(name: str, ref: str | int) -> str:
    """'3', or 'models:/NAME/3': the version number, refusing a version of another model."""
    text = str(ref).strip()
    m = re.fullmatch(r"models:/([^/@]+)/(\d+)", text)
    if m:
        if m.group(1) != name:
            raise UsageError(f"{text} is a version of registered model {m.group(1)!r}, not of {name!r}")
        return m.group(2)
    if not text.isdigit():
        raise UsageError(f"version {text!r} is not a version number (e.g. --version 3 or models:/{name}/3)")
    return text


def get_version(client, name: str, ref: str | int) -> VersionInfo:
    """A version of a loraflow-managed model that carries loraflow lineage; clear errors otherwise."""
    from mlflow.exceptions import MlflowException

    managed_model(client, name)
    version = parse_version_ref(name, ref)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UsageError(
                f"{name} has no version {version} (never registered, or deleted); `loraflow history {name}` lists them"
            ) from e
        raise
    missing = [t for t in LINEAGE_TAGS if not mv.tags.get(t)]
    if missing:
        raise UsageError(
            f"version {version} of {name} has no loraflow lineage (missing tags {', '.join(missing)}): only versions "
            "registered by loraflow's register stage can be promoted"
        )
    if mv.status != "READY":
        raise UsageError(f"version {version} of {name} is {mv.status}, not READY")
    return VersionInfo(name, str(mv.version), dict(mv.tags), mv.tags["loraflow.mlflow_run_id"], mv.creation_timestamp)


def version_or_none(client, name: str, version: str | None) -> VersionInfo | None:
    return None if version is None else get_version(client, name, version)


def run_config(client, run_id: str) -> PipelineConfig | None:
    """The config a version was trained with (config.yaml of its MLflow run); None if unreadable."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "config.yaml", tmp)
            return config_from_dict(yaml.safe_load(Path(path).read_text()) or {}, source=f"run {run_id} config.yaml")
        except (MlflowException, OSError, ConfigError):  # absent, or written by an older schema
            return None


def eval_setting(client, info: VersionInfo) -> EvalSetting:
    import mlflow
    from mlflow.exceptions import MlflowException

    split_uri = info.tags.get("loraflow.eval_split") or None
    split_sha = None
    if split_uri:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(split_uri, dst_path=tmp, tracking_uri=client.tracking_uri)
                split_sha = hashlib.sha256(Path(local).read_bytes()).hexdigest()
            except (MlflowException, OSError):
                split_uri = None
    cfg = run_config(client, info.run_id)
    return EvalSetting(
        split_uri=split_uri,
        split_sha256=split_sha,
        contract=info.tags.get("loraflow.contract"),
        eval=cfg.eval if cfg else None,
        max_seq_length=cfg.train.max_seq_length if cfg else None,
    )


# --- the gate ---


def _check(name: str, kind: str, passed: bool, detail: str) -> GateCheck:
    return GateCheck(name=name, kind=kind, passed=passed, detail=detail[:300])


def files_check(client, info: VersionInfo) -> GateCheck:
    """The version's adapter files can be listed in the artifact store, and its merged model is on disk."""
    import mlflow
    from mlflow.exceptions import MlflowException

    problems = []
    try:
        listed = {
            a.path
            for a in mlflow.artifacts.list_artifacts(
                artifact_uri=f"{info.uri}/artifacts/adapter", tracking_uri=client.tracking_uri
            )
        }
        root = {
            a.path for a in mlflow.artifacts.list_artifacts(artifact_uri=info.uri, tracking_uri=client.tracking_uri)
        }
    except (MlflowException, OSError) as e:
        listed, root = set(), set()
        problems.append(f"artifacts of {info.uri} cannot be listed ({e})")
    if root and "MLmodel" not in root:
        problems.append(f"{info.uri} has no MLmodel file")
    if root and not any(p.endswith("adapter_model.safetensors") for p in listed):
        problems.append(f"{info.uri} has no artifacts/adapter/adapter_model.safetensors")
    merged = info.tags.get("loraflow.merged_path")
    merged_dir = Path(merged) if merged else None
    if merged_dir is None or not (merged_dir / "config.json").is_file() or not any(merged_dir.glob("*.safetensors")):
        problems.append(f"merged model not found at {merged!r} (loraflow.merged_path)")
    return _check("files", "integrity", not problems, "; ".join(problems) or f"adapter artifacts and {merged} present")


def integrity_checks(client, info: VersionInfo, rules: PromotionConfig) -> list[GateCheck]:
    checks = [files_check(client, info)]
    diff = info.tags.get("loraflow.merge_max_abs_logit_diff")
    limit = rules.max_merge_deviation or (
        float(info.tags["loraflow.merge_tolerance"]) if info.tags.get("loraflow.merge_tolerance") else None
    )
    if diff is None or limit is None:
        checks.append(_check("merge", "integrity", False, "no recorded merge deviation or tolerance"))
    else:
        ok = float(diff) <= limit
        checks.append(
            _check("merge", "integrity", ok, f"max |dlogit| {float(diff):.3g} {'<=' if ok else '>'} {limit:g}")
        )
    contract = info.tags.get("loraflow.contract", "")
    ok = bool(contract) and (rules.contract is None or contract.split("@")[0] == rules.contract)
    wanted = f" (required: {rules.contract})" if rules.contract else ""
    checks.append(_check("contract", "integrity", ok, f"data passed contract {contract or 'none'}{wanted}"))
    return checks


def improvement(metric: str, candidate: float, reference: float) -> float:
    """How much better ``candidate`` is than ``reference`` (positive: better)."""
    return candidate - reference if HIGHER_IS_BETTER[metric] else reference - candidate


def metric_checks(
    candidate: dict[str, float], base: dict[str, float], champion: dict[str, float] | None, rules: PromotionConfig
) -> list[GateCheck]:
    """The rules on numbers: presence, absolute thresholds, beating the base, and the champion comparison."""
    checks = []
    for m in rules.required_metrics:
        if m not in candidate:
            checks.append(_check(m, "metric", False, f"candidate has no {m}"))
    have = [m for m in rules.required_metrics if m in candidate]
    for m, bound in rules.thresholds.items():
        if m in candidate:
            ok = candidate[m] >= bound - _EPS if HIGHER_IS_BETTER[m] else candidate[m] <= bound + _EPS
            op = ">=" if HIGHER_IS_BETTER[m] else "<="
            checks.append(_check(f"{m} {op} {bound:g}", "metric", ok, f"{m} {candidate[m]:.4f} (threshold {bound:g})"))
    if rules.beat_base:
        for m in have:
            if m in base:
                ok = improvement(m, candidate[m], base[m]) >= -_EPS
                checks.append(_check(f"{m} vs base", "metric", ok, f"{m} {candidate[m]:.4f} vs base {base[m]:.4f}"))
    for m in have if champion is not None else []:
        if m not in champion:
            checks.append(_check(f"{m} vs champion", "metric", False, f"champion has no {m}"))
            continue
        gain = improvement(m, candidate[m], champion[m])
        if m in rules.min_improvement:
            need = rules.min_improvement[m]
            ok, rule = gain >= need - _EPS, f"improves by >= {need:g}"
        else:
            need = rules.max_regression.get(m, 0.0)
            ok, rule = gain >= -need - _EPS, f"regresses by <= {need:g}"
        detail = f"{m} {candidate[m]:.4f} vs champion {champion[m]:.4f} (better by {gain:+.4f}; rule: {rule})"
        checks.append(_check(f"{m} vs champion", "metric", ok, detail))
    return checks


def assess(client, name: str, ref: str | int, rules: PromotionConfig, rescore: Rescorer) -> Assessment:
    """Run the gate: candidate against the current champion on the same held-out data. Moves nothing.

    When the two were evaluated on different held-out data, contracts or eval settings, the champion
    is re-scored with ``rescore`` on the candidate's split and settings; its old numbers are not used.
    """
    candidate = get_version(client, name, ref)
    champion = version_or_none(client, name, aliases(client, name).get(CHAMPION))
    checks = integrity_checks(client, candidate, rules)
    champion_metrics, reevaluated = None, False
    if champion is not None and champion.version != candidate.version:
        champion_metrics = champion.metrics
        mine, theirs = eval_setting(client, candidate), eval_setting(client, champion)
        if not mine.same_as(theirs):
            if mine.split_uri is None or mine.eval is None or mine.max_seq_length is None:
                checks.append(
                    _check(
                        "comparable",
                        "integrity",
                        False,
                        "champion was evaluated on other data or settings, and the candidate's held-out split or "
                        "config is not in its MLflow run, so the champion cannot be re-scored on it",
                    )
                )
            else:
                champion_metrics = rescore(champion, mine.split_uri, mine.eval, mine.max_seq_length)
                reevaluated = True
    checks += metric_checks(candidate.metrics, candidate.base_metrics, champion_metrics, rules)
    verdict = Verdict(
        passed=all(c.passed for c in checks),
        checks=checks,
        candidate=candidate.metrics,
        champion=champion_metrics,
        champion_version=champion.version if champion else None,
        reevaluated=reevaluated,
    )
    return Assessment(candidate, champion, verdict, rules)


# --- the lock ---


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
            tags = {"loraflow.lock.token": self.token, "loraflow.lock.owner": self.owner}
            tags["loraflow.lock.expires"] = f"{time.time() + self.lease_s:.3f}"
            try:
                self.exp_id = self.client.create_experiment(self.name, tags=tags)
                return self
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            holder = self.client.get_experiment_by_name(self.name)
            if holder is None:
                continue  # released in between
            expires = float(holder.tags.get("loraflow.lock.expires", "0"))
            if holder.lifecycle_stage != "active" or expires < time.time():
                self._clear(holder.experiment_id, restore=holder.lifecycle_stage != "active")  # a dead holder
                continue
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"another promotion or rollback of {self.model} holds its lock (owner "
                    f"{holder.tags.get('loraflow.lock.owner', '?')}, lease until {time.ctime(expires)}); "
                    "try again when it has finished, or raise promotion.lock_timeout_s"
                )
            time.sleep(random.uniform(0.05, 0.25))

    def __exit__(self, *exc: object) -> None:
        exp = self.client.get_experiment(self.exp_id)
        if exp.name == self.name and exp.tags.get("loraflow.lock.token") == self.token:
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


# --- history ---


class VersionRow(Record):
    """One registered version with its lineage and metrics, for `loraflow history`."""

    version: str
    created: str = Field(description="Registration time, ISO 8601 UTC.")
    aliases: list[str]
    metrics: dict[str, float]
    base_metrics: dict[str, float]
    lineage: dict[str, str] = Field(description="Data, contract, base model, config, code, Prefect and MLflow runs.")


class History(Record):
    """Everything `loraflow history NAME` answers from: versions, current aliases and the audit ledger."""

    model: str
    aliases: dict[str, str]
    versions: list[VersionRow]
    moves: list[AuditRecord]
    refusals: list[AuditRecord]

    def champion_at(self, when: dt.datetime) -> str | None:
        return audit.champion_at(self.moves, when)

    def version(self, version: str) -> VersionRow:
        for row in self.versions:
            if row.version == str(version):
                return row
        raise UsageError(f"{self.model} has no version {version}; it has {', '.join(r.version for r in self.versions)}")


def lineage_of(tags: dict[str, str]) -> dict[str, str]:
    """The lineage a version's tags record, under readable names."""
    contract_name, _, contract_version = tags.get("loraflow.contract", "").partition("@")
    run_id = tags.get("loraflow.mlflow_run_id", "")
    return {
        "data_digest": tags.get("loraflow.data_digest", ""),
        "data_file": tags.get("loraflow.data_source", ""),
        "contract": contract_name,
        "contract_version": contract_version,
        "base_model": tags.get("loraflow.base_model", ""),
        "base_digest": tags.get("loraflow.base_digest", ""),
        "config_hash": tags.get("loraflow.config_hash", ""),
        "config": f"runs:/{run_id}/config.yaml" if run_id else "",
        "code_version": tags.get("loraflow.code_version", ""),
        "prefect_flow_run": tags.get("loraflow.flow_run_id", ""),
        "mlflow_run": run_id,
        "eval_split": tags.get("loraflow.eval_split", ""),
        "merge_max_abs_logit_diff": tags.get("loraflow.merge_max_abs_logit_diff", ""),
        "merge_tolerance": tags.get("loraflow.merge_tolerance", ""),
        "merged_model": tags.get("loraflow.merged_path", ""),
    }


def history(client, name: str) -> History:
    """Versions (oldest first), aliases and audit entries of a loraflow-managed registered model."""
    managed_model(client, name)
    live = aliases(client, name)
    by_version: dict[str, list[str]] = {}
    for alias, version in live.items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        info = VersionInfo(name, str(mv.version), dict(mv.tags), mv.tags.get("loraflow.mlflow_run_id", ""), 0)
        rows.append(
            VersionRow(
                version=str(mv.version),
                created=dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, dt.UTC).isoformat(),
                aliases=sorted(by_version.get(str(mv.version), [])),
                metrics=info.metrics,
                base_metrics=info.base_metrics,
                lineage=lineage_of(info.tags),
            )
        )
    ledger = audit.ledger_id(client, name)
    records = audit.read_ledger(client, ledger) if ledger else []
    return History(
        model=name,
        aliases={k: str(v) for k, v in live.items()},
        versions=rows,
        moves=audit.moves(records),
        refusals=[r for r in records if r.seq is None],
    )
