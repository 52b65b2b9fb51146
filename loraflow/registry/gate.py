"""The promotion gate: integrity checks (files, merge, lineage) and metric checks against the champion.

It runs outside the model's lock (re-scoring a champion is CPU/GPU work); :mod:`loraflow.registry.moves`
acts on its :class:`Assessment` under the lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loraflow import tags as T
from loraflow.config import EvalConfig, PromotionConfig
from loraflow.records import GateCheck, Verdict
from loraflow.registry.versions import (
    CHAMPION,
    HIGHER_IS_BETTER,
    VersionInfo,
    aliases,
    eval_setting,
    get_version,
    version_or_none,
)

_EPS = 1e-9  # metrics from tags are printed with 6 significant digits

# Re-scores a version on a held-out split: (version, split URI, eval settings, max length) -> metrics.
Rescorer = Callable[[VersionInfo, str, EvalConfig, int], dict[str, float]]


@dataclass(frozen=True)
class Assessment:
    """The gate's work before any alias moves: the two versions and the verdict."""

    candidate: VersionInfo
    champion: VersionInfo | None
    verdict: Verdict
    rules: PromotionConfig = field(repr=False)


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
    merged = info.tags.get(T.MERGED_PATH)
    merged_dir = Path(merged) if merged else None
    if merged_dir is None or not (merged_dir / "config.json").is_file() or not any(merged_dir.glob("*.safetensors")):
        problems.append(f"merged model not found at {merged!r} (loraflow.merged_path)")
    return _check("files", "integrity", not problems, "; ".join(problems) or f"adapter artifacts and {merged} present")


def integrity_checks(client, info: VersionInfo, rules: PromotionConfig) -> list[GateCheck]:
    checks = [files_check(client, info)]
    diff = info.tags.get(T.MERGE_MAX_ABS_LOGIT_DIFF)
    limit = rules.max_merge_deviation or (
        float(info.tags[T.MERGE_TOLERANCE]) if info.tags.get(T.MERGE_TOLERANCE) else None
    )
    if diff is None or limit is None:
        checks.append(_check("merge", "integrity", False, "no recorded merge deviation or tolerance"))
    else:
        ok = float(diff) <= limit
        checks.append(
            _check("merge", "integrity", ok, f"max |dlogit| {float(diff):.3g} {'<=' if ok else '>'} {limit:g}")
        )
    contract = info.tags.get(T.CONTRACT, "")
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
