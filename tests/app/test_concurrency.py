"""Many clients at once: concurrent starts create exactly one job each (or one per idempotency key)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from raygrpo_test_services import bearer

from app.settings import Settings

ROWS = [{"query": "digit 1:", "expected_outcome": "1"}]


@pytest.mark.slow
def test_500_concurrent_starts_create_exactly_the_jobs_asked_for(tmp_path, db_url, engine, tiny_model_dir):
    from app.api.main import create_app

    settings = Settings(home=tmp_path / "home", database_url=db_url, redis_url=None,
                        default_model=tiny_model_dir, rate_limits={"default": 0})
    app = create_app(settings)
    n, keys = 500, 50

    def start(i: int) -> str:
        params = {"agent_id": f"agent-{i % 7}", "training_data": ROWS,
                  "config": {"n_iterations": 3, "batch_size": 1, "reward": "digit", "max_budget_usd": "1"}}
        if i % 2:  # half of the calls share 50 idempotency keys
            params["idempotency_key"] = f"key-{i % keys}"
        r = client.post("/api/v1/jsonrpc", json={"jsonrpc": "2.0", "method": "training.start_grpo",
                                                  "params": params, "id": i})
        assert r.status_code == 200
        return r.json()["result"]["job_id"]

    with TestClient(app, headers=bearer(settings)) as client, ThreadPoolExecutor(max_workers=32) as pool:
        ids = list(pool.map(start, range(n)))
    keyed = {i % keys: ids[i] for i in range(1, n, 2)}
    for i in range(1, n, 2):
        assert ids[i] == keyed[i % keys]  # every call with a key got the key's one job
    expected = n // 2 + len(keyed)  # one job per unkeyed call, one per distinct key
    assert len(set(ids)) == expected

    from app.data import db
    with db.session_scope(app.state.ctx.engine) as s:
        rows, cursor = [], None
        while True:
            page, cursor = db.list_jobs(s, limit=100, cursor=cursor)
            rows += page
            if cursor is None:
                break
    assert len(rows) == expected and {j.id for j in rows} == set(ids)
