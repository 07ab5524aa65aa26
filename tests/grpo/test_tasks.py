"""Built-in tasks and the JSONL loader: determinism, held-out eval sets, answer keys that verify."""

from __future__ import annotations

import json
import re

import pytest

from grpo.rewards import resolve
from grpo.tasks import (
    CODE_PROBLEMS,
    COUNTDOWN_TRAIN_SIZE,
    TASKS,
    Dataset,
    Sample,
    countdown_instances,
    load_dataset,
    read_jsonl,
)

BUILT_IN = [t for t in TASKS if t != "jsonl"]


def write_jsonl(path, rows):
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8"
    )
    return path


# ---- built-in tasks -------------------------------------------------------------------------------


@pytest.mark.parametrize("task", BUILT_IN)
def test_same_seed_same_dataset(task):
    a = load_dataset(task, eval_size=16, seed=3)
    b = load_dataset(task, eval_size=16, seed=3)
    assert a == b
    assert a.name == task and a.reward == task
    assert a.train and all(isinstance(s, Sample) for s in a.train + a.eval)


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
def test_seed_changes_the_split_and_eval_is_held_out(task):
    a = load_dataset(task, eval_size=32, seed=0)
    b = load_dataset(task, eval_size=32, seed=1)
    assert a.train != b.train
    assert len(a.eval) == 32
    assert not {s.prompt for s in a.eval} & {s.prompt for s in a.train}
    assert len({s.prompt for s in a.train}) == len(a.train)  # no duplicate prompts either


def test_digit_prompts_and_repeated_eval():
    d = load_dataset("digit", eval_size=25)
    assert [s.prompt for s in d.train] == [f"digit {i}:" for i in range(10)]
    assert [s.expected for s in d.train] == [str(i) for i in range(10)]
    assert len(d.eval) == 25 and d.eval[:10] == d.train and d.eval[20] == d.train[0]


def test_arithmetic_size_and_format():
    d = load_dataset("arithmetic", eval_size=32)
    assert len(d.train) + len(d.eval) > 3000
    apply = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for s in d.train[:200]:
        match = re.fullmatch(r"(\d+)([+*-])(\d+)=", s.prompt)
        assert match, s.prompt
        a, op, b = match.groups()
        assert int(s.expected) == apply[op](int(a), int(b))


def test_countdown_format():
    d = load_dataset("countdown", eval_size=8)
    assert len(d.train) == COUNTDOWN_TRAIN_SIZE
    s = d.train[0]
    numbers, target = s.expected.split("|")
    assert s.prompt == f"numbers {numbers} target {target}:"


def test_every_countdown_instance_is_solved_by_its_solution():
    score = resolve("countdown")
    instances = countdown_instances(COUNTDOWN_TRAIN_SIZE + 32, seed=0)
    assert [i.sample() for i in instances[32:]] == load_dataset("countdown", eval_size=32).train
    for inst in instances:
        assert score(inst.sample().prompt, inst.solution, inst.sample().expected) == 1.0, inst
    assert score(instances[0].sample().prompt, "1 + 1", instances[0].sample().expected) < 1.0


def test_code_task_has_enough_problems():
    d = load_dataset("code", eval_size=4)
    assert len(d.train) >= 6 and len(d.eval) == 4
    assert all("assert" in s.expected for s in d.train)


# ---- every answer key verifies with its own reward ------------------------------------------------


COUNTDOWN_SOLUTIONS = {i.sample(): i.solution for i in countdown_instances(COUNTDOWN_TRAIN_SIZE + 32, seed=0)}


def right_and_wrong(task: str, sample: Sample) -> tuple[str, str]:
    """A completion that should score 1.0 and one that should not, for one sample of `task`."""
    if task == "digit":
        wrong = "0" if sample.expected != "0" else "1"
        return sample.expected * 6, wrong * 6
    if task == "arithmetic":
        return sample.expected, str(int(sample.expected) + 1)
    if task == "countdown":
        solution = COUNTDOWN_SOLUTIONS[sample]
        return solution, f"{solution} + 1"
    raise AssertionError(task)


@pytest.mark.parametrize("task", ["digit", "arithmetic", "countdown"])
def test_expected_answers_score_one_and_wrong_ones_less(task):
    d = load_dataset(task, eval_size=32)
    score = resolve(d.reward)
    for sample in d.train[:5] + d.eval[:5]:
        right, wrong = right_and_wrong(task, sample)
        assert score(sample.prompt, right, sample.expected) == 1.0
        assert score(sample.prompt, wrong, sample.expected) < 1.0


