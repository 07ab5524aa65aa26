"""Writes the Grafana dashboards of kuberay/monitoring/dashboards/ (`python kuberay/monitoring/dashboards.py`).

Dashboards as code: each panel is one line below (title, kind, PromQL), the JSON model is generated.
tests/deploy/test_monitoring.py checks that the committed JSON is this script's output and that every
query parses and names only metrics the job API or Ray exports.

API metrics are scraped from the API cluster's head pod (one target; every replica answers the same
totals, see app/api/metrics.py); gauges are still taken with `max` so the brief second target during a
RayService upgrade does not double them. Training metrics come from the runs (`ray_raygrpo_train_*`,
tagged job_id) and Ray's own node metrics (`ray_node_*`, `ray_cluster_*`) from every Ray pod.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent / "dashboards"
R = "$__rate_interval"
J = 'job_id=~"$job_id"'


def panel(title: str, kind: str, *targets: tuple[str, str], unit: str = "short", w: int = 8, h: int = 7,
          description: str = "") -> dict:
    """kind: timeseries | stat | bargauge; targets: (PromQL, legend)."""
    return {
        "type": kind, "title": title, "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "gridPos": {"w": w, "h": h},
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for i, (expr, legend) in enumerate(targets)],
    }


def dashboard(uid: str, title: str, panels: list[dict], variables: list[dict] = ()) -> dict:
    x = y = row_h = 0
    for i, p in enumerate(panels, start=1):  # lay panels out left to right, 24 columns a row
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        p["id"], p["gridPos"] = i, {"x": x, "y": y, "w": w, "h": h}
        x, row_h = x + w, max(row_h, h)
    datasource = {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"}
    return {
        "uid": uid, "title": title, "tags": ["raygrpo"], "timezone": "browser", "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [datasource, *variables]}, "annotations": {"list": []}, "panels": panels,
    }


def training_overview() -> dict:
    return dashboard("raygrpo-training-overview", "raygrpo / Training overview", [
        panel("Active jobs", "stat", ("max(training_jobs_active)", "running"), w=4, h=5),
        panel("Jobs started (24 h)", "stat", ("max(increase(training_jobs_total[24h]))", "started"), w=4, h=5),
        panel("Success rate (24 h)", "stat",
              ("max(increase(training_jobs_completed_total[24h])) / clamp_min(max(increase(training_jobs_completed_total[24h]))"
               " + max(increase(training_jobs_failed_total[24h])) + max(increase(training_jobs_cancelled_total[24h])), 1)",
               "completed"), unit="percentunit", w=4, h=5),
        panel("Failure rate (10 m)", "stat",
              ("max(increase(training_jobs_failed_total[10m])) / clamp_min(max(increase(training_jobs_completed_total[10m]))"
               " + max(increase(training_jobs_failed_total[10m])) + max(increase(training_jobs_cancelled_total[10m])), 1)",
               "failed"), unit="percentunit", w=4, h=5,
              description="Share of the jobs that ended in the last 10 minutes that failed; alert above 10 %."),
        panel("Queued", "stat", ('max by (queue) (redis_queue_length{queue="training_jobs"})', "queued"), w=4, h=5),
        panel("GPU nodes", "stat", ('sum(ray_cluster_active_nodes{node_type=~".*gpu.*"})', "active"), w=4, h=5),
        panel("Job outcomes", "timeseries",
              (f"max(rate(training_jobs_completed_total[{R}]))", "completed"),
              (f"max(rate(training_jobs_failed_total[{R}]))", "failed"),
              (f"max(rate(training_jobs_cancelled_total[{R}]))", "cancelled"), unit="ops", w=12),
        panel("Job duration", "timeseries",
              (f"histogram_quantile(0.5, max by (le) (rate(training_job_duration_seconds_bucket[{R}])))", "p50"),
              (f"histogram_quantile(0.95, max by (le) (rate(training_job_duration_seconds_bucket[{R}])))", "p95"),
              unit="s", w=12),
        panel("Iteration time by job", "timeseries",
              ("max by (job_id) (ray_raygrpo_train_step_seconds)", "{{job_id}}"), unit="s", w=12),
        panel("Training step by job", "timeseries",
              ("max by (job_id) (ray_raygrpo_train_iteration)", "{{job_id}}"), w=12),
        panel("Budget used by job", "bargauge",
              ("max by (job_id) (training_job_cost_usd) / max by (job_id) (training_job_budget_usd > 0)", "{{job_id}}"),
              unit="percentunit", w=12, description="cost / max_budget_usd of each job that has a budget"),
        panel("Cost by job", "timeseries", ("max by (job_id) (training_job_cost_usd)", "{{job_id}}"),
              unit="currencyUSD", w=12),
        panel("GPU utilisation", "timeseries",
              ("avg by (instance) (ray_node_gpus_utilization)", "{{instance}}"), unit="percent", w=8),
        panel("CPU utilisation", "timeseries",
              ("avg by (instance) (ray_node_cpu_utilization)", "{{instance}}"), unit="percent", w=8),
        panel("Tokens per second", "timeseries",
              ("sum by (job_id) (ray_raygrpo_train_tokens_per_second)", "{{job_id}}"), w=8),
    ])


def system_health() -> dict:
    return dashboard("raygrpo-system-health", "raygrpo / System health", [
        panel("API up", "stat", ('max(up{job="raygrpo-api"})', "up"), w=4, h=5),
        panel("Requests / s", "stat", (f"sum(max without (instance, pod) (rate(http_requests_total[{R}])))", "req/s"),
              unit="reqps", w=4, h=5),
        panel("p95 latency", "stat",
              (f"histogram_quantile(0.95, sum by (le) (max without (instance, pod) (rate(http_request_duration_seconds_bucket[{R}]))))",
               "p95"), unit="s", w=4, h=5),
        panel("DB connections", "stat",
              ("max(db_pool_connections_in_use) / max(db_pool_connections_max)", "in use"), unit="percentunit", w=4, h=5),
        panel("Queue depth", "stat", ('max(redis_queue_length{queue="training_jobs"})', "queued"), w=4, h=5),
        panel("Ray nodes", "stat", ("sum(ray_cluster_active_nodes)", "active"), ("sum(ray_cluster_pending_nodes)", "pending"),
              w=4, h=5),
        panel("HTTP requests by status", "timeseries",
              (f"sum by (status) (max without (instance, pod) (rate(http_requests_total[{R}])))", "{{status}}"),
              unit="reqps", w=12),
        panel("HTTP latency", "timeseries",
              *[(f"histogram_quantile({q}, sum by (le) (max without (instance, pod) (rate(http_request_duration_seconds_bucket[{R}]))))",
                 f"p{round(q * 100)}") for q in (0.5, 0.95, 0.99)], unit="s", w=12),
        panel("JSON-RPC calls by method and code", "timeseries",
              (f"sum by (method, code) (max without (instance, pod) (rate(jsonrpc_requests_total[{R}])))", "{{method}} {{code}}"),
              unit="ops", w=12),
        panel("Database connections", "timeseries",
              ("max(db_pool_connections_in_use)", "in use"), ("max(db_pool_connections_max)", "max"), w=12),
        panel("Queue depth", "timeseries", ("max by (queue) (redis_queue_length)", "{{queue}}"), w=12),
        panel("Node memory used", "timeseries",
              ("max by (instance) (ray_node_mem_used) / max by (instance) (ray_node_mem_total)", "{{instance}}"),
              unit="percentunit", w=12),
        panel("Node CPU", "timeseries", ("avg by (instance) (ray_node_cpu_utilization)", "{{instance}}"),
              unit="percent", w=12),
        panel("Node GPU", "timeseries", ("avg by (instance) (ray_node_gpus_utilization)", "{{instance}}"),
              unit="percent", w=12),
    ])


def job_details() -> dict:
    job_var = {"name": "job_id", "label": "Job", "type": "query", "refresh": 2, "includeAll": False, "multi": True,
               "datasource": {"type": "prometheus", "uid": "${datasource}"},
               "query": {"query": "label_values(training_job_cost_usd, job_id)", "refId": "job_id"},
               "definition": "label_values(training_job_cost_usd, job_id)"}
    return dashboard("raygrpo-job-details", "raygrpo / Job details", [
        panel("Step", "stat", (f"max by (job_id) (ray_raygrpo_train_iteration{{{J}}})", "{{job_id}}"), w=6, h=5),
        panel("Cost", "stat", (f"max by (job_id) (training_job_cost_usd{{{J}}})", "{{job_id}}"), unit="currencyUSD",
              w=6, h=5),
        panel("Budget used", "stat",
              (f"max by (job_id) (training_job_cost_usd{{{J}}}) / max by (job_id) (training_job_budget_usd{{{J}}} > 0)",
               "{{job_id}}"), unit="percentunit", w=6, h=5),
        panel("Checkpoints", "stat", (f"max by (job_id) (ray_raygrpo_train_checkpoints_total{{{J}}})", "{{job_id}}"),
              w=6, h=5),
        panel("Reward", "timeseries",
              (f"avg by (job_id) (ray_raygrpo_train_reward_mean{{{J}}})", "{{job_id}} mean"),
              (f"avg by (job_id) (ray_raygrpo_train_reward_std{{{J}}})", "{{job_id}} std"), w=12),
        panel("Loss", "timeseries", (f"avg by (job_id) (ray_raygrpo_train_loss{{{J}}})", "{{job_id}}"), w=12),
        panel("KL to the reference", "timeseries", (f"avg by (job_id) (ray_raygrpo_train_kl{{{J}}})", "{{job_id}}"), w=8),
        panel("Entropy", "timeseries", (f"avg by (job_id) (ray_raygrpo_train_entropy{{{J}}})", "{{job_id}}"), w=8),
        panel("Clip fraction", "timeseries",
              (f"avg by (job_id) (ray_raygrpo_train_clip_fraction{{{J}}})", "{{job_id}}"), unit="percentunit", w=8),
        panel("Step time split", "timeseries",
              (f"avg by (job_id) (ray_raygrpo_train_rollout_seconds{{{J}}})", "{{job_id}} rollout"),
              (f"avg by (job_id) (ray_raygrpo_train_update_seconds{{{J}}})", "{{job_id}} update"),
              (f"avg by (job_id) (ray_raygrpo_train_weight_sync_seconds{{{J}}})", "{{job_id}} weight sync"),
              (f"avg by (job_id) (ray_raygrpo_train_step_seconds{{{J}}})", "{{job_id}} step"), unit="s", w=12),
        panel("Tokens per second", "timeseries",
              (f"sum by (job_id) (ray_raygrpo_train_tokens_per_second{{{J}}})", "{{job_id}}"), w=12),
        panel("Trajectories / s", "timeseries",
              (f"sum by (job_id) (rate(ray_raygrpo_train_trajectories_total{{{J}}}[{R}]))", "{{job_id}}"), w=8),
        panel("Reward failures", "timeseries",
              (f"sum by (job_id) (increase(ray_raygrpo_train_reward_failures_total{{{J}}}[{R}]))", "{{job_id}}"), w=8),
        panel("Cost and budget", "timeseries",
              (f"max by (job_id) (training_job_cost_usd{{{J}}})", "{{job_id}} cost"),
              (f"max by (job_id) (training_job_budget_usd{{{J}}})", "{{job_id}} budget"), unit="currencyUSD", w=8),
    ], variables=[job_var])


DASHBOARDS = {"training-overview.json": training_overview, "system-health.json": system_health,
              "job-details.json": job_details}


def render() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


if __name__ == "__main__":
    HERE.mkdir(exist_ok=True)
    for name, text in render().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}")
