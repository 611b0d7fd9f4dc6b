"""GPU metrics over a stand-in NVML: no GPU here, so a fake `pynvml` module goes on sys.path,
shaped like nvidia-ml-py's (nvmlInit, nvmlDeviceGetCount, ..., NVMLError), and the real
sidecar's /metrics is scraped over HTTP."""

from __future__ import annotations

import logging
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from aiohttp.web import Application, Request
from prometheus_client.parser import text_string_to_metric_families

from llmserve.sidecar.app import build_sidecar_app
from llmserve.sidecar.gpu import register_gpu_metrics
from llmserve.sidecar.metrics import Metrics
from llmserve.sidecar.recorder import Recorder
from llmserve.sidecar.request_log import RequestLog
from llmserve.sidecar.stats import RollingStats

ClientFactory = Callable[[Application], Awaitable[TestClient[Request, Application]]]

FAKE_NVML = """
class NVMLError(Exception):
    pass

class _Rates:
    gpu = 40

class _Memory:
    used = 3 << 30
    total = 80 << 30

FAILING = {failing!r}

def nvmlInit():
    if "init" in FAILING:
        raise NVMLError("Driver Not Loaded")

def nvmlDeviceGetCount():
    return 2

def nvmlDeviceGetHandleByIndex(index):
    return index

def nvmlDeviceGetUtilizationRates(handle):
    if handle == 1 and "utilization" in FAILING:
        raise NVMLError("GPU is lost")
    return _Rates()

def nvmlDeviceGetMemoryInfo(handle):
    return _Memory()
"""


def fake_nvml(monkeypatch: pytest.MonkeyPatch, directory: Path, *failing: str) -> None:
    (directory / "pynvml.py").write_text(textwrap.dedent(FAKE_NVML.format(failing=failing)))
    monkeypatch.syspath_prepend(str(directory))
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)


def samples(text: str, name: str) -> dict[str, float]:
    return {
        s.labels["gpu"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


async def test_a_failing_nvml_call_costs_its_samples_not_the_scrape(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    aiohttp_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake_nvml(monkeypatch, tmp_path, "utilization")
    metrics = Metrics()
    assert register_gpu_metrics(metrics.registry, devices=str(tmp_path / "none*"))
    recorder = Recorder(metrics, RollingStats(), RequestLog("llmserve", None), max_keys=10)
    client = await aiohttp_client(build_sidecar_app(recorder))
    for _ in range(2):
        response = await client.get("/metrics")
        assert response.status == 200
        text = await response.text()
    assert samples(text, "llm_gpu_utilization_ratio") == {"0": 0.4}
    assert samples(text, "llm_gpu_memory_used_bytes") == {"0": 3 << 30, "1": 3 << 30}
    assert samples(text, "llm_gpu_collect_errors_total") == {"0": 0, "1": 2}
    assert "llm_requests_running" in text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["NVML utilization failed for GPU 1: GPU is lost"]


@pytest.mark.parametrize(("devices", "level"), [(True, logging.WARNING), (False, logging.INFO)])
def test_nvml_failing_on_a_host_with_gpu_devices_is_a_warning(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    devices: bool,
    level: int,
) -> None:
    fake_nvml(monkeypatch, tmp_path, "init")
    if devices:
        (tmp_path / "nvidia0").touch()
    caplog.set_level(logging.INFO, "llmserve.sidecar")
    assert not register_gpu_metrics(Metrics().registry, devices=str(tmp_path / "nvidia[0-9]*"))
    [record] = [r for r in caplog.records if "no GPU metrics" in r.getMessage()]
    assert record.levelno == level
    assert "Driver Not Loaded" in record.getMessage()
