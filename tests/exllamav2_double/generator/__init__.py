"""exllamav2.generator: the names the engine imports (exllamav2/generator/__init__.py:3,6)."""

from __future__ import annotations

from tests.exllamav2_double.generator.dynamic import (
    ExLlamaV2DynamicGenerator,
    ExLlamaV2DynamicJob,
)
from tests.exllamav2_double.generator.sampler import ExLlamaV2Sampler

__all__ = ["ExLlamaV2DynamicGenerator", "ExLlamaV2DynamicJob", "ExLlamaV2Sampler"]
