"""PolicyServer throughput: completion tokens/s with concurrent clients, dynamic batching on vs off.

Baseline: the same PolicyServer with `batching=False` (one request decoded at a time, as a plain
HF `generate` server would). Both run as Serve applications on a local Ray, one replica each, with
the tiny random-init Llama (or a larger one: --hidden/--layers); the clients are asyncio tasks
posting OpenAI completions through Serve's HTTP proxy. Tokens are the `usage.completion_tokens` the
server reports, so early EOS is counted honestly.

    python bench/bench_policy_server.py [--clients 16] [--requests 8] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, clients: int, requests: int, max_tokens: int) -> tuple[float, int, list[float]]:
    """(seconds, completion tokens, per-request latencies) for `clients` x `requests` completions."""
    latencies: list[float] = []
    tokens = 0

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for j in range(requests):
            t0 = time.perf_counter()
            r = await http.post(url, json={"prompt": f"digit {(i + j) % 10}:", "max_tokens": max_tokens,
                                           "temperature": 1.0})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await http.post(url, json={"prompt": "warm up", "max_tokens": 4})
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        return time.perf_counter() - t0, tokens, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8, help="per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (and CPUs) of the replica")
    args = parser.parse_args()

    import ray
    from ray import serve

    from app.serving.policy import VariantSpec, build_policy_app
    from grpo.tiny import save_tiny_model

    model = save_tiny_model(Path(tempfile.mkdtemp()) / "m", hidden_size=args.hidden, num_layers=args.layers)
    ray.init(num_cpus=max(4, args.threads + 1), log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = {}
    try:
        for batching in (False, True):
            name = "batched" if batching else "unbatched"
            app = build_policy_app(name, [VariantSpec(name=name, path=str(model))], batching=batching,
                                   cpus_per_replica=args.threads, max_batch_size=args.clients)
            serve.run(app, name=name, route_prefix=f"/policies/{name}")
            url = f"http://127.0.0.1:{port}/policies/{name}/v1/completions"
            seconds, tokens, lat = asyncio.run(load(url, args.clients, args.requests, args.max_tokens))
            results[name] = tokens / seconds
            print(f"{name:>9}: {tokens} completion tokens in {seconds:.1f}s = {tokens / seconds:.0f} tok/s; "
                  f"latency p50 {statistics.median(lat) * 1000:.0f} ms, "
                  f"p95 {sorted(lat)[int(0.95 * len(lat)) - 1] * 1000:.0f} ms", flush=True)
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"dynamic batching: {results['batched'] / results['unbatched']:.2f}x the completion tokens/s of "
          f"one request at a time ({args.clients} clients, {args.max_tokens} max tokens, hidden {args.hidden}, "
          f"{args.layers} layers, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
