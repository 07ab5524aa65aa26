"""What a policy rank holds while it loads, before and after the meta-device load: 2 gloo ranks (plain
torch.distributed, no Ray), FSDP2, fp32 policy plus the bf16 KL reference, random-init models saved as
ordinary Hugging Face directories.

    python bench/sharded_load.py [--cases smol,qwen05]

- whole (the engine before, b725c24): every rank runs `from_pretrained` (the whole fp32 model in its memory),
  then `fully_shard`; the KL reference is a whole bf16 copy on every rank.
- sharded (grpo.trainer.build_policy / build_reference): the model is built on the meta device, sharded, and
  each rank reads only its rows of the safetensors files (grpo.loading); the reference the same way, in bf16.

Printed per case and mode, the larger of the two ranks: the peak resident set during the load (VmHWM, less
shared memory, from just before the load) and what stays resident after it, in GiB, and the ratio
sharded / whole; then rank 0's peak growth while it exports the checkpoint's Hugging Face directory
(whole: the full fp32 state dict gathered to rank 0, then `save_pretrained`; sharded: `parallel.save_hf`,
one file of at most 2 GiB at a time). The plan's load figure (grpo.memplan) is printed next to it. glibc's mmap threshold is
fixed at 64 KiB as in bench/memory_plan.py, so freed tensors leave the resident set.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.memory_plan import CASES  # noqa: E402

GIB = 1024**3


def _rank(rank: int, world: int, port: int, model: str, mode: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from grpo import memory, parallel, trainer
    from grpo.config import GRPOConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = GRPOConfig(model=model, strategy="fsdp", kl_coef=0.02, num_policy_workers=world, dtype="bfloat16",
                     activation_checkpointing=False)
    device = torch.device("cpu")
    base = memory.resident_bytes()
    memory.reset_peak()
    if mode == "whole":
        policy = parallel.wrap_policy(trainer._load_model(model, torch.float32), strategy="fsdp", dtype="bfloat16",
                                      device=device)
        ref = trainer._load_model(model, torch.bfloat16).requires_grad_(False).eval()
    else:
        policy = trainer.build_policy(cfg, device, None)
        ref = trainer.build_reference(cfg, device, Path(model))
    peak = memory.peak_bytes() - base
    held = memory.resident_bytes() - base
    # the checkpoint's Hugging Face export: before, the whole fp32 state dict on rank 0, then save_pretrained;
    # after, parallel.save_hf (gathered and written one file at a time)
    export_dir = Path(out) / f"export{rank}"
    export_dir.mkdir()
    before = memory.resident_bytes()
    memory.reset_peak()
    if mode == "whole":
        sd = parallel.full_state_dict(policy)
        if rank == 0:
            policy.save_pretrained(export_dir, state_dict=sd)
        del sd
    else:
        parallel.save_hf(policy, export_dir if rank == 0 else None)
    export_peak = memory.peak_bytes() - before
    torch.save({"peak": peak, "held": held, "export": export_peak}, f"{out}/rank{rank}.pt")
    del policy, ref
    dist.barrier()
    dist.destroy_process_group()


def measure(model: Path, mode: str) -> tuple[float, float, float]:
    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(2, port, str(model), mode, out), nprocs=2, join=True)
        ranks = [torch.load(f"{out}/rank{r}.pt") for r in range(2)]
    return max(r["peak"] for r in ranks) / GIB, max(r["held"] for r in ranks) / GIB, ranks[0]["export"] / GIB


def planned_load(model: Path) -> float:
    from grpo import memplan
    from grpo.config import GRPOConfig

    cfg = GRPOConfig(model=str(model), strategy="fsdp", kl_coef=0.02, num_policy_workers=2, dtype="bfloat16")
    p = memplan.plan(cfg, memplan.ModelDims.from_config(str(model)), device="cpu")
    return p.load_gib - memplan.CPU_RUNTIME_GIB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="smol,qwen05")
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # the spawned ranks start with it
    from grpo.tiny import save_tiny_model

    print(f"# {datetime.date.today()}, {os.cpu_count()} cores, 2 gloo ranks, FSDP2 + bf16 KL reference")
    print(f"{'case':8} {'params':>8} {'mode':8} {'peak GiB':>9} {'held GiB':>9} {'plan GiB':>9} {'export GiB':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            model = save_tiny_model(Path(tmp) / case, arch="qwen2", **CASES[case])
            from grpo import memplan

            params = memplan.ModelDims.from_config(str(model)).params
            got = {}
            for mode in ("whole", "sharded"):
                got[mode] = measure(model, mode)
                plan = f"{planned_load(model):9.2f}" if mode == "sharded" else f"{'':9}"
                print(f"{case:8} {params / 1e6:7.0f}M {mode:8} {got[mode][0]:9.2f} {got[mode][1]:9.2f} {plan} "
                      f"{got[mode][2]:10.2f}")
            print(f"{case:8} {'':8} {'ratio':8} {got['sharded'][0] / got['whole'][0]:8.2f}x "
                  f"{got['sharded'][1] / got['whole'][1]:8.2f}x {'':9} {got['sharded'][2] / got['whole'][2]:9.2f}x")


if __name__ == "__main__":
    main()
