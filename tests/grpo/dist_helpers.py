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
