"""Training internals reach Prometheus through Ray: a run's RayMetricsReporter sets ray.util.metrics
that Ray's metrics agent exports (prefixed `ray_`, tagged with the job id) on the node's metrics port."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.ray


def test_step_metrics_are_exported_on_rays_metrics_port(ray_session):
    import ray

    from grpo.config import GRPOConfig
    from grpo.report import RayMetricsReporter

    @ray.remote(num_cpus=0)
    def report() -> None:  # in a Ray worker, as the run's driver is in its Ray Job
        rep = RayMetricsReporter("job_metrics_test")
        rep.on_start(GRPOConfig(model="unused", checkpoint_interval=2), job_id="job_metrics_test")
        rep.on_step({"step": 2, "reward_mean": 0.625, "loss": -0.01, "kl": 0.002, "tokens_per_s": 900.0,
                     "reward_errors": 3.0, "step_time_s": 1.5, "publish_time_s": 0.02})
        rep.on_trajectories([{}] * 16)
        time.sleep(12)  # stay alive past the export interval so the agent has the values

    ref = report.remote()
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    wanted = {
        "ray_raygrpo_train_reward_mean": 0.625, "ray_raygrpo_train_tokens_per_second": 900.0,
        "ray_raygrpo_train_reward_failures_total": 3.0, "ray_raygrpo_train_trajectories_total": 16.0,
        "ray_raygrpo_train_iteration": 2.0, "ray_raygrpo_train_checkpoints_total": 1.0,
    }
    found: dict[str, float] = {}
    deadline = time.time() + 60
    while time.time() < deadline and set(found) != set(wanted):
        for line in httpx.get(url, timeout=10).text.splitlines():
            name = line.split("{", 1)[0]
            if name in wanted and 'job_id="job_metrics_test"' in line:
                found[name] = float(line.rsplit(" ", 1)[1])
        time.sleep(1)
    ray.get(ref)
    assert found == wanted
