"""Shared fixtures: one local Ray per session, a tiny HF model directory per session.

Tests marked `gpu` are skipped without CUDA. Under CI (CI=true) tests marked `services` fail
instead of skipping when Redis/PostgreSQL are missing, and tests that run user code (the `sandbox`
fixture) fail instead of skipping when the bubblewrap sandbox cannot start.
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sandbox() -> None:
    """The code sandbox works here: skip without it on a developer's machine, fail under CI."""
    from grpo.sandbox import status

    state = status()
    if not state.available:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the code sandbox is required under CI: {state.reason}")
        pytest.skip(state.reason)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random-init 4-layer Llama (hidden 128) and byte tokenizer, saved as an ordinary HF directory."""
    from grpo.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", seed=0))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session; logical CPUs above the 2 real cores so every actor fits."""
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Serve's proxy callback, as every stack of ours sets it (app.api.proxy): read by the proxy actors, which
    # inherit this process's environment through the raylet it starts
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "app.api.proxy:middlewares")
    # address="local": a new cluster even when `ray start` left one running on this machine
    context = ray.init(address="local", num_cpus=8, log_to_driver=True)
    # The dashboard takes another port when 8265 is busy (another local cluster): tests that call the
    # Jobs API read the real one here. Not RAY_DASHBOARD_URL: stacks the tests start must not inherit it.
    os.environ["RAYGRPO_TEST_DASHBOARD_URL"] = f"http://{context.dashboard_url}"
    yield ray
    ray.shutdown()
