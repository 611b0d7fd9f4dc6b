"""GPU utilisation and memory from NVML, exported only where a GPU and the NVML library exist.

A GPU that faults is when these metrics matter most, and NVML fails then: a failing call costs
only its own samples (counted in llm_gpu_collect_errors_total and logged once per device and
call until it recovers), never the rest of the scrape.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

__all__ = ["GPU_DEVICES", "GPU_METRICS", "register_gpu_metrics"]

# Exported only where NVML finds a GPU.
GPU_METRICS = (
    "llm_gpu_utilization_ratio",
    "llm_gpu_memory_used_bytes",
    "llm_gpu_memory_total_bytes",
    "llm_gpu_collect_errors_total",
)
# The device nodes of NVIDIA GPUs: where they exist, a failing NVML is worth a warning.
GPU_DEVICES = "/dev/nvidia[0-9]*"

log = logging.getLogger("llmserve.sidecar")


class _NvmlCollector:
    def __init__(self, nvml: Any, count: int) -> None:
        self.nvml = nvml
        self.count = count
        self.errors = [0] * count
        self._failing: set[tuple[int, str]] = set()

    def _call(self, index: int, what: str, call: Callable[[Any], Any], argument: Any) -> Any:
        """call(argument), or None after counting and (once) logging its failure."""
        try:
            result = call(argument)
        # Whatever NVML raises while a GPU faults, the scrape must go on.
        except Exception as exc:
            self.errors[index] += 1
            if (index, what) not in self._failing:
                self._failing.add((index, what))
                log.warning("NVML %s failed for GPU %d: %s", what, index, exc)
            return None
        if (index, what) in self._failing:
            self._failing.discard((index, what))
            log.info("NVML %s answers again for GPU %d", what, index)
        return result

    def collect(self) -> Iterator[Metric]:
        nvml = self.nvml
        utilisation = GaugeMetricFamily(
            "llm_gpu_utilization_ratio",
            "GPU busy share over the last sample period (0-1).",
            labels=["gpu"],
        )
        used = GaugeMetricFamily("llm_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily("llm_gpu_memory_total_bytes", "GPU memory.", labels=["gpu"])
        errors = CounterMetricFamily(
            "llm_gpu_collect_errors",
            "NVML calls that failed while collecting GPU metrics (their samples are missing).",
            labels=["gpu"],
        )
        for index in range(self.count):
            gpu = str(index)
            handle = self._call(index, "handle", nvml.nvmlDeviceGetHandleByIndex, index)
            if handle is not None:
                rates = self._call(index, "utilization", nvml.nvmlDeviceGetUtilizationRates, handle)
                if rates is not None:
                    utilisation.add_metric([gpu], rates.gpu / 100)
                memory = self._call(index, "memory", nvml.nvmlDeviceGetMemoryInfo, handle)
                if memory is not None:
                    used.add_metric([gpu], memory.used)
                    total.add_metric([gpu], memory.total)
            errors.add_metric([gpu], self.errors[index])
        yield from (utilisation, used, total, errors)


def register_gpu_metrics(registry: CollectorRegistry, devices: str = GPU_DEVICES) -> bool:
    """Add the GPU gauges if NVML answers; False (and nothing registered) otherwise.

    No NVML is normal on a machine without GPUs (INFO), and a fault where `devices` exist
    (WARNING: the GPU metrics an operator expects are missing).
    """
    level = logging.WARNING if glob.glob(devices) else logging.INFO
    try:
        import pynvml
    except ImportError:
        log.log(level, "no GPU metrics: pynvml (nvidia-ml-py) is not installed")
        return False
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as exc:
        log.log(level, "no GPU metrics: NVML failed: %s", exc)
        return False
    if count == 0:
        return False
    registry.register(_NvmlCollector(pynvml, count))
    log.info("exporting GPU metrics for %d devices", count)
    return True
