"""The promotion gate: integrity checks (files, merge, lineage) and metric checks against the champion.

It runs outside the model's lock (re-scoring a champion is CPU/GPU work); :mod:`loraflow.registry.moves`
acts on its :class:`Assessment` under the lock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from loraflow import scores
from loraflow import tags as T
from loraflow.config import EvalConfig, PromotionConfig
from loraflow.records import ExampleScores, GateCheck, Verdict
from loraflow.registry.versions import (
    CHAMPION,
    HIGHER_IS_BETTER,
    VersionInfo,
    aliases,
    eval_setting,
    get_version,
    version_examples,
    version_or_none,
)

_EPS = 1e-9  # metrics from tags are printed with 6 significant digits

# Re-scores a version on a held-out split: (version, split URI, eval settings, max length) -> its per-example scores.
Rescorer = Callable[[VersionInfo, str, EvalConfig, int], ExampleScores]


@dataclass(frozen=True)
class Assessment:
    """The gate's work before any alias moves: the two versions and the verdict."""

    candidate: VersionInfo
    champion: VersionInfo | None
    verdict: Verdict
    rules: PromotionConfig = field(repr=False)


def _check(name: str, kind: str, passed: bool, detail: str, estimate: float | None = None, interval=None) -> GateCheck:
    return GateCheck(name=name, kind=kind, passed=passed, detail=detail[:400], estimate=estimate, interval=interval)


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


@dataclass(frozen=True)
class Examples:
    """Per-example scores the gate compares on (loraflow/scores.py); None where a version has none."""

    candidate: ExampleScores | None = None  # the candidate on its held-out split
    base: ExampleScores | None = None  # its base model (adapter off) on the same examples
    champion: ExampleScores | None = None  # the champion on the candidate's split
    general: dict[str, ExampleScores] | None = None  # the candidate's "base" and "finetuned" on the general text


def _gain_interval(metric: str, cand: ExampleScores | None, ref: ExampleScores | None, level: float):
    """Paired bootstrap interval of how much better cand is than ref, or None when that cannot be paired."""
    if cand is None or ref is None:
        return None
    if metric == "loss":
        if len(cand.loss) != len(ref.loss) or not sum(cand.tokens):
            return None
        low, high = scores.loss_interval(cand, level, other=ref)
        return -high, -low  # lower loss is better
    if len(cand.rouge_l) != len(ref.rouge_l) or not cand.rouge_l:
        return None
    return scores.rouge_l_interval(cand, level, other=ref)


def _unpaired(cand: ExampleScores | None, ref: ExampleScores | None, label: str) -> str:
    """Why a comparison falls back to means."""
    if cand is None:
        return "the candidate has no per-example scores (registered before loraflow logged them)"
    if ref is None:
        return f"the {label} has no per-example scores (registered before loraflow logged them)"
    return f"the {label}'s examples do not pair with the candidate's"


def _compare(
    m: str, label: str, cand: float, ref: float, need: float, rule: str, interval, level: float, missing: str
) -> GateCheck:
    """One comparison rule: better by at least ``need`` (negative: worse by at most -need).

    With an interval, the rule must hold at its unfavourable (lower) end: the candidate is promoted only on
    a difference that the held-out examples show, not on noise. Without one, the means decide.
    """
    gain = improvement(m, cand, ref)
    head = f"{m} {cand:.4f} vs {label} {ref:.4f}: better by {gain:+.4f}"
    if interval is None:
        ok = gain >= need - _EPS
        return _check(f"{m} vs {label}", "metric", ok, f"{head}; rule: {rule} (means only: {missing})", gain)
    ok = interval[0] >= need - _EPS
    pct = f"{level:.0%}"
    detail = f"{head}, {pct} interval [{interval[0]:+.4f}, {interval[1]:+.4f}]; rule: {rule} at its lower end"
    return _check(f"{m} vs {label}", "metric", ok, detail, gain, interval)


