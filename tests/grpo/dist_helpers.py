"""Functions run on 2 gloo ranks in spawned processes (plain torch.distributed, no Ray), for tests of
grpo.parallel. Each writes what it saw to `out/rank{R}.pt`; the test reads the files."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist


def run_ranks(fn, out: Path, *args, world: int = 2) -> list[dict]:
    """`fn(rank, world, out, *args)` on `world` gloo ranks; returns each rank's saved dict."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(world, port, fn, out, args), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _entry(rank: int, world: int, port: int, fn, out: Path, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, out, *args), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def fsdp_buckets(rank: int, world: int, out: Path, model_dir: str, bucket_bytes: int) -> dict:
    """The buckets `weight_buckets` yields on this rank of an FSDP2-wrapped model, in bf16."""
    from transformers import AutoModelForCausalLM

    from grpo import parallel

    model = parallel.wrap_policy(AutoModelForCausalLM.from_pretrained(model_dir), strategy="fsdp", dtype="bfloat16",
                                 device=torch.device("cpu"))
    buckets = list(parallel.weight_buckets(model, dtype=torch.bfloat16, bucket_bytes=bucket_bytes))
    full = parallel.full_state_dict(model)
    return {"buckets": buckets, "full_keys": sorted(full)}


def sharded_load(rank: int, world: int, out: Path, model_dir: str, dtype: str) -> dict:
    """The policy built on the meta device and read shard by shard (grpo.loading), as trainer.build_policy
    does under FSDP2, next to the reference built the same way; what each rank holds and the gathered whole."""
    from grpo import loading, parallel

    device = torch.device("cpu")
    model = parallel.wrap_policy(loading.empty_model(model_dir, torch.float32), strategy="fsdp", dtype=dtype,
                                 device=device)
    loading.materialize(model, device, loading.SafetensorsIndex.of(Path(model_dir)))
    local_bytes = sum(p.to_local().numel() * p.to_local().element_size() for p in model.parameters())
    ids = torch.arange(1, 13).reshape(2, 6)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    ref = parallel.shard(loading.empty_model(model_dir, torch.bfloat16), device=device)
    loading.materialize(ref, device, loading.SafetensorsIndex.of(Path(model_dir)))
    ref_local = {n: p.to_local().clone() for n, p in ref.named_parameters()}
    full = parallel.full_state_dict(model)
    model.reshard()  # the root keeps its gathered weights after a forward without backward
    with torch.no_grad():  # a "warm-up": the policy moves, then the reference takes its weights shard by shard
        for p in model.parameters():
            p.to_local().add_(0.5)
    parallel.copy_weights(ref.requires_grad_(False), model)
    return {"local_bytes": local_bytes, "logits": logits, "full": full,
            "buffers": {n: b.clone() for n, b in model.named_buffers()}, "ref_before": ref_local,
            "ref_full_after": parallel.full_state_dict(ref)}


def session_step(rank: int, world: int, out: Path, model_dir: str, rows: list, denominator: float) -> dict:
    """One session step on `world` workers (grpo.session.SessionWorker, FSDP2 when world > 1): the rows split
    round-robin as the host splits them (a worker may get none), one AdamW step, then the weights as the
    sampler gets them and as save_weights writes them."""
    from grpo.session import SessionWorker

    w = SessionWorker(model_dir, rank=rank, world=world)
    w.join("127.0.0.1", 0)  # the group exists already: this shards the model
    got = w.forward_backward(rows[rank::world], "cross_entropy", {}, denominator)
    step = w.optim_step({"learning_rate": 1e-2})
    weights = w.weights()
    w.save_weights(str(out / "saved"), model_dir)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in w.model.parameters())
    return {"logprobs": got["logprobs"], "grad_norm": step["grad_norm"], "weights": weights, "local": local,
            "sharded": hasattr(next(w.model.parameters()), "to_local")}


def lora_sharded_load(rank: int, world: int, out: Path, model_dir: str) -> dict:
    """A LoRA policy under FSDP2 as trainer.build_policy builds it: the adapter on the meta model, sharded, each
    rank reading its rows of the base by their names in the base's files; what each rank holds, the gathered
    whole and the logits."""
    import transformers

    from grpo import trainer
    from grpo.config import GRPOConfig

    def whole(*args, **kwargs):
        raise AssertionError("the base was loaded whole")

    transformers.AutoModelForCausalLM.from_pretrained = whole  # in this spawned process only
    cfg = GRPOConfig(model=model_dir, strategy="fsdp", num_policy_workers=world, lora_rank=4,
                     lora_target_modules=["q_proj", "v_proj"], kl_coef=0.0)
    model = trainer.build_policy(cfg, torch.device("cpu"), None)
    from grpo import parallel

    local_bytes = sum(p.to_local().numel() * p.to_local().element_size() for p in model.parameters())
    with torch.no_grad():
        logits = model(input_ids=torch.arange(1, 13).reshape(2, 6)).logits.float()
    return {"local_bytes": local_bytes, "logits": logits, "full": parallel.full_state_dict(model),
            "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)}
