"""The kinds of per-key limit, in one table that everything else reads.

The keys file's fields, the `llmserve keys` flags, both limiters' buckets and costs, the
`x-ratelimit-*` headers, the 429 each kind answers with, the sidecar's `limit` label and the
README's table of limits all come from `KINDS`: a new kind is one row here plus its tests.
This module imports nothing from the server, so that the keys file can be validated with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["KINDS", "LimitKind", "kind", "readme_table"]

_MINUTE = 60.0
_DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class LimitKind:
    """One kind of limit a key may have; absent from a key means unlimited."""

    # The keys file field, the `llmserve keys --<name>` flag and the metrics' `limit` label.
    name: str
    # What it counts, in words, for flags, error messages and the docs.
    meaning: str
    # Requests are charged one each before the body is read; tokens after tokenizing (prompt +
    # max_tokens), then reconciled to what the request used.
    unit: Literal["requests", "tokens"]
    # A token bucket refilled evenly over this window; None: a count of requests running at
    # once (leases), not a bucket.
    window_seconds: float | None
    # OpenAI's noun in `x-ratelimit-{limit,remaining,reset}-<noun>`, where OpenAI has one.
    header: str | None
    # The 429's `type` and `code`: daily quotas are OpenAI's `insufficient_quota`.
    error_type: str
    error_code: str
    # The README's "what it counts" cell.
    counts: str

    def cost(self, tokens: int) -> int:
        """What one request reserving `tokens` takes from this kind's bucket."""
        return tokens if self.unit == "tokens" else 1


KINDS: tuple[LimitKind, ...] = (
    LimitKind(
        "rpm",
        "requests per minute",
        "requests",
        _MINUTE,
        header="requests",
        error_type="requests",
        error_code="rate_limit_exceeded",
        counts="requests per minute",
    ),
    LimitKind(
        "tpm",
        "tokens per minute (prompt + completion)",
        "tokens",
        _MINUTE,
        header="tokens",
        error_type="tokens",
        error_code="rate_limit_exceeded",
        counts=(
            "tokens per minute: prompt + `max_tokens` reserved at admission, then reconciled to"
            " prompt + tokens actually generated when the request ends (cancelled and failed"
            " requests give back what they did not use)"
        ),
    ),
    LimitKind(
        "concurrency",
        "requests running at once",
        "requests",
        None,
        header=None,
        error_type="requests",
        error_code="rate_limit_exceeded",
        counts="requests running at once",
    ),
    LimitKind(
        "tpd",
        "tokens per day",
        "tokens",
        _DAY,
        header=None,
        error_type="insufficient_quota",
        error_code="insufficient_quota",
        counts="tokens per day, counted the same way",
    ),
    LimitKind(
        "rpd",
        "requests per day",
        "requests",
        _DAY,
        header=None,
        error_type="insufficient_quota",
        error_code="insufficient_quota",
        counts="requests per day",
    ),
)

_BY_NAME = {k.name: k for k in KINDS}


def kind(name: str) -> LimitKind:
    """The row named `name` (KeyError for a name the table does not have)."""
    return _BY_NAME[name]


def readme_table() -> str:
    """The README's table of limits, as markdown."""
    rows = ["| limit | what it counts | refused with |", "|---|---|---|"]
    for k in KINDS:
        refusal = f"429 `{k.error_code}`"
        if k.error_type != k.error_code:
            refusal += f", type `{k.error_type}`"
        rows.append(f"| `{k.name}` | {k.counts} | {refusal} |")
    return "\n".join(rows)
