"""`loraflow history`: every version of a model with its lineage and metrics, and the audit ledger."""

from __future__ import annotations

import datetime as dt

from pydantic import Field

from loraflow import tags as T
from loraflow.errors import UsageError
from loraflow.records import Record
from loraflow.registry import audit
from loraflow.registry.audit import AuditRecord
from loraflow.registry.versions import VersionInfo, aliases, managed_model


class VersionRow(Record):
    """One registered version with its lineage and metrics, for `loraflow history`."""

    version: str
    created: str = Field(description="Registration time, ISO 8601 UTC.")
    aliases: list[str]
    metrics: dict[str, float]
    base_metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="Bootstrap intervals of its metrics over held-out examples (evaluate)."
    )
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
    contract_name, _, contract_version = tags.get(T.CONTRACT, "").partition("@")
    run_id = tags.get(T.MLFLOW_RUN_ID, "")
    return {
        "data_digest": tags.get(T.DATA_DIGEST, ""),
        "data_file": tags.get(T.DATA_SOURCE, ""),
        "contract": contract_name,
        "contract_version": contract_version,
        "base_model": tags.get(T.BASE_MODEL, ""),
        "base_digest": tags.get(T.BASE_DIGEST, ""),
        "config_hash": tags.get(T.CONFIG_HASH, ""),
        "config": f"runs:/{run_id}/config.yaml" if run_id else "",
        "code_version": tags.get(T.CODE_VERSION, ""),
        "prefect_flow_run": tags.get(T.FLOW_RUN_ID, ""),
        "mlflow_run": run_id,
        "eval_split": tags.get(T.EVAL_SPLIT, ""),
        "eval_examples": tags.get(T.EVAL_EXAMPLES, ""),
        "merge_max_abs_logit_diff": tags.get(T.MERGE_MAX_ABS_LOGIT_DIFF, ""),
        "merge_tolerance": tags.get(T.MERGE_TOLERANCE, ""),
        "merged_model": tags.get(T.MERGED_PATH, ""),
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
        info = VersionInfo(name, str(mv.version), dict(mv.tags), mv.tags.get(T.MLFLOW_RUN_ID, ""), 0)
        rows.append(
            VersionRow(
                version=str(mv.version),
                created=dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, dt.UTC).isoformat(),
                aliases=sorted(by_version.get(str(mv.version), [])),
                metrics=info.metrics,
                base_metrics=info.base_metrics,
                intervals=info.intervals,
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
