"""Prompt sets: the built-in tasks, the JSONL loader, and deterministic per-step batches.

A task is a list of `Sample(prompt, expected)` split into train and eval, plus the name of the
reward function in grpo.rewards that checks it. Built-ins, from smallest to largest:
  digit      "digit 7:" -> "7"; ten prompts, learnable by a random tiny model in a few steps (tests)
  arithmetic "12+7=" -> "19"; every small +, -, * problem, shuffled by seed, eval held out
  countdown  "numbers 3 5 7 target 22:" -> "3 5 7|22"; reach the target with + - * / (always solvable)
  code       write a small Python function; `expected` is the assert-based test code
  jsonl      your own file of {"query", "expected_outcome"} rows, or {"messages": [...], "expected_outcome"}
Not covered: tokenisation, prompt templates and chat formatting (the rollout side owns those).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

TASKS = ("digit", "arithmetic", "countdown", "code", "jsonl")
"""names `load_dataset` accepts"""

COUNTDOWN_TRAIN_SIZE = 2000
"""countdown training instances (the eval instances come on top, all distinct)"""


@dataclass(frozen=True)
class Sample:
    prompt: str
    expected: str
    """what the reward function compares the completion with (an answer, a key, or test code)"""
    messages: tuple[tuple[str, str], ...] | None = None
    """the conversation the policy is prompted with, as (role, content) pairs, when the row gave OpenAI-style
    messages; `prompt` is then its last user turn, which is what rewards and stored trajectories see"""

    @property
    def input(self) -> str | tuple[tuple[str, str], ...]:
        """What the policy is prompted with: the messages when there are some, else the prompt text."""
        return self.messages if self.messages is not None else self.prompt


@dataclass
class Dataset:
    name: str
    train: list[Sample]
    eval: list[Sample]
    reward: str
    """name of this task's default reward function in grpo.rewards"""

    def batch(self, step: int, n: int, seed: int, round: int = 0) -> list[Sample]:
        """The `n` training prompts of optimizer step `step`: a pure function of (seed, step, round).

        Without replacement when the train set is large enough, so a step sees n distinct prompts;
        with replacement otherwise. Being a function of the step (not a stateful iterator) is what
        makes resuming from a checkpoint replay exactly the prompts the run would have seen. `round` > 0
        draws the extra prompts dynamic sampling asks for when it dropped flat groups.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if not self.train:
            raise ValueError(f"dataset {self.name!r} has no training samples")
        key = f"batch:{seed}:{step}" + (f":{round}" if round else "")
        rng = random.Random(key)  # str seeds hash stably across processes
        if n > len(self.train):
            return rng.choices(self.train, k=n)
        return rng.sample(self.train, n)


# ---- digit ----------------------------------------------------------------------------------------


def _digit(eval_size: int) -> Dataset:
    samples = [Sample(prompt=f"digit {d}:", expected=str(d)) for d in range(10)]
    # Ten prompts cannot be split; eval is the same prompts, repeated to the requested size.
    eval_set = [samples[i % len(samples)] for i in range(eval_size)]
    return Dataset(name="digit", train=samples, eval=eval_set, reward="digit")


# ---- arithmetic -----------------------------------------------------------------------------------


def _arithmetic_problems() -> list[Sample]:
    """Every problem in the task, in a fixed order: a+b, a-b (a >= b) for a, b < 50; a*b for a, b <= 12."""
    problems = [Sample(f"{a}+{b}=", str(a + b)) for a in range(50) for b in range(50)]
    problems += [Sample(f"{a}-{b}=", str(a - b)) for a in range(50) for b in range(a + 1)]
    problems += [Sample(f"{a}*{b}=", str(a * b)) for a in range(13) for b in range(13)]
    return problems  # 3,944 distinct prompts


def _arithmetic(eval_size: int, seed: int) -> Dataset:
    problems = _arithmetic_problems()
    if eval_size > len(problems) // 2:
        raise ValueError(f"eval_size: at most {len(problems) // 2} for arithmetic, got {eval_size}")
    random.Random(f"arithmetic:{seed}").shuffle(problems)
    # Prompts are distinct, so slicing one shuffled list makes eval disjoint from train.
    return Dataset(
        name="arithmetic", train=problems[eval_size:], eval=problems[:eval_size], reward="arithmetic"
    )


# ---- countdown ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CountdownInstance:
    numbers: tuple[int, ...]
    target: int
    solution: str
    """an expression over exactly `numbers` that equals `target` (how the instance was built)"""

    def sample(self) -> Sample:
        shown = " ".join(map(str, self.numbers))
        return Sample(prompt=f"numbers {shown} target {self.target}:", expected=f"{shown}|{self.target}")


def _countdown_instance(rng: random.Random) -> CountdownInstance:
    """Build a random expression over 3-4 numbers in 1..10; its value is the target.

    Building the answer first is what guarantees every instance is solvable. Classic countdown
    rules apply to every intermediate result: non-negative integers, exact division only.
    """
    while True:
        numbers = tuple(rng.randint(1, 10) for _ in range(rng.choice((3, 4))))
        parts = [(str(n), Fraction(n)) for n in numbers]  # (expression text, exact value)
        while len(parts) > 1:
            i, j = rng.sample(range(len(parts)), 2)
            (left, a), (right, b) = parts[i], parts[j]
            op = rng.choice("+-*/")
            if (op == "-" and a < b) or (op == "/" and (b == 0 or a % b != 0)):
                op = "+"  # keep the rules rather than resample: the mix of ops still varies
            if op == "+":
                value = a + b
            elif op == "-":
                value = a - b
            elif op == "*":
                value = a * b
            else:
                value = a / b
            parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [(f"({left} {op} {right})", value)]
        expression, value = parts[0]
        if 1 <= value <= 100:  # small targets keep the task about search, not big multiplications
            return CountdownInstance(numbers=numbers, target=int(value), solution=expression[1:-1])


def countdown_instances(n: int, seed: int) -> list[CountdownInstance]:
    """`n` countdown instances with pairwise distinct prompts, deterministic in `seed`."""
    rng = random.Random(f"countdown:{seed}")
    seen: set[tuple[tuple[int, ...], int]] = set()
    out: list[CountdownInstance] = []
    while len(out) < n:
        inst = _countdown_instance(rng)
        if (inst.numbers, inst.target) not in seen:
            seen.add((inst.numbers, inst.target))
            out.append(inst)
    return out


def _countdown(eval_size: int, seed: int) -> Dataset:
    samples = [inst.sample() for inst in countdown_instances(COUNTDOWN_TRAIN_SIZE + eval_size, seed)]
    return Dataset(name="countdown", train=samples[eval_size:], eval=samples[:eval_size], reward="countdown")


# ---- code -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeProblem:
    prompt: str
    tests: str
    """assert-based test code appended to the completion"""
    reference: str
    """a correct solution, so the tests themselves can be tested"""

    def sample(self) -> Sample:
        return Sample(prompt=self.prompt, expected=self.tests)


def _code_problem(name_sig: str, task: str, tests: list[str], reference: str) -> CodeProblem:
    prompt = f"# Write a Python function `{name_sig}` that {task}.\n"
    return CodeProblem(prompt=prompt, tests="\n".join(tests) + "\n", reference=reference)


CODE_PROBLEMS: tuple[CodeProblem, ...] = (
    _code_problem(
        "add(a, b)",
        "returns the sum of a and b",
        ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"],
        "def add(a, b):\n    return a + b\n",
    ),
    _code_problem(
        "is_even(n)",
        "returns True if the integer n is even and False otherwise",
        ["assert is_even(4) is True", "assert is_even(7) is False", "assert is_even(0) is True"],
        "def is_even(n):\n    return n % 2 == 0\n",
    ),
    _code_problem(
        "reverse_string(s)",
        "returns the string s reversed",
        ["assert reverse_string('abc') == 'cba'", "assert reverse_string('') == ''"],
        "def reverse_string(s):\n    return s[::-1]\n",
    ),
    _code_problem(
        "factorial(n)",
        "returns n! for a non-negative integer n",
        ["assert factorial(0) == 1", "assert factorial(1) == 1", "assert factorial(5) == 120"],
        "def factorial(n):\n    result = 1\n    for k in range(2, n + 1):\n        result *= k\n    return result\n",
    ),
    _code_problem(
        "max_of_list(xs)",
        "returns the largest element of the non-empty list xs without using max()",
        [
            "assert max_of_list([3, 1, 2]) == 3",
            "assert max_of_list([-5, -2]) == -2",
            "assert max_of_list([7]) == 7",
        ],
        "def max_of_list(xs):\n    best = xs[0]\n    for x in xs[1:]:\n        if x > best:\n            best = x\n"
        "    return best\n",
    ),
    _code_problem(
        "count_vowels(s)",
        "returns how many of the characters of s are vowels (a, e, i, o, u, either case)",
        [
            "assert count_vowels('hello') == 2",
            "assert count_vowels('xyz') == 0",
            "assert count_vowels('AEIOU') == 5",
        ],
        "def count_vowels(s):\n    return sum(ch in 'aeiouAEIOU' for ch in s)\n",
    ),
    _code_problem(
        "is_palindrome(s)",
        "returns True if the string s reads the same forwards and backwards",
        [
            "assert is_palindrome('racecar') is True",
            "assert is_palindrome('ab') is False",
            "assert is_palindrome('') is True",
        ],
        "def is_palindrome(s):\n    return s == s[::-1]\n",
    ),
    _code_problem(
        "fizzbuzz(n)",
        "returns 'Fizz' for multiples of 3, 'Buzz' for multiples of 5, 'FizzBuzz' for both, else str(n)",
        [
            "assert fizzbuzz(3) == 'Fizz'",
            "assert fizzbuzz(10) == 'Buzz'",
            "assert fizzbuzz(30) == 'FizzBuzz'",
            "assert fizzbuzz(7) == '7'",
        ],
        "def fizzbuzz(n):\n    if n % 15 == 0:\n        return 'FizzBuzz'\n    if n % 3 == 0:\n        return 'Fizz'\n"
        "    if n % 5 == 0:\n        return 'Buzz'\n    return str(n)\n",
    ),
)


def _code(eval_size: int) -> Dataset:
    samples = [p.sample() for p in CODE_PROBLEMS]
    # Too few problems to hold any out: eval is the same problems (each once), up to eval_size.
    return Dataset(name="code", train=samples, eval=samples[:eval_size], reward="code")


# ---- jsonl ----------------------------------------------------------------------------------------

_QUERY_KEYS = ("query", "prompt", "question")
_EXPECTED_KEYS = ("expected_outcome", "answer", "expected")


def _field(row: dict, keys: tuple[str, ...], where: str) -> str:
    """The first of `keys` present in `row`, as a non-empty string; ValueError naming it otherwise."""
    key = next((k for k in keys if k in row), None)
    aliases = ", ".join(repr(k) for k in keys[1:])
    if key is None:
        raise ValueError(f"{where}: missing field {keys[0]!r} (or an alias: {aliases})")
    value = row[key]
    # Numeric answers ({"answer": 42}) are common in math sets; bools are almost surely a mistake.
    if key in _EXPECTED_KEYS and isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def read_jsonl(path: str | Path) -> list[Sample]:
    """Rows of {"query": ..., "expected_outcome": ...} as Samples, in file order.

    Accepts the aliases "prompt"/"question" and "answer"/"expected" (numbers become strings);
    blank lines are skipped. The first bad row raises ValueError naming the file, line and field.
    """
    samples: list[Sample] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}: not UTF-8 ({exc.reason})") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            expected = _field(row, _EXPECTED_KEYS, where)
            if "messages" in row:
                messages = parse_messages(row["messages"], f"{where}: field 'messages'")
                samples.append(Sample(prompt=last_user_turn(messages), expected=expected, messages=messages))
            else:
                samples.append(Sample(prompt=_field(row, _QUERY_KEYS, where), expected=expected))
    return samples


ROLES = ("system", "user", "assistant", "tool")


def parse_messages(value: object, where: str) -> tuple[tuple[str, str], ...]:
    """OpenAI-style [{"role", "content"}, ...] as (role, content) pairs; ValueError naming `where` otherwise.
    A prompt conversation must end with a user turn (the policy answers it)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}[{i}] must be {{\"role\": one of {', '.join(ROLES)}, \"content\": a string}}")
        out.append((m["role"], m["content"]))
    if out[-1][0] != "user":
        raise ValueError(f"{where} must end with a user turn, got {out[-1][0]!r}")
    return tuple(out)


def last_user_turn(messages: tuple[tuple[str, str], ...]) -> str:
    return next(content for role, content in reversed(messages) if role == "user")


def _jsonl(dataset_path: str | None, eval_size: int, eval_path: str | None = None) -> Dataset:
    if dataset_path is None:
        raise ValueError("dataset_path: required for task 'jsonl'")
    rows = read_jsonl(dataset_path)
    if not rows:
        raise ValueError(f"{dataset_path}: no rows")
    if eval_path is not None:  # a separate held-out file: train on every row of the dataset
        return Dataset(name="jsonl", train=rows, eval=read_jsonl(eval_path)[:eval_size], reward="exact_match")
    # Hold out the tail, at most a fifth of the file; with under 5 rows nothing can be spared.
    held_out = min(eval_size, len(rows) // 5)
    if held_out == 0:
        return Dataset(name="jsonl", train=rows, eval=[], reward="exact_match")
    return Dataset(name="jsonl", train=rows[:-held_out], eval=rows[-held_out:], reward="exact_match")


def load_dataset(
    task: str, *, dataset_path: str | None = None, eval_size: int = 32, seed: int = 0,
    eval_path: str | None = None,
) -> Dataset:
    """The named task's train/eval split. Deterministic in (task, dataset file, eval_size, seed)."""
    if eval_size < 0:
        raise ValueError(f"eval_size must be >= 0, got {eval_size}")
    if dataset_path is not None and task != "jsonl":
        raise ValueError(f"dataset_path is only used with task 'jsonl', not {task!r}")
    if task == "digit":
        return _digit(eval_size)
    if task == "arithmetic":
        return _arithmetic(eval_size, seed)
    if task == "countdown":
        return _countdown(eval_size, seed)
    if task == "code":
        return _code(eval_size)
    if task == "jsonl":
        return _jsonl(dataset_path, eval_size, eval_path)
    if eval_path is not None:
        raise ValueError(f"eval_path is only used with task 'jsonl', not {task!r}")
    raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
