"""Rate limits per principal and method: token buckets, in Redis (atomic, shared by every Serve
replica) or in this process when there is no Redis.

A bucket holds `limit` tokens and refills at `limit` per minute, so a caller may burst up to the limit
and then gets one call per 60/limit seconds. Each call takes one token, each member of a batch too.
Limits come from `Settings.rate_limits` (`RAYGRPO_RATE_LIMITS`); 0 turns a method's limit off.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from app.api.auth import request_state
from app.api.jsonrpc import RATE_LIMITED, Method, RPCError

# KEYS[1]: the bucket hash; ARGV: capacity, refill per second. Redis' own clock, so replicas agree.
_TAKE = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil then
  tokens = capacity
  ts = now
end
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 1)
return {allowed, tostring(tokens)}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: float
    """seconds until the bucket is full again"""
    retry_after_s: float
    """seconds until the next call would be allowed (0 when allowed)"""


def _decision(allowed: bool, tokens: float, limit: int, rate: float) -> Decision:
    return Decision(allowed=allowed, limit=limit, remaining=int(tokens), reset_s=(limit - tokens) / rate,
                    retry_after_s=0.0 if allowed else (1 - tokens) / rate)


class RateLimiter:
    """Token buckets keyed by (principal, method)."""

    def __init__(self, limits: dict[str, int], redis_url: str | None = None, *, prefix: str = "raygrpo:rl:"):
        self.limits = dict(limits)
        self.prefix = prefix
        self._redis = None
        self._script = None
        if redis_url:
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
            self._script = self._redis.register_script(_TAKE)
        self._local: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    @property
    def shared(self) -> bool:
        """Whether a take is a Redis round trip (made off the event loop) or an in-process update."""
        return self._script is not None

    def limit_for(self, method: str) -> int:
        return self.limits.get(method, self.limits.get("default", 0))

    def take(self, principal: str, method: str) -> Decision | None:
        """One token from the caller's bucket for `method`; None when the method is unlimited."""
        limit = self.limit_for(method)
        if limit <= 0:
            return None
        rate = limit / 60.0
        key = f"{self.prefix}{principal}:{method}"
        if self._script is not None:
            allowed, tokens = self._script(keys=[key], args=[limit, rate])
            return _decision(bool(allowed), float(tokens), limit, rate)
        with self._lock:
            now = time.monotonic()
            tokens, ts = self._local.get(key, (float(limit), now))
            tokens = min(float(limit), tokens + (now - ts) * rate)
            allowed = tokens >= 1
            if allowed:
                tokens -= 1
            self._local[key] = (tokens, now)
            return _decision(allowed, tokens, limit, rate)


async def rate_limit(method: Method) -> None:
    """The Registry's guard after `authorize`: takes a token for the caller (by principal, else client
    address), records the X-RateLimit-* headers, refuses with -42900 and a retry-after when empty.
    A Redis bucket is taken from a worker thread: its round trip must not stall the event loop."""
    state = request_state()
    limiter = getattr(getattr(state, "services", None), "limiter", None)
    if state is None or limiter is None:
        return
    who = state.principal.subject if state.principal else f"ip:{state.client_ip or 'unknown'}"
    if limiter.shared:
        decision = await asyncio.to_thread(limiter.take, who, method.name)
    else:
        decision = limiter.take(who, method.name)
    if decision is None:
        return
    # With several calls in a batch the headers describe the tightest bucket.
    previous = state.headers.get("X-RateLimit-Remaining")
    if previous is None or decision.remaining <= int(previous):
        state.headers.update({
            "X-RateLimit-Limit": str(decision.limit),
            "X-RateLimit-Remaining": str(decision.remaining),
            "X-RateLimit-Reset": str(max(1, round(decision.reset_s))),
        })
    if not decision.allowed:
        retry = max(1, round(decision.retry_after_s + 0.499))
        state.headers["Retry-After"] = str(retry)
        raise RPCError(RATE_LIMITED, f"rate limit exceeded: {decision.limit} {method.name} calls per minute; "
                       f"retry after {retry} s", {"limit": decision.limit, "retry_after_s": retry,
                                                   "method": method.name})
