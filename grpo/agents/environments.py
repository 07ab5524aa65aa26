"""Agent environments: the interface, the tool-call format, and the built-in tool tasks.

An environment is one episode of an agent task, isolated per trajectory (a fresh instance each):

    env = make_environment(spec)              # "calculator" | "python" | "search" | "module:Class"
    first = await env.reset(sample)           # the first observation: the prompt text
    result = await env.step(Action(text, token_ids))   # -> StepResult(observation, reward, done, info)

Token-in/token-out: the rollout worker (grpo.agents.episodes) hands the environment the action as the
decoded text *and* the exact token ids it sampled, and appends the observation's tokens (the env's
`observation_ids` if it gives them, else the observation text tokenised once) to the trajectory. The
trainer trains on those very ids; nothing is re-tokenised from decoded text.

Tool calls (`ToolEnvironment`): an action that contains `<tool>...</tool>` (or `<tool_call>...</tool_call>`,
the tags of chat templates that take `tools=`) calls a tool. Inside the
tags is one JSON object `{"name": "<tool>", "arguments": {...}}`, parsed strictly (`parse_tool_call`):
no other keys, arguments an object, nothing after `</tool>`. An action without `<tool>` is the final
answer and ends the episode with the outcome reward. A malformed call, an unknown tool, a tool that
raises or one that exceeds `tool_timeout_s` gives an observation that tells the model what went wrong;
the episode continues. The tool's answer comes back as the observation turn `\\n<result>...</result>\\n`
(or the tokenizer's tool turn with `chat_template`).

Built-ins, each bringing its own samples and a demonstration (for the engine's supervised warm-up):
  calculator  two-digit arithmetic; tool `calc` {"expr": "12*7"}
  python      the code task's problems; tools `python` {"code"} and `test` {"code"} in grpo.sandbox
  search      questions about a small invented corpus shipped in grpo/agents/data/corpus.jsonl; tool `search`
Not here: generation, batching and masks (grpo.agents.episodes), reward shaping and credit (grpo.loss).
"""

from __future__ import annotations

import ast
import asyncio
import functools
import importlib
import inspect
import json
import operator
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from grpo.tasks import CODE_PROBLEMS, Dataset, Sample

TOOL_OPEN, TOOL_CLOSE = "<tool>", "</tool>"
TEMPLATE_TOOL_OPEN, TEMPLATE_TOOL_CLOSE = "<tool_call>", "</tool_call>"
"""the call tags of chat templates that take `tools=` (Qwen2.5, Hermes): accepted as well as ours"""
TOOL_TAGS = ((TOOL_OPEN, TOOL_CLOSE), (TEMPLATE_TOOL_OPEN, TEMPLATE_TOOL_CLOSE))
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
MAX_OBSERVATION_CHARS = 2000
"""tool output beyond this is cut (and says so): an observation must not eat the token budget"""


@dataclass(frozen=True)
class Action:
    """What the policy produced in one turn: the decoded text and the exact sampled token ids."""

    text: str
    token_ids: tuple[int, ...] = ()


@dataclass
class StepResult:
    observation: str
    """text appended to the trajectory as a non-policy turn ('' when done)"""
    reward: float = 0.0
    """this step's reward; on the final step, the outcome reward"""
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    """`tool` (name called), `error` (what went wrong), `verified` (the step checked the work), ..."""
    observation_ids: list[int] | None = None
    """the observation's token ids, when the environment tokenises itself (token-out)"""


@runtime_checkable
class Environment(Protocol):
    """One episode. Both methods may be plain or `async`; the rollout awaits either kind."""

    def reset(self, sample: Sample) -> str | Awaitable[str]:
        """Start the episode for `sample`; return the first observation (the prompt). Must depend
        on the sample only: the G trajectories of a group share their prompt's KV cache."""
        ...

    def step(self, action: Action) -> StepResult | Awaitable[StepResult]: ...


async def maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


# ---- the tool-call format -------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


class ToolCallError(ValueError):
    """A malformed tool call; the message is shown to the model as the observation."""


