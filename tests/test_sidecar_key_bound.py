"""The sidecar exports its key-name bound next to the count, so LlmserveKeysAtLimit can compare
the two (prometheus/rules/alerts.yml) without the operator copying sidecar.max_keys into a rule."""

from __future__ import annotations

from prometheus_client import generate_latest

from llmserve.sidecar.metrics import Metrics
from llmserve.sidecar.recorder import Recorder
from llmserve.sidecar.stats import RollingStats


def test_the_configured_max_keys_is_exported() -> None:
    metrics = Metrics()
    Recorder(metrics, RollingStats(), lambda line: None, max_keys=7)
    text = generate_latest(metrics.registry).decode()
    assert "\nllm_sidecar_max_keys 7.0\n" in text
