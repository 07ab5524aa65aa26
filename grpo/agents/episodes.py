"""Multi-turn rollouts: many environments per rollout actor, one batched generation across them.

`run_episodes` plays P prompts x G trajectories against fresh environments (grpo.agents.environments), at most
`concurrency` live at once. A small asyncio scheduler keeps three kinds of work in flight: resets,
environment steps (each under `step_timeout_s`) and ONE batched generation turn for every live
trajectory that is waiting for the model (run in a thread, so slow tools keep running meanwhile).
A turn ends at EOS, at the tool-call close tag, or at the turn/trajectory token limit.

Token layout of a trajectory, exactly as sampled (nothing is re-tokenised from text):
    prompt_ids | action 0 (policy) | observation 0 (env) | action 1 (policy) | ...
`completion_mask` marks every real token after the prompt (attention), `loss_mask` only the
policy's own tokens (the loss), `logprobs` the sampling log-probs on those, `token_step` which
action each policy token belongs to (-1 elsewhere) so step-level advantages can be spread onto tokens.

Each turn re-reads its whole context (one batched prefill, then KV-cached decoding); the KV cache
is not carried across turns. Not here: the tool format and environments (grpo.agents.environments), advantages
(grpo.learner.score_agent_batch and grpo.loss).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch
from torch import Tensor

from grpo.agents.environments import RESULT_CLOSE, RESULT_OPEN, TOOL_TAGS, Action, StepResult, maybe_await
from grpo.sampling import PromptFormat, Rollout, left_pad, position_ids, sample_token, sampling_generator
from grpo.tasks import Sample

BATCH_GRACE_S = 0.005
"""how long a turn's batch waits for environment steps still running before it is generated"""


@dataclass(frozen=True)
class Shaping:
    """Reward shaping terms added to a step's environment reward."""

    tool_call: float = 0.0
    """per successful tool call"""
    tool_error: float = 0.0
    """per malformed call, unknown tool, failing or timed-out tool"""
    verification: float = 0.0
    """per step the environment marks `verified` (e.g. running the tests)"""
    step: float = 0.0
    """per step (a negative value asks for shorter trajectories)"""

    def of(self, info: dict[str, Any]) -> float:
        r = self.step
        if info.get("error"):
            r += self.tool_error
        elif info.get("tool"):
            r += self.tool_call
        if info.get("verified"):
            r += self.verification
        return r


@dataclass(frozen=True)
class AgentSettings:
    """What a rollout actor needs to play episodes: the agent part of GRPOConfig, picklable."""

    environment: str
    tools: list[str] | None = None
    instructions: bool = True
    chat_template: bool | None = None
    max_steps: int = 4
    max_new_tokens: int = 64
    max_total_tokens: int = 256
    concurrency: int = 64
    step_timeout_s: float = 30.0
    tool_timeout_s: float = 10.0
    shaping: Shaping = Shaping()
    actor_cpus: float | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> AgentSettings:
        return cls(environment=cfg.environment, tools=cfg.tools, instructions=cfg.tool_instructions,
                   chat_template=cfg.chat_template, max_steps=cfg.max_steps_per_trajectory,
                   max_new_tokens=cfg.max_new_tokens, max_total_tokens=cfg.max_trajectory_tokens,
                   concurrency=cfg.env_concurrency, step_timeout_s=cfg.env_step_timeout_s,
                   tool_timeout_s=cfg.tool_timeout_s, actor_cpus=cfg.env_actor_cpus,
                   shaping=Shaping(tool_call=cfg.reward_tool_call, tool_error=cfg.reward_tool_error,
                                   verification=cfg.reward_verification, step=cfg.reward_step))

    def make_env(self) -> Any:
        from grpo.agents.environments import make_environment

        return make_environment(self.environment, tools=self.tools, instructions=self.instructions,
                                tool_timeout_s=self.tool_timeout_s, actor_cpus=self.actor_cpus)


@dataclass
class AgentRollout(Rollout):
    """A Rollout of multi-turn trajectories: the base fields plus per-step rewards and records."""

    step_rewards: Tensor | None = None  # (N, S) float32: env reward + shaping of each action step
    step_mask: Tensor | None = None  # (N, S) bool: steps that happened
    token_step: Tensor | None = None  # (N, L) int64: action index of each policy token, -1 elsewhere
    records: list[list[dict[str, Any]]] = field(default_factory=list)  # N lists of step records


