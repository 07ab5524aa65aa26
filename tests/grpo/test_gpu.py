"""CUDA checks of the engine's classes (skipped without a GPU; run them where one is lent)."""

from __future__ import annotations

import pytest
import torch

from grpo.config import GRPOConfig
from grpo.learner import Learner, score_batch
from grpo.rollout import RolloutWorker

pytestmark = pytest.mark.gpu


def _learner(cfg: GRPOConfig, device: str, pad_id: int) -> Learner:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=getattr(torch, cfg.dtype)).to(device)
    return Learner(cfg, model, ref_model=None, pad_id=pad_id)


def test_rollout_and_update_run_on_cuda_in_bf16_and_match_the_cpu_loss(tiny_model_dir):
    cpu = RolloutWorker(tiny_model_dir, device="cpu")
    r = cpu.generate(["digit 1:", "digit 2:"], group_size=4, max_new_tokens=6, seed=0)
    rewards = [float(i % 2) for i in range(8)]
    gpu_worker = RolloutWorker(tiny_model_dir, device="cuda", dtype="bfloat16")
    assert gpu_worker.generate(["digit 1:"], group_size=4, max_new_tokens=6, seed=0).completion_ids.shape[0] == 4
    stats = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        cfg = GRPOConfig(model=tiny_model_dir, max_new_tokens=6, dtype=dtype, kl_coef=0.0, async_rollouts=True)
        learner = _learner(cfg, device, cpu.pad_id)
        batch = score_batch(r, rewards, cfg)
        stats[device] = learner.step(batch, num_tokens=batch.num_tokens, num_seqs=batch.num_seqs)
    # async_rollouts weights each token by pi_now / pi_sampler (TIS), so the loss is a real number to compare
    assert stats["cuda"]["loss"] == pytest.approx(stats["cpu"]["loss"], abs=2e-2)
    assert stats["cuda"]["entropy"] == pytest.approx(stats["cpu"]["entropy"], rel=2e-2)
