"""Engines behind one interface (`base.Engine`), chosen by `engine.kind` through `ENGINES`.

Every engine is built the same way, from its own configuration section (the one named after its
kind) and `engine.model_id`. The table holds import paths rather than classes, so choosing an
engine imports that engine alone: never torch on a CPU machine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Final

from llmserve.server.config import Config
from llmserve.server.engines.base import Engine, EngineError

__all__ = ["ENGINES", "Engine", "EngineError", "create_engine"]

# engine.kind -> "module:class", the module relative to this package.
ENGINES: Final[Mapping[str, str]] = {
    "llamacpp": ".llamacpp:LlamaCppEngine",
    "exllamav2": ".exllamav2:ExLlamaV2Engine",
    "synthetic": ".synthetic:SyntheticEngine",
}


def create_engine(config: Config) -> Engine:
    """The engine `engine.kind` names, built (not loaded) from its section of the same name."""
    kind = config.engine.kind
    module, _, name = ENGINES[kind].partition(":")
    engine_class: Callable[..., Engine] = getattr(import_module(module, __name__), name)
    return engine_class(getattr(config, kind), model_id=config.engine.model_id)
