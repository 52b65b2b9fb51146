"""Per-example scores and the paired bootstrap (loraflow/scores.py): exact, seeded, no model needed."""

from __future__ import annotations

import numpy as np
import pytest

from loraflow import scores
from loraflow.records import ExampleScores


def example_scores(loss, tokens=None, rouge=()) -> ExampleScores:
    return ExampleScores(loss=list(loss), tokens=list(tokens or [10] * len(loss)), rouge_l=list(rouge))


def test_interval_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(1)
    a = example_scores(rng.normal(2.0, 0.5, 100), rng.integers(5, 30, 100).tolist())
    first = scores.loss_interval(a, 0.9)
    assert first == scores.loss_interval(a, 0.9)  # fixed seed: the same interval every time
    assert first[0] < a.mean_loss() < first[1]
    wider = scores.loss_interval(a, 0.99)
    assert wider[0] < first[0] and wider[1] > first[1]


def test_paired_interval_sees_a_shift_that_the_spread_of_examples_hides() -> None:
    rng = np.random.default_rng(2)
    hard = rng.normal(3.0, 1.0, 64)  # examples differ a lot from one another...
    champion = example_scores(hard)
    candidate = example_scores(hard - 0.05 + rng.normal(0, 0.01, 64))  # ...but the candidate is 0.05 better on each
    low, high = scores.loss_interval(candidate, 0.9, other=champion)
    assert high < 0 and low == pytest.approx(-0.05, abs=0.01)
    # Unpaired, the two means' own intervals overlap almost entirely.
    own_c, own_p = scores.loss_interval(candidate, 0.9), scores.loss_interval(champion, 0.9)
    assert own_c[1] > own_p[0]
    same = scores.loss_interval(champion, 0.9, other=champion)
    assert same == (0.0, 0.0)


def test_noise_alone_gives_an_interval_around_zero_that_shrinks_with_examples() -> None:
    rng = np.random.default_rng(3)
    widths = []
    for n in (32, 128, 512):
        a = example_scores([0] * n, rouge=rng.uniform(0, 1, n))
        b = example_scores([0] * n, rouge=rng.uniform(0, 1, n))  # the same distribution: no real difference
        low, high = scores.rouge_l_interval(a, 0.9, other=b)
        assert low < 0 < high or abs(low) < 0.1
        widths.append(high - low)
    assert widths[0] > 1.6 * widths[1] > 1.6 * 1.6 * widths[2]  # about 1/sqrt(n): halves per 4x examples


def test_token_weighting_matches_the_reported_loss() -> None:
    a = example_scores([1.0, 3.0], [30, 10])
    assert a.mean_loss() == pytest.approx(1.5)
    low, high = scores.loss_interval(a, 0.999)
    assert 1.0 <= low <= 1.5 <= high <= 3.0


def test_artifact_round_trip(tmp_path) -> None:
    heldout = {
        "base": example_scores([3.0, 2.0, 1.0], [5, 6, 7], [0.1, 0.2]),
        "finetuned": example_scores([2.0, 1.5, 0.5], [5, 6, 7], [0.3, 0.4]),
    }
    general = {"base": example_scores([2.5, 2.6], [90, 95]), "finetuned": example_scores([2.7, 2.6], [90, 95])}
    path = scores.write_examples(tmp_path / "eval" / scores.EXAMPLES_FILE, {"heldout": heldout, "general": general})
    assert scores.read_examples(path) == {"heldout": heldout, "general": general}
    first = path.read_text().splitlines()[0]
    assert '"set": "heldout"' in first and '"rouge_l_finetuned": 0.3' in first


def test_pairs_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="paired scores of 2 and 3 examples"):
        scores.loss_interval(example_scores([1, 2]), 0.9, other=example_scores([1, 2, 3]))
