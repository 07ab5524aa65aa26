"""Latency and throughput of the job API's `training.get_status`: Ray Serve against plain uvicorn, on loopback.

    python bench/bench_api_latency.py [--clients 1,8,32] [--duration 10] [--warmup 2]
                                      [--sides uvicorn,serve] [--serve-variants replicas2,ongoing16]
                                      [--pool per-client|shared] [--serve-env RAY_SERVE_THROUGHPUT_OPTIMIZED=1]

One SQLite file in a temp folder is seeded with one queued job (`training.start_grpo` on the tiny model
of grpo.tiny), then every side answers `training.get_status` for that job:

  uvicorn  the FastAPI app of app.api.main.create_app in one `uvicorn app.api.main:create_app --factory` process
           (uvloop + httptools, access log on, into a file), the baseline of the ratios
  serve    the same app as deployed by app.api.serve.start (deployment TrainingAPI as shipped: autoscaling
           1..4 replicas, max_ongoing_requests 64) behind Serve's HTTP proxy on a local
           ray.init(num_cpus=4); RAYGRPO_MAX_RUNNING_JOBS=0, so the Dispatcher never launches the job
  serve:replicas2, serve:ongoing16   optional extra rows at the largest client count: the deployment
           redeployed with 2 fixed replicas, or 1 fixed replica with max_ongoing_requests 16 (the rest
           of the requests queue in the proxy)

The Dispatcher builds a Ray Jobs client in its constructor, which needs the dashboard (the Jobs API), so
Ray starts with the dashboard on a free port and the replica's RAY_DASHBOARD_URL points at it.

Each level runs N asyncio clients that send requests back to back over N keep-alive connections (by
default one httpx.AsyncClient of one connection per client; `--pool shared`: one client, a pool of N): `--warmup` seconds discarded, then `--duration` seconds recorded with time.perf_counter around
each request; every loop is bounded in time and count. For Serve the proxy's and the replica's own
per-request times are read from their access logs, which splits a request into proxy and replica time.
The load generator shares the machine's cores with the server; its CPU per request is printed too.
Not covered: the write methods, PostgreSQL, Redis, more than one host.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

GOAL_P95_MS = 25.0
"""the issue's target: p95 of training.get_status at 32 concurrent clients"""
GOAL_CLIENTS = 32
MAX_REQUESTS_PER_CLIENT = 200_000
"""hard bound on any one client loop besides its deadline"""
REQUEST_TIMEOUT_S = 10.0
SEED_PARAMS = {"agent_id": "bench", "config": {"n_iterations": 5, "batch_size": 4, "reward": "digit",
                                               "max_budget_usd": "1"},
               "training_data": [{"query": "digit 1:", "expected_outcome": "1"}]}
ACCESS_LINE = re.compile(r"POST /api/v1/jsonrpc (\d{3}) ([\d.]+)ms")
"""Serve's access-log entry (proxy and replica log the same shape)"""


