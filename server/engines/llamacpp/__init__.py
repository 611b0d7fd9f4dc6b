"""The CPU engine: llama.cpp through llama-cpp-python's bindings to its C API.

`engine` schedules sequences into shared decode steps, `model` is the typed layer over the C
API, and `sampling` picks each next token with NumPy from llama.cpp's logits.
"""

from llmserve.server.engines.llamacpp.engine import LlamaCppEngine

__all__ = ["LlamaCppEngine"]
