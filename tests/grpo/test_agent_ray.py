"""A multi-turn agent run on the real engine (local Ray): the calculator task learned with the tool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpo.config import GRPOConfig
from grpo.run import run
from grpo.tiny import save_tiny_model


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.ray
@pytest.mark.slow
def test_learns_the_calculator_task_with_the_tool_after_a_short_warmup(ray_session, tmp_path):
    """Two-digit + and * (too many products to memorise): the policy must call `calc` with the
    expression it was given and copy the result into its answer. A short supervised warm-up on the
    environment's demonstrations teaches the call format, imperfectly; GRPO on the environment's
    outcome reward then raises both the tool-use rate and the reward."""
    model = save_tiny_model(tmp_path / "tiny", hidden_size=64, num_layers=2, seed=0)
    cfg = GRPOConfig(
        model=str(model), environment="calculator", tool_instructions=False, max_new_tokens=64,
        max_trajectory_tokens=128, max_steps_per_trajectory=3, group_size=4, prompts_per_step=16,
        sft_warmup_steps=320, sft_learning_rate=2e-3, learning_rate=5e-4, num_steps=40, eval_size=16,
        checkpoint_interval=0, output_dir=str(tmp_path / "runs"), run_name="calc", cpus_per_worker=1,
        cpus_per_reward_worker=0.5,
    )
    # before the warm-up: the random-init policy never makes a well-formed tool call
    from grpo.multiturn import AgentSettings, agent_stats
    from grpo.rollout import RolloutWorker

    initial = RolloutWorker(str(model)).generate_agent(cfg.load_dataset().train[:16], group_size=4, seed=0,
                                                       settings=AgentSettings.from_config(cfg))
    assert agent_stats(initial)["tool_use"] == 0 and float(initial.step_rewards.sum()) == 0.0

    result = run(cfg)
    assert result.status == "completed", result.error
    metrics = _rows(cfg.run_dir / "metrics.jsonl")
    assert len(metrics) == 40 and metrics[0]["sft_warmup_loss"] < 1.0

    def mean(key: str, rows: list[dict]) -> float:
        return sum(m[key] for m in rows) / len(rows)

    first, last = metrics[:10], metrics[-10:]
    print({k: (round(mean(k, first), 3), round(mean(k, last), 3))
           for k in ("reward_mean", "env_reward_mean", "tool_use_rate", "tool_error_rate", "steps_per_traj")})
    # the warm-up taught the call format (imperfectly: some calls are malformed or miscopied) ...
    assert 0.3 < mean("tool_use_rate", first) and mean("tool_use_rate", last) >= 0.5
    # ... and GRPO on the outcome reward makes the policy solve more problems with the tool
    assert mean("reward_mean", last) > mean("reward_mean", first) + 0.05
    assert metrics[-1]["eval_reward"] >= 0.0
    # every trajectory is stored with its steps, as the model and the tool produced them
    rows = _rows(cfg.run_dir / "trajectories.jsonl")
    assert len(rows) == 40 * 64 and all(r["steps"] for r in rows)
    solved = [r for r in rows[-64:] if r["success"]]
    assert solved, "some trajectories of the last step solve their problem"
    call, answer = solved[0]["steps"][-2:]
    assert call["tool"] == "calc" and answer["action"].strip().startswith(call["tool_result"])