def test_code_references_pass_and_wrong_code_fails():
    score = resolve(load_dataset("code").reward)
    for problem in CODE_PROBLEMS:
        assert score(problem.prompt, problem.reference, problem.tests) == 1.0, problem.prompt
    add = CODE_PROBLEMS[0]
    assert score(add.prompt, "def add(a, b):\n    return a - b\n", add.tests) == 0.0


# ---- batches --------------------------------------------------------------------------------------


def test_batch_is_a_function_of_seed_and_step():
    d = load_dataset("arithmetic", eval_size=8)
    assert d.batch(5, 16, seed=0) == d.batch(5, 16, seed=0)
    assert d.batch(5, 16, seed=0) != d.batch(6, 16, seed=0)
    assert d.batch(5, 16, seed=0) != d.batch(5, 16, seed=1)
    batch = d.batch(0, 64, seed=0)
    assert len(set(batch)) == 64  # without replacement
    assert set(batch) <= set(d.train)


def test_batch_larger_than_train_samples_with_replacement():
    d = load_dataset("digit")
    batch = d.batch(0, 25, seed=0)
    assert len(batch) == 25 and set(batch) <= set(d.train)
    assert d.batch(0, 0, seed=0) == []
    with pytest.raises(ValueError, match="n must be"):
        d.batch(0, -1, seed=0)
    with pytest.raises(ValueError, match="no training samples"):
        Dataset(name="empty", train=[], eval=[], reward="exact_match").batch(0, 1, seed=0)


# ---- jsonl ----------------------------------------------------------------------------------------


def test_jsonl_rows_aliases_and_blank_lines(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"query": "q1", "expected_outcome": "a1"},
            "",
            {"prompt": "q2", "answer": "a2"},
            {"question": "q3", "expected": "a3", "extra": 1},
            {"query": "q4", "answer": 42},
            "   ",
        ],
    )
    assert read_jsonl(path) == [
        Sample("q1", "a1"),
        Sample("q2", "a2"),
        Sample("q3", "a3"),
        Sample("q4", "42"),
    ]


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ('{"expected_outcome": "x"}', "missing field 'query'"),
        ('{"query": "x"}', "missing field 'expected_outcome'"),
        ('{"query": "", "answer": "x"}', "field 'query' must be a non-empty string"),
        ('{"query": 3, "answer": "x"}', "field 'query' must be a non-empty string"),
        ('{"prompt": "x", "answer": true}', "field 'answer' must be a non-empty string"),
        ('{"query": "x", "answer": ', "invalid JSON"),
        ('["x", "y"]', "expected a JSON object"),
    ],
)
def test_jsonl_bad_row_names_file_line_and_field(tmp_path, bad_row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"query": "ok", "answer": "ok"}, "", bad_row])
    with pytest.raises(ValueError, match=message) as info:
        read_jsonl(path)
    assert f"{path}:3:" in str(info.value)


def test_jsonl_holds_out_the_tail(tmp_path):
    rows = [{"query": f"q{i}", "answer": str(i)} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    d = load_dataset("jsonl", dataset_path=str(path), eval_size=32)
    assert d.reward == "exact_match"
    assert [s.prompt for s in d.eval] == ["q16", "q17", "q18", "q19"]  # 20 // 5 rows
    assert len(d.train) == 16
    d = load_dataset("jsonl", dataset_path=str(path), eval_size=2)
    assert [s.prompt for s in d.eval] == ["q18", "q19"] and len(d.train) == 18


def test_jsonl_small_file_keeps_everything_for_training(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": f"q{i}", "answer": "a"} for i in range(4)])
    d = load_dataset("jsonl", dataset_path=str(path))
    assert len(d.train) == 4 and d.eval == []


def test_load_dataset_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="dataset_path"):
        load_dataset("jsonl")
    with pytest.raises(ValueError, match="no rows"):
        load_dataset("jsonl", dataset_path=str(write_jsonl(tmp_path / "e.jsonl", [""])))
    with pytest.raises(ValueError, match="only used with task 'jsonl'"):
        load_dataset("digit", dataset_path="x.jsonl")
    with pytest.raises(ValueError, match="digit, arithmetic, countdown, code, jsonl"):
        load_dataset("chess")
