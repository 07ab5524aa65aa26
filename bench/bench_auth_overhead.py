"""What authentication, rate limiting, audit and request metrics cost per call of the job API.

Baseline: the same app with `RAYGRPO_AUTH=off` and no rate limits (the request metrics, the audit
row of a state change and the request-id middleware stay: they cannot be turned off). Each configuration answers the same
`training.get_status` (a read: no audit row) and `training.cancel` of a missing job (a state change:
one audit row) in process through FastAPI's TestClient, on SQLite, with and without Redis (buckets
and counters in Redis cost one round trip each). Prints per-call latency (median, p95) and the ratio
to the baseline.

    python bench/bench_auth_overhead.py [--calls 2000] [--redis redis://127.0.0.1:6379/12]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient

from app.api.auth import mint_token
from app.api.main import create_app
from app.settings import Settings
from grpo.tiny import save_tiny_model


def measure(client: TestClient, body: dict, calls: int) -> tuple[float, float]:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        r = client.post("/api/v1/jsonrpc", json=body)
        times.append(time.perf_counter() - t0)
        assert r.status_code in (200, 404), r.text
    times.sort()
    return statistics.median(times) * 1e3, times[int(0.95 * len(times))] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model = tmp / "model"
    save_tiny_model(model)
    configs = {
        "baseline (auth off, no limits)": dict(auth="off", rate_limits={"default": 0}, redis_url=None),
        "JWT + limits + audit, in process": dict(auth="on", redis_url=None),
        "JWT + limits + audit, Redis": dict(auth="on", redis_url=args.redis),
    }
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for i, (name, over) in enumerate(configs.items()):
        limits = {"default": 0} if over.get("auth") == "off" else {"default": 10**9}
        settings = Settings(home=tmp / f"h{i}", database_url=None, default_model=str(model),
                            jwt_secret="bench-secret-" + "x" * 32, rate_limits=over.pop("rate_limits", limits), **over)
        app = create_app(settings)
        headers = {"Authorization": f"Bearer {mint_token(settings, 'bench', 'admin')}"}
        with TestClient(app, headers=headers) as client:
            job = client.post("/api/v1/jsonrpc", json={
                "jsonrpc": "2.0", "method": "training.start_grpo", "id": 1,
                "params": {"agent_id": "b", "training_data": [{"query": "q", "expected_outcome": "a"}],
                           "config": {"n_iterations": 1, "max_budget_usd": "1"}}}).json()["result"]["job_id"]
            read = {"jsonrpc": "2.0", "method": "training.get_status", "params": {"job_id": job}, "id": 2}
            write = {"jsonrpc": "2.0", "method": "training.cancel", "params": {"job_id": "job_" + "0" * 32}, "id": 3}
            measure(client, read, 100)  # warm up
            results[name] = {"get_status": measure(client, read, args.calls),
                             "cancel": measure(client, write, args.calls // 2)}
    base = results["baseline (auth off, no limits)"]
    print(f"{'configuration':36s} {'call':18s} {'p50 ms':>8s} {'p95 ms':>8s} {'p50 / baseline':>15s}")
    for name, calls in results.items():
        for call, (p50, p95) in calls.items():
            print(f"{name:36s} {call:18s} {p50:8.2f} {p95:8.2f} {p50 / base[call][0]:14.2f}x")


if __name__ == "__main__":
    main()
