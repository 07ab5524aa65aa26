"""The evaluation statistics: a paired t-test over per-query rewards, checked by hand."""

from __future__ import annotations

import pytest

from grpo.evaluate import EvalResult, compare, evaluate_model
from grpo.tasks import Sample


def test_paired_t_test_matches_the_hand_computation():
    # diffs [1, 1, 0, 0]: mean 0.5, sd sqrt(1/3), t = 0.5 / (sqrt(1/3) / 2) = sqrt(3) = 1.732, df 3
    out = compare([0, 0, 1, 0], [1, 1, 1, 0])
    assert out["improvement"] == 0.5
    assert out["t_statistic"] == pytest.approx(3**0.5)
    assert out["p_value"] == pytest.approx(0.1817, abs=1e-3) and out["significant"] is False


def test_identical_and_uniformly_better_models():
    assert compare([0.5, 0.5], [0.5, 0.5]) == {"improvement": 0.0, "t_statistic": None, "p_value": 1.0,
                                               "significant": False}
    assert compare([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])["significant"] is True
    with pytest.raises(ValueError, match="same"):
        compare([1.0], [1.0, 0.0])


def test_rates():
    r = EvalResult([1.0, 0.5, 0.0, 1.0], ["a", "b", "c", "d"])
    assert r.success_rate == 0.5 and r.avg_reward == 0.625


def test_evaluate_model_scores_greedy_completions(tiny_model_dir):
    samples = [Sample(f"digit {d}:", str(d)) for d in range(3)]
    a = evaluate_model(tiny_model_dir, samples, reward="digit", max_new_tokens=6)
    b = evaluate_model(tiny_model_dir, samples, reward="digit", max_new_tokens=6)
    assert a.completions == b.completions and len(a.rewards) == 3  # greedy: deterministic
    assert all(0.0 <= x <= 1.0 for x in a.rewards)
