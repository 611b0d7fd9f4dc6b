"""The GPU engine: ExLlamaV2's dynamic generator, with torch and exllamav2 imported lazily.

`engine` runs the generator on its worker thread, `library` is the one place the GPU libraries
are imported, `loader` builds the model, cache and generator, `jobs` turns a request into a job,
and `files` reads what the library does not from the model directory. Importing this package
imports neither torch nor exllamav2: only building the engine does.
"""

from llmserve.server.engines.exllamav2.engine import ExLlamaV2Engine

__all__ = ["ExLlamaV2Engine"]
