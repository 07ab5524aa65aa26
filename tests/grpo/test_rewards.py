"""Built-in verifiers, the reward registry's probe, and RewardWorker's containment of failures."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from grpo import rewards
from grpo.rewards import (
    MAX_MESSAGES,
    RewardError,
    RewardWorker,
    ScoreResult,
    arithmetic_reward,
    code_reward,
    countdown_reward,
    digit_reward,
    exact_match_reward,
    names,
    register,
    resolve,
    validate,
)

HERE = str(Path(__file__).parent)


@pytest.fixture
def helpers(monkeypatch):
    """Make tests/grpo/reward_helpers.py importable as `reward_helpers` for this test only."""
    monkeypatch.syspath_prepend(HERE)


# ---- built-in reward functions --------------------------------------------------------------------


def test_digit_gives_partial_credit_over_six_characters():
    assert digit_reward("digit 3:", "333333", "3") == 1.0
    assert digit_reward("digit 3:", "3x3", "3") == pytest.approx(2 / 6)
    assert digit_reward("digit 3:", "3333333333", "3") == 1.0  # only the first 6 count
    assert digit_reward("digit 3:", "", "3") == 0.0


def test_exact_match_uses_the_stripped_first_line():
    assert exact_match_reward("q", "  Paris  \nmore text", "Paris ") == 1.0
    assert exact_match_reward("q", "\n\nParis", "Paris") == 1.0
    assert exact_match_reward("q", "Paris, France", "Paris") == 0.0


def test_arithmetic_reads_the_first_integer():
    assert arithmetic_reward("12+7=", "19", "19") == 1.0
    assert arithmetic_reward("12+7=", " 19 and then 20", "19") == 1.0
    assert arithmetic_reward("3-5=", "-2", "-2") == 1.0
    assert arithmetic_reward("12+7=", "20 19", "19") == 0.0
    assert arithmetic_reward("12+7=", "nineteen", "19") == 0.0


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("3*5+7", 1.0),
        ("(3 * 5) + 7 = 22\nexplanation", 1.0),
        ("7+5*3", 1.0),
        ("5*3+7+0", 0.1),  # 0 is not a given number
        ("3*5+7+7", 0.1),  # 7 used twice, given once
        ("3+5+7", 0.1),  # well-formed, wrong value
        ("7/(5-5)", 0.1),  # division by zero is wrong, not malformed
        ("3*5+", 0.0),
        ("", 0.0),
        ("3.0*5+7", 0.0),  # float literal
        ("3**2", 0.0),  # power is not allowed
        ("-3+25", 0.0),  # unary minus is not allowed
        ("__import__('os').system('true')", 0.0),
        ("True+21", 0.0),
        ("(" * 300 + "3" + ")" * 300, 0.0),
    ],
)
def test_countdown_scores(completion, reward):
    assert countdown_reward("numbers 3 5 7 target 22:", completion, "3 5 7|22") == reward


def test_countdown_uses_exact_fractions():
    assert countdown_reward("numbers 8 3 3 target 8:", "8/3*3", "8 3 3|8") == 1.0
    assert countdown_reward("numbers 1 3 target 0:", "1/3*3-1", "1 3|0") == 0.1  # the second 1 isn't given


def test_code_runs_completion_then_tests():
    tests = "assert double(4) == 8\n"
    assert code_reward("p", "def double(x):\n    return 2 * x\n", tests) == 1.0
    assert code_reward("p", "Sure!\n```python\ndef double(x):\n    return x + x\n```\nDone.", tests) == 1.0
    assert code_reward("p", "def double(x):\n    return x\n", tests) == 0.0
    assert code_reward("p", "def double(x):\n    return", tests) == 0.0


# ---- registry -------------------------------------------------------------------------------------


def test_resolve_builtin_names():
    for name, fn in [
        ("digit", digit_reward),
        ("exact_match", exact_match_reward),
        ("arithmetic", arithmetic_reward),
        ("countdown", countdown_reward),
        ("code", code_reward),
    ]:
        assert resolve(name) is fn
    assert {"digit", "exact_match", "arithmetic", "countdown", "code"} <= set(names())


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(RewardError, match="unknown reward 'nope'.*exact_match"):
        resolve("nope")


def test_resolve_module_function(helpers):
    fn = resolve("reward_helpers:matches")
    assert fn("p", "a", "a") == 1.0
    assert resolve("reward_helpers:as_int")("p", "a", "a") == 1
    assert resolve("reward_helpers:as_bool")("p", "a", "b") is False


def test_resolve_import_errors_name_the_spec(helpers):
    with pytest.raises(RewardError, match="no_such_module_xyz"):
        resolve("no_such_module_xyz:fn")
    with pytest.raises(RewardError, match="has no attribute 'missing'"):
        resolve("reward_helpers:missing")
    with pytest.raises(RewardError, match="'package.module:function'"):
        resolve("reward_helpers:")


@pytest.mark.parametrize(
    "attr, message",
    [
        ("returns_string", "returned '1.0' \\(str\\), not a number"),
        ("returns_nan", "non-finite"),
        ("raises", "raised on the probe.*KeyError"),
        ("NOT_CALLABLE", "not a callable"),
    ],
)
def test_probe_rejects_bad_functions_naming_them(helpers, attr, message):
    spec = f"reward_helpers:{attr}"
    with pytest.raises(RewardError, match=message) as info:
        resolve(spec)
    assert spec in str(info.value)


def test_validate_times_out_a_hanging_probe():
    def hangs(prompt, completion, expected):
        time.sleep(2)
        return 1.0

    with pytest.raises(RewardError, match="'hangs' did not return within 0.1s"):
        validate(hangs, "hangs", timeout_s=0.1)


def test_register_validates_then_resolves(monkeypatch):
    monkeypatch.setattr(rewards, "_REGISTRY", dict(rewards._REGISTRY))  # this test's names stay here

    def length(prompt: str, completion: str, expected: str) -> float:
        return len(completion) / 10

    register("test_length", length)
    assert resolve("test_length") is length
    register("test_length", length)  # same function again: fine
    with pytest.raises(RewardError, match="already registered"):
        register("test_length", lambda p, c, e: 0.0)
    register("test_length", exact_match_reward, replace=True)
    assert resolve("test_length") is exact_match_reward
    with pytest.raises(RewardError, match="'test_bad'.*not a number"):
        register("test_bad", lambda p, c, e: None)
    with pytest.raises(RewardError, match="no ':'"):
        register("a:b", length)
    assert "test_bad" not in names()


# ---- RewardWorker ---------------------------------------------------------------------------------


def test_worker_scores_builtin_tasks():
    worker = RewardWorker("arithmetic")
    result = worker.score([("1+1=", "2", "2"), ("2*3=", "5", "6"), ("9-4=", " 5\n", "5")])
    assert result == ScoreResult(rewards=[1.0, 0.0, 1.0], errors=0, timeouts=0, messages=[])


def test_worker_counts_errors_and_timeouts_and_scores_the_rest(helpers):
    worker = RewardWorker("reward_helpers:flaky", timeout_s=0.2)
    items = [
        ("p", "a", "a"),
        ("p", "boom", "a"),
        ("p", "inf", "a"),
        ("p", "sleep", "a"),
        ("p", "str", "a"),
        ("p", "b", "a"),
        ("p", "a", "a"),
    ]
    start = time.monotonic()
    result = worker.score(items)
    assert time.monotonic() - start < 1.0  # the 1 s sleep was abandoned at 0.2 s
    assert result.rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert result.errors == 3 and result.timeouts == 1
    assert result.messages[0] == "ValueError: boom"
    assert any(m.startswith("TimeoutError") and "0.2s" in m for m in result.messages)
    assert all(math.isfinite(r) for r in result.rewards)


def test_worker_keeps_only_a_few_messages(helpers):
    result = RewardWorker("reward_helpers:flaky").score([("p", "boom", "a")] * 20)
    assert result.errors == 20 and len(result.messages) == MAX_MESSAGES


def test_worker_rejects_a_bad_spec_at_construction(helpers):
    with pytest.raises(RewardError, match="reward_helpers:raises"):
        RewardWorker("reward_helpers:raises")
    with pytest.raises(ValueError, match="timeout_s"):
        RewardWorker("digit", timeout_s=0)
