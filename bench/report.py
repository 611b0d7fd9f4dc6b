"""What a benchmark level measured, as numbers, a table, JSON and a chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmserve.bench.load import RequestResult

__all__ = ["latencies", "summarize", "table", "write_chart", "write_json"]


def _percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), or None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def summarize(
    concurrency: int, results: list[RequestResult], wall_seconds: float
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    e2e = [r.ended - r.started for r in ok]
    per_stream = [
        (len(r.token_times) - 1) / (r.token_times[-1] - r.token_times[0])
        for r in ok
        if len(r.token_times) > 1 and r.token_times[-1] > r.token_times[0]
    ]
    tokens = sum(r.tokens for r in ok)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "truncated": sum(1 for r in results if r.truncated),
        "error_samples": sorted({r.error or f"HTTP {r.status}" for r in results if not r.ok})[:5],
        "wall_seconds": round(wall_seconds, 3),
        "completion_tokens": tokens,
        "aggregate_tokens_per_second": round(tokens / wall_seconds, 2) if wall_seconds else 0.0,
        "per_stream_tokens_per_second_p50": _round(_percentile(per_stream, 50)),
        "per_stream_tokens_per_second_p5": _round(_percentile(per_stream, 5)),
        **latencies(ok),
        "e2e_ms_p50": _ms(_percentile(e2e, 50)),
        "e2e_ms_p99": _ms(_percentile(e2e, 99)),
    }


def latencies(streams: list[RequestResult]) -> dict[str, float | None]:
    """TTFT and inter-token percentiles over the streams' tokens, in milliseconds."""
    ttft = [r.token_times[0] - r.started for r in streams if r.token_times]
    gaps = [b - a for r in streams for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    return {
        "ttft_ms_p50": _ms(_percentile(ttft, 50)),
        "ttft_ms_p95": _ms(_percentile(ttft, 95)),
        "ttft_ms_p99": _ms(_percentile(ttft, 99)),
        "inter_token_ms_p50": _ms(_percentile(gaps, 50)),
        "inter_token_ms_p99": _ms(_percentile(gaps, 99)),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


_COLUMNS = [
    ("conc", "concurrency"),
    ("ok", "ok"),
    ("err", "errors"),
    ("trunc", "truncated"),
    ("tok/s", "aggregate_tokens_per_second"),
    ("tok/s/stream", "per_stream_tokens_per_second_p50"),
    ("TTFT p50", "ttft_ms_p50"),
    ("p95", "ttft_ms_p95"),
    ("p99", "ttft_ms_p99"),
    ("ITL p50", "inter_token_ms_p50"),
    ("p99", "inter_token_ms_p99"),
    ("E2E p50", "e2e_ms_p50"),
]


def table(levels: list[dict[str, Any]]) -> str:
    """A fixed-width table, times in milliseconds."""
    rows = [[title for title, _ in _COLUMNS]]
    rows += [
        ["-" if level[key] is None else str(level[key]) for _, key in _COLUMNS] for level in levels
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
    )


def write_json(path: Path, run: dict[str, Any]) -> None:
    path.write_text(json.dumps(run, indent=2) + "\n")


def write_chart(path: Path, runs: dict[str, list[dict[str, Any]]], title: str) -> None:
    """Aggregate tokens/s and TTFT p50 against concurrency, one line per labelled run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, levels in runs.items():
        xs = [level["concurrency"] for level in levels]
        throughput.plot(
            xs, [level["aggregate_tokens_per_second"] for level in levels], "o-", label=label
        )
        ttft.plot(xs, [level["ttft_ms_p50"] or 0 for level in levels], "o-", label=label)
    levels_seen = sorted({level["concurrency"] for levels in runs.values() for level in levels})
    for axes, ylabel in ((throughput, "generated tokens/s (all streams)"), (ttft, "TTFT p50 (ms)")):
        axes.set_xlabel("concurrent streams")
        axes.set_ylabel(ylabel)
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels_seen, [str(level) for level in levels_seen])
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
