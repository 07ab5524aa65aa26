"""Reward functions: the built-in verifiers, the name registry, and the worker that scores batches.

A reward function is `fn(prompt, completion, expected) -> float`, a plain function of strings that
knows nothing about Ray or tensors. `resolve` turns the config's `reward` string (a registered name
or `package.module:function`) into one, after a probe call shows it returns a finite number.
`RewardWorker` scores a batch with one function and contains its failures: an exception or a
non-finite value scores 0.0 and counts as an error, a call past the timeout scores 0.0 and counts as
a timeout, so one bad completion never takes down a training step. The engine wraps RewardWorker
with `ray.remote` and spreads batches over an ActorPool; nothing here imports Ray.

Not covered: shaping or normalising rewards across a group (that is the advantage computation in
grpo/loss.py) and running code safely (grpo/sandbox.py; the `code` reward calls it).
"""

from __future__ import annotations

import ast
import functools
import importlib
import math
import numbers
import operator
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from grpo.sandbox import SandboxUnavailable, run_python

RewardFn = Callable[[str, str, str], float]
"""(prompt, completion, expected) -> reward"""

PROBE = ("digit 1:", "1", "1")
"""the (prompt, completion, expected) every reward function is called with before it is accepted"""

MAX_MESSAGES = 5
"""failure messages kept per ScoreResult; the counts are always complete"""

CODE_TIMEOUT_S = 5.0
"""wall-clock limit for one `code` reward program in the sandbox"""


class RewardError(ValueError):
    """A reward spec that cannot be used: unknown, not importable, or failing the probe call."""


# ---- built-in reward functions ------------------------------------------------------------------


def digit_reward(prompt: str, completion: str, expected: str) -> float:
    """Share of the first 6 completion characters equal to the expected digit (count / 6).

    Partial credit on purpose: a random tiny model gets a gradient from its very first steps.
    """
    target = expected.strip()
    if len(target) != 1:
        raise ValueError(f"digit reward: expected a single character, got {expected!r}")
    return sum(ch == target for ch in completion[:6]) / 6


def exact_match_reward(prompt: str, completion: str, expected: str) -> float:
    """1.0 if the completion's first line (whitespace stripped) equals `expected` stripped, else 0.0."""
    first_line = completion.strip().split("\n", 1)[0].strip()
    return 1.0 if first_line == expected.strip() else 0.0


_INTEGER = re.compile(r"-?\d+")


def arithmetic_reward(prompt: str, completion: str, expected: str) -> float:
    """1.0 if the first integer in the completion equals the expected integer, else 0.0."""
    target = int(expected.strip())
    match = _INTEGER.search(completion)
    return 1.0 if match is not None and int(match.group()) == target else 0.0


def parse_countdown_expected(expected: str) -> tuple[list[int], int]:
    """Decode a countdown answer key "3 5 7|22" into ([3, 5, 7], 22)."""
    numbers_part, sep, target_part = expected.partition("|")
    if not sep:
        raise ValueError(f"countdown expected must look like '3 5 7|22', got {expected!r}")
    return [int(tok) for tok in numbers_part.split()], int(target_part)


class _Malformed(Exception):
    """The completion is not an expression of integers, + - * / and parentheses."""


_OPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,  # on Fractions: exact, so 7/2*2 == 7
}

_MAX_EXPRESSION_CHARS = 200  # bounds parse time and nesting depth on arbitrary completions


def _literals(node: ast.expr) -> list[int]:
    """The integer literals of a checked expression tree; raises _Malformed on any other node."""
    if isinstance(node, ast.Constant) and type(node.value) is int:  # not bool, float or str
        return [node.value]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _literals(node.left) + _literals(node.right)
    raise _Malformed(type(node).__name__)


def _value(node: ast.expr) -> Fraction:
    """Exact value of a tree already checked by `_literals`. ZeroDivisionError propagates."""
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    assert isinstance(node, ast.BinOp)  # guaranteed by _literals
    return _OPS[type(node.op)](_value(node.left), _value(node.right))


def countdown_reward(prompt: str, completion: str, expected: str) -> float:
    """1.0 for an expression hitting the target, 0.1 if well-formed but wrong, 0.0 if malformed.

    The expression is the completion's first line, cut at an "=" (so "3*5+7=22" counts), parsed
    with `ast` and evaluated by walking the tree with Fractions; nothing is ever eval'd. Each given
    number may be used at most as often as it is given; using others is well-formed but wrong.
    """
    numbers, target = parse_countdown_expected(expected)
    text = completion.split("\n", 1)[0].split("=", 1)[0].strip()
    if not text or len(text) > _MAX_EXPRESSION_CHARS:
        return 0.0
    try:
        tree = ast.parse(text, mode="eval").body
        used = _literals(tree)
    except (SyntaxError, ValueError, RecursionError, _Malformed):
        return 0.0
    if Counter(used) - Counter(numbers):  # some literal used more often than given
        return 0.1
    try:
        value = _value(tree)
    except ZeroDivisionError:
        return 0.1
    return 1.0 if value == target else 0.1


