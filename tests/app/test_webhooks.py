"""Webhooks: signed, retried with backoff, sent by the run's reporter at the right moments."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.client.webhooks import WebhookVerificationError, verify_webhook
from app.jobs.webhooks import Webhooks, sign


@pytest.fixture
def receiver():
    """A loopback HTTP server that records what it gets; answers 503 to the first `fail_first` posts."""
    got: list[dict] = []
    state = {"fail_first": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if state["fail_first"] > 0:
                state["fail_first"] -= 1
                self.send_response(503)
                self.end_headers()
                return
            got.append({"headers": dict(self.headers), "body": body})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", got, state
    server.shutdown()


def test_signed_and_retried_until_delivered(receiver):
    url, got, state = receiver
    state["fail_first"] = 2
    hooks = Webhooks([url], "s3cret", backoff_s=0.01)
    hooks.emit("training.job.started", {"job_id": "job_1"})
    hooks.flush()
    assert len(got) == 1  # two 503s, then delivered once
    h, body = got[0]["headers"], got[0]["body"]
    assert h["X-Raygrpo-Event"] == "training.job.started"
    payload = verify_webhook("s3cret", h, body)  # the SDK's helper accepts what the server signed
    assert payload["event"] == "training.job.started" and payload["data"] == {"job_id": "job_1"}
    assert payload["id"] == h["webhook-id"]
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify_webhook("other", h, body)
    assert sign("k", "i", 1, b"x") == sign("k", "i", 1, b"x") != sign("k", "i", 1, b"y")
    assert sign("k", "i", 1, b"x") != sign("k", "j", 1, b"x") != sign("k", "i", 2, b"x")
    with pytest.raises(ValueError, match="event"):
        hooks.emit("training.nope", {})


def test_gives_up_after_the_attempts_and_unreachable_urls_do_not_raise(receiver):
    url, got, state = receiver
    state["fail_first"] = 10
    hooks = Webhooks([url, "http://127.0.0.1:9/unreachable"], None, attempts=3, backoff_s=0.01)
    hooks.emit("training.job.failed", {"job_id": "job_2"})
    hooks.flush()
    assert got == [] and state["fail_first"] == 7  # 3 attempts at the receiver, then it gave up


def test_the_reporter_sends_progress_budget_warning_and_the_final_event(receiver, tmp_path, tiny_model_dir):
    from app.data import db
    from app.jobs.reporter import DBReporter
    from app.settings import Settings
    from grpo.config import GRPOConfig

    url, got, _ = receiver
    settings = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", redis_url=None)
    engine = db.get_engine(settings.db_url)
    db.init_db(engine)
    from decimal import Decimal

    with db.session_scope(engine) as s:
        job, _ = db.create_job(s, agent_id="a", owner=None, config={}, engine_config={}, total_iterations=10,
                               budget_usd=Decimal("1"), priority=0, idempotency_key=None, training_rows=1,
                               evaluation_rows=0)
        db.mark_running(s, job_id=job.id, ray_submission_id=job.id)
    cfg = GRPOConfig(model=tiny_model_dir, num_steps=10)
    rep = DBReporter(cfg=cfg, job_id=job.id, db_url=settings.db_url, webhooks=Webhooks([url], "k", backoff_s=0.01))
    rep.on_start(cfg, job_id=job.id)
    for step, cost in [(1, 0.1), (2, 0.2), (3, 0.8), (4, 0.95)]:
        rep.on_step({"step": step, "reward_mean": 0.5, "cost_usd": cost})
    rep.on_end("completed", error=None, summary={"last_metrics": {"step": 4}, "cost_usd": 0.95})
    events = [json.loads(g["body"]) for g in got]
    names = [e["event"] for e in events]
    assert names.count("training.job.progress") == 4  # 10 %, 20 %, 30 %, 40 % of 10 iterations
    warnings = [e["data"]["percent"] for e in events if e["event"] == "training.budget.warning"]
    assert sorted(warnings) == [75, 90]
    # delivery runs on two threads, so arrival order is not emission order (receivers sort by created_at)
    done = [e for e in events if e["event"] == "training.job.completed"]
    assert len(done) == 1 and done[0]["data"]["job_id"] == job.id
    assert max(e["created_at"] for e in events) == done[0]["created_at"]
    with db.session_scope(engine) as s:
        assert db.get_job(s, job_id=job.id).budget_warned_pct == 90


def test_a_replayed_or_altered_delivery_is_rejected(receiver):
    """Standard Webhooks: id and timestamp are signed with the body, so a captured delivery replayed later
    fails the receiver's timestamp check, and re-stamping it breaks the signature."""
    import base64
    import secrets

    url, got, _ = receiver
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    hooks = Webhooks([url], secret, backoff_s=0.01)
    hooks.emit("training.job.completed", {"job_id": "job_9"})
    hooks.flush()
    h, body = got[0]["headers"], got[0]["body"]
    sent_at = int(h["webhook-timestamp"])
    assert verify_webhook(secret, h, body, now=sent_at + 60)["data"] == {"job_id": "job_9"}
    with pytest.raises(WebhookVerificationError, match="replay"):
        verify_webhook(secret, h, body, now=sent_at + 3600)  # the same bytes an hour later
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify_webhook(secret, {**h, "webhook-timestamp": str(sent_at + 3600)}, body, now=sent_at + 3600)
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify_webhook(secret, h, body.replace(b"job_9", b"job_8"), now=sent_at)
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify_webhook(secret, {**h, "webhook-id": "another"}, body, now=sent_at)
    with pytest.raises(WebhookVerificationError, match="missing header webhook-signature"):
        verify_webhook(secret, {k: v for k, v in h.items() if k.lower() != "webhook-signature"}, body)
