"""What a multi-tenant run measured: each tenant's latencies and service, how the service was
shared (Jain's index), as numbers, a table and a chart.

Service is counted as the server's fair scheduler counts it by default (scheduler.prompt_weight
and generated_weight: 1 per prompt token, 2 per generated one), from the usage each stream ends
with, so the shares here are the ones the scheduler is meant to equalise."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmserve.bench.load import RequestResult
from llmserve.bench.report import latencies
from llmserve.bench.tenants import TenantResults

__all__ = [
    "ServiceWeights",
    "jain_index",
    "summarize_tenants",
    "tenant_table",
    "write_tenant_chart",
]


@dataclass(frozen=True)
class ServiceWeights:
    prompt: float = 1.0
    completion: float = 2.0


def jain_index(values: list[float]) -> float:
    """(sum x)^2 / (n * sum x^2): 1 when all are equal, 1/n when one has everything."""
    squares = sum(x * x for x in values)
    return sum(values) ** 2 / (len(values) * squares) if squares else 1.0


def _prompt_tokens(tenant: TenantResults) -> float:
    """A tenant's prompt length in tokens, from the usage its finished streams reported."""
    known = [r.prompt_tokens for r in tenant.results if r.prompt_tokens is not None]
    return statistics.median(known) if known else 0.0


def _service(result: RequestResult, prompt_tokens: float, weights: ServiceWeights) -> float:
    """What one stream cost the server. A stream cut at the run's end has no usage: its prompt
    counts if its first token came (the prompt was read) and each token received counts."""
    if not result.ok:
        return 0.0
    prompt = result.prompt_tokens if result.prompt_tokens is not None else prompt_tokens
    read = result.prompt_tokens is not None or bool(result.token_times)
    return weights.prompt * (prompt if read else 0) + weights.completion * result.tokens


def summarize_tenants(
    tenants: list[TenantResults], wall_seconds: float, weights: ServiceWeights
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for tenant in tenants:
        spec, finished = tenant.spec, tenant.results
        ok = [r for r in finished if r.ok]
        prompt_tokens = _prompt_tokens(tenant)
        received = ok + tenant.cut
        service = sum(_service(r, prompt_tokens, weights) for r in received)
        tokens = sum(r.tokens for r in received)
        rows.append(
            {
                "tenant": spec.name,
                "weight": spec.weight,
                "concurrency": spec.concurrency,
                "prompt_words": tenant.target.prompt_words,
                "max_tokens": tenant.target.max_tokens,
                "requests": len(finished),
                "ok": len(ok),
                "errors": len(finished) - len(ok),
                "truncated": sum(1 for r in finished if r.truncated),
                "cut_at_end": len(tenant.cut),
                "error_samples": sorted(
                    {r.error or f"HTTP {r.status}" for r in finished if not r.ok}
                )[:5],
                "completion_tokens": tokens,
                "tokens_per_second": round(tokens / wall_seconds, 2) if wall_seconds else 0.0,
                # Streams cut at the end have waited too: leaving them out would hide the
                # longest waits of a starved tenant.
                **latencies(received),
                # A stream cut at the end before its first token has no TTFT, only this bound.
                "unanswered_wait_ms_max": max(
                    (
                        round((r.ended - r.started) * 1000, 2)
                        for r in tenant.cut
                        if not r.token_times
                    ),
                    default=None,
                ),
                "service": round(service, 1),
                "service_per_weight": round(service / spec.weight, 1),
            }
        )
    total_service = sum(row["service"] for row in rows)
    total_weight = sum(row["weight"] for row in rows)
    for row in rows:
        row["share_of_service"] = round(row["service"] / total_service, 4) if total_service else 0.0
        row["share_of_weight"] = round(row["weight"] / total_weight, 4)
    total_tokens = sum(row["completion_tokens"] for row in rows)
    return {
        "wall_seconds": round(wall_seconds, 3),
        "service_weights": {"prompt": weights.prompt, "completion": weights.completion},
        "tokens_per_second": round(total_tokens / wall_seconds, 2) if wall_seconds else 0.0,
        "jain_index": round(jain_index([row["service"] / row["weight"] for row in rows]), 4),
        "tenants": rows,
    }


_COLUMNS = [
    ("tenant", "tenant"),
    ("weight", "weight"),
    ("conc", "concurrency"),
    ("ok", "ok"),
    ("err", "errors"),
    ("cut", "cut_at_end"),
    ("tokens", "completion_tokens"),
    ("tok/s", "tokens_per_second"),
    ("TTFT p50", "ttft_ms_p50"),
    ("p95", "ttft_ms_p95"),
    ("ITL p50", "inter_token_ms_p50"),
    ("p99", "inter_token_ms_p99"),
    ("service", "service"),
    ("share", "share_of_service"),
]


def tenant_table(run: dict[str, Any]) -> str:
    """A fixed-width table of the tenants, times in milliseconds, and the run's totals."""
    rows = [[title for title, _ in _COLUMNS]]
    rows += [
        ["-" if row[key] is None else str(row[key]) for _, key in _COLUMNS]
        for row in run["tenants"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.append(
        f"total {run['tokens_per_second']} tok/s over {run['wall_seconds']} s; "
        f"Jain's index over service/weight {run['jain_index']}"
    )
    return "\n".join(lines)


def write_tenant_chart(path: Path, run: dict[str, Any], title: str) -> None:
    """Share of service beside share of weight, and TTFT and inter-token latency, per tenant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = run["tenants"]
    names = [row["tenant"] for row in rows]
    xs = range(len(rows))
    figure, panels = plt.subplots(1, 3, figsize=(13, 4.2))
    bars = (
        ("share", ("share_of_service", "share_of_weight"), ("service", "weight")),
        ("TTFT (ms)", ("ttft_ms_p50", "ttft_ms_p95"), ("p50", "p95")),
        ("inter-token (ms)", ("inter_token_ms_p50", "inter_token_ms_p99"), ("p50", "p99")),
    )
    for axes, (ylabel, keys, labels) in zip(panels, bars, strict=True):
        for offset, key, label in zip((-0.2, 0.2), keys, labels, strict=True):
            axes.bar([x + offset for x in xs], [row[key] or 0 for row in rows], 0.4, label=label)
        axes.set_xticks(list(xs), names)
        axes.set_ylabel(ylabel)
        axes.grid(True, axis="y", alpha=0.3)
        axes.legend()
    figure.suptitle(f"{title}; Jain's index {run['jain_index']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
