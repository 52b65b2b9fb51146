"""Promotion gate, rollback, audit trail and history against the real MLflow server of `local_stack`.

Versions are registered directly with tasks/register.register (one tiny adapter trained once, real
merge, metrics chosen per version) instead of running the whole flow for each. Each test uses its
own registered model. The pure gate rules are tested without a server at the top.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from loraflow import scores
from loraflow import tags as T
from loraflow.config import EvalConfig, LoraConfig, MergeConfig, PromotionConfig, RegisterConfig, TrainConfig
from loraflow.errors import RegistryError, UsageError
from loraflow.records import (
    Adapter,
    EvalReport,
    ExampleScores,
    GeneralTextMetrics,
    Lineage,
    MergedModel,
    ModelMetrics,
    QuantizedBase,
    ValidatedData,
)
from loraflow.registry import audit, gate, history, moves
from loraflow.registry import versions as registered
from tests.conftest import make_validated_data, tiny_records, torch_threads

integration = pytest.mark.integration
RULES = PromotionConfig(min_improvement={"loss": 0.01}, max_regression={"rouge_l": 0.05}, lock_timeout_s=30)
TRAIN = TrainConfig(max_steps=4, learning_rate=1e-2, lr_scheduler="constant", batch_size=4, max_seq_length=64)
EVAL = EvalConfig(batch_size=4, max_new_tokens=4)

# --- the gate's rules on numbers (no server) ---


def test_metric_rules_improvement_regression_threshold_and_base() -> None:
    rules = PromotionConfig(min_improvement={"loss": 0.05}, max_regression={"rouge_l": 0.02}, thresholds={"loss": 2})
    base = {"loss": 3.0, "rouge_l": 0.1}
    champion = {"loss": 1.0, "rouge_l": 0.5}
    ok = gate.metric_checks({"loss": 0.9, "rouge_l": 0.49}, base, champion, rules)
    assert all(c.passed for c in ok) and len(ok) == 6  # threshold, 2 x base, 2 x champion, forgetting
    assert "not measured" in ok[-1].detail  # no general-text scores: the forgetting guard says so
    assert all("means only" in c.detail for c in ok[1:5])  # no per-example scores either: means decide
    small_gain = gate.metric_checks({"loss": 0.97, "rouge_l": 0.6}, base, champion, rules)
    assert [c.name for c in small_gain if not c.passed] == ["loss vs champion"]
    rouge_drop = gate.metric_checks({"loss": 0.5, "rouge_l": 0.47}, base, champion, rules)
    assert [c.name for c in rouge_drop if not c.passed] == ["rouge_l vs champion"]
    first = gate.metric_checks({"loss": 2.5, "rouge_l": 0.2}, base, None, rules)  # no champion: absolute rules
    assert [c.name for c in first if not c.passed] == ["loss <= 2"]
    worse_than_base = gate.metric_checks({"loss": 3.5, "rouge_l": 0.2}, base, None, PromotionConfig())
    assert [c.name for c in worse_than_base if not c.passed] == ["loss vs base"]


def per_example(loss, rouge) -> ExampleScores:
    return ExampleScores(loss=[float(x) for x in loss], tokens=[10] * len(loss), rouge_l=[float(x) for x in rouge])


def test_paired_rules_promote_a_real_win_and_refuse_one_that_noise_explains() -> None:
    """Two candidates beat the champion's mean loss by more than min_improvement; only one does so on the examples."""
    import numpy as np

    rng = np.random.default_rng(0)
    n, rules = 64, PromotionConfig(min_improvement={"loss": 0.05}, max_regression={"rouge_l": 0.05})
    hard, rouge = rng.normal(2.0, 0.8, n), rng.uniform(0.1, 0.6, n)
    champion = per_example(hard, rouge)
    base = per_example(hard + 1.0, rouge - 0.1)
    real = per_example(hard - 0.1 + rng.normal(0, 0.02, n), rouge)  # 0.1 better on every example
    noise = rng.normal(0, 0.6, n)
    lucky = per_example(hard + noise - noise.mean() - 0.1, rouge)  # 0.1 better on average, by chance
    means = {"loss": champion.mean_loss(), "rouge_l": champion.mean_rouge_l()}
    base_means = {"loss": base.mean_loss(), "rouge_l": base.mean_rouge_l()}

    def loss_check(candidate: ExampleScores):
        checks = gate.metric_checks(
            {"loss": candidate.mean_loss(), "rouge_l": candidate.mean_rouge_l()}, base_means, means, rules,
            gate.Examples(candidate=candidate, base=base, champion=champion),
        )  # fmt: skip
        return next(c for c in checks if c.name == "loss vs champion"), checks

    win, checks = loss_check(real)
    assert win.passed and win.estimate == pytest.approx(0.1, abs=0.01) and win.interval[0] > 0.05
    assert "90% interval [+0.09" in win.detail and all(c.passed for c in checks)
    chance, _ = loss_check(lucky)
    assert chance.estimate == pytest.approx(0.1, abs=1e-6)  # the means alone would promote it
    assert not chance.passed and chance.interval[0] < 0.05 < chance.interval[1]
    # The same numbers without per-example scores (versions registered before they were logged): means decide.
    old = gate.metric_checks({"loss": lucky.mean_loss(), "rouge_l": 0.4}, base_means, means, rules)
    old_loss = next(c for c in old if c.name == "loss vs champion")
    assert old_loss.passed and old_loss.interval is None and "means only" in old_loss.detail


