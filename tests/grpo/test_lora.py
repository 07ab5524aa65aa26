"""LoRA: only the adapter trains and is published; the reference is the base with the adapter off.

Unit tests run the engine's pieces in one process (no Ray); the Ray test runs four steps of a rank-8 adapter
on two workers and reloads its checkpoint with `peft` (the learning curve is bench/learning_curves.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from grpo import parallel  # noqa: E402
from grpo.config import GRPOConfig  # noqa: E402
from grpo.learner import Learner, score_batch  # noqa: E402
from grpo.lora import AdapterOff, adapter_state, add_adapter, nbytes  # noqa: E402
from grpo.rewards import digit_reward  # noqa: E402
from grpo.rollout import RolloutWorker  # noqa: E402
from grpo.tasks import load_dataset  # noqa: E402


def _cfg(model: str, **kw) -> GRPOConfig:
    base = {"model": model, "lora_rank": 8, "group_size": 4, "prompts_per_step": 4, "learning_rate": 1e-2,
            "kl_coef": 0.0, "max_new_tokens": 4}
    return GRPOConfig(**(base | kw))


def test_lora_builds_the_same_adapter_config_and_runs_sharded_without_the_merged_export(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, lora_target_modules=["q_proj", "v_proj", "o_proj"])
    assert cfg.lora_config() == {"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "task_type": "CAUSAL_LM",
                                 "target_modules": ["q_proj", "v_proj", "o_proj"]}
    assert _cfg(tiny_model_dir, lora_rank=0).lora_config() is None
    assert _cfg(tiny_model_dir, lora_target_modules=["all-linear"]).lora_config()["target_modules"] == "all-linear"
    from grpo.config import ConfigError, load_config

    assert load_config(None, {"model": tiny_model_dir, "lora_rank": 8, "strategy": "fsdp"}).strategy == "fsdp"
    with pytest.raises(ConfigError, match="lora_merged_export: not with strategy 'fsdp'"):
        load_config(None, {"model": tiny_model_dir, "lora_rank": 8, "strategy": "fsdp", "lora_merged_export": True})


def test_only_the_adapter_trains_is_published_and_loads_into_a_sampler(tiny_model_dir):
    cfg = _cfg(tiny_model_dir)
    policy = RolloutWorker(tiny_model_dir, lora=cfg.lora_config())  # the policy side: a trainable copy
    sampler = RolloutWorker(tiny_model_dir, lora=cfg.lora_config())
    model = policy.model
    learner = Learner(cfg, model, ref_model=None, pad_id=policy.pad_id)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    in_optimizer = {id(p) for g in learner.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == trainable and trainable
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in names)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    data = load_dataset("digit", eval_size=0)
    samples = data.batch(1, cfg.prompts_per_step, 0)
    model.train()
    for step in range(3):
        ro = policy.generate([s.prompt for s in samples], group_size=cfg.group_size, max_new_tokens=4, seed=step)
        rewards = [digit_reward(samples[i // 4].prompt, t, samples[i // 4].expected) + (i % 4 == 0)
                   for i, t in enumerate(ro.texts)]  # a signal in every group's first row: never an empty update
        batch = score_batch(ro, rewards, cfg)
        learner.step(batch, num_tokens=float(batch.num_tokens), num_seqs=float(batch.num_seqs))
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), f"{n}: a base weight changed"

    published = adapter_state(model)
    assert published and all("lora_" in k for k in published)
    full = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    ratio = nbytes(published) / nbytes(full)
    print(f"published per step: {nbytes(published)} bytes of adapter against {nbytes(full)} of base weights "
          f"({ratio:.1%})")
    assert ratio < 0.10
    sampler.load_weights(published, 3)
    prompts = [s.prompt for s in data.train[:6]]
    model.eval()
    assert sampler.generate(prompts, group_size=1, max_new_tokens=6, temperature=0.0).texts == \
        policy.generate(prompts, group_size=1, max_new_tokens=6, temperature=0.0).texts
    with pytest.raises(ValueError, match="weights do not fit"):
        sampler.load_weights({k: v for k, v in list(published.items())[1:]}, 4)  # an adapter tensor missing


def test_the_reference_is_the_base_with_the_adapter_off(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    policy = add_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                         _cfg(tiny_model_dir).lora_config()).eval()
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # an adapter that has learned something
    ids = torch.tensor([list(b"digit 7:")])
    with torch.no_grad():
        want = base(input_ids=ids).logits
        assert not torch.allclose(policy(input_ids=ids).logits, want, atol=1e-3)
        torch.testing.assert_close(AdapterOff(policy)(input_ids=ids).logits, want)
        assert not torch.allclose(policy(input_ids=ids).logits, want, atol=1e-3)  # the adapter is back on
    assert sum(p.numel() for p in policy.parameters()) < 1.2 * sum(p.numel() for p in base.parameters())


ATTENTION_AND_HEAD = ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]
"""The adapter targets of the Ray test and of bench/learning_curves.py. A random-init model's output layer maps every hidden state to near-uniform
logits (std ~0.2), so adapters on attention alone cannot make a digit likely (measured: reward flat at 0.01 for
300 steps with q/v or all-linear); the head's adapter learns "a digit", the attention's "which one"."""


@pytest.mark.ray
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_lora_run_on_two_workers_publishes_the_adapter_and_its_checkpoint_loads_with_peft(ray_session, strategy,
                                                                                          tiny_model_dir, tmp_path):
    """Four steps of a rank-8 adapter on two workers, DDP or FSDP2 (the frozen base sharded with the adapter),
    checked by their mechanics: only the adapter trains and is published, the checkpoint is a PEFT adapter
    directory holding the policy the run ended with, and (DDP) the merged export computes what base + adapter
    compute. (That such a run learns the digit task, 0.8 in about a hundred steps, is
    `python bench/learning_curves.py --curve lora-digit`: docs/benchmarks.md.)"""
    import json

    import ray
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from grpo.run import build_actors, run

    cfg = GRPOConfig(model=tiny_model_dir, output_dir=str(tmp_path / "runs"), run_name="lora", num_steps=4,
                     prompts_per_step=8, group_size=4, max_new_tokens=6, learning_rate=2e-3, kl_coef=0.0,
                     loss_agg="token-mean", lora_rank=8, lora_target_modules=ATTENTION_AND_HEAD,
                     num_policy_workers=2, eval_size=10, checkpoint_interval=2, cpus_per_worker=1,
                     cpus_per_reward_worker=0.5, strategy=strategy, lora_merged_export=strategy == "ddp")
    handles = build_actors(cfg)
    try:
        result = run(cfg, handles=handles)
        assert result.status == "completed" and result.steps == 4, result.error
        rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]

        full = sum(t.numel() * t.element_size() for t in
                   AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().values())
        published = {r["publish_bytes"] for r in rows}
        assert len(published) == 1 and published.pop() < 0.10 * full  # the adapter, every step

        ckpt = Path(result.checkpoint)
        assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
        assert not (ckpt / "model.safetensors").exists()  # an adapter directory, not a second copy of the base
        assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == cfg.model
        adapter = load_file(str(ckpt / "adapter_model.safetensors"))
        lora_b = [v for k, v in adapter.items() if "lora_B" in k]
        assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b)  # B starts at zero: every adapter trained

        evals = cfg.load_dataset().eval[: cfg.eval_size]
        prompts = [s.input for s in evals]
        served = ray.get(handles["rollout_actors"][0].generate.remote(
            prompts, group_size=1, max_new_tokens=cfg.max_new_tokens, temperature=0.0)).texts
        loaded = RolloutWorker(cfg.model)
        loaded.model = PeftModel.from_pretrained(loaded.model, str(ckpt)).eval()
        texts = loaded.generate(prompts, group_size=1, max_new_tokens=cfg.max_new_tokens, temperature=0.0).texts
        assert texts == served  # the checkpoint is the policy the run ended with
        final_eval = sum(digit_reward(s.prompt, t, s.expected) for s, t in zip(evals, texts, strict=True)) / len(evals)
        assert final_eval == pytest.approx(result.checkpoint_scores[result.checkpoint], abs=1e-9)  # the run's last eval
        # evaluation and models.deploy open a checkpoint with AutoModelForCausalLM: the adapter on its base
        assert RolloutWorker(str(ckpt)).generate(prompts, group_size=1, max_new_tokens=cfg.max_new_tokens,
                                                 temperature=0.0).texts == served
        if strategy == "fsdp":
            assert not (ckpt / "merged").exists()
            assert (ckpt / parallel.SHARDS_DIR).is_dir()  # the resume's shards: adapter, base and AdamW state
            return
        # the merged export is an ordinary model computing what base + adapter compute (to rounding)
        merged = ckpt / "merged"
        assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
        ids = torch.tensor([list(b"digit 7:"), list(b"digit 2:")])
        with torch.no_grad():
            torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(str(merged))(input_ids=ids).logits,
                                       loaded.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    finally:
        for h in handles["rollout_actors"] + handles["reward_actors"] + [handles["weight_board"], handles["monitor"]]:
            ray.kill(h)


@pytest.mark.ray
@pytest.mark.slow
def test_a_lora_run_under_fsdp2_resumes_from_its_sharded_checkpoint(ray_session, tiny_model_dir, tmp_path):
    """Two steps, then the same run asked for four: the second attempt builds the PEFT model on the meta device,
    reads nothing of the base (the checkpoint's shards hold base, adapter and AdamW state) and continues at
    step 3; every step is stored once and the final adapter is a PEFT directory that moved past step 2's."""
    import json

    import ray
    from safetensors.torch import load_file

    from grpo.run import build_actors, run

    def cfg_of(steps: int) -> GRPOConfig:
        return GRPOConfig(model=tiny_model_dir, output_dir=str(tmp_path / "runs"), run_name="lora-resume",
                          num_steps=steps, prompts_per_step=8, group_size=4, max_new_tokens=6, learning_rate=2e-3,
                          kl_coef=0.0, lora_rank=8, lora_target_modules=["q_proj", "v_proj"], strategy="fsdp",
                          num_policy_workers=2, eval_size=0, checkpoint_interval=2, cpus_per_worker=1,
                          cpus_per_reward_worker=0.5)

    adapters = []
    for steps in (2, 4):
        cfg = cfg_of(steps)
        handles = build_actors(cfg)
        try:
            result = run(cfg, handles=handles)
        finally:
            for h in handles["rollout_actors"] + handles["reward_actors"] + [handles["weight_board"],
                                                                              handles["monitor"]]:
                ray.kill(h)
        assert result.status == "completed" and result.steps == steps, result.error
        adapters.append(load_file(str(Path(result.checkpoint) / "adapter_model.safetensors")))
        lines = [x for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        if steps == 2:
            first = lines
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    assert lines[:2] == first  # steps 1-2 are the first attempt's, not run again: it resumed at step 3
    assert sorted(adapters[0]) == sorted(adapters[1])
    assert any(not torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0] if "lora_B" in k)
