"""Draw docs/exemplar-path.png: from a TTFT bucket's exemplar to that request's log line.

Grafana does not run here, so this picture is drawn from the real thing instead: it starts
`llmserve serve` (synthetic engine, one stream at a time, so eight requests sent together see
their first token after 0.05 to 1.5 s of queueing), half of them with a W3C `traceparent`;
it scrapes the sidecar's /metrics as OpenMetrics, and draws
the TTFT histogram with each bucket's exemplar beside the request-log line it names.

    .venv/bin/python scripts/exemplar_picture.py --out docs/exemplar-path.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sys
import tempfile
from pathlib import Path

import aiohttp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

BUCKET = re.compile(
    r"^llm_time_to_first_token_seconds_bucket\{([^}]*)\} (\S+)(?: # \{([^}]*)\} (\S+))?"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def load(base: str) -> None:
    """Eight requests at once on a one-stream engine: each waits for the ones before it."""

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        headers = {}
        if index % 2 == 0:
            headers["traceparent"] = f"00-{index + 1:032x}-{index + 1:016x}-01"
        body = {"model": "synthetic", "max_tokens": 4, "prompt": "x"}
        async with session.post(f"{base}/v1/completions", json=body, headers=headers) as response:
            await response.read()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, index) for index in range(8)))


async def scrape(metrics: str) -> list[tuple[str, float, dict[str, str], float]]:
    accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with aiohttp.ClientSession() as session:
        async with session.get(metrics, headers=accept) as response:
            text = await response.text()
    rows = []
    for line in text.splitlines():
        if match := BUCKET.match(line):
            le = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))["le"]
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match[3] or ""))
            rows.append((le, float(match[2]), labels, float(match[4] or "nan")))
    return rows


async def main(out: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="llms-picture-"))
    port, sidecar = free_port(), free_port()
    log_file = tmp / "requests.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "llmserve.server.cli", "serve", "--engine", "synthetic"),
        *("--port", str(port), "--sidecar-port", str(sidecar)),
        *("--sidecar-socket-path", f"{tmp}/ev.sock", "--sidecar-log-file", str(log_file)),
        *("--synthetic-first-token-seconds", "0.05", "--synthetic-token-interval-seconds", "0.05"),
        *("--synthetic-parallel", "1"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"{base}/ready") as ready:
                        if ready.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        print("sending requests", file=sys.stderr)
        await load(base)
        await asyncio.sleep(1.5)
        rows = await scrape(f"http://127.0.0.1:{sidecar}/metrics")
    finally:
        proc.terminate()
        await proc.wait()
    lines = {}
    for raw in log_file.read_text().splitlines():
        entry = json.loads(raw)
        if entry.get("msg") == "request finished":
            lines[entry["request_id"]] = entry
    draw(rows, lines, out)
    print(f"wrote {out}", file=sys.stderr)


def draw(
    rows: list[tuple[str, float, dict[str, str], float]],
    lines: dict[str, dict[str, object]],
    out: Path,
) -> None:
    shown = [r for r in rows if r[0] != "+Inf" and float(r[0]) <= 2.5]
    cumulative = [r[1] for r in shown]
    counts = [b - a for a, b in zip([0.0, *cumulative], cumulative, strict=False)]
    fig, (chart, text) = plt.subplots(
        2, 1, figsize=(11, 6.5), gridspec_kw={"height_ratios": [3, 1]}
    )
    positions = range(len(shown))
    chart.bar(positions, counts, color="#9ecae1", label="requests in the bucket")
    chart.set_xticks(list(positions), [f"≤{r[0]}" for r in shown], rotation=45, fontsize=8)
    chart.set_ylabel("requests")
    chart.set_title("llm_time_to_first_token_seconds: each bucket's exemplar names a request")
    notes = []
    for position, (le, _, labels, value) in zip(positions, shown, strict=True):
        rid = labels.get("request_id")
        if not rid:
            continue
        label = "" if notes else "exemplar (click: Loki query for its request_id)"
        chart.plot(position, 0.3, "o", color="#d62728", markersize=9, label=label)
        chart.annotate(
            f"{value:.3f}s",
            (position, 0.3),
            textcoords="offset points",
            xytext=(0, 10),
            ha="center",
            fontsize=8,
        )
        entry = lines.get(rid, {})
        trace = f', "trace_id": "{labels["trace_id"]}"' if "trace_id" in labels else ""
        notes.append(
            f'le={le}  exemplar request_id={rid[:12]}...  →  log line: "ttft_s": '
            f'{entry.get("ttft_s")}, "status": "{entry.get("status")}"{trace[:48]}'
        )
    chart.legend()
    text.axis("off")
    text.text(
        0.0,
        1.0,
        'Loki: {service_name="llmserve"} | request_id="<id>"\n\n' + "\n".join(notes),
        va="top",
        family="monospace",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/exemplar-path.png"))
    asyncio.run(main(parser.parse_args().out))
