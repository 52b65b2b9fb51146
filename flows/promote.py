"""The promote and rollback flows: the promotion gate, alias moves and their audit trail.

    loraflow promote NAME --version N [--reason TEXT] [--force]   # also at the end of `loraflow run`
    loraflow rollback NAME [--reason TEXT]                        #   when promotion.enabled is set
    loraflow history NAME [--at DATE] [--version N] [--json] [--report out.html]

The rules and the race-safe alias moves live in loraflow/registry/ (gate.py, moves.py); this module places them:
the gate (which may re-score the champion, CPU/GPU work) runs outside the model's lock, the move
inside it. Each move records this flow run's id in the audit ledger.
"""

from __future__ import annotations

import getpass

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.bookkeeping import entry_point
from loraflow.config import PromotionConfig
from loraflow.records import PromotionResult
from loraflow.registry import gate, moves
from loraflow.registry.versions import VersionInfo


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


@task(name="gate", cache_policy=NO_CACHE)
def gate_task(tracking_uri: str, name: str, version: str, rules: PromotionConfig) -> gate.Assessment:
    def rescore(champion: VersionInfo, split_uri: str, eval_cfg, max_length: int) -> dict[str, float]:
        from tasks.reevaluate import score_version  # torch and peft: imported only when re-scoring is needed

        print(f"re-scoring champion {champion.uri} on the candidate's held-out split {split_uri}")
        return score_version(tracking_uri, champion.uri, split_uri, eval_cfg, max_length)

    return gate.assess(_client(tracking_uri), name, version, rules, rescore)


@task(name="move-aliases", cache_policy=NO_CACHE)
def commit_task(
    tracking_uri: str, assessment: gate.Assessment, actor: str, reason: str, force: bool
) -> PromotionResult:
    return moves.commit(
        _client(tracking_uri), assessment, actor=actor, reason=reason, force=force, flow_run_id=flow_run.get_id()
    )


@flow(name="promote", log_prints=True)
def promote(
    name: str, version: str, tracking_uri: str, rules: PromotionConfig, reason: str = "", force: bool = False
) -> PromotionResult:
    """Gate a registered version against the champion and promote it if it passes (or is forced)."""
    actor = rules.identity or getpass.getuser()  # a flow is an entry point: the OS user is read here
    tracking_uri = entry_point(tracking_uri, "tracking_uri")
    assessment = gate_task(tracking_uri, name, version, rules)
    result = commit_task(tracking_uri, assessment, actor, reason or "promotion gate", force)
    print(result.message)
    return result


@flow(name="rollback", log_prints=True)
def rollback(name: str, tracking_uri: str, rules: PromotionConfig, reason: str = "") -> PromotionResult:
    """Point `champion` back at `previous-champion`, audited."""
    result = moves.rollback(
        _client(entry_point(tracking_uri, "tracking_uri")),
        name,
        actor=rules.identity or getpass.getuser(),
        reason=reason,
        flow_run_id=flow_run.get_id(),
        lock_timeout_s=rules.lock_timeout_s,
    )
    print(result.message)
    return result
