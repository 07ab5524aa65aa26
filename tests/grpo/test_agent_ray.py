"""A multi-turn agent run on the real engine (local Ray): the calculator task learned with the tool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grpo.config import GRPOConfig
from grpo.run import run
from grpo.tiny import save_tiny_model


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.ray
@pytest.mark.slow
def test_learns_the_calculator_task_with_the_tool_after_a_short_warmup(ray_session, tmp_path):
    """Two-digit + and * (too many products to memorise): the policy must call `calc` with the
    expression it was given and copy the result into its answer. From random init (no tool use, no
    reward) the engine's supervised warm-up on the environment's demonstrations teaches the format,
    and then GRPO on the environment's outcome reward (plus 0.1 per successful tool call) raises both
    the tool-use rate and the outcome: the warm-up leaves a policy that, sampled at temperature 1, calls the tool in ~80% of
    trajectories and solves about a third of the problems (its copies of the tool's four-digit result
    are often wrong); GRPO makes it call the tool more often and copy more reliably. Measured, first 10
    against last 20 GRPO steps: outcome 0.36 -> 0.49-0.51, tool use 0.79 -> 0.88 (docs/engine.md)."""
    from grpo.agents.episodes import AgentSettings, agent_stats
    from grpo.rollout import RolloutWorker

    model = save_tiny_model(tmp_path / "tiny", hidden_size=64, num_layers=2, seed=0)
    steps = 50
    cfg = GRPOConfig(
        model=str(model), environment="calculator", tool_instructions=False, max_new_tokens=64,
        max_trajectory_tokens=128, max_steps_per_trajectory=3, group_size=8, prompts_per_step=16,
        sft_warmup_steps=320, sft_batch_size=16, sft_learning_rate=2e-3, learning_rate=5e-4, lr_warmup_steps=10,
        reward_tool_call=0.1,
        num_steps=steps, eval_size=16, checkpoint_interval=0, output_dir=str(tmp_path / "runs"), run_name="calc",
        cpus_per_worker=1, cpus_per_reward_worker=0.5,
    )
    # before: the random-init policy never makes a well-formed tool call and solves nothing
    initial = RolloutWorker(str(model)).generate_agent(cfg.load_dataset().train[:8], group_size=8, seed=0,
                                                       settings=AgentSettings.from_config(cfg))
    assert agent_stats(initial)["tool_use"] == 0 and float(initial.step_rewards.sum()) == 0.0

    result = run(cfg)
    assert result.status == "completed", result.error
    metrics = _rows(cfg.run_dir / "metrics.jsonl")
    assert len(metrics) == steps and metrics[0]["sft_warmup_loss"] < 0.5

    def mean(key: str, rows: list[dict]) -> float:
        return sum(m[key] for m in rows) / len(rows)

    # GRPO's first steps (the warmed-up policy) against its last 40%: 1280 and 2560 trajectories
    first, last = metrics[:10], metrics[-20:]
    print("first 10 / last 20 GRPO steps:", {k: (round(mean(k, first), 3), round(mean(k, last), 3))
          for k in ("env_reward_mean", "reward_mean", "tool_use_rate", "tool_calls_per_traj", "tool_error_rate",
                    "entropy")})
    # the warm-up taught the format: most trajectories already call the tool, some solve their problem
    assert mean("tool_use_rate", first) >= 0.5 and mean("env_reward_mean", first) >= 0.1
    # ... and GRPO raises both; env_reward is the outcome alone (the reward adds 0.1 per good call)
    assert mean("env_reward_mean", last) >= mean("env_reward_mean", first) + 0.05
    assert mean("tool_use_rate", last) >= mean("tool_use_rate", first) + 0.03
    assert mean("reward_mean", last) == pytest.approx(
        mean("env_reward_mean", last) + 0.1 * mean("tool_calls_per_traj", last), abs=1e-6)
    assert metrics[-1]["eval_reward"] > 0.0
    # every trajectory is stored with its steps, as the model and the tool produced them
    rows = _rows(cfg.run_dir / "trajectories.jsonl")
    assert len(rows) == steps * 128 and all(r["steps"] for r in rows)
    solved = [r for r in rows[-128 * 5:] if r["success"]]
    assert solved, "some trajectories of the last steps solve their problem"
    call, answer = solved[0]["steps"][-2:]
    assert call["tool"] == "calc" and answer["action"].strip().startswith(call["tool_result"])


@pytest.mark.ray
def test_heavy_environments_run_in_their_own_ray_actors(ray_session, tiny_model_dir):
    """env_actor_cpus: each trajectory's environment lives in its own Ray actor, and the episodes
    are the same as in-process ones (demonstrations through the rollout worker, plus sampling)."""
    from grpo.agents.environments import CalculatorEnv
    from grpo.agents.episodes import AgentSettings
    from grpo.rollout import RolloutWorker
    from grpo.tasks import Sample

    worker = RolloutWorker(tiny_model_dir)
    samples = [Sample("12*7=", "84"), Sample("30+45=", "75")]
    local = AgentSettings(environment="calculator", instructions=False)
    remote = AgentSettings(environment="calculator", instructions=False, actor_cpus=0.1)
    demos = [CalculatorEnv.demonstration(s) for s in samples]
    a = worker.generate_agent(samples, settings=local, group_size=2, forced=demos)
    b = worker.generate_agent(samples, settings=remote, group_size=2, forced=demos)
    assert a.texts == b.texts and torch.equal(a.completion_ids, b.completion_ids)
    assert b.step_rewards.sum(1).tolist() == [1.0] * 4
    sampled = worker.generate_agent(samples, settings=remote, group_size=2, seed=1)
    assert sampled.finish_reasons and all(recs for recs in sampled.records)
