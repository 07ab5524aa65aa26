"""kuberay/monitoring: dashboards, alert rules and scrape targets name only metrics that exist.

Every PromQL expression (dashboard targets, alert rules) is parsed with promql-parser (Prometheus's
grammar) and the metric names it reads are checked against what the job API exports on /metrics
(app/api/metrics.py), what the runs export through ray.util.metrics (Prometheus adds Ray's `ray_` prefix)
and Ray's own node metrics. Runbook links must land on an anchor of docs/operations.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kube_checks import ManifestError, load_all, promql_metrics, validate_monitoring

ROOT = Path(__file__).resolve().parents[2]
MON = ROOT / "kuberay" / "monitoring"

API_METRICS = {
    "training_jobs_total", "training_jobs_active", "training_jobs_completed_total", "training_jobs_failed_total",
    "training_jobs_cancelled_total", "training_job_cost_usd", "training_job_budget_usd", "redis_queue_length",
    "http_requests_total", "jsonrpc_requests_total", "db_pool_connections_in_use", "db_pool_connections_max",
    *(f"{h}_{s}" for h in ("training_job_duration_seconds", "http_request_duration_seconds")
      for s in ("bucket", "sum", "count")),
}
TRAIN_METRICS = {f"ray_raygrpo_train_{n}" for n in (
    "reward_mean", "reward_std", "loss", "kl", "entropy", "clip_fraction", "tokens_per_second", "step_seconds",
    "weight_sync_seconds", "rollout_seconds", "update_seconds", "reward_failures_total", "iteration",
    "trajectories_total", "checkpoints_total")}
RAY_METRICS = {"ray_node_cpu_utilization", "ray_node_gpus_utilization", "ray_node_mem_used", "ray_node_mem_total",
               "ray_cluster_active_nodes", "ray_cluster_pending_nodes"}
KNOWN = API_METRICS | TRAIN_METRICS | RAY_METRICS | {"up"}  # `up`: Prometheus's own, one per scrape target


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((MON / "dashboards").glob("*.json"))}


def targets(board: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]


def rules() -> list[dict]:
    [rule] = load_all(MON / "prometheusrule.yaml")
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


def test_ray_node_metric_names_are_ray_s_own():
    """The ray_node_*/ray_cluster_* names the dashboards use are defined by the installed Ray's reporter."""
    import ray.dashboard.modules.reporter.reporter_agent as agent

    source = Path(agent.__file__).read_text()
    for name in RAY_METRICS:
        assert f'"{name.removeprefix("ray_")}"' in source, name


def test_committed_dashboards_are_the_generator_s_output():
    spec = importlib.util.spec_from_file_location("dashboards", MON / "dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == {n: (MON / "dashboards" / n).read_text() for n in dashboards()}, (
        "run `python kuberay/monitoring/dashboards.py` after editing it")


