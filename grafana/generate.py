"""Generate llmserve's Grafana dashboards as plain JSON data, and the provisioned datasources
that link them to the logs: `python grafana/generate.py`.

The committed files in grafana/dashboards/ and grafana/provisioning/datasources/ must equal what
this writes (a test checks), so a dashboard is changed here, not in Grafana's editor. Every panel
takes its datasource from a variable, has a unit, and every rate uses `$__rate_interval`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCES = Path(__file__).resolve().parent / "provisioning" / "datasources" / "llmserve.yml"
PROMETHEUS_UID = "llmserve-prometheus"
LOKI_UID = "llmserve-loki"
PROM = {"type": "prometheus", "uid": "${datasource}"}
LOKI = {"type": "loki", "uid": "${loki}"}
SEL = 'model=~"$model"'
KEY = 'key=~"$key"'
INST = 'instance=~"$instance"'
RI = "$__rate_interval"
TOP_KEYS = 10
# Prometheus bucket series as a heatmap: Grafana de-accumulates the cumulative `le` buckets and
# orders the rows by their bound, not as text ("10.0" before "2.0").
HEATMAP = {"format": "heatmap"}


def _variables(with_model: bool, with_key: bool, with_instance: bool) -> list[dict[str, Any]]:
    def query(name: str, metric: str, label: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": name.capitalize(),
            "type": "query",
            "datasource": PROM,
            "query": {"query": f"label_values({metric}, {label})", "refId": name},
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "current": {},
            "allValue": ".*",
        }

    variables = [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {"text": "Prometheus", "value": "llmserve-prometheus"},
        },
        {
            "name": "loki",
            "label": "Loki",
            "type": "datasource",
            "query": "loki",
            "current": {"text": "Loki", "value": "llmserve-loki"},
        },
    ]
    # Only boards whose metrics carry a model label offer $model: elsewhere it would filter nothing.
    if with_model:
        variables.append(query("model", "llm_requests_total", "model"))
    if with_key:
        variables.append(query("key", "llm_key_requests_total", "key"))
    # Every sidecar Prometheus scrapes, up or down: one Prometheus watches a whole fleet, and a
    # replica that stopped answering is the one to pick.
    if with_instance:
        variables.append(query("instance", 'up{job="llmserve-sidecar"}', "instance"))
    return variables


def _annotations() -> dict[str, Any]:
    return {
        "list": [
            {
                "name": "Model loads",
                "datasource": PROM,
                "enable": True,
                "iconColor": "blue",
                "expr": "changes(llm_model_load_duration_seconds[1m]) > 0",
                "step": "60s",
                "titleFormat": "model loaded",
            },
            {
                # From the start time, not from counter resets: resets() needs samples from
                # before the restart inside its window, so a sidecar away longer than the window
                # came back unmarked. Two 60 s steps, so one always falls after the first scrape.
                "name": "Sidecar restarts",
                "datasource": PROM,
                "enable": True,
                "iconColor": "orange",
                "expr": 'time() - process_start_time_seconds{job="llmserve-sidecar"} < 120',
                "step": "60s",
                "titleFormat": "sidecar {{instance}} restarted",
            },
        ]
    }


class Board:
    def __init__(
        self,
        uid: str,
        title: str,
        *,
        with_model: bool = True,
        with_key: bool = False,
        with_instance: bool = False,
    ) -> None:
        self.uid, self.title = uid, title
        self.with_model, self.with_key, self.with_instance = with_model, with_key, with_instance
        self.panels: list[dict[str, Any]] = []
        self._x = self._y = 0

    def _place(self, width: int, height: int) -> dict[str, int]:
        if self._x + width > 24:
            self._x, self._y = 0, self._y + height
        pos = {"x": self._x, "y": self._y, "w": width, "h": height}
        self._x += width
        return pos

    def panel(
        self,
        title: str,
        kind: str,
        unit: str,
        targets: list[tuple[str, str]],
        *,
        width: int = 12,
        height: int = 8,
        options: dict[str, Any] | None = None,
        datasource: dict[str, str] = PROM,
        description: str = "",
        target_options: dict[str, Any] | None = None,
        exemplars: bool = False,
    ) -> None:
        """`exemplars`: the first query also draws its histogram's exemplars (the requests that
        fell in its buckets, each a link to its log lines)."""
        self.panels.append(
            {
                "id": len(self.panels) + 1,
                "title": title,
                "description": description,
                "type": kind,
                "datasource": datasource,
                "gridPos": self._place(width, height),
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": options or {},
                "targets": [
                    {
                        "refId": chr(65 + i),
                        "expr": expr,
                        "legendFormat": legend,
                        "datasource": datasource,
                        **(target_options or {}),
                        **({"exemplar": True} if exemplars and i == 0 else {}),
                    }
                    for i, (expr, legend) in enumerate(targets)
                ],
            }
        )

    def json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "title": self.title,
            "tags": ["llmserve"],
            "schemaVersion": 39,
            "version": 1,
            "editable": False,
            "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"},
            "timezone": "browser",
            "templating": {"list": _variables(self.with_model, self.with_key, self.with_instance)},
            "annotations": _annotations(),
            "panels": self.panels,
        }


def top(expr: str) -> str:
    """The busiest keys only: with `$key` at All, 10,000 keys would draw 10,000 series."""
    return f"topk({TOP_KEYS}, {expr})"


def quantiles(metric: str) -> list[tuple[str, str]]:
    return [
        (f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{SEL}}}[{RI}])))", f"p{p}")
        for q, p in (("0.5", "50"), ("0.95", "95"), ("0.99", "99"))
    ]


def overview() -> Board:
    b = Board("llmserve-overview", "llmserve / Overview", with_instance=True)
    b.panel(
        "Requests per second by status",
        "timeseries",
        "reqps",
        [(f"sum by (status) (rate(llm_requests_total{{{SEL}}}[{RI}]))", "{{status}}")],
    )
    b.panel(
        "Tokens generated per second",
        "timeseries",
        "short",
        [
            (f"sum(rate(llm_generation_tokens_total{{{SEL}}}[{RI}]))", "generated"),
            (f"sum(rate(llm_prompt_tokens_total{{{SEL}}}[{RI}]))", "prompt"),
        ],
    )
    b.panel(
        "Time to first token",
        "timeseries",
        "s",
        quantiles("llm_time_to_first_token_seconds"),
        width=8,
        exemplars=True,
    )
    b.panel(
        "Request duration",
        "timeseries",
        "s",
        quantiles("llm_request_duration_seconds"),
        width=8,
        exemplars=True,
    )
    b.panel(
        "Inter-token latency",
        "timeseries",
        "s",
        quantiles("llm_inter_token_latency_seconds"),
        width=8,
        exemplars=True,
    )
    b.panel(
        "Server error ratio",
        "timeseries",
        "percentunit",
        [
            (
                f'sum(rate(llm_requests_total{{{SEL}, status=~"error|overloaded"}}[{RI}])) / '
                f"sum(rate(llm_requests_total{{{SEL}}}[{RI}]))",
                "errors",
            )
        ],
        width=8,
    )
    b.panel(
        "Running and waiting",
        "timeseries",
        "short",
        [
            (f"sum(llm_requests_running{{{SEL}}})", "running"),
            (f"sum(llm_requests_waiting{{{SEL}}})", "waiting"),
        ],
        width=8,
    )
    b.panel(
        "KV cache in use",
        "timeseries",
        "percentunit",
        [(f"max(llm_kv_cache_usage_ratio{{{SEL}}})", "KV cache")],
        width=8,
    )
    b.panel(
        "Model loaded",
        "stat",
        "bool",
        [(f"max by (model) (llm_model_loaded{{{SEL}}})", "{{model}}")],
        width=6,
        height=4,
    )
    b.panel(
        "Servers reporting",
        "stat",
        "short",
        [(f"sum by (instance) (llm_servers_reporting{{{INST}}})", "{{instance}}")],
        width=6,
        height=4,
    )
    b.panel(
        "Sidecar uptime",
        "stat",
        "s",
        [
            (
                f'time() - process_start_time_seconds{{job="llmserve-sidecar", {INST}}}',
                "{{instance}}",
            )
        ],
        width=6,
        height=4,
    )
    b.panel(
        "Events lost (1h)",
        "stat",
        "short",
        [
            (
                "sum(increase(llm_sidecar_events_lost_total[1h])) + "
                "sum(increase(llm_sidecar_server_overflow_events_total[1h]))",
                "lost",
            )
        ],
        width=6,
        height=4,
    )
    b.panel(
        "GPU utilisation",
        "timeseries",
        "percentunit",
        [(f"llm_gpu_utilization_ratio{{{INST}}}", "GPU {{gpu}} {{instance}}")],
    )
    b.panel(
        "GPU memory in use",
        "timeseries",
        "bytes",
        [(f"llm_gpu_memory_used_bytes{{{INST}}}", "GPU {{gpu}} {{instance}}")],
    )
    return b


def customers() -> Board:
    b = Board("llmserve-customers", "llmserve / Customers", with_model=False, with_key=True)
    b.panel(
        "Requests per second by key",
        "timeseries",
        "reqps",
        [(top(f"sum by (key) (rate(llm_key_requests_total{{{KEY}}}[{RI}]))"), "{{key}}")],
    )
    b.panel(
        "Tokens per second by key",
        "timeseries",
        "short",
        [
            (
                top(f"sum by (key) (rate(llm_key_generation_tokens_total{{{KEY}}}[{RI}]))"),
                "{{key}} generated",
            ),
            (
                top(f"sum by (key) (rate(llm_key_prompt_tokens_total{{{KEY}}}[{RI}]))"),
                "{{key}} prompt",
            ),
        ],
    )
    b.panel(
        "Rate-limited requests by key and limit",
        "timeseries",
        "reqps",
        [
            (
                top(f"sum by (key, limit) (rate(llm_key_rate_limited_total{{{KEY}}}[{RI}]))"),
                "{{key}} {{limit}}",
            )
        ],
    )
    b.panel(
        "Errors by key",
        "timeseries",
        "reqps",
        [
            (
                top(f"sum by (key, type) (rate(llm_key_errors_total{{{KEY}}}[{RI}]))"),
                "{{key}} {{type}}",
            )
        ],
    )
    b.panel(
        "Limit in use",
        "timeseries",
        "percentunit",
        [
            (
                top(f"max by (key, limit) (llm_key_rate_limit_utilization_ratio{{{KEY}}})"),
                "{{key}} {{limit}}",
            )
        ],
    )
    b.panel(
        "Top keys by tokens (1h)",
        "table",
        "short",
        [
            (
                top(f"sum by (key) (increase(llm_key_generation_tokens_total{{{KEY}}}[1h]))"),
                "{{key}}",
            )
        ],
        options={"showHeader": True},
    )
    b.panel(
        "Share of service by key",
        "timeseries",
        "percentunit",
        [
            (
                top(
                    f"sum by (key) (rate(llm_key_service_tokens_total{{{KEY}}}[{RI}])) / "
                    f"scalar(sum(rate(llm_key_service_tokens_total[{RI}])))"
                ),
                "{{key}}",
            )
        ],
        description="What the fair scheduler gave each key, out of what it gave all of them: "
        "prompt tokens read and tokens generated, weighted as the scheduler charges them, "
        "counted as requests finish. A key's weight scales the share it is entitled to.",
    )
    b.panel(
        "Queue wait by key (mean per request)",
        "timeseries",
        "s",
        [
            (
                top(
                    f"sum by (key) (rate(llm_key_queue_seconds_total{{{KEY}}}[{RI}])) / "
                    f"sum by (key) (rate(llm_key_requests_total{{{KEY}, "
                    f'status=~"ok|cancelled|error"}}[{RI}]))'
                ),
                "{{key}}",
            )
        ],
        description="Time each key's requests waited for a generation slot, over its requests "
        "that got one (those that ended ok, cancelled or in an engine error).",
    )
    return b


def latency() -> Board:
    b = Board("llmserve-latency", "llmserve / Latency")
    for title, metric in (
        ("Time to first token", "llm_time_to_first_token_seconds"),
        ("Inter-token latency", "llm_inter_token_latency_seconds"),
        ("Request duration", "llm_request_duration_seconds"),
    ):
        b.panel(
            f"{title} (heatmap)",
            "heatmap",
            "s",
            [(f"sum by (le) (rate({metric}_bucket{{{SEL}}}[{RI}]))", "{{le}}")],
            width=8,
            options={"calculate": False, "yAxis": {"unit": "s"}},
            target_options=HEATMAP,
            exemplars=True,
        )
    b.panel(
        "Queue, prefill and decode (mean per request)",
        "timeseries",
        "s",
        [
            (
                f"sum(rate(llm_request_queue_time_seconds_sum{{{SEL}}}[{RI}])) / "
                f"sum(rate(llm_request_queue_time_seconds_count{{{SEL}}}[{RI}]))",
                "queue",
            ),
            (
                f"sum(rate(llm_request_prefill_time_seconds_sum{{{SEL}}}[{RI}])) / "
                f"sum(rate(llm_request_prefill_time_seconds_count{{{SEL}}}[{RI}]))",
                "prefill",
            ),
            (
                f"sum(rate(llm_time_per_output_token_seconds_sum{{{SEL}}}[{RI}])) / "
                f"sum(rate(llm_time_per_output_token_seconds_count{{{SEL}}}[{RI}]))",
                "per token",
            ),
        ],
    )
    b.panel(
        "Tokens per second per stream (30 tokens/s line)",
        "heatmap",
        "short",
        [
            (
                f"sum by (le) (rate(llm_request_generation_tokens_per_second_bucket{{{SEL}}}"
                f"[{RI}]))",
                "{{le}}",
            )
        ],
        options={"calculate": False},
        target_options=HEATMAP,
    )
    b.panel(
        "Share of streams under 30 tokens/s",
        "timeseries",
        "percentunit",
        [
            (
                f'sum(rate(llm_request_generation_tokens_per_second_bucket{{{SEL}, le="30.0"}}'
                f"[{RI}])) / sum(rate(llm_request_generation_tokens_per_second_count{{{SEL}}}"
                f"[{RI}]))",
                "under 30 tokens/s",
            )
        ],
    )
    b.panel(
        "Fairness between keys (Jain's index, last minute)",
        "timeseries",
        "none",
        [(f"min by (model) (llm_scheduler_fairness_index{{{SEL}}})", "{{model}}")],
        width=8,
        description="1 when every key that had to wait got the same service per unit of its "
        "weight over the last minute, 1/n when one of n got it all. Empty (NaN) while fewer than "
        "two keys waited: there was nothing to share.",
    )
    b.panel(
        "Decode step size (heatmap)",
        "heatmap",
        "short",
        [(f"sum by (le) (rate(llm_scheduler_step_tokens_bucket{{{SEL}}}[{RI}]))", "{{le}}")],
        width=8,
        options={"calculate": False},
        target_options=HEATMAP,
        description="Tokens per decode step: one per stream decoded, plus each prompt token "
        "read in the step (llamacpp.step_tokens bounds it).",
    )
    b.panel(
        "Decode step duration",
        "timeseries",
        "s",
        quantiles("llm_scheduler_step_seconds"),
        width=8,
    )
    return b


def errors_and_logs() -> Board:
    b = Board("llmserve-errors", "llmserve / Errors and logs", with_model=False)
    b.panel(
        "Errors by type",
        "timeseries",
        "reqps",
        [(f"sum by (type) (rate(llm_errors_total[{RI}]))", "{{type}}")],
    )
    b.panel(
        "Cancellations by reason",
        "timeseries",
        "reqps",
        [(f"sum by (reason) (rate(llm_requests_cancelled_total[{RI}]))", "{{reason}}")],
    )
    b.panel(
        "Error lines",
        "logs",
        "none",
        [('{service_name="llmserve"} | json | level=~"error|warning"', "")],
        width=24,
        datasource=LOKI,
    )
    b.panel(
        "Slowest requests (end to end)",
        "table",
        "s",
        [
            (
                'topk(20, max_over_time({service_name="llmserve"} | json | msg="request finished" '
                "| unwrap e2e_s [$__range]) by (request_id, key, model))",
                "",
            )
        ],
        width=12,
        datasource=LOKI,
        # One instant query over the dashboard's range: a range query keeps a series per
        # request and per step, past Loki's max_query_series on real traffic.
        target_options={"queryType": "instant", "instant": True, "range": False},
    )
    b.panel(
        "A request by id (set the request_id variable)",
        "logs",
        "none",
        [('{service_name="llmserve"} | request_id="$request_id"', "")],
        width=12,
        datasource=LOKI,
    )
    return b


BOARDS = [overview, customers, latency, errors_and_logs]

# Grafana fills these in when a link is followed; provisioning would expand a single `$` from the
# environment, so the file carries `$$`.
VALUE, FROM, TO = "$${__value.raw}", "$${__from}", "$${__to}"
# The lines of one request (request_id is structured metadata), and of every request in one
# trace (a line filter, which finds it however the line was shipped).
REQUEST_LINES = f'{{service_name="llmserve"}} | request_id="{VALUE}"'
TRACE_LINES = f'{{service_name="llmserve"}} |= "{VALUE}"'


def explore_logs(logql: str) -> str:
    """A Grafana link that opens Explore on Loki with `logql` over the time range in view."""
    pane = {
        "datasource": LOKI_UID,
        "queries": [{"refId": "A", "datasource": {"type": "loki", "uid": LOKI_UID}, "expr": logql}],
        "range": {"from": FROM, "to": TO},
    }
    encoded = quote(json.dumps({"logs": pane}, separators=(",", ":")), safe="")
    # Grafana finds its variables in the link as written, so they stay unencoded.
    for variable in (VALUE, FROM, TO):
        encoded = encoded.replace(quote(variable, safe=""), variable)
    return f"/explore?schemaVersion=1&orgId=1&panes={encoded}"


def datasources() -> str:
    """The provisioned datasources: Prometheus's exemplars and Loki's log lines link to the log
    lines of the request (or the trace) they name."""
    links = {"request_id": ("Log lines of this request", REQUEST_LINES)}
    links["trace_id"] = ("Log lines of this trace", TRACE_LINES)
    prometheus = {
        "name": "Prometheus",
        "uid": PROMETHEUS_UID,
        "type": "prometheus",
        "access": "proxy",
        "url": "http://localhost:9090",
        "jsonData": {
            "timeInterval": "15s",
            "exemplarTraceIdDestinations": [
                {"name": name, "urlDisplayLabel": label, "url": explore_logs(logql)}
                for name, (label, logql) in links.items()
            ],
        },
    }
    loki = {
        "name": "Loki",
        "uid": LOKI_UID,
        "type": "loki",
        "access": "proxy",
        "url": "http://localhost:3100",
        "jsonData": {
            "derivedFields": [
                {
                    "name": name,
                    "matcherType": "regex",
                    # The field as the JSON log line has it; the value is an id, never spaces.
                    "matcherRegex": f'"{name}":\\s*"([^"\\s]+)"',
                    "urlDisplayLabel": label,
                    "url": explore_logs(logql),
                }
                for name, (label, logql) in links.items()
            ]
        },
    }
    header = (
        "# Generated by grafana/generate.py. Grafana datasources for llmserve's dashboards; the\n"
        "# uids are fixed so dashboards can name them. Exemplars and log lines link to the log\n"
        "# lines of the request or trace they name.\n"
    )
    body = {"apiVersion": 1, "datasources": [prometheus, loki]}
    text: str = yaml.safe_dump(body, sort_keys=False, width=1000)
    return header + text


def render() -> dict[str, str]:
    """file name -> JSON text for every dashboard."""
    out = {}
    for make in BOARDS:
        board = make().json()
        if board["uid"] == "llmserve-errors":
            board["templating"]["list"].append(
                {"name": "request_id", "label": "Request id", "type": "textbox", "query": ""}
            )
        out[f"{board['uid']}.json"] = json.dumps(board, indent=2, sort_keys=True) + "\n"
    return out


if __name__ == "__main__":
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote grafana/dashboards/{name}")
    DATASOURCES.write_text(datasources())
    print("wrote grafana/provisioning/datasources/llmserve.yml")
