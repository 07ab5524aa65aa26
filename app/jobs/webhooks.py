"""Webhooks: job events POSTed to the operator's URLs, signed with HMAC-SHA256, retried with backoff.

Events: `training.job.started`, `training.job.progress` (every 10 % of the iterations),
`training.job.completed`, `training.job.failed`, `training.job.cancelled`, `training.budget.warning`.
URLs and the secret come from the environment (`RAYGRPO_WEBHOOK_URLS`, comma-separated, and
`RAYGRPO_WEBHOOK_SECRET`), never from a request. Delivery runs in a background thread so a slow
receiver never slows a run; `flush()` waits for what is in flight (at the end of a run).

Deliveries follow the Standard Webhooks scheme: `webhook-id` (the event id, kept across retries),
`webhook-timestamp` (Unix seconds of the attempt) and `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">`, so a captured delivery cannot be replayed past the receiver's timestamp
tolerance. Receivers verify with `app.client.webhooks.verify_webhook` (in the SDK) and drop ids they have
seen (retries repeat one). `X-Raygrpo-Event` names the event.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx

log = logging.getLogger("app.jobs.webhooks")

EVENTS = ("training.job.started", "training.job.progress", "training.job.completed", "training.job.failed",
          "training.job.cancelled", "training.budget.warning")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64>`: HMAC-SHA256 of "{id}.{timestamp}.{body}"; a `whsec_<base64>` secret is used decoded.
    (The SDK's app.client.webhooks verifies it; the two are kept apart by the package layers.)"""
    key = base64.b64decode(secret[len("whsec_"):]) if secret.startswith("whsec_") else secret.encode()
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class Webhooks:
    def __init__(self, urls: list[str], secret: str | None, *, attempts: int = 5, backoff_s: float = 0.5,
                 timeout_s: float = 5.0):
        self.urls, self.secret = [u for u in urls if u], secret
        self.attempts, self.backoff_s, self.timeout_s = attempts, backoff_s, timeout_s
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="webhooks") if self.urls else None
        self._pending: list[Future] = []
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any) -> Webhooks:
        return cls(settings.webhook_urls, settings.webhook_secret)

    def emit(self, event: str, data: dict[str, Any]) -> None:
        if event not in EVENTS:
            raise ValueError(f"event: unknown webhook event {event!r}")
        if self._pool is None:
            return
        payload = {"id": uuid.uuid4().hex, "event": event, "created_at": datetime.now(UTC).isoformat(), "data": data}
        body = json.dumps(payload, default=str).encode()
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()]
            self._pending += [self._pool.submit(self._deliver, url, event, payload["id"], body) for url in self.urls]

    def _deliver(self, url: str, event: str, delivery: str, body: bytes) -> bool:
        for attempt in range(self.attempts):
            timestamp = int(time.time())  # each attempt signed at its own time: receivers refuse old ones
            headers = {"Content-Type": "application/json", "X-Raygrpo-Event": event, "webhook-id": delivery,
                       "webhook-timestamp": str(timestamp)}
            if self.secret:
                headers["webhook-signature"] = sign(self.secret, delivery, timestamp, body)
            try:
                r = httpx.post(url, content=body, headers=headers, timeout=self.timeout_s)
                if r.status_code < 300:
                    return True
                if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                    log.warning("webhook %s to %s refused with %d; not retried", event, url, r.status_code)
                    return False
            except httpx.HTTPError as e:
                log.info("webhook %s to %s failed (%s), attempt %d", event, url, type(e).__name__, attempt + 1)
            time.sleep(self.backoff_s * 2**attempt)  # 0.5, 1, 2, 4 s ...
        log.warning("webhook %s to %s gave up after %d attempts", event, url, self.attempts)
        return False

    def flush(self, timeout_s: float = 30.0) -> None:
        with self._lock:
            pending = list(self._pending)
        for f in pending:
            f.result(timeout=timeout_s)