def test_dashboards_are_grafana_models_whose_queries_name_known_metrics():
    boards = dashboards()
    assert {b["title"] for b in boards.values()} == {
        "raygrpo / Training overview", "raygrpo / System health", "raygrpo / Job details"}
    for name, board in boards.items():
        assert board["uid"] and board["schemaVersion"] >= 36 and board["panels"], name
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for p in board["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, (name, p["title"])
            assert p["targets"], (name, p["title"])
        for title, expr in targets(board):
            names = promql_metrics(expr)
            assert names and names <= KNOWN, (name, title, names - KNOWN)


def test_dashboards_cover_what_operators_asked_for():
    boards = {b["title"].split(" / ")[1]: b for b in dashboards().values()}
    used = {t: set().union(*(promql_metrics(e) for _, e in targets(b))) for t, b in boards.items()}
    assert {"training_jobs_active", "training_jobs_completed_total", "training_jobs_failed_total",
            "ray_raygrpo_train_step_seconds", "training_job_cost_usd", "training_job_budget_usd",
            "ray_node_gpus_utilization"} <= used["Training overview"]
    assert {"http_requests_total", "http_request_duration_seconds_bucket", "db_pool_connections_in_use",
            "redis_queue_length", "ray_node_mem_used"} <= used["System health"]
    assert {"ray_raygrpo_train_loss", "ray_raygrpo_train_reward_mean", "ray_raygrpo_train_kl",
            "ray_raygrpo_train_trajectories_total", "ray_raygrpo_train_checkpoints_total",
            "training_job_cost_usd"} <= used["Job details"]
    details = boards["Job details"]
    assert [v["name"] for v in details["templating"]["list"]] == ["datasource", "job_id"]
    assert all('job_id=~"$job_id"' in e for _, e in targets(details))  # every panel follows the chosen job


def test_dashboards_are_shipped_as_configmaps_for_grafana_s_sidecar():
    kustomization = yaml.safe_load((MON / "kustomization.yaml").read_text())
    assert kustomization["generatorOptions"]["labels"]["grafana_dashboard"] == "1"
    files = {f for g in kustomization["configMapGenerator"] for f in g["files"]}
    assert files == {f"dashboards/{n}" for n in dashboards()}


ALERTS = {
    # alert: (words the expression must contain, `for`)
    "RaygrpoHighJobFailureRate": (["training_jobs_failed_total[10m]", "training_jobs_completed_total[10m]",
                                   "training_jobs_cancelled_total[10m]", "> 0.10"], "5m"),
    "RaygrpoQueueBackup": (["redis_queue_length", "> 1000"], "10m"),
    "RaygrpoBudgetWarning": (["training_job_cost_usd", "training_job_budget_usd", "> 0.9"], None),
    "RaygrpoBudgetExceeded": (["training_job_cost_usd", ">= max by (job_id) (training_job_budget_usd",
                               "changes(ray_raygrpo_train_iteration[5m])"], "5m"),
    "RaygrpoAPIDown": (['up{job="raygrpo-api"}'], "2m"),
    "RaygrpoAPIHighLatency": (["histogram_quantile(0.95", "http_request_duration_seconds_bucket", "> 2"], "10m"),
    "RaygrpoDBConnectionsHigh": (["db_pool_connections_in_use", "db_pool_connections_max", "> 0.9"], "5m"),
}


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", markdown, re.M)}


def test_alert_rules_match_the_runbook():
    by_name = {r["alert"]: r for r in rules()}
    assert set(by_name) == set(ALERTS)
    anchors = _anchors((ROOT / "docs" / "operations.md").read_text())
    assert "alerts" in anchors
    for name, (words, duration) in ALERTS.items():
        rule = by_name[name]
        expr = " ".join(rule["expr"].split())
        for w in words:
            assert w in expr, (name, w)
        assert rule.get("for") == duration, name
        assert promql_metrics(rule["expr"]) <= KNOWN, name
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        url = rule["annotations"]["runbook_url"]
        assert url.split("#")[0].endswith("docs/operations.md") and url.split("#")[1] == name.lower(), url
        assert name.lower() in anchors, f"docs/operations.md has no section for {name}"


def test_a_rule_naming_an_unknown_metric_or_bad_promql_is_caught():
    assert promql_metrics("sum(rate(training_jobs_failed_totl[5m]))") - KNOWN == {"training_jobs_failed_totl"}
    with pytest.raises(ValueError):
        promql_metrics("max(training_jobs_active) >")
    [rule] = load_all(MON / "prometheusrule.yaml")
    rule["spec"]["groups"][0]["rules"][0]["expr"] = "rate(http_requests_total)"  # a range function needs [5m]
    with pytest.raises(ManifestError, match="expr"):
        validate_monitoring(rule)


def test_pod_monitors_scrape_ports_the_ray_pods_expose():
    monitors = {m["metadata"]["name"]: m for m in load_all(MON / "podmonitors.yaml")}
    assert set(monitors) == {"raygrpo-ray-head", "raygrpo-ray-workers", "raygrpo-api"}
    pods = []  # (cluster kind, labels KubeRay adds + the template's, container port names)
    for f, path in (("raycluster.yaml", ["spec"]), ("rayservice.yaml", ["spec", "rayClusterConfig"])):
        spec = load_all(ROOT / "kuberay" / f)[0]
        for p in path:
            spec = spec[p]
        for node_type, group in [("head", spec["headGroupSpec"]), *[("worker", g) for g in spec["workerGroupSpecs"]]]:
            labels = {**group["template"]["metadata"]["labels"], "ray.io/node-type": node_type}
            ports = {p["name"]: p["containerPort"] for c in group["template"]["spec"]["containers"]
                     for p in c.get("ports", [])}
            pods.append((labels, ports))
    for name, m in monitors.items():
        selected = [ports for labels, ports in pods if m["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert selected, f"{name} selects no pod"
        for endpoint in m["spec"]["podMetricsEndpoints"]:
            assert all(endpoint["port"] in ports for ports in selected), (name, endpoint["port"])
    assert {p["metrics"] for _, p in pods} == {8080}  # Ray's metrics export port, rayStartParams agree
    api = monitors["raygrpo-api"]["spec"]["podMetricsEndpoints"][0]
    assert api["path"] == "/metrics" and [p["serve"] for labels, p in pods
                                          if labels.get("app.kubernetes.io/component") == "api"
                                          and labels["ray.io/node-type"] == "head"] == [8000]


def test_deploy_and_runbook_links_land_on_headings():
    docs = ROOT / "docs"
    for page in ("deploy.md", "operations.md"):
        text = (docs / page).read_text()
        for target, anchor in re.findall(r"\]\(([\w.]*)#([\w-]+)\)", text):
            assert anchor in _anchors((docs / (target or page)).read_text()), f"{page}: {target}#{anchor}"


def _promtool() -> str | None:
    return os.environ.get("PROMTOOL") or shutil.which("promtool")


@pytest.mark.skipif(_promtool() is None, reason="promtool not found (Debian package prometheus; or set PROMTOOL)")
def test_alert_rules_pass_promtool_check_and_unit_tests(tmp_path):
    """`promtool check rules` and `promtool test rules` (kuberay/monitoring/alerts_test.yaml: each alert
    fires on its condition, with its labels and annotations, and stays quiet below it)."""
    [rule] = load_all(MON / "prometheusrule.yaml")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(MON / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    for args in (["check", "rules", "rules.yaml"], ["test", "rules", "alerts_test.yaml"]):
        out = subprocess.run([_promtool(), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
    tested = {t["alertname"] for case in yaml.safe_load((MON / "alerts_test.yaml").read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert tested == set(ALERTS)


def test_the_names_dashboards_and_alerts_use_are_the_ones_exported(tmp_path):
    """The API's /metrics page and the run's Ray metrics carry every name the monitoring objects query."""
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from app.api.main import create_app
    from app.settings import Settings
    from grpo.report import RAY_COUNTERS, RAY_GAUGES

    app = create_app(Settings(home=tmp_path, database_url=None, redis_url=None))
    with TestClient(app) as client:
        client.post("/api/v1/jsonrpc", json={"jsonrpc": "2.0", "method": "rpc.discover", "id": 1})  # request series
        page = client.get("/metrics").text
    exported = set()
    for family in text_string_to_metric_families(page):
        exported |= {family.name, *(s.name for s in family.samples)}
    assert API_METRICS <= exported, sorted(API_METRICS - exported)
    ray_names = {f"ray_{name}" for name, _ in [*RAY_GAUGES.values(), *RAY_COUNTERS.values()]}
    ray_names |= {"ray_raygrpo_train_trajectories_total", "ray_raygrpo_train_checkpoints_total"}
    assert TRAIN_METRICS <= ray_names, sorted(TRAIN_METRICS - ray_names)
