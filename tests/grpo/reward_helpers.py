"""Reward functions for test_rewards.py, resolved as "reward_helpers:NAME" (the test puts this folder
on sys.path). The bad ones exist to be rejected by the probe or contained by RewardWorker."""

from __future__ import annotations

import time


def matches(prompt: str, completion: str, expected: str) -> float:
    """1.0 when the completion equals the expected answer."""
    return 1.0 if completion == expected else 0.0


def as_int(prompt: str, completion: str, expected: str) -> int:
    """Returns an int (accepted: converted by float())."""
    return int(completion == expected)


def as_bool(prompt: str, completion: str, expected: str) -> bool:
    return completion == expected


def returns_string(prompt: str, completion: str, expected: str) -> str:
    return "1.0"


def returns_nan(prompt: str, completion: str, expected: str) -> float:
    return float("nan")


def raises(prompt: str, completion: str, expected: str) -> float:
    raise KeyError("no such answer")


def flaky(prompt: str, completion: str, expected: str) -> float:
    """Passes the probe, then misbehaves on purpose depending on the completion."""
    if completion == "boom":
        raise ValueError("boom")
    if completion == "inf":
        return float("inf")
    if completion == "str":
        return "high"  # type: ignore[return-value]
    if completion == "sleep":
        time.sleep(1.0)
    return 1.0 if completion == expected else 0.0


NOT_CALLABLE = 3