def parse_tool_call(text: str) -> ToolCall | None:
    """The tool call in an action, None if there is none (the action is an answer).

    Strict: exactly one `<tool>{json}</tool>` at the end of the action (text before it is allowed,
    e.g. reasoning), the JSON an object with exactly the keys "name" (a non-empty string) and
    "arguments" (an object). Anything else raises ToolCallError with a message for the model.
    `<tool_call>...</tool_call>`, what chat templates that take `tools=` teach (Qwen2.5, Hermes), is read
    the same way.
    """
    found = [(text.index(o), o, c) for o, c in TOOL_TAGS if o in text]
    if not found:
        return None
    start, tool_open, tool_close = min(found)
    end = text.find(tool_close, start)
    if end < 0:
        raise ToolCallError(f"tool call not closed: expected {tool_close}")
    if text[end + len(tool_close):].strip():
        raise ToolCallError(f"text after {tool_close}: a tool call must end the turn")
    body = text[start + len(tool_open):end]
    if any(o in body for o, _ in TOOL_TAGS):
        raise ToolCallError("one tool call per turn")
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise ToolCallError(f"tool call is not valid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict) or set(obj) != {"name", "arguments"}:
        raise ToolCallError('tool call must be {"name": ..., "arguments": {...}} with no other keys')
    if not isinstance(obj["name"], str) or not obj["name"]:
        raise ToolCallError("tool call: name must be a non-empty string")
    if not isinstance(obj["arguments"], dict):
        raise ToolCallError("tool call: arguments must be a JSON object")
    return ToolCall(obj["name"], obj["arguments"])


def format_tool_call(name: str, **arguments: Any) -> str:
    """The canonical text of a tool call (what demonstrations use)."""
    return TOOL_OPEN + json.dumps({"name": name, "arguments": arguments}, separators=(",", ":")) + TOOL_CLOSE


# ---- tools ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """A named function of keyword arguments returning text; sync functions run in a thread."""

    name: str
    description: str
    parameters: dict[str, str]
    """argument name -> short description; exactly these arguments are accepted"""
    fn: Callable[..., str | Awaitable[str]]

    def describe(self) -> str:
        args = ", ".join(f'"{k}": {v}' for k, v in self.parameters.items())
        return f"- {self.name}: {self.description}. arguments: {{{args}}}"

    def spec(self) -> dict[str, Any]:
        """The tool as an OpenAI function spec, for a chat template's `tools=`."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "required": list(self.parameters),
                           "properties": {k: {"type": "string", "description": v} for k, v in self.parameters.items()}},
        }}


class ToolEnvironment:
    """An environment where the model calls tools and then answers; subclasses give the tools,
    the outcome reward and (optionally) a dataset and a demonstration.

    `tools` (names) restricts the tools offered; `instructions` puts the tool list and the call
    format before the question (real models need it; a tiny model learning the format from a
    warm-up does not); `tool_timeout_s` bounds one tool call.
    """

    name: ClassVar[str] = "tools"

    def __init__(self, *, tools: list[str] | None = None, instructions: bool = True,
                 tool_timeout_s: float = 10.0) -> None:
        available = {t.name: t for t in self.make_tools()}
        unknown = sorted(set(tools or ()) - set(available))
        if unknown:
            raise ValueError(f"tools: {', '.join(unknown)} not offered by {self.name!r} "
                             f"(it has {', '.join(sorted(available))})")
        self.tools = {k: v for k, v in available.items() if tools is None or k in tools}
        self.instructions = instructions
        self.tool_timeout_s = tool_timeout_s
        self.sample: Sample | None = None
        self._last_info: dict[str, Any] = {}  # extra step info a tool leaves (e.g. `verified`)

    # -- what subclasses provide ----------------------------------------------------------------
    def make_tools(self) -> list[Tool]:
        raise NotImplementedError

    def outcome(self, answer: str) -> float:
        """The outcome reward of the final answer for `self.sample`."""
        raise NotImplementedError

    @classmethod
    def load_dataset(cls, eval_size: int, seed: int) -> Dataset:
        raise NotImplementedError(f"environment {cls.name!r} has no built-in samples: give a dataset")

    @classmethod
    def demonstration(cls, sample: Sample) -> list[str]:
        """A good sequence of actions for `sample` (tool calls, then the answer)."""
        raise NotImplementedError(f"environment {cls.name!r} has no demonstrations for the warm-up")

    def tool_specs(self) -> list[dict[str, Any]]:
        """The offered tools as OpenAI function specs (what a chat template that takes `tools=` renders)."""
        return [t.spec() for t in self.tools.values()]

    # -- the episode ----------------------------------------------------------------------------
    def reset(self, sample: Sample) -> str:
        self.sample = sample
        if not self.instructions:
            return sample.prompt
        tools = "\n".join(t.describe() for t in self.tools.values())
        return (f"You can call tools. To call one, end your turn with {TOOL_OPEN}"
                f'{{"name": NAME, "arguments": {{...}}}}{TOOL_CLOSE}. Tools:\n{tools}\n'
                f"Reply without a tool call to give your final answer.\n\n{sample.prompt}")

    async def step(self, action: Action) -> StepResult:
        try:
            call = parse_tool_call(action.text)
        except ToolCallError as e:
            return StepResult(f"error: {e}", info={"error": "malformed_tool_call"})
        if call is None:
            return StepResult("", reward=self.outcome(action.text), done=True, info={"answer": True})
        tool = self.tools.get(call.name)
        if tool is None:
            return StepResult(f"error: unknown tool {call.name!r}; tools: {', '.join(self.tools)}",
                              info={"error": "unknown_tool", "tool": call.name})
        if set(call.arguments) != set(tool.parameters):
            return StepResult(f"error: {tool.name} takes arguments {sorted(tool.parameters)}",
                              info={"error": "bad_arguments", "tool": tool.name})
        self._last_info = {}
        try:
            value = await asyncio.wait_for(self._call(tool, call.arguments), timeout=self.tool_timeout_s)
        except TimeoutError:
            return StepResult(f"error: {tool.name} timed out after {self.tool_timeout_s:g}s",
                              info={"error": "tool_timeout", "tool": tool.name})
        except Exception as e:  # a tool's failure is the model's observation, never the run's crash
            return StepResult(f"error: {tool.name} failed: {type(e).__name__}: {str(e)[:200]}",
                              info={"error": "tool_error", "tool": tool.name})
        text = str(value)
        if len(text) > MAX_OBSERVATION_CHARS:
            text = text[:MAX_OBSERVATION_CHARS] + f"... [{len(text) - MAX_OBSERVATION_CHARS} chars cut]"
        info: dict[str, Any] = {"tool": tool.name, "tool_result": text}
        info.update(self._last_info)
        self._last_info = {}
        return StepResult(text, info=info)

    async def _call(self, tool: Tool, arguments: dict[str, Any]) -> str:
        if inspect.iscoroutinefunction(tool.fn):
            return await tool.fn(**arguments)
        # A sync tool runs in a thread so a slow one never blocks the other trajectories. A thread
        # cannot be killed: a hung sync tool keeps its thread until it returns (the episode moves on).
        return await asyncio.to_thread(tool.fn, **arguments)


# ---- calculator -----------------------------------------------------------------------------------

_OPS: dict[type, Callable[[Any, Any], Any]] = {ast.Add: operator.add, ast.Sub: operator.sub,
                                              ast.Mult: operator.mul, ast.Div: operator.truediv}
_INTEGER = re.compile(r"-?\d+")


def calculate(expr: str) -> str:
    """Exact value of an expression of integers, + - * / and parentheses (walked with `ast`, never eval)."""
    if not isinstance(expr, str) or not expr.strip() or len(expr) > 200:
        raise ValueError("expr must be a non-empty string of at most 200 characters")

    def value(node: ast.expr) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) < 10**12:
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"unsupported expression element: {type(node).__name__}")

    result = value(ast.parse(expr.strip(), mode="eval").body)
    return str(result.numerator) if result.denominator == 1 else str(float(result))


def first_integer_matches(answer: str, expected: str) -> float:
    match = _INTEGER.search(answer)
    return 1.0 if match is not None and match.group() == expected.strip() else 0.0


class CalculatorEnv(ToolEnvironment):
    """Two-digit arithmetic the model is to solve with the `calc` tool; reward 1 for the right number."""

    name = "calculator"

    def make_tools(self) -> list[Tool]:
        return [Tool("calc", "evaluate an arithmetic expression", {"expr": "string, e.g. \"12*7\""}, calculate)]

    def outcome(self, answer: str) -> float:
        assert self.sample is not None
        return first_integer_matches(answer, self.sample.expected)

    @classmethod
    def load_dataset(cls, eval_size: int, seed: int) -> Dataset:
        # Two-digit operands: too many products to memorise, trivial with the tool.
        problems = [Sample(f"{a}{op}{b}=", calculate(f"{a}{op}{b}")) for a in range(10, 100)
                    for b in range(10, 100) for op in "+*"]
        random.Random(f"calculator:{seed}").shuffle(problems)
        return Dataset(name="calculator", train=problems[eval_size:], eval=problems[:eval_size], reward="arithmetic")

    @classmethod
    def demonstration(cls, sample: Sample) -> list[str]:
        return [format_tool_call("calc", expr=sample.prompt.rstrip("=").strip()), sample.expected]


# ---- python sandbox -------------------------------------------------------------------------------


class PythonEnv(ToolEnvironment):
    """Write a function; `python` runs code in the sandbox, `test` runs it against the problem's tests
    (a verification step). The final answer is the code, scored by the same tests."""

    name = "python"
    timeout_s: ClassVar[float] = 5.0
    memory_mb: ClassVar[int] = 256

    def make_tools(self) -> list[Tool]:
        return [Tool("python", "run Python code in a sandbox; returns stdout and stderr", {"code": "string"},
                     self._run),
                Tool("test", "run your function against the task's tests", {"code": "string"}, self._test)]

    def _run(self, code: str) -> str:
        from grpo.sandbox import run_python

        res = run_python(str(code), timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        status = "timed out" if res.timed_out else f"exit {res.returncode}"
        return f"{status}\n{res.stdout}{res.stderr}".strip()

    def _test(self, code: str) -> str:
        from grpo.sandbox import run_python

        assert self.sample is not None
        res = run_python(str(code) + "\n" + self.sample.expected, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        self._last_info = {"verified": True, "passed": res.ok}
        return "passed" if res.ok else "failed\n" + (res.stderr.strip().splitlines() or ["timed out"])[-1]

    def outcome(self, answer: str) -> float:
        from grpo.rewards import code_reward

        assert self.sample is not None
        return code_reward(self.sample.prompt, answer, self.sample.expected)

    @classmethod
    def load_dataset(cls, eval_size: int, seed: int) -> Dataset:
        samples = [p.sample() for p in CODE_PROBLEMS]
        return Dataset(name="python", train=samples, eval=samples[:eval_size], reward="code")

    @classmethod
    def demonstration(cls, sample: Sample) -> list[str]:
        ref = next(p.reference for p in CODE_PROBLEMS if p.prompt == sample.prompt)
        return [format_tool_call("test", code=ref), ref]


# ---- search over a local corpus -------------------------------------------------------------------

CORPUS_PATH = Path(__file__).parent / "data" / "corpus.jsonl"
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an the of in on is was what which who how to and by for from at its it".split())


@functools.cache
def load_corpus(path: str = str(CORPUS_PATH)) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(documents, questions) of a corpus file: rows {"id", "title", "text"} and {"question", "answer", "doc"}."""
    docs, questions = [], []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            (questions if "question" in row else docs).append(row)
    return docs, questions


def _terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


def search_corpus(query: str, docs: list[dict[str, str]], k: int = 2) -> list[dict[str, str]]:
    """The k documents sharing most query terms (title matches count double), best first."""
    q = set(_terms(query))
    if not q:
        return []
    scored = []
    for i, d in enumerate(docs):
        score = len(q & set(_terms(d["text"]))) + 2 * len(q & set(_terms(d["title"])))
        if score:
            scored.append((-score, i, d))
    return [d for _, _, d in sorted(scored)[:k]]


class SearchEnv(ToolEnvironment):
    """Questions about an invented world (so no model knows the answers); `search` returns the best
    matching documents of the shipped corpus. Reward 1 if the answer's first line contains the answer."""

    name = "search"

    def make_tools(self) -> list[Tool]:
        return [Tool("search", "search the document collection", {"query": "string"}, self._search)]

    def _search(self, query: str) -> str:
        hits = search_corpus(str(query), load_corpus()[0])
        return "\n".join(f"[{d['id']}] {d['title']}: {d['text']}" for d in hits) or "no results"

    def outcome(self, answer: str) -> float:
        assert self.sample is not None
        line = answer.strip().split("\n", 1)[0].lower()
        return 1.0 if self.sample.expected.lower() in line else 0.0

    @classmethod
    def load_dataset(cls, eval_size: int, seed: int) -> Dataset:
        samples = [Sample(q["question"], q["answer"]) for q in load_corpus()[1]]
        random.Random(f"search:{seed}").shuffle(samples)
        held = min(eval_size, len(samples) // 4)
        return Dataset(name="search", train=samples[held:], eval=samples[:held], reward="exact_match")

    @classmethod
    def demonstration(cls, sample: Sample) -> list[str]:
        return [format_tool_call("search", query=sample.prompt), sample.expected]


# ---- loading by name or import path ---------------------------------------------------------------

ENVIRONMENTS: dict[str, type] = {"calculator": CalculatorEnv, "python": PythonEnv, "search": SearchEnv}


def environment_class(spec: str) -> type:
    """The class for a built-in name, an installed plugin's name (entry point group `raygrpo.environments`)
    or a `package.module:Class` path; ValueError naming the problem."""
    if ":" not in spec:
        if spec in ENVIRONMENTS:
            return ENVIRONMENTS[spec]
        from grpo.plugins import ENVIRONMENTS as GROUP
        from grpo.plugins import installed

        plugins = installed(GROUP)
        if spec not in plugins:
            raise ValueError(f"unknown environment {spec!r}: use one of {', '.join(sorted({*ENVIRONMENTS, *plugins}))} "
                             "or 'package.module:Class'")
        try:
            cls = plugins[spec].load()
        except Exception as e:
            raise ValueError(f"environment {spec!r}: the plugin {plugins[spec].value!r} cannot be loaded: "
                             f"{type(e).__name__}: {e}") from None
        if not callable(cls):
            raise ValueError(f"environment {spec!r}: not a class or factory")
        return cls
    module_name, _, attr = spec.partition(":")
    try:
        cls = functools.reduce(getattr, attr.split("."), importlib.import_module(module_name))
    except (ImportError, AttributeError) as e:
        raise ValueError(f"environment {spec!r}: cannot import: {e}") from None
    if not callable(cls):
        raise ValueError(f"environment {spec!r}: not a class or factory")
    return cls


class _EnvHost:
    """Holds one environment inside its own Ray actor (see ActorEnvironment)."""

    def __init__(self, spec: str, kwargs: dict[str, Any]):
        self.env = make_environment(spec, **kwargs)

    async def reset(self, sample: Sample) -> str:
        return await maybe_await(self.env.reset(sample))

    async def step(self, action: Action) -> StepResult:
        step = self.env.step
        return await (step(action) if inspect.iscoroutinefunction(step) else asyncio.to_thread(step, action))


class ActorEnvironment:
    """An environment run in its own Ray actor, for heavy ones (a browser, a big simulator): the
    actor starts at `reset` with `num_cpus` and ends with the episode (its handle is dropped).
    The rollout actor awaits its calls, so many of them run at once."""

    def __init__(self, spec: str, *, num_cpus: float = 1.0, **kwargs: Any):
        self.spec, self.num_cpus, self.kwargs, self.actor = spec, num_cpus, kwargs, None

    async def reset(self, sample: Sample) -> str:
        import ray

        self.actor = ray.remote(num_cpus=self.num_cpus)(_EnvHost).remote(self.spec, self.kwargs)
        return await self.actor.reset.remote(sample)

    async def step(self, action: Action) -> StepResult:
        assert self.actor is not None, "step before reset"
        result = await self.actor.step.remote(action)
        if result.done:
            self.actor = None  # the last handle: Ray ends the actor
        return result


def make_environment(spec: str, *, tools: list[str] | None = None, instructions: bool = True,
                     tool_timeout_s: float = 10.0, actor_cpus: float | None = None) -> Environment:
    """A fresh environment instance (one per trajectory). ToolEnvironments get the tool options;
    any other class is called with no arguments. `actor_cpus` puts the environment in its own Ray
    actor with that many CPUs (ActorEnvironment)."""
    if actor_cpus is not None:
        return ActorEnvironment(spec, num_cpus=actor_cpus, tools=tools, instructions=instructions,
                                tool_timeout_s=tool_timeout_s)
    cls = environment_class(spec)
    if isinstance(cls, type) and issubclass(cls, ToolEnvironment):
        return cls(tools=tools, instructions=instructions, tool_timeout_s=tool_timeout_s)
    if tools is not None:
        raise ValueError(f"tools: environment {spec!r} is not a ToolEnvironment and takes no tool list")
    env = cls()
    if not (hasattr(env, "reset") and hasattr(env, "step")):
        raise ValueError(f"environment {spec!r}: instances need reset(sample) and step(action)")
    return env
