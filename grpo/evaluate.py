"""Offline evaluation of a model directory: greedy completions on queries, scored by a reward.

Used by the job API's `training.evaluate` (as a Ray task on the cluster) to compare a checkpoint
with its base model on the same queries. Statistics are in `compare`: a paired t-test over the
per-query rewards, because both models answer the same queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from grpo.rewards import resolve
from grpo.rollout import RolloutWorker
from grpo.tasks import Sample


@dataclass
class EvalResult:
    rewards: list[float]  # one per query, in order
    completions: list[str]
    steps: list[int] | None = None  # agent steps per query (multi-turn evaluation), else None

    @property
    def avg_steps(self) -> float:
        return sum(self.steps) / len(self.steps) if self.steps else 1.0

    @property
    def avg_reward(self) -> float:
        return sum(self.rewards) / len(self.rewards) if self.rewards else float("nan")

    @property
    def success_rate(self) -> float:
        return sum(r >= 1.0 - 1e-9 for r in self.rewards) / len(self.rewards) if self.rewards else float("nan")


def evaluate_model(model: str, samples: list[Sample], *, reward: str, max_new_tokens: int,
                   batch_size: int = 64, torch_threads: int = 1, agent: dict | None = None,
                   reward_source: str | None = None, chat_template: bool | None = None) -> EvalResult:
    """Greedy completions of `model` on `samples`, scored with the reward function `reward`.

    With `agent` (the agent keys of a GRPOConfig: environment, tools, ...) each query is a greedy
    multi-turn episode instead, scored by its environment (the outcome, without shaping)."""
    worker = RolloutWorker(model, torch_threads=torch_threads, chat_template=chat_template)
    if agent is not None:
        from grpo.agents.episodes import AgentSettings
        from grpo.config import GRPOConfig

        settings = AgentSettings.from_config(GRPOConfig(model=model, **agent))
        ro = worker.generate_agent(samples, settings=settings, group_size=1, temperature=0.0)
        return EvalResult([sum(r.get("env_reward", 0.0) for r in recs) for recs in ro.records], ro.texts,
                          steps=[len(recs) for recs in ro.records])
    texts: list[str] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        texts += worker.generate([s.input for s in chunk], group_size=1, max_new_tokens=max_new_tokens,
                                 temperature=0.0).texts
    if reward_source:  # one sandbox run for every item
        from grpo.rewards import SandboxedReward

        return EvalResult(SandboxedReward(reward_source).score_batch(
            [(s.prompt, t, s.expected) for s, t in zip(samples, texts, strict=True)]).rewards, texts)
    fn = resolve(reward)
    rewards = []
    for s, t in zip(samples, texts, strict=True):
        try:
            value = float(fn(s.prompt, t, s.expected))
        except Exception:  # a reward that fails on one item scores that item 0, as in training
            value = 0.0
        rewards.append(value if math.isfinite(value) else 0.0)
    return EvalResult(rewards, texts)


def compare(base: list[float], tuned: list[float], alpha: float = 0.05) -> dict[str, float | bool | None]:
    """Improvement of mean reward and a paired t-test (same queries for both models)."""
    if len(base) != len(tuned) or not base:
        raise ValueError("compare: both models must be scored on the same, non-empty list of queries")
    diffs = [t - b for b, t in zip(base, tuned, strict=True)]
    improvement = sum(diffs) / len(diffs)
    if len(diffs) < 2 or max(diffs) == min(diffs):
        # No spread in the differences: the t statistic is undefined; equal models are "no change".
        p = 1.0 if improvement == 0 else 0.0
        return {"improvement": improvement, "t_statistic": None, "p_value": p, "significant": p < alpha}
    from scipy import stats

    t, p = stats.ttest_rel(tuned, base)
    return {"improvement": improvement, "t_statistic": float(t), "p_value": float(p), "significant": bool(p < alpha)}
