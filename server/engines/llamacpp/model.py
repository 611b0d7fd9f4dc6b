"""A thin, typed layer over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

llama-cpp-python's high-level `Llama` class decodes one sequence at a time; serving many streams
at once needs the C API's multi-sequence batches. This module owns the model, the context, the
batch buffer and the logits each decode leaves, and nothing about scheduling or sampling.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmserve.server.engines.base import EngineError

log = logging.getLogger("llmserve.llamacpp")

# ggml_log_level: 3 = WARN, 4 = ERROR; info, debug and continuation lines go to debug.
_LLAMA_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise EngineError(
            "the llamacpp engine needs llama-cpp-python: pip install 'llmserve[cpu]'"
        ) from exc
    return llama_cpp


@functools.cache
def _route_llama_logs(lib: Any) -> Any:
    """Send llama.cpp's chatter to our logger instead of raw stderr.

    llama.cpp keeps one callback for the whole process, so it is set once and kept for good: a
    callback owned by a model would dangle once that model is gone, and the next line llama.cpp
    logs (freeing another model, say) would crash the process.
    """

    def on_log(level: int, text: bytes, _data: object) -> None:
        py_level = _LLAMA_LOG_LEVELS.get(level, logging.DEBUG)
        if log.isEnabledFor(py_level):
            log.log(py_level, "%s", text.decode("utf-8", "replace").rstrip())

    callback = lib.llama_log_callback(on_log)
    lib.llama_log_set(callback, ctypes.c_void_p(0))
    return callback


@dataclass(frozen=True, slots=True)
class ContextShape:
    context_per_sequence: int
    parallel: int
    batch_tokens: int
    threads: int


class LlamaModel:
    """One loaded GGUF model and one llama.cpp context with `parallel` independent sequences."""

    def __init__(
        self, path: str, shape: ContextShape, progress: Callable[[float], None] | None = None
    ) -> None:
        self.lib = lib = _import_llama_cpp()
        self._keep_alive: list[Any] = []
        _route_llama_logs(lib)
        lib.llama_backend_init()

        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        if progress is not None:

            def on_progress(fraction: float, _data: object) -> bool:
                progress(fraction)
                return True

            callback = lib.llama_progress_callback(on_progress)
            self._keep_alive.append(callback)
            model_params.progress_callback = callback
        self.model = lib.llama_model_load_from_file(os.fsencode(path), model_params)
        if not self.model:
            raise EngineError(f"llama.cpp could not load the GGUF file {path}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.train_context = int(lib.llama_model_n_ctx_train(self.model))
        if shape.context_per_sequence > self.train_context:
            # llama.cpp only warns, and the model then writes nonsense past what it was trained on.
            lib.llama_model_free(self.model)
            raise EngineError(
                f"llamacpp.context_per_sequence = {shape.context_per_sequence} is more than the "
                f"{self.train_context} tokens {path} was trained on; set it to at most "
                f"{self.train_context}"
            )

        ctx_params = lib.llama_context_default_params()
        ctx_params.n_ctx = shape.context_per_sequence * shape.parallel
        ctx_params.n_seq_max = shape.parallel
        ctx_params.n_batch = shape.batch_tokens
        ctx_params.n_ubatch = shape.batch_tokens
        ctx_params.n_threads = shape.threads
        ctx_params.n_threads_batch = shape.threads
        # A KV buffer per sequence: attention then spans only that sequence's cells (a unified
        # buffer makes every token attend over all streams' cells, measured 20% slower at 8
        # streams), and no stream can take cells another was promised.
        ctx_params.kv_unified = False
        ctx_params.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise EngineError(
                f"llama.cpp could not create a context of {ctx_params.n_ctx} tokens "
                f"(llamacpp.context_per_sequence {shape.context_per_sequence} x "
                f"llamacpp.parallel {shape.parallel}); out of memory?"
            )
        self.memory = lib.llama_get_memory(self.ctx)
        self.context_per_sequence = int(lib.llama_n_ctx_seq(self.ctx))
        # llama.cpp lowers n_batch to the whole context when that is smaller; a decode call
        # with more tokens than it kept aborts the process (GGML_ASSERT n_tokens_all <= n_batch).
        self.batch_capacity = int(lib.llama_n_batch(self.ctx))
        self.batch = lib.llama_batch_init(self.batch_capacity, 0, 1)
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._pieces: dict[int, bytes] = {}

    # metadata -------------------------------------------------------------------------------

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def chat_template_source(self) -> str | None:
        raw = self.lib.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8", "replace") if raw else None

    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self.lib.llama_model_desc(self.model, buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def n_params(self) -> int:
        return int(self.lib.llama_model_n_params(self.model))

    def size_bytes(self) -> int:
        return int(self.lib.llama_model_size(self.model))

    def special_token_text(self, which: str) -> str:
        token = {"bos": self.lib.llama_vocab_bos, "eos": self.lib.llama_vocab_eos}[which](
            self.vocab
        )
        if token < 0:
            return ""
        text = self.lib.llama_vocab_get_text(self.vocab, token)
        return text.decode("utf-8", "replace") if text else ""

    @property
    def adds_bos(self) -> bool:
        return bool(self.lib.llama_vocab_get_add_bos(self.vocab))

    # tokens ---------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            tokens = (self.lib.llama_token * capacity)()
            n = self.lib.llama_tokenize(
                self.vocab, data, len(data), tokens, capacity, add_special, True
            )
            if n >= 0:
                return list(tokens[:n])
            capacity = -n

    def control_token_texts(self) -> list[str]:
        """Texts that the tokenizer turns into control tokens (role markers, end of turn)."""
        lib, vocab = self.lib, self.vocab
        texts = []
        for token in range(self.n_vocab):
            if lib.llama_vocab_is_control(vocab, token):
                raw = lib.llama_vocab_get_text(vocab, token)
                if raw:
                    texts.append(raw.decode("utf-8", "replace"))
        return texts

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for; control tokens render as nothing."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        buf = self._piece_buffer
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        piece = buf.raw[:n]
        self._pieces[token] = piece
        return piece

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    # logits -------------------------------------------------------------------------------

    def logits(self, row: int) -> np.ndarray:
        """The logits the last decode computed for batch row `row`, read in place (read-only,
        and valid until the next decode)."""
        pointer = self.lib.llama_get_logits_ith(self.ctx, row)
        if not pointer:
            raise EngineError(f"llama.cpp holds no logits for batch row {row}")
        view = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
        view.flags.writeable = False
        return view

    # decoding -------------------------------------------------------------------------------

    def decode(self, tokens: Sequence[tuple[int, int, int, bool]]) -> int:
        """Decode (token, position, sequence, wants_logits) rows in one batch; 0 on success."""
        batch = self.batch
        token, pos, n_seq, seq_id, logits = (
            batch.token,
            batch.pos,
            batch.n_seq_id,
            batch.seq_id,
            batch.logits,
        )
        for i, (tok, position, seq, want) in enumerate(tokens):
            token[i] = tok
            pos[i] = position
            n_seq[i] = 1
            seq_id[i][0] = seq
            logits[i] = want
        batch.n_tokens = len(tokens)
        return int(self.lib.llama_decode(self.ctx, batch))

    def forget_sequence(self, seq: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def forget_sequence_from(self, seq: int, position: int) -> bool:
        """Drop a sequence's cache from `position` on; False if this model cannot (recurrent)."""
        return bool(self.lib.llama_memory_seq_rm(self.memory, seq, position, -1))

    def forget_all(self) -> None:
        self.lib.llama_memory_clear(self.memory, True)

    def close(self) -> None:
        lib = self.lib
        if self.batch is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lib.llama_model_free(self.model)
            self.model = None
