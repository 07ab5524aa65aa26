"""The engine's GPU path on one CUDA GPU, without Ray: collectives, rollout, FSDP2 update, weight publish.

    PYTHONPATH=. python bench/gpu_check.py [--out gpu.json] [--peak-tflops 989]   # on the GPU machine
    PYTHONPATH=. python bench/gpu_check.py --device cpu --tiny                    # the script itself, on CPU

Ray Train only creates the process group, so this script creates it by hand (`torch.distributed`, world
size 1, NCCL on CUDA, gloo on CPU) and drives the same classes a Ray run does:

  1. collectives  `parallel.Collectives(device).sum/max` through the backend, values checked
  2. rollout      `RolloutWorker(dir, dtype="bfloat16").generate`: 8 prompts x 8 completions x 512 new tokens,
                  no stop token, after an 8-token warm-up; rollout tok/s = completion tokens / wall seconds
  3. update       `Learner.step` on a model wrapped by `parallel.wrap_policy(strategy="fsdp", dtype="bfloat16")`
                  (FSDP2, bf16 compute, fp32 master weights and AdamW): 32 sequences of 512 prompt + 512
                  completion tokens, micro-batches of 16, 3 steps timed after one warm-up step; update tok/s
                  counts every token through forward and backward (prompt and completion)
  4. publish      `parallel.weight_buckets(dtype=bf16)` into `RolloutWorker.load_weights` bucket by bucket, as the trainer does

The model is Qwen2.5-0.5B-shaped (Qwen2ForCausalLM, 24 layers, hidden 896, 151936-row tied embedding),
random-init and saved to a temp directory with grpo.tiny's 259-token byte tokenizer: nothing is downloaded.
The rollout samples ids the tokenizer does not know; decoding drops them, which a throughput check can afford.

MFU = model FLOPs per update step / step seconds / peak dense bf16 FLOP/s. Model FLOPs (fwd + bwd = 3 x fwd):
6 x non-embedding params per token, 6 x vocab x hidden per position whose logits are computed (the learner
keeps only the completion's, `logits_to_keep`), and 12 x layers x hidden x seq_len per token for attention
(PaLM's count: the full square, no causal discount). Peak: 989 TFLOP/s dense bf16 on an H100 and on an
H200 (datasheets: the same GH100 compute); `--peak-tflops` overrides.

Needs torch, transformers, tokenizers, pydantic and pyyaml (grpo.config); not Ray. Exits 1 when a check fails.
GPU figures come only from a GPU: the `--tiny` CPU run checks that the script works, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

from grpo import loading, parallel
from grpo.config import GRPOConfig
from grpo.learner import Learner, score_batch
from grpo.rollout import RolloutWorker
from grpo.sampling import Rollout
from grpo.tiny import build_tokenizer

VOCAB = 151936
"""Qwen2.5's embedding rows, kept in --tiny too so that the ids-beyond-the-tokenizer path is exercised"""
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, datasheets (the H200 is the H100's GH100 compute)
"""dense bf16 TFLOP/s by a substring of torch.cuda.get_device_name (see the module docstring)"""


@dataclass(frozen=True)
class Sizes:
    """The model's shape and the batches measured."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    prompts: int  # rollout: prompts x group sequences of new_tokens each
    group: int
    new_tokens: int
    update_seqs: int  # update: sequences of update_len tokens, half prompt and half completion
    update_len: int
    micro_batch: int
    steps: int  # timed update steps, after one warm-up step


FULL = Sizes(896, 4864, 24, 14, 2, prompts=8, group=8, new_tokens=512, update_seqs=32, update_len=1024,
             micro_batch=16, steps=3)
TINY = Sizes(64, 256, 2, 4, 2, prompts=2, group=2, new_tokens=16, update_seqs=4, update_len=64, micro_batch=2, steps=2)


def save_model(s: Sizes, out: Path) -> int:
    """A random-init Qwen2 of shape `s` (fp32) and the byte tokenizer, saved to `out`; returns its parameter count."""
    tok = build_tokenizer()
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=True, rope_theta=1e6,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())  # the tied embedding counted once


def update_batch(s: Sizes, cfg: GRPOConfig):
    """`update_seqs` sequences of random ids, prompt and completion `update_len / 2` each, random rewards."""
    g = torch.Generator().manual_seed(0)
    n, half = s.update_seqs, s.update_len // 2
    ro = Rollout(
        prompt_ids=torch.randint(0, VOCAB, (n // s.group, half), generator=g).tolist(),
        completion_ids=torch.randint(0, VOCAB, (n, half), generator=g),  # (N, L)
        completion_mask=torch.ones(n, half, dtype=torch.bool), logprobs=torch.zeros(n, half),  # (N, L)
        finish_reasons=["length"] * n, texts=[""] * n, group_size=s.group, version=0,
    )
    return score_batch(ro, torch.rand(n, generator=g).tolist(), cfg)


def train_flops(s: Sizes, n_params: int) -> float:
    """Model FLOPs of one update step (the module docstring gives the formula)."""
    tokens = s.update_seqs * s.update_len
    logit_positions = s.update_seqs * (s.update_len // 2 + 1)  # logits_to_keep = completion + 1
    body = n_params - VOCAB * s.hidden
    return 6 * body * tokens + 6 * VOCAB * s.hidden * logit_positions + 12 * s.layers * s.hidden * s.update_len * tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo)")
    ap.add_argument("--tiny", action="store_true", help="2-layer model and small batches: checks the script in seconds")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s for the MFU")
    ap.add_argument("--out", type=Path, default=None, help="also write the summary here as JSON")
    args = ap.parse_args()
    s = TINY if args.tiny else FULL
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def peak_gb() -> float | None:
        return round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if cuda else None

    def reset_peak() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

    checks: dict[str, bool] = {}
    with socket.socket() as sock:  # a free port for the one-process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    tmp = tempfile.TemporaryDirectory()
    try:
        # 1. collectives: the tensors live on the worker's device, as NCCL requires
        col = parallel.Collectives(device)
        checks["collectives"] = col.sum([1.0, 2.5]) == [1.0, 2.5] and col.max([3.0, -1.0]) == [3.0, -1.0]

        # 2. rollout: the worker loads the saved directory in bf16, like a rollout actor
        model_dir = Path(tmp.name) / "qwen2"
        n_params = save_model(s, model_dir)
        worker = RolloutWorker(str(model_dir), device=str(device), dtype="bfloat16", torch_threads=min(8, os.cpu_count() or 1))
        # No stop token at all: every row decodes all new_tokens whatever the seed (a random model samples one of
        # its stop tokens about once in 76k draws, often enough to fail the length check on some seeds).
        worker.set_stop_ids([])
        prompts = [f"prompt {i}: count the digits of {i * 7919}" for i in range(s.prompts)]
        worker.generate(prompts, group_size=s.group, max_new_tokens=8, temperature=1.0, seed=1)  # warm-up
        reset_peak()
        sync()
        t0 = time.perf_counter()
        ro = worker.generate(prompts, group_size=s.group, max_new_tokens=s.new_tokens, temperature=1.0, seed=0)
        sync()
        rollout_s = time.perf_counter() - t0
        rollout_peak = peak_gb()
        checks["rollout"] = ro.completion_ids.shape == (s.prompts * s.group, s.new_tokens) and \
            ro.num_tokens == s.prompts * s.group * s.new_tokens and len(ro.texts) == s.prompts * s.group

        # 3. update: FSDP2 bf16 mixed precision on the fp32 model, the trainer's wrapping
        cfg = GRPOConfig(model=str(model_dir), dtype="bfloat16", strategy="fsdp", group_size=s.group,
                         max_new_tokens=s.update_len // 2, micro_batch_size=s.micro_batch, learning_rate=1e-6,
                         kl_coef=0.0)
        # built on the meta device, sharded, then its shards read from the files (trainer.build_policy's way)
        policy = parallel.wrap_policy(loading.empty_model(model_dir, torch.float32), strategy="fsdp",
                                      dtype="bfloat16", device=device)
        loading.materialize(policy, device, loading.SafetensorsIndex.of(Path(model_dir)))
        learner = Learner(cfg, policy, ref_model=None, pad_id=worker.pad_id)
        batch = update_batch(s, cfg)
        reset_peak()
        times, stats = [], []
        for i in range(1 + s.steps):
            sync()
            t0 = time.perf_counter()
            stats.append(learner.step(batch, num_tokens=batch.num_tokens, num_seqs=batch.num_seqs))
            sync()
            if i > 0:  # the first step allocates AdamW's state and warms the kernels
                times.append(time.perf_counter() - t0)
        update_peak = peak_gb()
        step_s = sorted(times)[len(times) // 2]
        checks["update"] = all(math.isfinite(st["loss"]) and math.isfinite(st["grad_norm"]) and st["grad_norm"] > 0
                               for st in stats)

        # 4. publish: bf16 buckets gathered from the shards into the rollout worker, as grpo.trainer.publish does
        sync()
        t0 = time.perf_counter()
        buckets = list(parallel.weight_buckets(policy, dtype=torch.bfloat16, bucket_bytes=256 << 20))
        checks["publish"] = worker.load_weights(buckets, version=1) == 1
        publish_s = time.perf_counter() - t0
    finally:
        dist.destroy_process_group()
        tmp.cleanup()

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    flops = train_flops(s, n_params)
    summary = {
        "date": datetime.date.today().isoformat(), "device": name, "backend": backend,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "model": f"Qwen2 {s.layers} layers, hidden {s.hidden}, {n_params / 1e6:.1f}M params, random init",
        "rollout_tokens": ro.num_tokens, "rollout_s": round(rollout_s, 3),
        "rollout_tokens_per_s": round(ro.num_tokens / rollout_s, 1), "rollout_peak_gb": rollout_peak,
        "update_tokens": s.update_seqs * s.update_len, "update_step_s": round(step_s, 4),
        "update_tokens_per_s": round(s.update_seqs * s.update_len / step_s, 1),
        "update_flops_per_token": round(flops / (s.update_seqs * s.update_len)),
        "peak_tflops": peak, "mfu": round(flops / step_s / (peak * 1e12), 4) if peak else None,
        "update_peak_gb": update_peak, "publish_s": round(publish_s, 3),
        "sizes": asdict(s), "checks": checks,
    }
    print(f"\n== gpu_check {'(tiny) ' if args.tiny else ''}{summary['date']}: {name}, torch {torch.__version__}, "
          f"transformers {transformers.__version__} ==")
    print("| figure | value |\n|---|---|")
    for key, label in [("model", "model"), ("rollout_tokens_per_s", f"rollout tok/s ({ro.num_tokens} tokens)"),
                       ("rollout_peak_gb", "rollout peak memory GB"),
                       ("update_tokens_per_s", f"update tok/s ({s.update_seqs} x {s.update_len} tokens a step)"),
                       ("update_step_s", "update step s (median)"), ("mfu", f"MFU (peak {peak or 'unknown: --peak-tflops'} TFLOP/s)"),
                       ("update_peak_gb", "update peak memory GB"), ("publish_s", "publish s (gather + load)")]:
        print(f"| {label} | {'-' if summary[key] is None else summary[key]} |")
    print("| checks | " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items()) + " |")
    if args.out is not None:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
