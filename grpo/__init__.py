"""raygrpo training: config, GRPO math, rollout and the training loop."""