class TurnFormat:
    """How a prompt and an observation become text around the policy's turns.

    Plain (no chat template): the prompt as given, observations as `\\n<result>...</result>\\n`.
    With a chat template (`chat` True, or None and the tokenizer has one) it renders the user turn and,
    for observations, the text between the end of an assistant turn and the start of the next one around
    a `tool` message (found by rendering with a marker), so a chat model sees its own format.
    """

    MARK = "\x00MARK\x00"

    def __init__(self, tokenizer: Any, chat: bool | None = None):
        self.tokenizer, self.chat = tokenizer, PromptFormat(tokenizer, chat).chat  # None: when it has a template
        # A template that renders `tools` gets the environment's tools that way (and teaches its own call
        # tags, which parse_tool_call reads); otherwise the environment writes our instructions itself.
        self.template_tools = self.chat and "tools" in str(getattr(tokenizer, "chat_template", "") or "")

    def tools_for(self, env: Any) -> list[dict[str, Any]] | None:
        """The environment's tools for the template, when both take part; switches off the environment's own
        written instructions then (call before its reset)."""
        if not self.template_tools or not callable(getattr(env, "tool_specs", None)):
            return None
        if getattr(env, "instructions", False):
            env.instructions = False
        return env.tool_specs()

    def prompt(self, text: str, tools: list[dict[str, Any]] | None = None) -> str:
        if not self.chat:
            return text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True, **({"tools": tools} if tools else {}))

    def observation(self, text: str) -> str:
        if not self.chat:
            return f"\n{RESULT_OPEN}{text}{RESULT_CLOSE}\n"
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" + self.MARK},
                {"role": "tool", "content": text}]
        full = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return full[full.index(self.MARK) + len(self.MARK):]


@dataclass
class _Traj:
    index: int
    sample: Sample
    env: Any = None
    prompt_ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    policy: list[bool] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    token_step: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    last_observation: str = ""
    turn_started: float = 0.0
    finish: str | None = None
    tools: list[dict[str, Any]] | None = None
    """the environment's tools as the chat template takes them (None: our written instructions, if any)"""


class TurnGenerator:
    """Batched sampling of one turn for many contexts of different lengths (left-padded, KV-cached)."""

    def __init__(self, model: Any, tokenizer: Any, *, pad_id: int, eos_ids: list[int], device: Any,
                 stops: tuple[str, ...] = tuple(c for _, c in TOOL_TAGS)):
        """`eos_ids`: every token that ends the policy's turn for good (sampling.stop_token_ids); `stops`: the
        strings that end a turn with a tool call (ours and the chat templates' closing tags)."""
        self.model, self.tokenizer, self.pad_id, self.device = model, tokenizer, pad_id, device
        self.eos_ids = frozenset(eos_ids)
        self.stops = stops
        # Only a token whose text contains a stop string's last character can complete it: check
        # the decoded tail of a row only after one of those (cheap on any vocabulary).
        vocab = len(tokenizer)
        enders = {s[-1] for s in stops}
        self.stop_enders = torch.tensor(
            [any(e in tokenizer.decode([i]) for e in enders) for i in range(vocab)], dtype=torch.bool)
        self._tail = 2 * max(len(s) for s in stops)

    @torch.inference_mode()
    def __call__(self, contexts: list[list[int]], limits: list[int], *, temperature: float, top_p: float,
                 gen: torch.Generator | None) -> list[tuple[list[int], list[float], str]]:
        """Per context: (sampled ids, their log-probs, "eos" | "stop" | "length")."""
        from transformers import DynamicCache

        n, budget = len(contexts), max(limits)
        ids, mask = left_pad(contexts, self.pad_id)  # (n, Lc)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                         past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1]  # (n, V)
        attn, pos = mask, position_ids(mask)[:, -1]  # (n, Lc), (n,)
        limit = torch.tensor(limits, device=self.device)  # (n,)
        alive = limit > 0  # (n,)
        reasons = ["length"] * n
        toks: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[float]] = [[] for _ in range(n)]
        for _ in range(budget):
            tok, lp = sample_token(logits, temperature, top_p, gen)  # (n,), (n,)
            for i in alive.nonzero().flatten().tolist():
                toks[i].append(int(tok[i]))
                lps[i].append(float(lp[i]))
                if toks[i][-1] in self.eos_ids:
                    reasons[i] = "eos"
                elif self.stop_enders[toks[i][-1]] and self.tokenizer.decode(toks[i][-self._tail:]).endswith(
                        self.stops):
                    reasons[i] = "stop"
                if reasons[i] != "length" or len(toks[i]) >= limits[i]:
                    alive[i] = False
            if not alive.any():
                break
            tok = torch.where(alive, tok, self.pad_id)
            attn = torch.cat([attn, torch.ones((n, 1), dtype=torch.bool, device=self.device)], dim=1)  # (n, Lc+t+1)
            pos = pos + 1
            out = self.model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos[:, None],
                             past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1]  # (n, V)
        return [(toks[i], lps[i], reasons[i]) for i in range(n)]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


