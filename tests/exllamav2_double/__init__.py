"""A test double of `exllamav2` 0.3.2, the surface the ExLlamaV2 engine uses, without a GPU.

It reproduces the library's contract (turboderp-org/exllamav2 at tag v0.3.2): the dynamic
generator's result stages and keys, (1, n) token_ids, eos and timings only on a job's last result,
text held back for partial stop strings, cancel, the page budget that makes enqueue() assert, and
the constructor checks. Every behaviour cites the library file and line it comes from. `install`
puts it (and a sliver of torch) into sys.modules for one test, which is how the engine's import
seam, `llmserve.server.engines.exllamav2.library.load_library`, finds it.
"""

from __future__ import annotations

import sys
from types import ModuleType

import pytest

from tests.exllamav2_double import attn, cache, config, model, tokenizer, torch_double
from tests.exllamav2_double import generator as generator_package
from tests.exllamav2_double.cache import (
    ExLlamaV2Cache,
    ExLlamaV2Cache_8bit,
    ExLlamaV2Cache_Q4,
    ExLlamaV2Cache_Q6,
    ExLlamaV2Cache_Q8,
    ExLlamaV2CacheBase,
)
from tests.exllamav2_double.config import ExLlamaV2Config
from tests.exllamav2_double.generator import dynamic, sampler
from tests.exllamav2_double.model import ExLlamaV2
from tests.exllamav2_double.tokenizer import ExLlamaV2Tokenizer

__all__ = [
    "ExLlamaV2",
    "ExLlamaV2Cache",
    "ExLlamaV2CacheBase",
    "ExLlamaV2Cache_8bit",
    "ExLlamaV2Cache_Q4",
    "ExLlamaV2Cache_Q6",
    "ExLlamaV2Cache_Q8",
    "ExLlamaV2Config",
    "ExLlamaV2Tokenizer",
    "install",
]

__version__ = "0.3.2"

_MODULES: dict[str, ModuleType] = {
    "exllamav2.attn": attn,
    "exllamav2.cache": cache,
    "exllamav2.config": config,
    "exllamav2.model": model,
    "exllamav2.tokenizer": tokenizer,
    "exllamav2.generator": generator_package,
    "exllamav2.generator.dynamic": dynamic,
    "exllamav2.generator.sampler": sampler,
}


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import torch` and `import exllamav2...` find the double until the test ends."""
    monkeypatch.setitem(sys.modules, "torch", torch_double)
    monkeypatch.setitem(sys.modules, "exllamav2", sys.modules[__name__])
    for name, module in _MODULES.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(attn, "has_flash_attn_with_paged", True)
    monkeypatch.setattr(dynamic.ExLlamaV2DynamicGenerator, "fail_after_iterations", None)
    monkeypatch.setattr(dynamic.ExLlamaV2DynamicGenerator, "construction_gate", None)
    monkeypatch.setattr(torch_double.cuda, "available", True)
    monkeypatch.setattr(torch_double.cuda, "allocated", {})
