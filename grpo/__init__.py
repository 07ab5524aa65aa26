"""raygrpo's engine: config, GRPO math, sampling, rewards, the policy update and the Ray training loop.

Runs without the control plane: `python -m grpo.run --config cfg.yaml` (or as a Ray Job). Nothing here
imports `app`; a run launched by the API reports through the `Reporter` interface (grpo.report) that
the API side implements. Agents (environments, tools, multi-turn episodes) are the `grpo.agents` package.
"""
