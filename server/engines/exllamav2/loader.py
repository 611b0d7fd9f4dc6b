"""Load an ExLlamaV2 model, its KV cache and tokenizer, and build dynamic generators over them.

The cache is the token budget every concurrent request shares; paged attention (continuous
batching) needs flash-attn 2.5.7 or later, and without it the generator runs one request at a
time, which is said loudly at startup. Everything here runs on the engine's worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmserve.server.config import ExLlamaV2Section
from llmserve.server.engines.exllamav2.library import Library

__all__ = ["PAGE_TOKENS", "LoadedModel", "load_model", "max_batch_size"]

log = logging.getLogger("llmserve.engine")

# exllamav2/generator/dynamic.py PAGED_PAGE_SIZE: cache sizes and paged chunks are multiples.
PAGE_TOKENS = 256
# The generator's default max_q_size: tokens per sequence in one decode forward.
_MAX_Q_SIZE = 8
_CACHE_CLASSES = {
    "fp16": "ExLlamaV2Cache",
    "q4": "ExLlamaV2Cache_Q4",
    "q6": "ExLlamaV2Cache_Q6",
    "q8": "ExLlamaV2Cache_Q8",
}


def max_batch_size(settings: ExLlamaV2Section, chunk_tokens: int) -> int:
    """Sequences at once: the generator allows at most chunk_tokens / max_q_size."""
    ceiling = chunk_tokens // _MAX_Q_SIZE
    return min(settings.max_batch_size or ceiling, ceiling)


@dataclass(slots=True)
class LoadedModel:
    library: Library
    settings: ExLlamaV2Section
    config: Any
    model: Any
    cache: Any
    tokenizer: Any
    draft_model: Any
    draft_cache: Any
    paged: bool
    cache_tokens: int
    chunk_tokens: int
    batch_size: int

    @property
    def draft_tokens(self) -> int:
        return self.settings.draft_tokens if self.draft_model is not None else 0

    @property
    def context_length(self) -> int:
        """Prompt plus completion one request may use: bounded by the model and by the cache."""
        return min(int(self.config.max_seq_len), self.cache_tokens) - self.draft_tokens

    def new_generator(self) -> Any:
        generator = self.library.generator
        return generator.ExLlamaV2DynamicGenerator(
            model=self.model,
            cache=self.cache,
            tokenizer=self.tokenizer,
            max_batch_size=self.batch_size,
            max_chunk_size=self.chunk_tokens,
            draft_model=self.draft_model,
            draft_cache=self.draft_cache,
            num_draft_tokens=self.settings.draft_tokens,
            paged=self.paged,
        )

    def vram_bytes(self) -> dict[str, int]:
        """Memory torch has allocated on each GPU (weights, cache and buffers)."""
        cuda = self.library.torch.cuda
        return {f"cuda:{i}": int(cuda.memory_allocated(i)) for i in range(cuda.device_count())}

    def unload(self) -> None:
        for model in (self.draft_model, self.model):
            if model is not None:
                model.unload()


def load_model(
    library: Library, settings: ExLlamaV2Section, progress: Callable[[str, int, int], None]
) -> LoadedModel:
    """Load the model (and the draft model) onto the GPUs; `progress(which, i, n)` per module."""
    exl = library.exllamav2
    assert settings.model_dir is not None
    config = _config(library, settings.model_dir, settings.max_seq_len, settings)
    cache_tokens = settings.cache_tokens or _round_up(config.max_seq_len, PAGE_TOKENS)
    chunk_tokens = config.max_input_len
    paged = library.paged_attention and not config.no_flash_attn
    if not paged:
        reason = (
            "flash-attn is disabled for this model (EXLLAMA_NO_FLASH_ATTN, or its architecture)"
            if library.paged_attention
            else "flash-attn 2.5.7 or later is not importable"
        )
        log.warning(
            "%s, so ExLlamaV2 runs unpaged: ONE request at a time, the others wait. Install "
            "flash-attn>=2.5.7 (pip install '.[gpu]') on an Ampere or newer GPU for continuous "
            "batching.",
            reason,
        )
    cache_class = getattr(exl, _CACHE_CLASSES[settings.cache_type])
    draft_model = draft_cache = None
    if settings.draft_model_dir:
        draft_config = _config(library, settings.draft_model_dir, config.max_seq_len, settings)
        draft_model = exl.ExLlamaV2(draft_config)
        draft_cache = cache_class(draft_model, max_seq_len=cache_tokens, lazy=True)
        draft_model.load_autosplit(
            draft_cache,
            reserve_vram=_reserve(settings),
            callback=lambda i, n: progress("draft model", i, n),
        )
    model = exl.ExLlamaV2(config)
    if settings.gpu_split == "auto":
        # A lazy cache is allocated layer by layer as autosplit places them (model.py).
        cache = cache_class(model, max_seq_len=cache_tokens, lazy=True)
        model.load_autosplit(
            cache, reserve_vram=_reserve(settings), callback=lambda i, n: progress("model", i, n)
        )
    else:
        split = [float(gb) for gb in settings.gpu_split.split(",")]
        model.load(gpu_split=split, callback=lambda i, n: progress("model", i, n))
        cache = cache_class(model, max_seq_len=cache_tokens)
    return LoadedModel(
        library=library,
        settings=settings,
        config=config,
        model=model,
        cache=cache,
        tokenizer=exl.ExLlamaV2Tokenizer(config),
        draft_model=draft_model,
        draft_cache=draft_cache,
        paged=paged,
        cache_tokens=cache_tokens,
        chunk_tokens=chunk_tokens,
        batch_size=max_batch_size(settings, chunk_tokens) if paged else 1,
    )


def _config(
    library: Library, model_dir: str, max_seq_len: int | None, settings: ExLlamaV2Section
) -> Any:
    config = library.exllamav2.ExLlamaV2Config(model_dir)
    config.arch_compat_overrides()
    if max_seq_len is not None:
        config.max_seq_len = max_seq_len
    # A prefill chunk is one forward pass; paged chunks are whole pages, no longer than a sequence.
    chunk = min(settings.chunk_tokens, max(config.max_seq_len // PAGE_TOKENS, 1) * PAGE_TOKENS)
    config.max_input_len = chunk
    config.max_attention_size = chunk**2
    return config


def _reserve(settings: ExLlamaV2Section) -> int | None:
    mb = settings.autosplit_reserve_mb
    return None if mb is None else mb * 1024**2


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step