def test_forgetting_guard_refuses_a_candidate_whose_general_perplexity_rose_too_far() -> None:
    import numpy as np

    rng = np.random.default_rng(1)
    base_text = rng.normal(2.5, 0.5, 300)
    rules = PromotionConfig(max_general_regression=0.05)
    held = {"loss": 1.0, "rouge_l": 0.5}

    def guard(rise: float):
        general = {"base": per_example(base_text, []), "finetuned": per_example(base_text + rise, [])}
        tags = {"general_perplexity": float(np.exp(general["finetuned"].mean_loss()))}
        base = {"general_perplexity": float(np.exp(general["base"].mean_loss()))}
        (check,) = gate.metric_checks(
            held | tags, base | {"loss": 2.0, "rouge_l": 0.1}, None, rules.model_copy(update={"beat_base": False}),
            gate.Examples(general=general),
        )  # fmt: skip
        return check

    kept = guard(0.02)  # +2.0% perplexity
    assert kept.passed and kept.estimate == pytest.approx(np.exp(0.02) - 1) and "+2.02%" in kept.detail
    forgot = guard(0.08)  # +8.3%
    assert not forgot.passed and forgot.interval[1] > 0.05 and forgot.name == "general text vs base <= +5%"
    with pytest.raises(ValueError):
        PromotionConfig(max_general_regression=-0.1)


def test_rules_must_name_required_metrics_and_refs_must_name_this_model() -> None:
    with pytest.raises(ValueError, match=r"promotion.thresholds.rouge_l: not in promotion.required_metrics"):
        PromotionConfig(required_metrics=["loss"], max_regression={}, thresholds={"rouge_l": 0.1})
    assert registered.parse_version_ref("m", "models:/m/3") == registered.parse_version_ref("m", 3) == "3"
    with pytest.raises(UsageError, match="is a version of registered model 'other', not of 'm'"):
        registered.parse_version_ref("m", "models:/other/3")


def move_record(model: str, seq: int, version: str, who: str = "t", at: str | None = None) -> audit.AuditRecord:
    return audit.AuditRecord(
        seq=seq,
        action="promote",
        model=model,
        version=version,
        from_version=None,
        to_version=version,
        previous_champion=None,
        who=who,
        at=at or audit.now_utc(),
        reason="",
        flow_run_id=None,
        token="fixed",  # the same writer retrying writes the same value
    )


def test_force_without_reason_is_a_usage_error_before_any_work(capsys) -> None:
    from flows.cli import main

    assert main(["promote", "any-model", "--version", "1", "--force"]) == 2
    assert "--force needs --reason" in capsys.readouterr().err


def test_champion_at_walks_the_moves_in_order() -> None:
    moves = [
        move_record("m", 1, "1", at="2026-01-01T00:00:00+00:00"),
        move_record("m", 2, "3", at="2026-02-01T00:00:00+00:00"),
    ]
    assert audit.champion_at(moves, dt.datetime(2025, 12, 31)) is None
    assert audit.champion_at(moves, dt.datetime(2026, 1, 15)) == "1"
    assert audit.champion_at(moves, dt.datetime(2026, 3, 1, tzinfo=dt.UTC)) == "3"


# --- registering versions cheaply ---