def _extract_code(completion: str) -> str:
    """The first ``` fenced block of the completion if it has one, else the whole completion."""
    match = re.search(r"```[^\n]*\n(.*?)(?:```|\Z)", completion, flags=re.DOTALL)
    return match.group(1) if match else completion


def code_reward(prompt: str, completion: str, expected: str) -> float:
    """1.0 if the completion followed by the expected test code runs to exit status 0, else 0.0."""
    program = _extract_code(completion) + "\n" + expected
    return 1.0 if run_python(program, timeout_s=CODE_TIMEOUT_S).ok else 0.0


# ---- calling a reward function safely -----------------------------------------------------------


@dataclass
class _Outcome:
    value: Any = None
    error: Exception | None = None
    finished: bool = False
    timed_out: bool = False


def _call(fn: RewardFn, args: tuple[str, str, str], timeout_s: float) -> _Outcome:
    """Call fn(*args) in a daemon thread and wait at most timeout_s.

    A Python thread cannot be killed, so a call that overruns is abandoned: its daemon thread keeps
    running (and holding CPU, if it spins) until it returns or the process exits, but it never
    blocks the caller or interpreter shutdown. A worker that piles up hung calls should be
    restarted by its owner; reward code that may hang for real belongs in grpo.sandbox.
    """
    outcome = _Outcome()

    def target() -> None:
        try:
            outcome.value = fn(*args)
            outcome.finished = True
        except Exception as exc:  # reward code is user code: any failure is data, not a crash
            outcome.error = exc

    thread = threading.Thread(target=target, name="reward-call", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        outcome.timed_out = True
    elif not outcome.finished and outcome.error is None:
        outcome.error = RuntimeError("reward function exited without returning (SystemExit?)")
    return outcome


def _as_reward(value: Any) -> float:
    """`value` as a float if it is a real finite number (bool, int, float, numpy scalars), else raise."""
    if not isinstance(value, numbers.Real):
        raise TypeError(f"returned {value!r} ({type(value).__name__}), not a number")
    reward = float(value)
    if not math.isfinite(reward):
        raise ValueError(f"returned a non-finite value {reward!r}")
    return reward


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


# ---- registry -----------------------------------------------------------------------------------

_REGISTRY: dict[str, RewardFn] = {
    # Ours and covered by tests, so they skip the probe (which for `code` would start a subprocess
    # at import time).
    "digit": digit_reward,
    "exact_match": exact_match_reward,
    "arithmetic": arithmetic_reward,
    "countdown": countdown_reward,
    "code": code_reward,
}


def names() -> list[str]:
    """Reward names a config may use: the registered ones and the installed `raygrpo.rewards` plugins."""
    from grpo.plugins import REWARDS, installed

    return sorted(set(_REGISTRY) | set(installed(REWARDS)))


def validate(fn: RewardFn, name: str, *, timeout_s: float = 10.0) -> None:
    """Raise RewardError naming `name` unless fn(*PROBE) returns a real finite number in time."""
    if not callable(fn):
        raise RewardError(f"reward {name!r} is {type(fn).__name__}, not a callable")
    outcome = _call(fn, PROBE, timeout_s)
    if outcome.timed_out:
        raise RewardError(f"reward {name!r} did not return within {timeout_s}s on the probe {PROBE}")
    if outcome.error is not None:
        raise RewardError(f"reward {name!r} raised on the probe {PROBE}: {_describe(outcome.error)}")
    try:
        _as_reward(outcome.value)
    except (TypeError, ValueError) as exc:
        raise RewardError(
            f"reward {name!r} {exc} on the probe {PROBE}; it must return a finite real number"
        ) from None


def register(name: str, fn: RewardFn, *, replace: bool = False) -> None:
    """Make `fn` available under `name` (after `validate`). Re-registering needs `replace=True`."""
    if not name or ":" in name:
        raise RewardError(f"reward name {name!r}: must be non-empty and contain no ':'")
    if name in _REGISTRY and not replace and _REGISTRY[name] is not fn:
        raise RewardError(f"reward {name!r} is already registered; pass replace=True to override it")
    validate(fn, name)
    _REGISTRY[name] = fn


def resolve(spec: str) -> RewardFn:
    """The reward function for a registered name, an installed plugin's name (entry point group
    `raygrpo.rewards`) or a "package.module:function" path.

    Imported functions are validated with the probe call; registered ones already were.
    """
    if ":" not in spec:
        if spec in _REGISTRY:
            return _REGISTRY[spec]
        from grpo.plugins import REWARDS, installed

        plugin = installed(REWARDS).get(spec)
        if plugin is None:
            raise RewardError(f"unknown reward {spec!r}: use one of {names()} or 'package.module:function'")
        try:
            fn = plugin.load()
        except Exception as exc:
            raise RewardError(f"reward {spec!r}: the plugin {plugin.value!r} cannot be loaded: "
                              f"{_describe(exc)}") from exc
        validate(fn, spec)
        return fn
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise RewardError(f"reward {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises while importing
        raise RewardError(f"reward {spec!r}: cannot import {module_name!r}: {_describe(exc)}") from exc
    try:
        fn = functools.reduce(getattr, attr_path.split("."), module)
    except AttributeError:
        raise RewardError(f"reward {spec!r}: module {module_name!r} has no attribute {attr_path!r}") from None
    validate(fn, spec)
    return fn


# ---- reward source, run in the sandbox ---------------------------------------------------------

MAX_SOURCE_CHARS = 64 * 1024
"""longest reward source a config may carry"""

# main.py of a sandboxed scoring run: loads reward.py (the user's source) without importing it into any
# worker, scores items.json with a per-item alarm, and writes one JSON line per outcome to the results
# channel (fd 3; its stdout is the user's to print to). The run is one process per batch, killed at the
# batch's wall-clock bound; what it wrote before that still counts.
_HARNESS = r"""
import json, math, os, signal, sys

class _ItemTimeout(BaseException):
    pass

def _alarm(signum, frame):
    raise _ItemTimeout()

def _write(outcome):
    os.write(3, (json.dumps(outcome) + "\n").encode())

namespace = {"__name__": "reward_source"}
try:
    exec(compile(open("reward.py").read(), "reward.py", "exec"), namespace)
except BaseException as e:
    _write({"load_error": f"{type(e).__name__}: {e}"[:300]})
    sys.exit(0)
fn = namespace.get("reward")
if not callable(fn):
    _write({"load_error": "the source defines no function reward(prompt, completion, expected)"})
    sys.exit(0)
signal.signal(signal.SIGALRM, _alarm)
for prompt, completion, expected in json.load(open("items.json")):
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT)
    try:
        value = fn(prompt, completion, expected)
        signal.setitimer(signal.ITIMER_REAL, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _write(["error", f"TypeError: returned {type(value).__name__}, not a number"])
        elif not math.isfinite(float(value)):
            _write(["error", f"ValueError: returned {value!r}, not a finite number"])
        else:
            _write(["ok", float(value)])
    except _ItemTimeout:
        _write(["timeout", None])
    except BaseException as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _write(["error", f"{type(e).__name__}: {e}"[:300]])
"""


def compile_untrusted(source: str) -> None:
    """RewardError unless `source` (a caller's reward) is within the size limit and compiles. Compiling runs
    nothing of it; this is all the API does with caller code before a sandbox scores the probe."""
    if not source.strip():
        raise RewardError("reward_source: empty")
    if len(source) > MAX_SOURCE_CHARS:
        raise RewardError(f"reward_source: {len(source)} characters, more than {MAX_SOURCE_CHARS}")
    try:
        compile(source, "reward.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:  # ValueError: a NUL byte
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
        raise RewardError(f"reward_source: {type(e).__name__}: {getattr(e, 'msg', None) or e}{where}") from None


class SandboxedReward:
    """A reward given as Python source that defines `reward(prompt, completion, expected) -> float`.

    The source never runs in a worker: each batch is scored by one bubblewrap sandbox run (grpo/sandbox.py:
    every namespace its own, a throwaway uid, only the Python runtime visible, rlimits), each item under
    `timeout_s` (an alarm), the whole batch under n x timeout_s + 5 s of wall clock, after which the
    sandbox is killed. Items it did not score count as timeouts. Where the sandbox cannot start, every
    call raises RewardError saying why: the source is refused, never run with less isolation.
    """

    def __init__(self, source: str, *, timeout_s: float = 10.0, memory_mb: int = 512):
        compile_untrusted(source)
        self.source, self.timeout_s, self.memory_mb = source, timeout_s, memory_mb

    def score_batch(self, items: list[tuple[str, str, str]]) -> ScoreResult:
        import json

        if not items:
            return ScoreResult(rewards=[], errors=0, timeouts=0, messages=[])
        try:
            run = run_python(_HARNESS.replace("TIMEOUT", repr(float(self.timeout_s))),
                             timeout_s=len(items) * self.timeout_s + 5.0, memory_mb=self.memory_mb,
                             files={"reward.py": self.source, "items.json": json.dumps([list(i) for i in items])},
                             results=True)
        except SandboxUnavailable as e:  # fail closed: the source is refused, never run with less isolation
            raise RewardError(f"reward_source: refused: {e}") from None
        results: list = []
        for line in (run.results or "").splitlines():
            try:
                outcome = json.loads(line)
            except ValueError:
                break  # a line cut by the kill (or garbage the source wrote): what came before stands
            if isinstance(outcome, dict) and "load_error" in outcome:
                raise RewardError(f"reward_source: {outcome['load_error']}")
            results.append(outcome)
        rewards: list[float] = []
        errors = timeouts = 0
        messages: list[str] = []
        for i in range(len(items)):
            kind, value = (results[i] + [None, None])[:2] if i < len(results) and isinstance(results[i], list) \
                else ("timeout" if run.timed_out else "error", None)
            if kind == "ok" and isinstance(value, (int, float)) and math.isfinite(value):
                rewards.append(float(value))
                continue
            rewards.append(0.0)
            if kind == "timeout":
                timeouts += 1
                message = f"TimeoutError: reward_source took longer than {self.timeout_s}s"
            else:
                errors += 1
                message = str(value) if kind == "error" and value else (
                    f"the sandbox ended without scoring (exit {run.returncode}): {run.stderr[-200:]}")
            if len(messages) < MAX_MESSAGES:
                messages.append(message)
        return ScoreResult(rewards=rewards, errors=errors, timeouts=timeouts, messages=messages)

    def validate(self) -> None:
        """RewardError unless the source loads and scores the probe with a finite number."""
        result = self.score_batch([PROBE])
        if result.timeouts:
            raise RewardError(f"reward_source: did not return within {self.timeout_s}s on the probe {PROBE}")
        if result.errors:
            raise RewardError(f"reward_source: failed on the probe {PROBE}: {result.messages[0]}")

    def __call__(self, prompt: str, completion: str, expected: str) -> float:
        """One item (evaluation); failures score 0.0, as in training."""
        return self.score_batch([(prompt, completion, expected)]).rewards[0]


def probe_reward_source(source: str, timeout_s: float) -> None:
    """RewardError unless `source` compiles, loads and scores the probe with a finite number, in the sandbox."""
    SandboxedReward(source, timeout_s=timeout_s).validate()


# ---- the worker ---------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    """Rewards for one batch, in input order, and what went wrong while computing them."""

    rewards: list[float]
    errors: int
    """items whose call raised or returned something other than a finite number (scored 0.0)"""
    timeouts: int
    """items whose call ran past the timeout (scored 0.0)"""
    messages: list[str]
    """up to MAX_MESSAGES short descriptions of the failures, e.g. "ValueError: ..." """


class RewardWorker:
    """Scores (prompt, completion, expected) triples with one reward function, failures contained.

    A plain class so it can be tested without Ray; the engine builds `ray.remote(RewardWorker)`.
    Items are scored one after another: parallelism comes from several workers in an ActorPool.
    """

    def __init__(self, spec: str, timeout_s: float = 10.0, source: str | None = None):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.spec = spec
        self.timeout_s = timeout_s
        self.sandboxed = SandboxedReward(source, timeout_s=timeout_s) if source else None
        # fails here, at start-up, rather than on the first batch
        self.fn = resolve(spec) if self.sandboxed is None else self.sandboxed
        if self.sandboxed is not None:
            self.sandboxed.validate()

    def score(self, items: list[tuple[str, str, str]]) -> ScoreResult:
        if self.sandboxed is not None:  # one sandbox process per batch
            return self.sandboxed.score_batch(items)
        rewards: list[float] = []
        errors = timeouts = 0
        messages: list[str] = []
        for prompt, completion, expected in items:
            outcome = _call(self.fn, (prompt, completion, expected), self.timeout_s)
            failure: str | None = None
            if outcome.timed_out:
                timeouts += 1
                failure = f"TimeoutError: reward {self.spec!r} took longer than {self.timeout_s}s"
            elif outcome.error is not None:
                errors += 1
                failure = _describe(outcome.error)
            else:
                try:
                    rewards.append(_as_reward(outcome.value))
                except (TypeError, ValueError) as exc:
                    errors += 1
                    failure = _describe(exc)
            if failure is not None:
                rewards.append(0.0)
                if len(messages) < MAX_MESSAGES:
                    messages.append(failure)
        return ScoreResult(rewards=rewards, errors=errors, timeouts=timeouts, messages=messages)
