"""Multi-turn environments on a real local Ray: each trajectory's environment in its own actor.

A whole agent run (warm-up, GRPO, the KL reference, a resume) on two FSDP2 workers is
tests/grpo/test_parallel_ray.py's warm-up test; the calculator task learned with the tool, a 50-step curve,
is `python bench/learning_curves.py --curve agent-calculator` (docs/benchmarks.md)."""

from __future__ import annotations

import pytest
import torch


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