@pytest.fixture(scope="module")
def tiny_adapter(tiny_quantized, tiny_data, tmp_path_factory) -> Adapter:
    from tasks.train import train

    with torch_threads(1):
        return train(tiny_quantized, tiny_data, LoraConfig(r=4), TRAIN, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def tiny_merged(tiny_adapter, tiny_quantized, tiny_data, tmp_path_factory) -> MergedModel:
    from tasks.merge import merge

    with torch_threads(1):
        return merge(tiny_quantized, tiny_adapter, tiny_data, MergeConfig(verify_rows=2), tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def other_split(tmp_path_factory) -> ValidatedData:
    """Different held-out rows (and digest): versions trained on it are not comparable with tiny_data's."""
    rows = [{**r, "output": f"Goodbye, {r['instruction'][13:-1]}."} for r in tiny_records()[4:]]
    data = make_validated_data(tmp_path_factory.mktemp("other"), tiny_records(), rows)
    return data.model_copy(update={"digest": "1" * 64})


class Registrar:
    """Registers versions of one model with chosen metrics, the way the finetune flow does."""

    def __init__(self, uri: str, base: QuantizedBase, adapter: Adapter, merged: MergedModel, data: ValidatedData):
        self.uri, self.base, self.adapter, self.merged, self.data = uri, base, adapter, merged, data
        self.name = f"promo-{uuid.uuid4().hex[:8]}"

    def register(
        self,
        loss: float,
        rouge: float,
        data: ValidatedData | None = None,
        merged_path: str | None = None,
        examples: dict[str, dict[str, ExampleScores]] | None = None,
        general: GeneralTextMetrics | None = None,
    ) -> str:
        """A version with these metrics; with ``examples`` also its per-example scores (else: an old version)."""
        from loraflow.tracking import MlflowTracker
        from tasks.register import register

        data = data or self.data
        parent = MlflowTracker.start(self.uri, "promote-tests", f"{self.name}-run")
        config = {
            "base_model": {"name": "tiny-llama", "path": self.base.base.path},
            "data": {"path": data.source},
            "train": TRAIN.model_dump(mode="json"),
            "eval": EVAL.model_dump(mode="json"),
            "registry": {"model_name": self.name},
        }
        folder = Path(self.adapter.path).parent / uuid.uuid4().hex
        folder.mkdir()
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        parent.log_artifact(folder / "config.yaml")
        parent.log_artifact(data.eval_path, "data")
        examples_uri = ""
        if examples is not None:
            parent.log_artifact(scores.write_examples(folder / "eval" / scores.EXAMPLES_FILE, examples), "eval")
            examples_uri = f"runs:/{parent.run_id}/eval/{scores.EXAMPLES_FILE}"
        lineage = Lineage(
            data_digest=data.digest,
            data_source=data.source,
            contract=data.contract,
            base_model="tiny-llama",
            base_digest=self.base.base.digest,
            config_hash="c" * 64,
            code_version="git:test",
            flow_run_id=str(uuid.uuid4()),
            mlflow_run_id=parent.run_id,
            eval_split=f"runs:/{parent.run_id}/data/{Path(data.eval_path).name}",
            eval_examples=examples_uri,
        )
        metrics = ModelMetrics(loss=loss, perplexity=2.0, rouge_l=rouge, tokens=10, generated=4)
        base_metrics = ModelMetrics(loss=9.0, perplexity=9.0, rouge_l=0.0, tokens=10, generated=4)
        evaluation = EvalReport(
            base=base_metrics, finetuned=metrics, general=general, samples_path="-", examples_path="-", seconds=0.0
        )
        merged = self.merged.model_copy(update={"path": merged_path}) if merged_path else self.merged
        return register(
            self.adapter, self.base, evaluation, merged, lineage, RegisterConfig(model_name=self.name), self.uri, 4
        ).version


@pytest.fixture
def reg(local_stack, tiny_quantized, tiny_adapter, tiny_merged, tiny_data) -> Registrar:
    return Registrar(local_stack.mlflow_url, tiny_quantized, tiny_adapter, tiny_merged, tiny_data)


def client_of(reg: Registrar):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=reg.uri)


def no_rescore(*args):
    raise AssertionError("comparable versions must not be re-scored")


def promote(reg: Registrar, version: str, rules: PromotionConfig = RULES, force: bool = False, reason: str = ""):
    client = client_of(reg)
    assessment = gate.assess(client, reg.name, version, rules, no_rescore)
    return moves.commit(client, assessment, actor="tester", reason=reason, force=force, flow_run_id="fr-test")


# --- promotion, refusal, rollback ---


@integration
def test_better_promoted_worse_refused_rollback_restores(reg: Registrar) -> None:
    v1, v2, v3, v4 = (reg.register(*m) for m in [(1.0, 0.30), (0.8, 0.32), (0.6, 0.33), (0.7, 0.40)])
    client = client_of(reg)

    first = promote(reg, v1)
    assert first.promoted and first.champion == v1 and first.previous_champion is None
    assert first.verdict.champion is None  # no champion yet: only the absolute rules applied
    assert promote(reg, v2).promoted
    assert promote(reg, v3).promoted
    assert registered.aliases(client, reg.name) == {"candidate": v4, "champion": v3, "previous-champion": v2}

    worse = promote(reg, v4)  # loss 0.7 > champion's 0.6
    assert not worse.promoted and "loss vs champion" in worse.message
    assert registered.aliases(client, reg.name)["champion"] == v3

    back = moves.rollback(client, reg.name, actor="tester", reason="bad answers", flow_run_id="fr", lock_timeout_s=5)
    assert back.champion == v2 and back.previous_champion == v1
    assert registered.aliases(client, reg.name) == {"candidate": v4, "champion": v2, "previous-champion": v1}
    assert moves.rollback(client, reg.name, actor="t", reason="", flow_run_id=None, lock_timeout_s=5).champion == v1
    with pytest.raises(RegistryError, match="no previous-champion to roll back to"):
        moves.rollback(client, reg.name, actor="t", reason="", flow_run_id=None, lock_timeout_s=5)

    h = history.history(client, reg.name)
    assert [(m.seq, m.action, m.from_version, m.to_version) for m in h.moves] == [
        (1, "promote", None, v1),
        (2, "promote", v1, v2),
        (3, "promote", v2, v3),
        (4, "rollback", v3, v2),
        (5, "rollback", v2, v1),
    ]
    assert all(m.done_at and m.who in ("tester", "t") for m in h.moves)
    assert h.moves[1].verdict.champion == {"loss": 1.0, "rouge_l": 0.3} and h.moves[1].flow_run_id == "fr-test"
    (refused,) = h.refusals
    assert refused.version == v4 and refused.to_version == v3 and not refused.verdict.passed
    assert h.version(v3).lineage["mlflow_run"] and h.version(v3).lineage["merged_model"] == reg.merged.path


@integration
def test_history_answers_champion_at_date(reg: Registrar) -> None:
    versions = [reg.register(1.0 - 0.1 * i, 0.3) for i in range(3)]
    client = client_of(reg)
    stamps = []
    for v in versions:
        stamps.append(dt.datetime.now(dt.UTC))
        time.sleep(0.02)
        assert promote(reg, v).promoted
    time.sleep(0.02)
    stamps.append(dt.datetime.now(dt.UTC))
    moves.rollback(client, reg.name, actor="t", reason="", flow_run_id=None, lock_timeout_s=5)
    h = history.history(client, reg.name)
    assert [h.champion_at(s) for s in stamps] == [None, *versions]  # each stamp was taken just before a move
    assert [h.champion_at(m.when) for m in h.moves] == [versions[0], versions[1], versions[2], versions[1]]
    assert h.champion_at(dt.datetime.now(dt.UTC)) == versions[1] == registered.aliases(client, reg.name)["champion"]


@integration
def test_refuses_foreign_models_deleted_or_unlineaged_versions_and_missing_files(reg: Registrar) -> None:
    client = client_of(reg)
    v1 = reg.register(1.0, 0.3)
    foreign = f"foreign-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(foreign)
    with pytest.raises(UsageError, match="not created by loraflow"):
        promote(_named(reg, foreign), "1")
    assert client.get_registered_model(foreign).aliases == {} and client.get_registered_model(foreign).tags == {}
    with pytest.raises(UsageError, match=f"is a version of registered model '{foreign}'"):
        promote(reg, f"models:/{foreign}/1")

    run = client.create_run(client.get_experiment_by_name("promote-tests").experiment_id)
    bare = client.create_model_version(reg.name, source=f"runs:/{run.info.run_id}/x", run_id=run.info.run_id)
    with pytest.raises(UsageError, match=f"version {bare.version} of {reg.name} has no loraflow lineage"):
        promote(reg, bare.version)
    client.delete_model_version(reg.name, bare.version)
    with pytest.raises(UsageError, match=f"{reg.name} has no version {bare.version} .*deleted"):
        promote(reg, bare.version)

    assert promote(reg, v1).promoted
    gone = reg.register(0.5, 0.4, merged_path=str(Path(reg.merged.path).parent / "missing"))
    refused = promote(reg, gone, force=True, reason="ship it")
    assert (
        not refused.promoted
        and "--force never overrides" in refused.message
        and "merged model not found" in (refused.message)
    )
    assert registered.aliases(client, reg.name)["champion"] == v1


def _named(reg: Registrar, name: str) -> Registrar:
    other = Registrar(reg.uri, reg.base, reg.adapter, reg.merged, reg.data)
    other.name = name
    return other


@integration
def test_champion_is_rescored_on_the_candidates_split_when_data_changed(reg: Registrar, other_split) -> None:
    client = client_of(reg)
    v1 = reg.register(0.5, 0.3)
    assert promote(reg, v1).promoted
    v2 = reg.register(0.4, 0.3, data=other_split)  # other held-out rows: v1's 0.5 says nothing about them
    calls = []

    def rescore(champion, split_uri, eval_cfg, max_length):
        from tasks.reevaluate import score_version

        calls.append((champion.version, split_uri))
        with torch_threads(1):
            return score_version(reg.uri, champion.uri, split_uri, eval_cfg, max_length)

    assessment = gate.assess(client, reg.name, v2, RULES, rescore)
    assert calls == [(v1, registered.get_version(client, reg.name, v2).tags[T.EVAL_SPLIT])]
    verdict = assessment.verdict
    assert verdict.reevaluated and verdict.champion_version == v1
    assert verdict.champion["loss"] != 0.5 and verdict.champion["loss"] > 1.0  # the real score, not the tag
    assert verdict.passed  # the tiny adapter's real loss on those rows is far above 0.4
    # v2 was registered without per-example scores (as before this version of loraflow): means only, said so.
    (loss_check,) = [c for c in verdict.checks if c.name == "loss vs champion"]
    assert loss_check.interval is None and "means only" in loss_check.detail


@integration
def test_rescored_champion_is_compared_example_by_example(reg: Registrar, other_split, tiny_quantized) -> None:
    """The champion re-scored on the candidate's split comes back per example, so the comparison stays paired."""
    from tasks.reevaluate import score_version

    client = client_of(reg)
    v1 = reg.register(0.5, 0.3)
    assert promote(reg, v1).promoted
    uri = registered.get_version(client, reg.name, v1).uri
    with torch_threads(1):  # the champion on the candidate's held-out rows, as the gate will re-score it
        champion = score_version(reg.uri, uri, Path(other_split.eval_path).as_uri(), EVAL, TRAIN.max_seq_length)
    rows = len(champion.loss)
    assert rows == 4 and len(champion.rouge_l) == 4 and sum(champion.tokens) > 0
    # A candidate on the other split that is 0.3 nats better on every example than the champion would be.
    better = champion.model_copy(update={"loss": [x - 0.3 for x in champion.loss]})
    v2 = reg.register(
        better.mean_loss(), champion.mean_rouge_l(), data=other_split,
        examples={"heldout": {"base": champion, "finetuned": better}},
    )  # fmt: skip

    def rescore(version, split_uri, eval_cfg, max_length):
        with torch_threads(1):
            return score_version(reg.uri, version.uri, split_uri, eval_cfg, max_length)

    verdict = gate.assess(client, reg.name, v2, RULES, rescore).verdict
    (loss_check,) = [c for c in verdict.checks if c.name == "loss vs champion"]
    assert verdict.reevaluated and loss_check.interval is not None
    # Paired: every example improved by exactly 0.3, so the interval is that point, whatever the spread.
    assert loss_check.interval == pytest.approx((0.3, 0.3), abs=1e-6) and loss_check.passed


@integration
def test_concurrent_promotions_leave_one_winner_and_a_consistent_trail(reg: Registrar) -> None:
    client = client_of(reg)
    v1 = reg.register(1.0, 0.3)
    assert promote(reg, v1).promoted
    contenders = [reg.register(0.9 - 0.05 * i, 0.3) for i in range(4)]
    # All gates run first (each sees champion v1), then all commits start together.
    assessments = [gate.assess(client, reg.name, v, RULES, no_rescore) for v in contenders]
    barrier, results, errors = threading.Barrier(len(contenders)), {}, []

    def commit(a: gate.Assessment) -> None:
        from mlflow import MlflowClient

        try:
            barrier.wait()
            own = MlflowClient(tracking_uri=reg.uri)
            results[a.candidate.version] = moves.commit(
                own, a, actor=f"t{a.candidate.version}", reason="", force=False, flow_run_id=None
            )
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=commit, args=(a,)) for a in assessments]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    winners = [v for v, r in results.items() if r.promoted]
    assert len(winners) == 1 and len(results) == len(contenders)
    assert all("moved from" in r.message for v, r in results.items() if v != winners[0])
    live = registered.aliases(client, reg.name)
    assert (live["champion"], live["previous-champion"]) == (winners[0], v1)
    h = history.history(client, reg.name)
    assert [(m.seq, m.to_version) for m in h.moves] == [(1, v1), (2, winners[0])]
    assert sorted(r.version for r in h.refusals) == sorted(v for v in contenders if v != winners[0])
    assert not client.search_experiments(filter_string=f"name = 'loraflow-lock/{reg.name}'")  # lock released


