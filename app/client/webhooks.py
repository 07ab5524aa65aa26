"""Verify the job events raygrpo POSTs to your webhook URL (the Standard Webhooks scheme).

Each delivery carries `webhook-id` (the event's id, the same on every retry), `webhook-timestamp` (Unix
seconds of the attempt) and `webhook-signature` (`v1,<base64 HMAC-SHA256>`, space-separated when there
are several) over `"{id}.{timestamp}.{body}"`. The key is the operator's RAYGRPO_WEBHOOK_SECRET: a
`whsec_<base64>` secret is used decoded, any other string as its UTF-8 bytes. Because the id and the
timestamp are signed, a receiver that refuses old timestamps (5 minutes by default) and ids it has seen
cannot be fooled by a replayed delivery.

    from app.client.webhooks import verify_webhook, WebhookVerificationError

    @app.post("/hooks/raygrpo")
    async def hook(request):
        event = verify_webhook(SECRET, request.headers, await request.body())  # raises when forged/old
        if seen(event["id"]): return 204  # retries repeat an id
        ...
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

DEFAULT_TOLERANCE_S = 300


class WebhookVerificationError(Exception):
    """The delivery is not signed with this secret, lacks a header, or its timestamp is too old or new."""


def secret_key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_"):], validate=True)
        except binascii.Error:
            raise WebhookVerificationError("the secret starts with whsec_ but is not base64") from None
    return secret.encode()


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64>` for one delivery."""
    mac = hmac.new(secret_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify_webhook(secret: str, headers: Mapping[str, str], body: bytes, *,
                   tolerance_s: float = DEFAULT_TOLERANCE_S, now: float | None = None) -> dict[str, Any]:
    """The event (parsed JSON body) when the delivery is authentic and fresh; WebhookVerificationError else."""
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id, stamp, signatures = lower["webhook-id"], lower["webhook-timestamp"], lower["webhook-signature"]
    except KeyError as e:
        raise WebhookVerificationError(f"missing header {e.args[0]}") from None
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp is {now - timestamp:.0f} s from now (tolerance "
                                       f"{tolerance_s:.0f} s): a replay or a skewed clock")
    expected = signature(secret, msg_id, timestamp, body)
    if not any(hmac.compare_digest(expected, s) for s in signatures.split()):
        raise WebhookVerificationError("no valid signature for this secret")
    event = json.loads(body)
    if not isinstance(event, dict) or event.get("id") != msg_id:
        raise WebhookVerificationError("the body's id does not match webhook-id")
    return event
