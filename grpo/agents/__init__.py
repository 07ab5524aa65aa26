"""Agents: environments and their tools (`environments`: the tool-call format, the built-in calculator,
python and search environments and their tasks, `package.module:Class` loading) and multi-turn episodes
batched across environments (`episodes`: turn generation with a KV cache, step credit, the masked
rollout the learner trains on).

Does not own: single-turn sampling (grpo.rollout), the shared sampling steps (grpo.sampling), the loss.
"""
