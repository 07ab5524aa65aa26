"""The job API as a Ray Serve application: `serve build app.api.serve:app` / `serve run app.api.serve:app`.

The deployment wraps the FastAPI app of app.api.main (autoscaled replicas; each checks its database in
`check_health`) and makes sure the single Dispatcher actor is running. `python -m app.api.serve` starts
a local Ray (or joins RAY_ADDRESS) and serves on 127.0.0.1:8001 until interrupted.
"""

from __future__ import annotations

import os
import time

from fastapi import FastAPI
from ray import serve
from sqlalchemy import text

from app.api.main import create_app
from app.api.proxy import CALLBACK as PROXY_CALLBACK
from app.serving.access import API_APP, API_DEPLOYMENT
from app.settings import get_settings


def build_app() -> FastAPI:
    """Built in each replica at start (a FastAPI app does not pickle), from the replica's environment."""
    return create_app()


@serve.deployment(
    name=API_DEPLOYMENT,
    # Two replicas at least: losing one (its node, an OOM kill) costs no request. `start` below uses one
    # for a developer's local stack unless asked for more.
    autoscaling_config={"min_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 16},
    max_ongoing_requests=64,
    health_check_period_s=10,
    ray_actor_options={"num_cpus": 0.1},
)
@serve.ingress(build_app)
class TrainingAPI:
    def __init__(self) -> None:
        from app.data.db import get_engine
        from app.jobs.dispatcher import ensure_dispatcher
        from app.serving.deployments import reconcile

        # the dispatcher also keeps Serve running every policy deployment the database holds
        self.dispatcher = ensure_dispatcher(get_settings(), periodic=[reconcile])
        self.engine = get_engine(get_settings().db_url)  # the same cached engine the app uses
        self._ctx = None  # opened on the first policy call (settings, database, rate limiter)

    def check_health(self) -> None:
        """Serve restarts a replica whose database is unreachable."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    async def check_policy_call(self, name: str, authorization: str | None, api_key: str | None) -> dict:
        """Asked by every deployed policy's router about each request (app.serving.access): may this caller
        call deployment `name` now? -> {status, body, headers}."""
        import asyncio
        from dataclasses import asdict

        from app.api.context import Context
        from app.serving.access import check_policy_call

        if self._ctx is None:
            self._ctx = Context.open(get_settings())
        return asdict(await asyncio.to_thread(check_policy_call, self._ctx, name, authorization, api_key))


app = TrainingAPI.bind()


def start(*, host: str = "127.0.0.1", port: int | None = None, env: dict[str, str] | None = None,
          replicas: int | None = None) -> str:
    """Start Serve's HTTP proxy and the app on this Ray cluster; returns the JSON-RPC URL.

    `env` sets the replicas' environment (DATABASE_URL, REDIS_URL, RAYGRPO_HOME, ...) when it should
    differ from the cluster's; `replicas` fixes their number instead of autoscaling.
    """
    port = port or get_settings().api_port
    serve.start(http_options={"host": host, "port": port})
    target = app
    options: dict = {}
    if env:
        options["ray_actor_options"] = {"num_cpus": 0.1, "runtime_env": {"env_vars": env}}
    if replicas:
        options |= {"num_replicas": replicas, "autoscaling_config": None}
    else:  # a local stack: one replica unless load asks for more
        options["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}
    if options:
        target = TrainingAPI.options(**options).bind()
    serve.run(target, name=API_APP, route_prefix="/", blocking=False)
    return f"http://{host}:{port}/api/v1/jsonrpc"


if __name__ == "__main__":
    import signal
    import sys

    import ray

    # `kill` (TERM) and Ctrl-C end it cleanly, its local Ray with it (atexit); a shell without job control
    # starts `... &` with SIGINT ignored, so TERM is the one that always arrives.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)

    # Measured 1.5x the throughput of Serve's defaults on the job API (docs/benchmarks.md).
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    # Serve's proxy must not answer 500 to a header it cannot decode (app.api.proxy); on a cluster the nodes
    # need it in their environment (the image sets it).
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(namespace="raygrpo")
    else:  # a local Ray, as `raygrpo up` starts it: logical CPUs for a README-shaped job even on 2 cores
        ray.init(namespace="raygrpo", num_cpus=max(os.cpu_count() or 1, 8))
    print(f"job API at {start()}", flush=True)
    while True:
        time.sleep(3600)