@dataclass
class Level:
    """One side at one client count: latencies of the measured window and what they add up to."""

    side: str
    clients: int
    latencies_ms: list[float]
    errors: int
    window_s: float
    client_cpu_s: float
    replicas: int | None = None
    proxy_ms: list[float] = field(default_factory=list)  # Serve proxy's own per-request times
    replica_ms: list[float] = field(default_factory=list)  # Serve replica's own per-request times

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.window_s

    def pct(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- load ----------------------------------------------------------------------------------------

async def _client_loop(client: httpx.AsyncClient, url: str, body: dict, stop_at: float,
                       out: list[float] | None) -> int:
    """Requests back to back until `stop_at`; appends each latency (ms) to `out`; returns the errors."""
    errors = 0
    for _ in range(MAX_REQUESTS_PER_CLIENT):
        if time.perf_counter() >= stop_at:
            break
        t0 = time.perf_counter()
        try:
            r = await client.post(url, json=body)
            ok = r.status_code == 200 and "result" in r.json()
        except httpx.HTTPError:
            ok = False
        dt = (time.perf_counter() - t0) * 1000
        if not ok:
            errors += 1
        elif out is not None:
            out.append(dt)
    return errors


async def _load(url: str, job_id: str, clients: int, args: argparse.Namespace, on_start: Callable[[], None]
                ) -> tuple:
    body = {"jsonrpc": "2.0", "method": "training.get_status", "params": {"job_id": job_id}, "id": 1}
    # One pool of N connections (shared) or N clients of one connection each (per-client): httpx's
    # shared pool costs the load generator more CPU per request as N grows (encode/httpx#3215).
    n_pools, size = (1, clients) if args.pool == "shared" else (clients, 1)
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    pools = [httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S, headers=AUTH) for _ in range(n_pools)]
    try:
        stop = time.perf_counter() + args.warmup
        await asyncio.gather(*(_client_loop(pools[i % n_pools], url, body, stop, None) for i in range(clients)))
        latencies: list[float] = []
        on_start()
        cpu0, t0 = time.process_time(), time.perf_counter()
        errors = await asyncio.gather(*(_client_loop(pools[i % n_pools], url, body, t0 + args.duration, latencies)
                                        for i in range(clients)))
        window, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        for pool in pools:
            await pool.aclose()
    return latencies, sum(errors), window, cpu


def measure(side: str, url: str, job_id: str, clients: int, args: argparse.Namespace,
            on_start: Callable[[], None] = lambda: None) -> Level:
    """One level; `on_start` runs when the warm-up ends and the measured window begins."""
    lat, errors, window, cpu = asyncio.run(_load(url, job_id, clients, args, on_start))
    level = Level(side, clients, lat, errors, window, cpu)
    print(f"  {side:<16} {clients:>3} clients: {level.rps:7.0f} req/s  p50 {level.pct(50):6.1f}  "
          f"p95 {level.pct(95):6.1f}  p99 {level.pct(99):6.1f} ms  errors {errors}", flush=True)
    return level


def rpc(url: str, method: str, params: dict) -> dict:
    r = httpx.post(url, json={"jsonrpc": "2.0", "method": method, "params": params, "id": 1}, timeout=120,
                   headers=AUTH)
    body = r.json()
    if "result" not in body:
        raise RuntimeError(f"{method} failed: {body}")
    return body["result"]


def wait_ready(base: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health/live", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base} not up after {timeout_s}s")


# ---- sides ---------------------------------------------------------------------------------------

def app_env(home: Path, model: Path, redis_url: str = "") -> dict[str, str]:
    """What both sides' app processes read their Settings from. Authentication stays on (every request
    carries a JWT signed with the home's local secret) and get_status has a limit too high to trip,
    so each request pays for verifying the token and taking from its bucket, as in production."""
    return {"RAYGRPO_HOME": str(home), "DATABASE_URL": f"sqlite:///{home / 'raygrpo.db'}", "REDIS_URL": redis_url,
            "RAYGRPO_DEFAULT_MODEL": str(model), "RAYGRPO_MAX_RUNNING_JOBS": "0",
            "RAYGRPO_RATE_LIMITS": "training.get_status=1000000000"}


AUTH: dict[str, str] = {}
"""the Authorization header of every request (set in main, from the home's local secret)"""


def run_uvicorn(env: dict[str, str], home: Path, clients: list[int], args: argparse.Namespace
                ) -> tuple[str, list[Level]]:
    """Start one uvicorn process, seed the job, measure each client count; returns the job id too."""
    port = free_port()
    log = open(home / "uvicorn.log", "w")  # noqa: SIM115 -- closed below, after the process ends
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.api.main:create_app", "--factory",
                             "--host", "127.0.0.1", "--port", str(port)],
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    levels = []
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, 60)
        url = f"{base}/api/v1/jsonrpc"
        job_id = rpc(url, "training.start_grpo", SEED_PARAMS)["job_id"]
        for n in clients:
            levels.append(measure("uvicorn", url, job_id, n, args))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()
    return job_id, levels


