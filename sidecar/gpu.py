"""GPU utilisation and memory from NVML, exported only where a GPU and the NVML library exist."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

__all__ = ["GPU_METRICS", "register_gpu_metrics"]

# Exported only where NVML finds a GPU.
GPU_METRICS = (
    "llm_gpu_utilization_ratio",
    "llm_gpu_memory_used_bytes",
    "llm_gpu_memory_total_bytes",
)

log = logging.getLogger("llmserve.sidecar")


class _NvmlCollector:
    def __init__(self, nvml: Any, count: int) -> None:
        self.nvml = nvml
        self.count = count

    def collect(self) -> Iterator[Metric]:
        nvml = self.nvml
        utilisation = GaugeMetricFamily(
            "llm_gpu_utilization_ratio",
            "GPU busy share over the last sample period (0-1).",
            labels=["gpu"],
        )
        used = GaugeMetricFamily("llm_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily("llm_gpu_memory_total_bytes", "GPU memory.", labels=["gpu"])
        for index in range(self.count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            utilisation.add_metric([str(index)], rates.gpu / 100)
            used.add_metric([str(index)], memory.used)
            total.add_metric([str(index)], memory.total)
        yield from (utilisation, used, total)


def register_gpu_metrics(registry: CollectorRegistry) -> bool:
    """Add the GPU gauges if NVML answers; False (and nothing registered) otherwise."""
    try:
        import pynvml
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as exc:
        log.info("no GPU metrics: %s", exc)
        return False
    if count == 0:
        return False
    registry.register(_NvmlCollector(pynvml, count))
    log.info("exporting GPU metrics for %d devices", count)
    return True
