"""Decode without waste: useful tokens a second of the rollout's sampler against HF `generate` and against the
loop as it was before rows that stop left the batch.

    PYTHONPATH=. python bench/decode.py [--prompts 8] [--group 8] [--max-new 128] [--hidden 256] [--layers 4]
                                        [--repeats 3] [--device cpu|cuda] [--dtype float32|bfloat16] [--threads 2]

One random-init grpo.tiny Llama (its byte tokenizer), P prompts x G completions, `--max-new` new tokens at
temperature 1, seed 0. A random model has no end of its own, so the stop tokens are chosen from a free run
(no stop token) so that about half the rows stop before the limit (the share is printed); every side then
samples with that stop set:

  hf        `model.generate(do_sample=True, num_return_sequences=G, eos_token_id=stops)` on the left-padded
            prompts: finished rows keep decoding pad until the last row ends
  loop      `RolloutWorker.generate(compact=False, sync_every=1)`: the loop before this change, every row in
            every decode step, the host reading the device once a token
  compact   `RolloutWorker.generate()` as the engine runs it: rows that stopped leave the batch (and the KV
            cache), the device read once every 4 tokens on an accelerator (every token on the CPU)

Useful tokens are the completions' own (up to and including the stop token), the same count for every side
but HF's (it samples its own tokens). Each side is timed `--repeats` times after one warm-up; the median is
reported, with the ratio to `loop`. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def useful(ids: torch.Tensor, stops: list[int]) -> int:
    """Tokens of each row up to and including its first stop token (all of them when none): (N, L) -> count."""
    hit = torch.isin(ids, torch.tensor(stops))  # (N, L)
    first = torch.where(hit.any(dim=1), hit.int().argmax(dim=1) + 1, ids.shape[1])  # (N,)
    return int(first.sum())


def choose_stops(free: torch.Tensor, share: float = 0.5) -> tuple[list[int], float]:
    """Token ids whose first appearance ends about `share` of the free run's rows before the limit."""
    stops: list[int] = []
    got = 0.0
    candidates = sorted({int(t) for t in free.flatten().tolist()})
    while got < share:
        best = None
        for tok in candidates:
            if tok in stops:
                continue
            trial = stops + [tok]
            frac = float(torch.isin(free, torch.tensor(trial)).any(dim=1).float().mean())
            if best is None or abs(frac - share) < abs(best[1] - share):
                best = (tok, frac)
        if best is None or best[1] <= got:
            break
        stops.append(best[0])
        got = best[1]
    return stops, got


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    from grpo.rollout import RolloutWorker
    from grpo.sampling import left_pad
    from grpo.tiny import save_tiny_model

    torch.manual_seed(0)
    prompts = [f"digit {i}: the answer is" for i in range(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_model(Path(tmp) / "tiny", hidden_size=args.hidden, num_layers=args.layers)
        worker = RolloutWorker(str(model_dir), dtype=args.dtype, device=args.device, torch_threads=args.threads)
    kw = {"group_size": args.group, "max_new_tokens": args.max_new, "seed": 0}
    worker.set_stop_ids([])
    free = worker.generate(prompts, **kw).completion_ids
    stops, share = choose_stops(free)
    worker.set_stop_ids(stops)

    ids, mask = left_pad(worker.encode_prompts(prompts), worker.pad_id)
    ids, mask = ids.to(worker.device), mask.to(worker.device)

    def hf() -> int:
        with torch.inference_mode():
            out = worker.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                        top_p=1.0, top_k=0, max_new_tokens=args.max_new,
                                        num_return_sequences=args.group, eos_token_id=stops,
                                        pad_token_id=worker.pad_id)
        return useful(out[:, ids.shape[1]:].cpu(), stops)

    def ours(**extra) -> int:
        return worker.generate(prompts, **kw, **extra).num_tokens

    sides = {"hf": hf, "loop": lambda: ours(compact=False, sync_every=1), "compact": lambda: ours()}
    results: dict[str, dict[str, float]] = {}
    for name, fn in sides.items():
        fn()  # warm-up
        times, tokens = [], 0
        for _ in range(args.repeats):
            if worker.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens = fn()
            if worker.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        results[name] = {"seconds": sec, "useful_tokens": tokens, "tokens_per_s": tokens / sec}

    n = args.prompts * args.group
    print(f"{datetime.date.today()}  {args.device} ({os.cpu_count()} cores, {args.threads} threads), {args.dtype}; "
          f"tiny Llama hidden {args.hidden} x {args.layers} layers; {args.prompts} x {args.group} rows, "
          f"{args.max_new} new tokens; {share:.0%} of rows stop early (stop ids {stops})")
    print(f"{'side':<8} {'s':>8} {'useful tok':>11} {'useful tok/s':>13} {'vs loop':>8}")
    for name, r in results.items():
        print(f"{name:<8} {r['seconds']:>8.3f} {r['useful_tokens']:>11d} {r['tokens_per_s']:>13.0f} "
              f"{r['tokens_per_s'] / results['loop']['tokens_per_s']:>7.2f}x")
    print(json.dumps({"date": str(datetime.date.today()), "device": args.device, "rows": n, "max_new": args.max_new,
                      "stopped_early": share, **{f"{k}_tok_s": round(v["tokens_per_s"], 1) for k, v in results.items()},
                      "compact_vs_loop": round(results["compact"]["tokens_per_s"] / results["loop"]["tokens_per_s"], 3),
                      "compact_vs_hf": round(results["compact"]["tokens_per_s"] / results["hf"]["tokens_per_s"], 3)}))


if __name__ == "__main__":
    main()