@integration
def test_lock_excludes_and_the_ledger_refuses_a_second_claim(reg: Registrar) -> None:
    """The two guards under the gate, on their own: ModelLock serialises; a claimed seq cannot be claimed again."""
    client = client_of(reg)
    reg.register(1.0, 0.3)
    inside, overlaps = [0], []

    def worker(i: int) -> None:
        from mlflow import MlflowClient

        with moves.ModelLock(MlflowClient(tracking_uri=reg.uri), reg.name, f"w{i}", timeout_s=60):
            inside[0] += 1
            overlaps.append(inside[0])
            time.sleep(0.05)
            inside[0] -= 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert overlaps == [1] * 6

    ledger = audit.create_ledger(client, reg.name)
    first = move_record(reg.name, seq=1, version="1", who="a")
    audit.append_move(client, ledger, first)
    audit.append_move(client, ledger, first)  # the same writer retrying: idempotent
    with pytest.raises(RegistryError, match="audit sequence 1 .* was taken by a concurrent promote of version 1 by a"):
        audit.append_move(client, ledger, move_record(reg.name, seq=1, version="2", who="b"))
    assert [m.version for m in audit.read_ledger(client, ledger)] == ["1"]


# --- the command line and serving ---


def cli(stack, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "LORAFLOW_HOME": str(stack.home),
        "LORAFLOW_PREFECT_PORT": str(stack.prefect_port),
        "LORAFLOW_MLFLOW_PORT": str(stack.mlflow_port),
        "LORAFLOW_IDENTITY": "auditor@example",
    }
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True, timeout=180
    )


