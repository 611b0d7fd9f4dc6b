"""Per-key rate limits: requests, tokens per minute and per day, and concurrent requests.

Token buckets refill continuously (a key with `rpm = 60` regains one request a second); a
request is admitted only if every bucket of its key has room, and then all are charged at once.
Tokens are reserved as prompt + max_tokens at admission and reconciled to the real count when
the request ends. The `memory` backend serves one process; the `redis` backend shares the same
state between replicas, atomically, with one Lua script per decision.
"""

from __future__ import annotations

from llmserve.server.ratelimit.base import Decision, Limiter, LimiterUnavailable, Reservation
from llmserve.server.ratelimit.memory import MemoryLimiter

__all__ = ["Decision", "Limiter", "LimiterUnavailable", "MemoryLimiter", "Reservation"]
