"""Metric series on PostgreSQL: write one million points of one run, then query downsampled ranges.

    python bench/bench_metrics.py [--points 1000000] [--batch 10000] [--naive 5000] [--queries 30]

A fresh database (`raygrpo_t_<uuid>` on DATABASE_URL's server, dropped afterwards) gets the schema
and one run. Measured:

  insert   --points points of one metric in batches of --batch through app.research.series.write_metrics,
           the path of `metrics.log` and of a training job's reporter (COPY into a temp table, then one
           INSERT ... ON CONFLICT per batch), one transaction per batch: points/s.
  multirow the same code with COPY switched off (multi-row INSERT ... ON CONFLICT of 2,000 rows, the
           SQLite path) on a 100,000-point series: points/s.
  naive    the baseline of the ratios: one ORM object per point, `session.add` + `flush` (one INSERT
           round trip per point) in one transaction, on --naive points; and the same with a commit per
           point on --naive / 5 points (a logger that writes each value as it comes).
  queries  --queries repetitions each (after 3 warm-up): `query_series` over the whole million steps
           (1,000 buckets: min/max/mean/count/last per bucket in SQL, summed from the 1,000-step rollup
           blocks), the same from the points (a time range covering them all forces that path; the
           baseline of the ratio), over a random 100,000-step window
           (500 buckets), a raw 500-step window, `aggregate_series` over everything, and
           `metrics.query` through the in-process app (FastAPI TestClient: JSON-RPC, auth, JSON encoding
           included): p50/p95 in ms.

Not covered: concurrent writers, several runs sharing the table, PostgreSQL tuning (the server's
defaults are used), time-range queries (they scan the series' index range; see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "app")]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def timed(fn, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--naive", type=int, default=5_000)
    ap.add_argument("--queries", type=int, default=30)
    args = ap.parse_args()

    from raygrpo_test_services import bearer, fresh_postgres
    from sqlalchemy import text

    from app.data import db
    from app.data.tables import Experiment, MetricPoint, Run
    from app.research import series

    print(f"python {platform.python_version()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}")
    with fresh_postgres() as url:
        engine = db.get_engine(url)
        db.init_db(engine)
        with engine.connect() as conn:
            print("server:", conn.execute(text("SHOW server_version")).scalar())
        with db.session_scope(engine) as s:
            exp = Experiment(name="bench", owner="alice", status="active", run_count=3)
            runs = [Run(experiment_id=exp.id, number=i + 1, created_by="alice") for i in range(3)]
            s.add(exp)
            s.flush()
            s.add_all(runs)
        run, other, naive_run = (r.id for r in runs)
        t0 = datetime(2026, 11, 23, tzinfo=UTC)

        def batch(run_id: str, name: str, start: int, n: int):
            return [(name, step, 1.0 / (1 + step) + 0.001 * (step % 7), t0 + timedelta(seconds=step))
                    for step in range(start, start + n)]

        # 1. a million points, the way metrics.log and the reporter write them
        started = time.perf_counter()
        for start in range(0, args.points, args.batch):
            rows = batch(run, "loss", start, min(args.batch, args.points - start))
            with db.session_scope(engine) as s:
                series.write_metrics(s, run, rows)
        copy_s = time.perf_counter() - started
        copy_rate = args.points / copy_s
        print(f"insert (COPY batches of {args.batch}): {args.points} points in {copy_s:.1f} s = {copy_rate:,.0f} points/s")

        # 2. the multi-row INSERT path on PostgreSQL
        n_multi = min(100_000, args.points)
        threshold, series.COPY_THRESHOLD = series.COPY_THRESHOLD, 10**12
        started = time.perf_counter()
        for start in range(0, n_multi, args.batch):
            with db.session_scope(engine) as s:
                series.write_metrics(s, other, batch(other, "loss", start, min(args.batch, n_multi - start)))
        multi_rate = n_multi / (time.perf_counter() - started)
        series.COPY_THRESHOLD = threshold
        print(f"insert (multi-row INSERT of {series.SQLITE_CHUNK}): {n_multi} points = {multi_rate:,.0f} points/s")

        # 3. the naive baselines: one ORM object and one round trip per point
        with db.session_scope(engine) as s:
            sid = series.series_ids(s, naive_run, ["loss"])["loss"]
            sid_commit = series.series_ids(s, naive_run, ["loss_commit"])["loss_commit"]
        started = time.perf_counter()
        with db.session_scope(engine) as s:
            for _, step, value, ts in batch(naive_run, "loss", 0, args.naive):
                s.add(MetricPoint(series_id=sid, step=step, value=value, ts=ts))
                s.flush()
        naive_rate = args.naive / (time.perf_counter() - started)
        n_commit = max(1, args.naive // 5)
        started = time.perf_counter()
        for _, step, value, ts in batch(naive_run, "loss_commit", 0, n_commit):
            with db.session_scope(engine) as s:
                s.add(MetricPoint(series_id=sid_commit, step=step, value=value, ts=ts))
        commit_rate = n_commit / (time.perf_counter() - started)
        print(f"insert (naive ORM, flush per point, one transaction): {args.naive} points = {naive_rate:,.0f} points/s")
        print(f"insert (naive ORM, commit per point): {n_commit} points = {commit_rate:,.0f} points/s")
        print(f"ratio COPY batches / naive per-row ORM (one transaction): {copy_rate / naive_rate:.1f}x")
        print(f"ratio COPY batches / naive per-row ORM (commit per point): {copy_rate / commit_rate:.1f}x")
        print(f"ratio multi-row INSERT / naive per-row ORM (one transaction): {multi_rate / naive_rate:.1f}x")

        with engine.connect() as conn:
            conn.execute(text("ANALYZE metric_points"))
            conn.commit()
            size = conn.execute(text("SELECT pg_size_pretty(pg_total_relation_size('metric_points'))")).scalar()
        print(f"metric_points with {args.points + n_multi + args.naive + n_commit} rows: {size} (table + index)")

        # 4. queries
        with db.session_scope(engine) as s:
            main_sid = series.series_ids(s, run, ["loss"])["loss"]
        rng = random.Random(0)
        results: dict[str, list[float]] = {}

        def q_full():
            with db.session_scope(engine) as s:
                out = series.query_series(s, main_sid, max_points=1000)
            assert out["downsampled"] and len(out["points"]) == 1000

        window = min(100_000, args.points // 10)

        def q_full_points():  # a time range (covering every point) makes it read the points, not the blocks
            with db.session_scope(engine) as s:
                out = series.query_series(s, main_sid, max_points=1000, time_from=t0)
            assert out["downsampled"] and out["bucket_steps"] < series.ROLLUP_STEPS * 2

        def q_window():
            lo = rng.randrange(0, args.points - window)
            with db.session_scope(engine) as s:
                out = series.query_series(s, main_sid, max_points=500, step_from=lo, step_to=lo + window - 1)
            assert len(out["points"]) == 500

        def q_raw():
            lo = rng.randrange(0, args.points - 500)
            with db.session_scope(engine) as s:
                out = series.query_series(s, main_sid, max_points=500, step_from=lo, step_to=lo + 499)
            assert not out["downsampled"] and len(out["points"]) == 500

        def q_agg():
            with db.session_scope(engine) as s:
                out = series.aggregate_series(s, [main_sid])
            assert out[main_sid]["count"] == args.points

        results["downsample 1M steps -> 1000 buckets (rollup blocks)"] = timed(q_full, args.queries)
        results["downsample 1M steps -> 1000 buckets from the points (baseline)"] = timed(q_full_points, args.queries)
        results[f"downsample {window}-step window -> 500 buckets"] = timed(q_window, args.queries)
        results["raw 500-step window"] = timed(q_raw, args.queries)
        results["aggregate count/min/max/mean/last over 1M"] = timed(q_agg, args.queries)

        import tempfile

        from fastapi.testclient import TestClient

        from app.api.main import create_app
        from app.settings import Settings

        with tempfile.TemporaryDirectory() as home:
            settings = Settings(home=Path(home), database_url=url, redis_url=None, rate_limits={"default": 0})
            with TestClient(create_app(settings), headers=bearer(settings)) as client:
                body = {"jsonrpc": "2.0", "method": "metrics.query",
                        "params": {"run_id": run, "names": ["loss"], "max_points": 1000}, "id": 1}

                def q_api():
                    r = client.post("/api/v1/jsonrpc", json=body)
                    assert len(r.json()["result"]["series"][0]["points"]) == 1000

                results["metrics.query over HTTP (in-process app), 1M -> 1000"] = timed(q_api, args.queries)
        for name, values in results.items():
            print(f"{name}: p50 {statistics.median(values):.1f} ms, p95 {pct(values, 0.95):.1f} ms "
                  f"(n={len(values)})")
        blocks = statistics.median(results["downsample 1M steps -> 1000 buckets (rollup blocks)"])
        points = statistics.median(results["downsample 1M steps -> 1000 buckets from the points (baseline)"])
        print(f"ratio whole-run downsampling, points / rollup blocks (p50): {points / blocks:.1f}x")
        db.dispose_engine(url)


if __name__ == "__main__":
    main()