@integration
def test_cli_forced_promotion_history_and_report(reg: Registrar, local_stack, tmp_path) -> None:
    client = client_of(reg)
    v1, v2 = reg.register(1.0, 0.3), reg.register(1.5, 0.3)
    assert promote(reg, v1).promoted

    refused = cli(local_stack, "promote", reg.name, "--version", v2)
    assert refused.returncode == 1 and "loss vs champion" in refused.stderr
    forced = cli(local_stack, "promote", reg.name, "--version", v2, "--force", "--reason", "hotfix for ticket 7")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert registered.aliases(client, reg.name)["champion"] == v2

    move = history.history(client, reg.name).moves[-1]
    assert move.forced and move.reason == "hotfix for ticket 7" and move.who == "auditor@example"
    assert move.flow_run_id and not move.verdict.passed

    out = tmp_path / "history.html"
    shown = cli(local_stack, "history", reg.name, "--json", "--report", str(out))
    assert shown.returncode == 0, shown.stderr[-2000:]
    data = json.loads(shown.stdout)
    assert data["aliases"]["champion"] == v2 and [m["to_version"] for m in data["moves"]] == [v1, v2]
    html = out.read_text()
    assert "data:image/png;base64," in html and "hotfix for ticket 7" in html
    at = cli(local_stack, "history", reg.name, "--at", move.at, "--version", v2)
    assert at.returncode == 0 and f"champion at {move.at}: version {v2}" in at.stdout
    assert "data_digest" in at.stdout and "FORCED, failed" in at.stdout


@integration
def test_champion_serves_with_plain_mlflow_and_its_merged_model_loads(reg: Registrar) -> None:
    import mlflow
    from transformers import AutoModelForCausalLM

    v1 = reg.register(1.0, 0.3)
    assert promote(reg, v1).promoted
    mlflow.set_tracking_uri(reg.uri)
    with torch_threads(1):
        model = mlflow.pyfunc.load_model(f"models:/{reg.name}@champion")
        answers = model.predict(["Say hello to Ann."], params={"max_new_tokens": 3})
        assert len(answers) == 1 and isinstance(answers[0], str)
        merged = history.history(client_of(reg), reg.name).version(v1).lineage["merged_model"]
        assert AutoModelForCausalLM.from_pretrained(merged).config.model_type == "llama"