class ServeLogs:
    """Reads the access-log lines the proxy and the replicas appended since the last `mark()`."""

    def __init__(self, session_dir: Path) -> None:
        self.dir = session_dir / "logs" / "serve"
        self.offsets: dict[Path, int] = {}

    def mark(self) -> None:
        self.offsets = {p: p.stat().st_size for p in self.dir.glob("*.log")}

    def since_mark(self, kind: str) -> list[float]:
        times = []
        for p in self.dir.glob(f"{kind}_*.log"):
            with open(p, "rb") as f:
                f.seek(self.offsets.get(p, 0))
                text = f.read().decode(errors="replace")
            times += [float(m.group(2)) for m in ACCESS_LINE.finditer(text) if m.group(1) == "200"]
        return times


def run_serve(env: dict[str, str], job_id: str, args: argparse.Namespace) -> list[Level]:
    """The shipped deployment at every client count, then the extra variants at the largest one."""
    import ray
    from ray import serve

    from app.api import serve as app_serve
    from app.jobs.dispatcher import ACTOR_NAME, NAMESPACE

    os.environ.update(args.serve_env)  # the local Ray's processes (proxy, replicas) inherit this environment
    dash_port = free_port()
    ctx = ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_port=dash_port, namespace="raygrpo-bench",
                   log_to_driver=False)
    levels = []
    try:
        env = {**env, "RAY_DASHBOARD_URL": f"http://127.0.0.1:{dash_port}"}
        url = app_serve.start(host="127.0.0.1", port=free_port(), env=env)
        wait_ready(url.removesuffix("/api/v1/jsonrpc"), 120)
        logs = ServeLogs(Path(ctx.address_info["session_dir"]))

        def one(side: str, n: int) -> None:
            level = measure(side, url, job_id, n, args, on_start=logs.mark)
            level.proxy_ms, level.replica_ms = logs.since_mark("proxy"), logs.since_mark("replica")
            level.replicas = running_replicas()
            levels.append(level)

        for n in args.clients:
            one("serve", n)
        actor_options = {"num_cpus": 0.1, "runtime_env": {"env_vars": env}}
        variants = {"replicas2": {"num_replicas": 2, "autoscaling_config": None},
                    "ongoing16": {"num_replicas": 1, "autoscaling_config": None, "max_ongoing_requests": 16}}
        for name in args.serve_variants:
            target = app_serve.TrainingAPI.options(ray_actor_options=actor_options, **variants[name]).bind()
            serve.run(target, name="raygrpo-api", route_prefix="/", blocking=False)
            wait_deployed(variants[name]["num_replicas"], 120)
            one(f"serve:{name}", max(args.clients))
    finally:
        serve.shutdown()
        try:
            ray.kill(ray.get_actor(ACTOR_NAME, namespace=NAMESPACE))
        except ValueError:
            pass
        ray.shutdown()
    return levels


def running_replicas() -> int:
    from ray import serve

    status = serve.status().applications["raygrpo-api"].deployments["TrainingAPI"]
    return status.replica_states.get("RUNNING", 0)


def wait_deployed(replicas: int, timeout_s: float) -> None:
    """Until the app is RUNNING with `replicas` running replicas and nothing starting or stopping."""
    from ray import serve

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        app = serve.status().applications.get("raygrpo-api")
        if app is not None and app.status == "RUNNING":  # a str Enum
            states = app.deployments["TrainingAPI"].replica_states
            if states.get("RUNNING", 0) == replicas and sum(states.values()) == replicas:
                return
        time.sleep(0.5)
    raise RuntimeError(f"Serve app not redeployed with {replicas} replicas after {timeout_s}s: {serve.status()}")


# ---- report --------------------------------------------------------------------------------------

def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"nproc {os.cpu_count()}, {model}, load average {load}"


def versions() -> str:
    import fastapi
    import ray
    import sqlalchemy
    import starlette
    import uvicorn

    return (f"python {platform.python_version()}, ray {ray.__version__}, fastapi {fastapi.__version__}, "
            f"starlette {starlette.__version__}, uvicorn {uvicorn.__version__}, httpx {httpx.__version__}, "
            f"sqlalchemy {sqlalchemy.__version__}")


