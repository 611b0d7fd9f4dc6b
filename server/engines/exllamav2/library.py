"""The one place the ExLlamaV2 engine imports torch and exllamav2, lazily, with a clear refusal.

Importing exllamav2 compiles its CUDA extension on first use and fails in several ways on a
machine without a GPU (no torch, a CPU-only torch, no CUDA toolkit); each becomes an EngineError
that says what is missing and how to install it, so `llmserve serve` exits with one line
instead of a traceback. Nothing else in the server imports either library.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from llmserve.server.engines.base import EngineError

__all__ = ["SUPPORTED_VERSION", "Library", "load_library"]

log = logging.getLogger("llmserve.engine")

# The adapter is written against this release's API (generator/dynamic.py, generator/sampler.py).
SUPPORTED_VERSION = "0.3.2"

_INSTALL = (
    "install the GPU extra with pip install '.[gpu]' (exllamav2 0.3.2, flash-attn, and a CUDA "
    "build of torch 2.2 or later: see https://pytorch.org/get-started/locally/); exllamav2 "
    "compiles its CUDA extension on first import, which needs the CUDA toolkit (nvcc) of the "
    "same CUDA version as torch; see docs/gpu.md"
)


@dataclass(frozen=True, slots=True)
class Library:
    torch: Any
    exllamav2: Any
    generator: Any
    # exllamav2.attn decides this on import: flash-attn 2.5.7 or later was importable.
    paged_attention: bool


def load_library() -> Library:
    """Import torch and exllamav2, or raise EngineError naming what is missing."""
    try:
        import torch
    except ImportError:
        raise EngineError(f"the exllamav2 engine needs PyTorch with CUDA: {_INSTALL}") from None
    if not torch.cuda.is_available():
        raise EngineError(
            f"the exllamav2 engine needs a CUDA GPU, and torch {torch.__version__} finds none "
            f"(no NVIDIA driver, no GPU, or a CPU-only torch build): {_INSTALL}"
        )
    try:
        import exllamav2
        import exllamav2.attn
        import exllamav2.generator
    except ImportError as exc:
        missing = exc.name or "a dependency"
        raise EngineError(f"the exllamav2 engine cannot import {missing}: {_INSTALL}") from None
    except (OSError, RuntimeError) as exc:
        # A missing CUDA_HOME/nvcc, or an extension built for another torch ("undefined symbol").
        raise EngineError(
            f"exllamav2's CUDA extension could not be built or loaded ({exc}): {_INSTALL}"
        ) from None
    version = getattr(exllamav2, "__version__", "unknown")
    if version != SUPPORTED_VERSION:
        log.warning(
            "exllamav2 %s is installed; this engine was written for %s", version, SUPPORTED_VERSION
        )
    return Library(
        torch=torch,
        exllamav2=exllamav2,
        generator=exllamav2.generator,
        paged_attention=bool(exllamav2.attn.has_flash_attn_with_paged),
    )
