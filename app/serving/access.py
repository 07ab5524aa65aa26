"""Who may call a deployed policy (`/policies/<name>/v1/...`): the job API's own credentials and rules.

A policy application has no database or secret of its own: its router asks the job API (the `TrainingAPI`
deployment of the `raygrpo-api` application, over a Serve handle) about every request, and the API answers
with `check_policy_call`:
- the caller must present a JWT or an API key (`Authorization: Bearer <token or rg_ key>`, which is what the
  OpenAI client sends as its `api_key`, or `X-API-Key`), holding `models:read`;
- the deployment must be the caller's, or an admin's to see, or marked shared by an admin (`models.share`);
  any other name is "not found", exactly like a missing one;
- each call takes a token from the caller's `policy.generate` bucket (RAYGRPO_RATE_LIMITS), as JSON-RPC
  calls do from theirs.
Body size is the router's to bound (MAX_BODY_BYTES), before it asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

API_APP = "raygrpo-api"
"""the Serve application of the job API"""
API_DEPLOYMENT = "TrainingAPI"
RATE_LIMIT_METHOD = "policy.generate"
"""the rate-limit bucket of OpenAI calls to deployed policies (RAYGRPO_RATE_LIMITS="policy.generate=600")"""
MAX_BODY_BYTES = 10 * 2**20
"""largest request body a policy route reads (as the JSON-RPC route)"""
PERMISSION = "models:read"


@dataclass
class Verdict:
    """The API's answer about one call: allowed (status 200) or the HTTP error to send, OpenAI-shaped."""

    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    subject: str | None = None


def openai_error(status: int, message: str, *, kind: str, code: str | None = None) -> Verdict:
    return Verdict(status, {"error": {"message": message, "type": kind, "param": None, "code": code}})


def check_policy_call(ctx: Any, name: str, authorization: str | None, api_key: str | None) -> Verdict:
    """Whether the caller these headers name may call deployment `name` now (see the module docstring)."""
    from app.api.auth import authenticate
    from app.data import db
    from app.data.tables import PolicyDeployment

    principal, reason = authenticate(ctx.settings, ctx.engine, authorization, api_key)
    if principal is None:
        verdict = openai_error(401, f"unauthenticated: {reason or 'credentials required'}; send "
                               "Authorization: Bearer <token or API key>", kind="authentication_error",
                               code="invalid_api_key")
        verdict.headers["WWW-Authenticate"] = 'Bearer realm="raygrpo"'
        return verdict
    if not principal.can(PERMISSION):
        return openai_error(403, f"forbidden: calling a deployed policy needs the permission {PERMISSION}",
                            kind="permission_error")
    with db.session_scope(ctx.engine) as s:
        row = s.get(PolicyDeployment, name)
        visible = row is not None and (principal.owns(row.owner) or bool(row.shared))
    if not visible:
        return openai_error(404, f"deployment not found: {name}", kind="invalid_request_error",
                            code="model_not_found")
    verdict = Verdict(200, subject=principal.subject)
    decision = ctx.limiter.take(principal.subject, RATE_LIMIT_METHOD) if ctx.limiter is not None else None
    if decision is not None:
        verdict.headers = {"X-RateLimit-Limit": str(decision.limit), "X-RateLimit-Remaining": str(decision.remaining),
                           "X-RateLimit-Reset": str(max(1, round(decision.reset_s)))}
        if not decision.allowed:
            retry = max(1, round(decision.retry_after_s + 0.499))
            refused = openai_error(429, f"rate limit exceeded: {decision.limit} calls per minute to deployed "
                                   f"policies; retry after {retry} s", kind="rate_limit_error",
                                   code="rate_limit_exceeded")
            refused.headers = {**verdict.headers, "Retry-After": str(retry)}
            return refused
    return verdict
