"""The memory plan (grpo.memplan): a model's size from its config.json alone, what each strategy holds, the
strategy `auto` picks, and a run that will not fit refused before anything starts, naming the knob."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from grpo import memplan
from grpo.config import ConfigError, GRPOConfig
from grpo.run import check_memory_plan

CONFIGS = Path(__file__).parent / "model_configs"
QWEN_7B = CONFIGS / "qwen2.5-7b"  # config.json only: the plan needs no weights


def _cfg(model: str | Path = QWEN_7B, **kw) -> GRPOConfig:
    base = dict(model=str(model), prompts_per_step=64, group_size=8, max_prompt_tokens=512, max_new_tokens=1024,
                micro_batch_size=16, num_policy_workers=8, num_rollout_workers=8, gpus_per_worker=1.0,
                dtype="bfloat16")
    return GRPOConfig(**(base | kw))


@pytest.mark.parametrize(("name", "params"), [("qwen2.5-7b", 7_615_616_512), ("qwen2.5-0.5b", 494_032_768)])
def test_parameters_from_config_json_alone_match_the_published_counts(name, params):
    assert memplan.ModelDims.from_config(CONFIGS / name).params == params


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [False, True])
def test_parameters_match_the_model_transformers_builds(tmp_path, arch, tie):
    from grpo.tiny import save_tiny_model

    path = save_tiny_model(tmp_path / "m", arch=arch, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                           intermediate_size=96, vocab_size=1000, tie_embeddings=tie)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    unique = {id(p): p.numel() for p in model.parameters()}  # a tied head counts once
    assert memplan.ModelDims.from_config(path).params == sum(unique.values())


def test_a_7b_policy_on_eight_80gb_gpus_is_planned_sharded_and_fits():
    cfg = _cfg()
    p = memplan.plan(cfg, memplan.ModelDims.from_config(QWEN_7B), device_memory_gib=80)
    assert p.strategy == "fsdp" and p.fits, memplan.render(p)
    parts = {x.name: x.bytes / memplan.GIB for x in p.policy.parts}
    # 16 bytes a parameter of training state, 1/8 each: 7.6e9 * 16 / 8 = 14.2 GiB
    assert parts["weights"] + parts["gradients"] + parts["optimizer"] == pytest.approx(7_615_616_512 * 16 / 8 / 2**30)
    assert "ddp_buckets" not in parts and "reference" not in parts
    ddp = memplan.plan(cfg, memplan.ModelDims.from_config(QWEN_7B), device_memory_gib=80, strategy="ddp")
    assert ddp.fits is False and ddp.policy.total_gib > 7.6e9 * 20 / 2**30  # 16 B + DDP's buckets, whole


def test_under_fsdp2_the_kl_reference_and_the_load_are_sharded_and_under_ddp_whole():
    dims = memplan.ModelDims.from_config(QWEN_7B)
    fsdp = memplan.plan(_cfg(kl_coef=0.02), dims, device_memory_gib=80, strategy="fsdp")
    ddp = memplan.plan(_cfg(kl_coef=0.02), dims, device_memory_gib=80, strategy="ddp")
    fs = {x.name: x.bytes for x in fsdp.policy.parts}
    dd = {x.name: x.bytes for x in ddp.policy.parts}
    assert fs["reference"] == pytest.approx(2 * dims.params / 8) and dd["reference"] == pytest.approx(2 * dims.params)
    # loading: each FSDP2 rank its eighth of the fp32 weights and reference (read by rows), not the whole model
    shard_gib = (4 + 2) * dims.params / 8 / memplan.GIB
    assert shard_gib < fsdp.load_gib < shard_gib + memplan.GPU_RUNTIME_GIB + 0.5
    assert ddp.load_gib > (4 + 2) * dims.params / memplan.GIB


def test_on_24gb_gpus_it_does_not_fit_and_the_advice_is_checked_against_the_plan():
    cfg = _cfg()
    dims = memplan.ModelDims.from_config(QWEN_7B)
    p = memplan.plan(cfg, dims, device_memory_gib=24)
    assert p.fits is False
    message = p.message()
    assert message.startswith(f"needs {p.policy_peak_gib:.1f} GiB per GPU (policy worker), has 24")
    more = next(a for a in p.advice if "more policy workers" in a)
    update = {"num_policy_workers": int(more.rsplit("(", 1)[1].rstrip(")")),
              "num_rollout_workers": int(next(a for a in p.advice if "rollout actors" in a).split()[1])}
    if "micro_batch_size to" in more:
        update["micro_batch_size"] = int(more.split("micro_batch_size to ")[1].split()[0])
    followed = memplan.plan(cfg.model_copy(update=update), dims, device_memory_gib=24)
    assert followed.fits, memplan.render(followed)


def test_auto_is_ddp_where_a_replica_fits_and_without_a_device_size(tiny_model_dir):
    small = _cfg(tiny_model_dir, num_policy_workers=2)
    dims = memplan.ModelDims.from_config(tiny_model_dir)
    assert memplan.plan(small, dims, device_memory_gib=80).strategy == "ddp"
    assert memplan.plan(_cfg(), memplan.ModelDims.from_config(QWEN_7B)).strategy == "ddp"  # nothing to compare with
    # LoRA: DDP where a replica (the frozen base, the adapter and its AdamW state, activations) fits one device,
    # FSDP2 where it does not (the 7B base alone is 28 GiB in fp32)
    assert memplan.plan(_cfg(tiny_model_dir, num_policy_workers=2, lora_rank=8), dims,
                        device_memory_gib=80).strategy == "ddp"
    lora_7b = memplan.plan(_cfg(lora_rank=8), memplan.ModelDims.from_config(QWEN_7B), device_memory_gib=24)
    assert lora_7b.strategy == "fsdp"
    assert memplan.plan(_cfg(lora_rank=8, strategy="ddp"), memplan.ModelDims.from_config(QWEN_7B),
                        device_memory_gib=24).policy_peak_gib > 5 * lora_7b.policy_peak_gib


def test_activation_checkpointing_and_the_logprob_chunk_bound_the_activations():
    dims = memplan.ModelDims.from_config(QWEN_7B)
    parts = lambda **kw: {x.name: x.bytes for x in memplan.plan(_cfg(**kw), dims, strategy="fsdp").policy.parts}  # noqa: E731
    on, off = parts(), parts(activation_checkpointing=False)
    assert off["activations"] > 10 * on["activations"]
    assert parts(logprob_chunk_tokens=4096)["logprob_head"] == 4 * on["logprob_head"]


def test_the_run_refuses_a_plan_that_does_not_fit_before_anything_starts(tiny_model_dir):
    cfg = GRPOConfig(model=tiny_model_dir, device_memory_gib=0.05)
    with pytest.raises(ConfigError, match=r"^memory: needs .* GiB per worker .* has 0.05"):
        check_memory_plan(cfg)
    # a GPU run without a size reads it from the GPU model Ray reports
    gpu = GRPOConfig(model=str(QWEN_7B), gpus_per_worker=1, num_policy_workers=8, prompts_per_step=64, dtype="bfloat16")
    resolved = check_memory_plan(gpu, {"GPU": 8.0, "accelerator_type:H100": 1.0})
    assert resolved.strategy == "fsdp"
    with pytest.raises(ConfigError, match="has 24"):
        check_memory_plan(gpu, {"GPU": 8.0, "accelerator_type:A10G": 1.0})
    # a Hub id (no local config.json) is not planned: auto means ddp
    assert check_memory_plan(GRPOConfig(model="Qwen/Qwen2.5-7B")).strategy == "ddp"


def test_plan_is_offline_from_the_submit_file(tmp_path):
    from typer.testing import CliRunner

    from app.client.cli import cli

    job = tmp_path / "job.yaml"
    job.write_text("config:\n  batch_size: 64\n  n_trajectories_per_query: 8\n  max_new_tokens: 1024\n"
                   "  num_policy_workers: 8\n  num_rollout_workers: 8\n  gpus_per_worker: 1\n"
                   "  engine:\n    dtype: bfloat16\n    max_prompt_tokens: 512\n    micro_batch_size: 16\n")
    ok = CliRunner().invoke(cli, ["plan", str(job), "--model-config", str(QWEN_7B), "--device-memory", "80"])
    assert ok.exit_code == 0, ok.output
    assert "strategy fsdp on 8 policy worker(s)" in ok.stdout and "fits:" in ok.stdout
    no = CliRunner().invoke(cli, ["plan", str(job), "--model-config", str(QWEN_7B), "--device-memory", "24"])
    assert no.exit_code == 1 and "does not fit: needs" in no.stdout and "more policy workers" in no.stdout
    bad = CliRunner().invoke(cli, ["plan", str(job)])  # config.model unset: the server's default, unknown here
    assert bad.exit_code == 2 and "config.json" in bad.stderr