def general_check(rules: PromotionConfig, base: dict[str, float], tuned: dict[str, float], ex: Examples) -> GateCheck:
    """The forgetting guard: general-text perplexity may rise over the base's by at most max_general_regression."""
    limit = rules.max_general_regression
    key = "general_perplexity"
    name = f"general text vs base <= +{limit:.0%}"
    if key not in tuned or key not in base:
        return _check(name, "metric", True, "not measured: the version has no general-text perplexity "
                      "(trained before the forgetting guard, or eval.general_text unset)")  # fmt: skip
    increase = tuned[key] / base[key] - 1
    head = f"general-text perplexity {tuned[key]:.3f} vs base {base[key]:.3f}: {increase:+.2%}"
    if ex.general is None:
        ok = increase <= limit + _EPS
        return _check(name, "metric", ok, f"{head} (means only: no per-passage scores)", increase)
    low, high = scores.loss_interval(ex.general["finetuned"], rules.confidence, other=ex.general["base"])
    interval = (math.exp(low) - 1, math.exp(high) - 1)
    ok = interval[1] <= limit + _EPS
    detail = f"{head}, {rules.confidence:.0%} interval [{interval[0]:+.2%}, {interval[1]:+.2%}]; its upper end"
    return _check(name, "metric", ok, f"{detail} must be <= +{limit:.0%}", increase, interval)


def metric_checks(
    candidate: dict[str, float],
    base: dict[str, float],
    champion: dict[str, float] | None,
    rules: PromotionConfig,
    examples: Examples = Examples(),
) -> list[GateCheck]:
    """The rules on numbers: presence, absolute thresholds, beating the base, the champion comparison, forgetting.

    Comparisons are paired over examples where both sides have per-example scores (``examples``), and decided
    on the lower end of the bootstrap interval of the improvement; otherwise on the means, and the check says so.
    """
    level = rules.confidence
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
                interval = _gain_interval(m, examples.candidate, examples.base, level)
                missing = _unpaired(examples.candidate, examples.base, "base")
                checks.append(
                    _compare(m, "base", candidate[m], base[m], 0.0, "at least as good", interval, level, missing)
                )
    for m in have if champion is not None else []:
        if m not in champion:
            checks.append(_check(f"{m} vs champion", "metric", False, f"champion has no {m}"))
            continue
        if m in rules.min_improvement:
            need = rules.min_improvement[m]
            rule = f"improves by >= {need:g}"
        else:
            need = -rules.max_regression.get(m, 0.0)
            rule = f"regresses by <= {-need:g}"
        interval = _gain_interval(m, examples.candidate, examples.champion, level)
        missing = _unpaired(examples.candidate, examples.champion, "champion")
        checks.append(_compare(m, "champion", candidate[m], champion[m], need, rule, interval, level, missing))
    if rules.max_general_regression is not None:
        checks.append(general_check(rules, base, candidate, examples))
    return checks


def assess(client, name: str, ref: str | int, rules: PromotionConfig, rescore: Rescorer) -> Assessment:
    """Run the gate: candidate against the current champion on the same held-out data. Moves nothing.

    When the two were evaluated on different held-out data, contracts or eval settings, the champion
    is re-scored with ``rescore`` on the candidate's split and settings; its old numbers are not used.
    """
    candidate = get_version(client, name, ref)
    champion = version_or_none(client, name, aliases(client, name).get(CHAMPION))
    checks = integrity_checks(client, candidate, rules)
    mine = version_examples(client, candidate)
    examples = Examples(
        candidate=mine.get(scores.HELDOUT, {}).get("finetuned"),
        base=mine.get(scores.HELDOUT, {}).get("base"),
        general=mine.get(scores.GENERAL),
    )
    champion_metrics, reevaluated = None, False
    if champion is not None and champion.version != candidate.version:
        champion_metrics = champion.metrics
        examples = replace(
            examples, champion=version_examples(client, champion).get(scores.HELDOUT, {}).get("finetuned")
        )
        setting, theirs = eval_setting(client, candidate), eval_setting(client, champion)
        if not setting.same_as(theirs):
            if setting.split_uri is None or setting.eval is None or setting.max_seq_length is None:
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
                rescored = rescore(champion, setting.split_uri, setting.eval, setting.max_seq_length)
                champion_metrics = {"loss": rescored.mean_loss(), "rouge_l": rescored.mean_rouge_l()}
                examples = replace(examples, champion=rescored)
                reevaluated = True
    checks += metric_checks(candidate.metrics, candidate.base_metrics, champion_metrics, rules, examples)
    verdict = Verdict(
        passed=all(c.passed for c in checks),
        checks=checks,
        candidate=candidate.metrics,
        champion=champion_metrics,
        champion_version=champion.version if champion else None,
        reevaluated=reevaluated,
    )
    return Assessment(candidate, champion, verdict, rules)
