"""Engines behind one interface (`base.Engine`), chosen by `engine.kind` in the configuration.

Engine modules import their heavy libraries lazily, so choosing one never requires the others.
"""

from __future__ import annotations

import os

from server.config import Config
from server.engines.base import Engine, EngineError

__all__ = ["Engine", "EngineError", "create_engine"]


def create_engine(config: Config) -> Engine:
    kind = config.engine.kind
    if kind == "synthetic":
        from server.engines.synthetic import SyntheticEngine

        synthetic = config.synthetic
        return SyntheticEngine(
            model_id=config.engine.model_id or "synthetic",
            context_length=synthetic.context_length,
            parallel=synthetic.parallel,
            first_token_seconds=synthetic.first_token_seconds,
            token_interval_seconds=synthetic.token_interval_seconds,
            completion_tokens=synthetic.completion_tokens,
        )
    if kind == "exllamav2":
        from server.engines.exllamav2 import ExLlamaV2Engine

        return ExLlamaV2Engine(config.exllamav2, model_id=config.engine.model_id)
    from server.engines.llamacpp import LlamaCppEngine
    from server.model_files import ModelNotFound, bundled_gguf

    settings = config.llamacpp
    try:
        path = settings.model_path or str(bundled_gguf())
    except ModelNotFound as exc:
        raise EngineError(str(exc)) from None
    return LlamaCppEngine(
        path,
        model_id=config.engine.model_id,
        context_per_sequence=settings.context_per_sequence,
        parallel=settings.parallel,
        batch_tokens=settings.batch_tokens,
        threads=settings.threads or os.cpu_count() or 1,
    )