def report(levels: list[Level], args: argparse.Namespace) -> None:
    print(f"\ntraining.get_status on loopback, {args.duration:g} s per level after {args.warmup:g} s warm-up")
    print("| side | clients | replicas | requests | errors | req/s | p50 ms | p95 ms | p99 ms "
          "| client CPU ms/req | proxy p50 ms | replica p50 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for lv in levels:
        n = max(1, len(lv.latencies_ms))
        split = [f"{statistics.median(x):.1f}" if x else "-" for x in (lv.proxy_ms, lv.replica_ms)]
        print(f"| {lv.side} | {lv.clients} | {lv.replicas or '-'} | {len(lv.latencies_ms)} | {lv.errors} "
              f"| {lv.rps:.0f} | {lv.pct(50):.1f} | {lv.pct(95):.1f} | {lv.pct(99):.1f} "
              f"| {1000 * lv.client_cpu_s / n:.2f} | {split[0]} | {split[1]} |")
    base = {lv.clients: lv for lv in levels if lv.side == "uvicorn"}
    ratios = [(lv, base[lv.clients]) for lv in levels if lv.side.startswith("serve") and lv.clients in base]
    if ratios:
        print("\n| side | clients | p95 Serve/uvicorn | req/s Serve/uvicorn |")
        print("|---|---|---|---|")
        for lv, b in ratios:
            print(f"| {lv.side} | {lv.clients} | {lv.pct(95) / b.pct(95):.2f} | {lv.rps / b.rps:.2f} |")
    for lv in levels:
        if lv.side.startswith("serve") and lv.clients == GOAL_CLIENTS:
            verdict = "met" if lv.pct(95) < GOAL_P95_MS else "MISSED"
            print(f"goal p95 < {GOAL_P95_MS:g} ms at {GOAL_CLIENTS} clients, {lv.side}: {lv.pct(95):.1f} ms, "
                  f"{verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,8,32", help="concurrent client counts, comma-separated")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    ap.add_argument("--warmup", type=float, default=2.0, help="discarded seconds before each level")
    ap.add_argument("--pool", choices=["per-client", "shared"], default="per-client",
                    help="one httpx.AsyncClient per client (1 connection each) or one shared pool of N")
    ap.add_argument("--sides", default="uvicorn,serve", help="uvicorn, serve, or both")
    ap.add_argument("--redis", default="", help="REDIS_URL of the app (buckets and request counters in Redis)")
    ap.add_argument("--serve-variants", default="replicas2",
                    help="extra Serve rows at the largest client count: replicas2, ongoing16 (empty: none)")
    ap.add_argument("--serve-env", default="",
                    help="KEY=VALUE,... set for Ray's processes, e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1")
    args = ap.parse_args()
    args.serve_env = dict(kv.split("=", 1) for kv in args.serve_env.split(",") if kv)
    args.clients = [int(x) for x in args.clients.split(",")]
    args.sides = [x for x in args.sides.split(",") if x]
    args.serve_variants = [x for x in args.serve_variants.split(",") if x]
    if not 0 < args.duration <= 120 or not 0 <= args.warmup <= 60 or not all(0 < n <= 256 for n in args.clients):
        ap.error("--duration in (0, 120], --warmup in [0, 60], clients in 1..256")

    print(f"date {datetime.date.today()}; {machine()}")
    print(versions(), flush=True)
    from grpo.tiny import save_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        home, model = Path(tmp) / "home", Path(tmp) / "tiny"
        home.mkdir()
        save_tiny_model(model)
        env = app_env(home, model, args.redis)
        from app.api.auth import mint_token
        from app.settings import Settings

        # Minted before any server starts: this creates the home's secret, which the servers then read.
        AUTH["Authorization"] = "Bearer " + mint_token(Settings(home=home), "bench", "researcher", ttl_s=24 * 3600)
        # uvicorn goes first (before Ray's processes exist) and seeds the job both sides read.
        job_id, levels = run_uvicorn(env, home, args.clients if "uvicorn" in args.sides else [], args)
        if "serve" in args.sides:
            levels += run_serve(env, job_id, args)
    report(levels, args)


if __name__ == "__main__":
    main()
