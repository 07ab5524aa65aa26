"""Prometheus metrics of the job API, served at GET /metrics in the text format.

Correct across several Serve replicas, because nothing is summed per process:
- job metrics (`training_jobs_*`, `training_job_*`) are read from the database at scrape time, so
  every replica answers the same;
- request metrics (`http_requests_total`, `http_request_duration_seconds`, `jsonrpc_requests_total`)
  are counted in Redis hashes (HINCRBY, one pipelined round trip per request) when REDIS_URL is set,
  so a scrape through any replica sees every replica's requests. Without Redis (one local replica) they
  are counted in the process.
- `redis_queue_length{queue}` is read from Redis (or counts queued jobs when the database is the queue);
  `db_pool_connections_in_use/max` are the PostgreSQL server's connections and `max_connections`
  (for SQLite: this process's pool).
Training internals (reward, loss, KL, tokens/s, ...) come from the runs through `ray.util.metrics`
(grpo.report.RayMetricsReporter) and are scraped from Ray's metrics port, prefixed `ray_`.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, text
from sqlmodel import Session, select

from app.data.tables import JobStatus, TrainingJob, utcnow

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200)
_KEY = "raygrpo:metrics:"
_SEP = "\x1f"


class RequestCounters:
    """Counters of HTTP and JSON-RPC requests: in Redis when given a URL (shared), else in this process."""

    def __init__(self, redis_url: str | None = None):
        self._redis = None
        if redis_url:
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
        self._local: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._lock = threading.Lock()

    @property
    def shared(self) -> bool:
        """Whether recording is a Redis round trip (to keep off the event loop) or a local increment."""
        return self._redis is not None

    def _incr(self, updates: Iterable[tuple[str, str, float]]) -> None:
        if self._redis is not None:
            pipe = self._redis.pipeline(transaction=False)
            for name, field, amount in updates:
                if float(amount).is_integer():
                    pipe.hincrby(_KEY + name, field, int(amount))
                else:
                    pipe.hincrbyfloat(_KEY + name, field, amount)
            pipe.execute()
            return
        with self._lock:
            for name, field, amount in updates:
                self._local[name][field] += amount

    def _read(self, name: str) -> dict[str, float]:
        if self._redis is not None:
            return {k.decode(): float(v) for k, v in self._redis.hgetall(_KEY + name).items()}
        with self._lock:
            return dict(self._local[name])

    def record_http(self, method: str, status: int, duration_s: float,
                    rpc_calls: Iterable[tuple[str, int]] = ()) -> None:
        """One HTTP request and the JSON-RPC calls it answered (method, code), in one update (one
        pipelined round trip when shared)."""
        bucket = next((str(b) for b in LATENCY_BUCKETS if duration_s <= b), "+Inf")
        self._incr([
            ("http_requests_total", f"{method}{_SEP}{status}", 1),
            ("http_request_duration_seconds_bucket", f"{method}{_SEP}{bucket}", 1),
            ("http_request_duration_seconds_count", method, 1),
            ("http_request_duration_seconds_sum", method, duration_s),
            *(("jsonrpc_requests_total", f"{name}{_SEP}{code}", 1) for name, code in rpc_calls),
        ])

    def collect(self) -> Iterator[Any]:
        http = CounterMetricFamily("http_requests_total", "HTTP requests by method and status",
                                   labels=["method", "status"])
        for field, value in sorted(self._read("http_requests_total").items()):
            http.add_metric(field.split(_SEP), value)
        yield http
        rpc = CounterMetricFamily("jsonrpc_requests_total", "JSON-RPC calls by method and code (0: success)",
                                  labels=["method", "code"])
        for field, value in sorted(self._read("jsonrpc_requests_total").items()):
            rpc.add_metric(field.split(_SEP), value)
        yield rpc
        hist = HistogramMetricFamily("http_request_duration_seconds", "HTTP request latency", labels=["method"])
        raw = self._read("http_request_duration_seconds_bucket")
        sums = self._read("http_request_duration_seconds_sum")
        for method, count in sorted(self._read("http_request_duration_seconds_count").items()):
            cumulative, buckets = 0.0, []
            for bound in [*map(str, LATENCY_BUCKETS), "+Inf"]:
                cumulative += raw.get(f"{method}{_SEP}{bound}", 0.0)
                buckets.append((bound, cumulative))
            buckets[-1] = ("+Inf", count)
            hist.add_metric([method], buckets, sums.get(method, 0.0))
        yield hist


class JobCollector(Collector):
    """Job, queue and database metrics, read at scrape time from the shared stores. Without `per_job` (a caller
    that is neither the scraper nor an admin) the per-job families come without series: job ids are tenants'."""

    def __init__(self, ctx: Any, *, per_job: bool = True):
        self.ctx = ctx
        self.per_job = per_job

    def collect(self) -> Iterator[Any]:
        ctx = self.ctx
        with Session(ctx.engine) as s:
            by_status = dict(s.exec(select(TrainingJob.status, func.count()).group_by(TrainingJob.status)).all())
            total = sum(by_status.values())
            yield CounterMetricFamily("training_jobs_total", "Jobs ever submitted", value=total)
            yield GaugeMetricFamily("training_jobs_active", "Jobs running now", value=by_status.get("running", 0))
            yield GaugeMetricFamily("training_jobs_queued", "Jobs waiting to run", value=by_status.get("queued", 0))
            for status in (JobStatus.completed, JobStatus.failed, JobStatus.cancelled):
                yield CounterMetricFamily(f"training_jobs_{status}_total", f"Jobs that ended {status}",
                                          value=by_status.get(status, 0))
            exceeded = s.exec(select(func.count()).where(TrainingJob.stop_reason == "budget_exceeded")).one()
            yield CounterMetricFamily("training_jobs_budget_exceeded_total", "Jobs stopped by their budget",
                                      value=exceeded)

            finished = s.exec(select(TrainingJob.started_at, TrainingJob.finished_at).where(
                TrainingJob.finished_at.is_not(None), TrainingJob.started_at.is_not(None))).all()
            counts = [0] * (len(DURATION_BUCKETS) + 1)
            total_s = 0.0
            for started, ended in finished:
                seconds = (ended - started).total_seconds()
                total_s += seconds
                counts[next((i for i, b in enumerate(DURATION_BUCKETS) if seconds <= b), len(DURATION_BUCKETS))] += 1
            hist = HistogramMetricFamily("training_job_duration_seconds", "Wall time of finished jobs")
            cumulative, buckets = 0, []
            for bound, n in zip([*map(str, DURATION_BUCKETS), "+Inf"], counts, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            hist.add_metric([], buckets, total_s)
            yield hist

            # Cost and budget per job: live jobs and those that ended in the last hour (bounded cardinality).
            recent = utcnow() - timedelta(hours=1)
            jobs = s.exec(select(TrainingJob.id, TrainingJob.cost_usd, TrainingJob.budget_usd).where(
                TrainingJob.status.in_(["running", "queued", "paused"]) | (TrainingJob.finished_at >= recent))).all() \
                if self.per_job else []
            cost = GaugeMetricFamily("training_job_cost_usd", "Cost of a job so far", labels=["job_id"])
            budget = GaugeMetricFamily("training_job_budget_usd", "Budget of a job", labels=["job_id"])
            for job_id, spent, limit in jobs:
                cost.add_metric([job_id], float(spent or 0))
                if limit is not None:
                    budget.add_metric([job_id], float(limit))
            yield cost
            yield budget

        queue = GaugeMetricFamily("redis_queue_length", "Jobs in the queue lists", labels=["queue"])
        if ctx.queue is not None:
            lengths = ctx.queue.lengths()
            for name, n in lengths.items():
                queue.add_metric([name], n)
        else:
            queue.add_metric(["database"], by_status.get("queued", 0))
        yield queue

        in_use, limit = db_connections(ctx.engine)
        yield GaugeMetricFamily("db_pool_connections_in_use", "Database connections in use", value=in_use)
        yield GaugeMetricFamily("db_pool_connections_max", "Database connections allowed", value=limit)


def db_connections(engine: Any) -> tuple[int, int]:
    """(in use, allowed): the whole PostgreSQL server's, or this process's pool for SQLite."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            used = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"))
            in_use = int(used.scalar_one())
            limit = int(conn.execute(text("SHOW max_connections")).scalar_one())
        return in_use, limit
    pool = engine.pool
    checked_out = getattr(pool, "checkedout", lambda: 0)()
    size = getattr(pool, "size", lambda: 0)() + max(getattr(pool, "_max_overflow", 0), 0)
    return checked_out, max(size, 1)


class _Requests(Collector):
    def __init__(self, counters: RequestCounters):
        self.counters = counters

    def collect(self) -> Iterator[Any]:
        yield from self.counters.collect()


def render(ctx: Any, *, per_job: bool = True) -> bytes:
    """The text exposition of every metric above, for this app's context (per-job series only with `per_job`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Requests(ctx.counters))
    registry.register(JobCollector(ctx, per_job=per_job))
    return generate_latest(registry)


def sees_per_job(settings: Any, engine: Any, authorization: str | None, api_key: str | None) -> bool | None:
    """Whether a scrape with these headers sees per-job series: True for the scrape credential (RAYGRPO_METRICS_TOKEN)
    or an admin; False for anyone else or no credentials; None for credentials that are refused (a 401, so a
    misconfigured scraper shows instead of silently losing series)."""
    import hmac

    from app.api.auth import authenticate

    if settings.auth == "off":
        return True
    if not authorization and not api_key:
        return False
    scheme, _, token = (authorization or "").strip().partition(" ")
    if settings.metrics_token and scheme.lower() == "bearer" and \
            hmac.compare_digest(token.strip().encode(), settings.metrics_token.encode()):
        return True
    principal, _ = authenticate(settings, engine, authorization, api_key)
    return None if principal is None else principal.is_admin