async def _env_step(env: Any, action: Action, timeout_s: float) -> StepResult:
    # A sync step runs in a thread so a slow one does not block the other trajectories; a hung one
    # times out here (its thread is abandoned) and the trajectory ends cleanly.
    call = env.step(action) if inspect.iscoroutinefunction(env.step) else asyncio.to_thread(env.step, action)
    result = await asyncio.wait_for(maybe_await(call), timeout=timeout_s)
    if not isinstance(result, StepResult):
        raise TypeError(f"step() returned {type(result).__name__}, expected grpo.agents.environments.StepResult")
    return result


async def run_episodes(
    samples: list[Sample], *, group_size: int, make_env: Any, generate: TurnGenerator | None, tokenizer: Any,
    fmt: TurnFormat, max_steps: int, max_new_tokens: int, max_total_tokens: int, max_prompt_tokens: int,
    temperature: float, top_p: float, seed: int | None, concurrency: int, step_timeout_s: float,
    shaping: Shaping = Shaping(), forced: list[list[str]] | None = None,
) -> tuple[list[_Traj], float]:
    """Play every trajectory to its end; returns them in (prompt, member) order and the generation seconds.

    `forced` (one action list per sample) replaces sampling with given actions: the supervised
    warm-up's demonstrations take exactly the token layout of a sampled trajectory.
    """
    g = group_size
    trajs = [_Traj(i, samples[i // g]) for i in range(len(samples) * g)]
    # The generator must live where the model's logits do (CUDA on a GPU worker); forced play never samples.
    device = generate.device if generate is not None else "cpu"
    gen = sampling_generator(device, seed) if temperature > 0 else None
    queue: deque[_Traj] = deque(trajs)
    live = 0
    ready: list[_Traj] = []
    tasks: dict[asyncio.Future, tuple[str, Any]] = {}
    generating = False
    gen_seconds = 0.0

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    async def reset(t: _Traj) -> str:
        return await asyncio.wait_for(maybe_await(t.env.reset(t.sample)), timeout=step_timeout_s)

    def finish(t: _Traj, reason: str) -> None:
        nonlocal live
        t.finish, t.env, live = reason, None, live - 1

    def forced_turn(batch: list[_Traj]) -> list[tuple[list[int], list[float], str]]:
        assert forced is not None
        out = []
        for t in batch:
            actions = forced[t.index // g]
            k = len(t.rewards)
            ids = encode(actions[k]) if k < len(actions) else []
            if k == len(actions) - 1:  # the answer: ends with EOS as a sampled answer would
                ids = ids + [tokenizer.eos_token_id]
            out.append((ids, [0.0] * len(ids), "eos" if k == len(actions) - 1 else "stop"))
        return out

    def generate_batch(batch: list[_Traj]) -> list[tuple[list[int], list[float], str]]:
        if forced is not None:
            return forced_turn(batch)
        assert generate is not None
        limits = [min(max_new_tokens, max_total_tokens - len(t.tokens)) for t in batch]
        return generate([t.prompt_ids + t.tokens for t in batch], limits, temperature=temperature, top_p=top_p, gen=gen)

    def handle(task: asyncio.Future) -> None:
        nonlocal generating, gen_seconds
        kind, payload = tasks.pop(task)
        if kind == "reset":
            t = payload
            try:
                first = str(task.result())
            except Exception as e:  # an environment that cannot start: the trajectory is empty
                t.records.append({"step": 0, "error": f"reset failed: {type(e).__name__}: {e}"[:300],
                                  "timestamp": _now()})
                t.prompt_ids = encode(fmt.prompt(t.sample.prompt, t.tools))[-max_prompt_tokens:]
                finish(t, "env_error")
                return
            t.prompt_ids = encode(fmt.prompt(first, t.tools))[-max_prompt_tokens:]
            t.last_observation = first
            ready.append(t)
        elif kind == "generate":
            batch, t0 = payload
            generating = False
            gen_seconds += time.perf_counter() - t0
            for t, (ids, lps, reason) in zip(batch, task.result(), strict=True):
                k = len(t.rewards)
                if not ids:  # no token budget left for another turn
                    finish(t, "length")
                    continue
                t.tokens += ids
                t.policy += [True] * len(ids)
                t.logps += lps
                t.token_step += [k] * len(ids)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                t.records.append({"step": k, "observation": t.last_observation, "action": text,
                                  "action_tokens": len(ids), "end": reason, "timestamp": _now()})
                tasks[asyncio.ensure_future(_env_step(t.env, Action(text, tuple(ids)), step_timeout_s))] = (
                    "step", t)
        else:  # an environment step finished
            t = payload
            rec = t.records[-1]
            try:
                res: StepResult = task.result()
            except Exception as e:  # raised or timed out: end this trajectory cleanly, keep the rest
                err = "env_timeout" if isinstance(e, TimeoutError) else "env_error"
                rec.update(reward=shaping.step, env_reward=0.0, done=True, error=err,
                           message=f"{type(e).__name__}: {e}"[:300],
                           duration_s=round(time.perf_counter() - t.turn_started, 6))
                t.rewards.append(shaping.step)
                finish(t, err)
                return
            reward = float(res.reward) + shaping.of(res.info)
            rec.update(reward=reward, env_reward=float(res.reward), done=bool(res.done),
                       duration_s=round(time.perf_counter() - t.turn_started, 6),
                       **{k: v for k, v in res.info.items() if k in ("tool", "error", "verified", "passed")})
            if res.info.get("tool") and not res.info.get("error"):
                rec["tool_result"] = res.observation
            elif res.observation:
                rec["tool_result"] = res.observation
            t.rewards.append(reward)
            if res.done:
                finish(t, "stop")
                return
            if len(t.rewards) >= max_steps:
                finish(t, "max_steps")
                return
            obs_ids = res.observation_ids if res.observation_ids is not None else encode(
                fmt.observation(res.observation))
            if len(t.tokens) + len(obs_ids) >= max_total_tokens:
                finish(t, "length")
                return
            t.tokens += obs_ids
            t.policy += [False] * len(obs_ids)
            t.logps += [0.0] * len(obs_ids)
            t.token_step += [-1] * len(obs_ids)
            t.last_observation = res.observation
            ready.append(t)

    while queue or tasks or ready:
        while queue and live < concurrency:
            t = queue.popleft()
            live += 1
            t.env = make_env()
            t.tools = fmt.tools_for(t.env)  # before reset: the template, not the env, then states the tools
            tasks[asyncio.ensure_future(reset(t))] = ("reset", t)
        if ready and not generating:
            # Let environment steps that are about to finish join this batch (a fast tool answers in
            # microseconds): without the grace, the first few back would go alone and fragment batches.
            pending = [f for f, (kind, _) in tasks.items() if kind != "generate"]
            if pending:
                await asyncio.wait(pending, timeout=BATCH_GRACE_S)
                for f in [f for f in tasks if f.done()]:
                    handle(f)
            batch, ready = ready, []
            for t in batch:
                t.turn_started = time.perf_counter()
            generating = True
            tasks[asyncio.ensure_future(asyncio.to_thread(generate_batch, batch))] = ("generate", (batch, time.perf_counter()))
        if not tasks:
            continue
        done, _ = await asyncio.wait(list(tasks), return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            handle(task)
    return trajs, gen_seconds


def to_rollout(trajs: list[_Traj], *, group_size: int, pad_id: int, version: int, gen_seconds: float,
               tokenizer: Any) -> AgentRollout:
    """Lay finished trajectories out as tensors (rows in trajectory order, groups contiguous)."""
    g = group_size
    for p in range(len(trajs) // g):
        first = trajs[p * g].prompt_ids
        if any(trajs[p * g + j].prompt_ids != first for j in range(g)):
            raise ValueError("environment reset must return the same first observation for the same sample "
                             "(the trajectories of a group share their prompt)")
    n = len(trajs)
    width = max(1, max(len(t.tokens) for t in trajs))
    steps = max(1, max(len(t.rewards) for t in trajs))
    ids = torch.full((n, width), pad_id, dtype=torch.long)  # (N, L)
    attn = torch.zeros((n, width), dtype=torch.bool)  # (N, L)
    loss = torch.zeros((n, width), dtype=torch.bool)  # (N, L)
    logps = torch.zeros((n, width), dtype=torch.float32)  # (N, L)
    tstep = torch.full((n, width), -1, dtype=torch.long)  # (N, L)
    srew = torch.zeros((n, steps), dtype=torch.float32)  # (N, S)
    smask = torch.zeros((n, steps), dtype=torch.bool)  # (N, S)
    for i, t in enumerate(trajs):
        m = len(t.tokens)
        if m:
            ids[i, :m] = torch.tensor(t.tokens)
            attn[i, :m] = True
            loss[i, :m] = torch.tensor(t.policy)
            logps[i, :m] = torch.tensor(t.logps)
            tstep[i, :m] = torch.tensor(t.token_step)
        k = len(t.rewards)
        srew[i, :k] = torch.tensor(t.rewards, dtype=torch.float32)
        smask[i, :k] = True
    texts = [tokenizer.decode(t.tokens, skip_special_tokens=True) for t in trajs]
    return AgentRollout(
        prompt_ids=[trajs[p * g].prompt_ids for p in range(n // g)], completion_ids=ids, completion_mask=attn,
        logprobs=logps, finish_reasons=[t.finish or "length" for t in trajs], texts=texts, group_size=g,
        version=version, gen_seconds=gen_seconds, meta={"pad_id": float(pad_id)}, loss_mask=loss,
        step_rewards=srew, step_mask=smask, token_step=tstep, records=[t.records for t in trajs],
    )


def concat_agent_rollouts(parts: list[AgentRollout]) -> AgentRollout:
    """Join agent rollouts of one step (several rollout actors), padding tokens and steps."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.completion_ids.shape[1] for p in parts)
    steps = max(p.step_rewards.shape[1] for p in parts)

    def pad(t: Tensor, to: int, value: float | int | bool) -> Tensor:
        return torch.nn.functional.pad(t, (0, to - t.shape[1]), value=value)  # (N, to)

    pad_id = int(parts[0].meta.get("pad_id", 0))
    return AgentRollout(
        prompt_ids=[p for r in parts for p in r.prompt_ids],
        completion_ids=torch.cat([pad(r.completion_ids, width, pad_id) for r in parts]),
        completion_mask=torch.cat([pad(r.completion_mask, width, False) for r in parts]),
        logprobs=torch.cat([pad(r.logprobs, width, 0.0) for r in parts]),
        finish_reasons=[f for r in parts for f in r.finish_reasons], texts=[t for r in parts for t in r.texts],
        group_size=parts[0].group_size, version=min(r.version for r in parts),
        gen_seconds=max(r.gen_seconds for r in parts), meta=dict(parts[0].meta),
        loss_mask=torch.cat([pad(r.loss_mask, width, False) for r in parts]),
        step_rewards=torch.cat([pad(r.step_rewards, steps, 0.0) for r in parts]),
        step_mask=torch.cat([pad(r.step_mask, steps, False) for r in parts]),
        token_step=torch.cat([pad(r.token_step, width, -1) for r in parts]),
        records=[x for r in parts for x in r.records],
    )


def demonstrations(samples: list[Sample], settings: AgentSettings, tokenizer: Any, *, pad_id: int,
                   max_prompt_tokens: int) -> AgentRollout:
    """The environment's demonstrations of `samples`, played against real environments (so the
    observations are real) and laid out exactly as sampled trajectories: the warm-up's batch."""
    import asyncio

    from grpo.agents.environments import environment_class

    cls = environment_class(settings.environment)
    forced = [cls.demonstration(s) for s in samples]
    trajs, _ = asyncio.run(run_episodes(
        samples, group_size=1, make_env=settings.make_env, generate=None, tokenizer=tokenizer,
        fmt=TurnFormat(tokenizer, chat=settings.chat_template), max_steps=max(settings.max_steps, *map(len, forced)),
        max_new_tokens=settings.max_new_tokens, max_total_tokens=10**9, max_prompt_tokens=max_prompt_tokens,
        temperature=1.0, top_p=1.0, seed=None, concurrency=settings.concurrency,
        step_timeout_s=settings.step_timeout_s, forced=forced,
    ))
    return to_rollout(trajs, group_size=1, pad_id=pad_id, version=0, gen_seconds=0.0, tokenizer=tokenizer)


AGENT_STATS = ("tool_use", "tool_calls", "tool_errors", "agent_steps", "env_errors", "env_reward")
"""per-step sums the trainer all-reduces for agent runs (see agent_stats)"""


def agent_stats(ro: AgentRollout) -> dict[str, float]:
    """Sums over the trajectories of a rollout: trajectories that used a tool successfully, successful
    tool calls, failed ones (malformed, unknown, raised, timed out), steps taken, environment failures,
    and the environments' own rewards (the outcome, without shaping)."""
    calls = [[r for r in recs if r.get("tool") and not r.get("error")] for recs in ro.records]
    return {
        "tool_use": float(sum(bool(c) for c in calls)),
        "tool_calls": float(sum(len(c) for c in calls)),
        "tool_errors": float(sum(1 for recs in ro.records for r in recs if r.get("error"))),
        "agent_steps": float(sum(len(recs) for recs in ro.records)),
        "env_errors": float(sum(f in ("env_error", "env_timeout") for f in ro.finish_reasons)),
        "env_reward": float(sum(r.get("env_reward", 0.0) for recs in ro.records for r in recs)),
    }
