"""The CPU engine: llama.cpp with continuous batching across sequences on one worker thread.

Every decode step is one `llama_decode` call planned by the scheduler (`plan_step`): the next
token of each generating sequence, then prompt chunks, within `step_tokens`; eight streams cost
far less than eight times one, and a long prompt is read across steps instead of freezing every
stream while it is read. New requests join at the next step and finished or cancelled ones
leave at once; one request never interrupts or truncates another. The context holds
`parallel + spare_slots` sequences: admission gives the spare ones to a key with nothing
running, so it starts while another key holds every regular slot.

A finished sequence's KV cache stays in its slot. A new request goes to the free slot whose
cached tokens share the longest prefix with its prompt, and only the rest of the prompt is read:
a shared system prompt, or a conversation that comes back with one more turn, costs nothing the
second time (reported as `cached_tokens`). ctypes releases the GIL during the C calls, so the
event loop keeps serving while the worker computes.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmserve.server.chat_template import CHATML_TEMPLATE, ChatTemplate
from llmserve.server.config import LlamaCppSection
from llmserve.server.engines.base import (
    Completion,
    Engine,
    EngineError,
    FinishReason,
    Generation,
    GenerationRequest,
    GenerationStream,
    ModelInfo,
    RequestTooLarge,
    TokenDelta,
    deliver_threadsafe,
    in_daemon_thread,
    now_ns,
    require_loaded,
)
from llmserve.server.engines.llamacpp.model import ContextShape, LlamaModel
from llmserve.server.engines.llamacpp.sampling import TokenSampler
from llmserve.server.engines.text_output import TextAssembler
from llmserve.server.model_files import ModelNotFound, bundled_gguf
from llmserve.server.scheduler import Tenant, plan_step

log = logging.getLogger("llmserve.engine")

_Delivery = list[tuple[GenerationStream, TokenDelta | Completion]]


@dataclass(eq=False, slots=True, kw_only=True)
class _Sequence(Generation):
    assembler: TextAssembler
    sampler: TokenSampler
    arrival: int = 0
    slot: int = -1
    prefilled: int = 0
    last_token: int = -1
    cancel_requested: bool = False
    pending_ids: list[int] = field(default_factory=list)
    # Every token fed to llama_decode for this sequence, in position order: what its KV holds.
    kv_tokens: list[int] = field(default_factory=list)

    @property
    def prompt(self) -> Sequence[int]:
        return self.request.prompt_tokens

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < len(self.request.prompt_tokens)

    @property
    def tenant(self) -> Tenant:
        return self.request.tenant

    @property
    def served(self) -> int:
        return self.completion_tokens

    @property
    def prompt_left(self) -> int:
        return len(self.request.prompt_tokens) - self.prefilled


class LlamaCppEngine(Engine):
    kind = "llamacpp"

    def __init__(self, settings: LlamaCppSection, *, model_id: str | None) -> None:
        super().__init__()
        try:
            self._path = settings.model_path or str(bundled_gguf())
        except ModelNotFound as exc:
            raise EngineError(str(exc)) from None
        self._model_id = model_id or Path(self._path).stem
        self._parallel = settings.parallel
        self._spare_slots = settings.spare_slots
        self._step_tokens = settings.step_tokens
        self._shape = ContextShape(
            settings.context_per_sequence,
            settings.parallel + settings.spare_slots,
            settings.batch_tokens,
            settings.threads or os.cpu_count() or 1,
        )
        self._model: LlamaModel | None = None
        self._add_bos = False
        self._bos_text = ""
        self._control_texts: list[str] = []
        self._lock = threading.Condition()
        self._pending: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []
        self._free_slots: list[int] = []
        self._slot_tokens: dict[int, list[int]] = {}
        self._closing = False
        self._worker: threading.Thread | None = None
        self._arrivals = itertools.count()

    # Engine interface -------------------------------------------------------------------------

    @property
    def parallel(self) -> int:
        return self._parallel

    @property
    def spare_slots(self) -> int:
        return self._spare_slots

    @property
    def vocab_size(self) -> int:
        return require_loaded(self._model).n_vocab

    @property
    def active_sequences(self) -> int:
        with self._lock:
            return len(self._active) + len(self._pending)

    def kv_usage(self) -> float:
        with self._lock:
            used = sum(seq.prefilled + seq.completion_tokens for seq in self._active)
        return used / (self._shape.parallel * self._shape.context_per_sequence)

    async def load(self) -> ModelInfo:
        started = time.monotonic()
        log.info("loading %s with llama.cpp", self._path)
        if self._step_tokens <= self._parallel + self._spare_slots:
            log.warning(
                "llamacpp.step_tokens (%d) is not above llamacpp.parallel + spare_slots (%d): "
                "when every slot streams, the streams take turns at the steps",
                self._step_tokens,
                self._parallel + self._spare_slots,
            )
        model = await in_daemon_thread(self._load_model, "llamacpp-load")
        load_seconds = time.monotonic() - started
        self._model = model
        self._add_bos = model.adds_bos
        self._bos_text = model.special_token_text("bos")
        self._control_texts = model.control_token_texts()
        template_source = model.chat_template_source()
        if template_source is None:
            log.warning("%s has no chat template; using ChatML", self._path)
        self._template = ChatTemplate(
            template_source or CHATML_TEMPLATE,
            bos_token=self._bos_text,
            eos_token=model.special_token_text("eos"),
        )
        self._free_slots = list(range(self._shape.parallel - 1, -1, -1))
        self._info = ModelInfo(
            model_id=self._model_id,
            engine=self.kind,
            source=self._path,
            context_length=model.context_per_sequence,
            parallel=self._parallel,
            description=model.description(),
            load_seconds=load_seconds,
            details={
                "parameters": model.n_params(),
                "size_bytes": model.size_bytes(),
                "trained_context": model.train_context,
                "threads": self._shape.threads,
                "batch_tokens": model.batch_capacity,
                "step_tokens": self._step_tokens,
                "spare_slots": self._spare_slots,
            },
        )
        self._worker = threading.Thread(target=self._run, name="llamacpp-decode", daemon=True)
        self._worker.start()
        return self._info

    def _load_model(self) -> LlamaModel:
        if not Path(self._path).is_file():
            raise EngineError(f"GGUF model file not found: {self._path}")
        reported = [-1]

        def progress(fraction: float) -> None:
            step = int(fraction * 4)
            if step > reported[0]:
                reported[0] = step
                log.info("loading model: %d%%", step * 25)

        return LlamaModel(self._path, self._shape, progress)

    async def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join)
            self._worker = None
        if self._model is not None:
            self._model.close()
            self._model = None

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        model = require_loaded(self._model)
        # llama.cpp's tokenizer is quadratic in the number of control tokens in the text; each
        # becomes one token, so more than the context holds can be refused by counting.
        specials = sum(text.count(s) for s in self._control_texts)
        if specials > model.context_per_sequence:
            raise RequestTooLarge(
                f"The prompt holds {specials} special tokens, more than this model's context of "
                f"{model.context_per_sequence} tokens per request.",
                param="messages",
            )
        add_bos = add_special and self._add_bos and not text.startswith(self._bos_text or "\0")
        return model.tokenize(text, add_special=add_bos)

    def start(self, request: GenerationRequest) -> GenerationStream:
        require_loaded(self._model)
        holder: list[_Sequence] = []
        stream = GenerationStream(cancel=lambda: self._cancel(holder[0]))
        params = request.params
        seq = _Sequence(
            request,
            stream,
            assembler=TextAssembler(params.stop),
            sampler=TokenSampler(params),
            arrival=next(self._arrivals),
        )
        holder.append(seq)
        with self._lock:
            if self._closing:
                raise EngineError("the engine is shutting down")
            if self.failed:
                return self._ended_by_fault(request)
            self._pending.append(seq)
            self._lock.notify()
        return stream

    def _cancel(self, seq: _Sequence) -> None:
        with self._lock:
            seq.cancel_requested = True
            self._lock.notify()

    # worker thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        model = require_loaded(self._model)
        reason: FinishReason = "cancelled"
        error = None
        try:
            while self._next_step(model):
                pass
        except Exception as exc:
            reason, error = "error", self._fault.record(exc)
        finally:
            self._finish_everything(reason, error)

    def _next_step(self, model: LlamaModel) -> bool:
        out: _Delivery = []
        with self._lock:
            while not self._closing and not self._pending and not self._active:
                self._lock.wait()
            if self._closing:
                return False
            self._admit(model, out)
            for seq in [s for s in self._active if s.cancel_requested]:
                self._cancelled_total += 1
                self._finish(model, seq, "cancelled", out)
        if self._active:
            self._decode_step(model, out)
        if out:
            deliver_threadsafe(out)
        return True

    def _admit(self, model: LlamaModel, out: _Delivery) -> None:
        while self._pending and self._free_slots:
            seq = self._pending.popleft()
            if seq.cancel_requested:
                self._cancelled_total += 1
                out.append((seq.stream, seq.completion("cancelled")))
                continue
            self._take_slot(model, seq)
            seq.started_ns = now_ns()
            # Rows ordered by sequence id let llama.cpp split a batch into few micro-batches.
            bisect.insort(self._active, seq, key=lambda s: s.slot)

    def _take_slot(self, model: LlamaModel, seq: _Sequence) -> None:
        """The free slot whose cache shares the longest prefix with the prompt; keep that part."""
        prompt = seq.prompt
        best, shared = self._free_slots[-1], 0
        for slot in self._free_slots:
            common = _common_prefix(self._slot_tokens.get(slot, ()), prompt)
            if common > shared:
                best, shared = slot, common
        self._free_slots.remove(best)
        seq.slot = best
        # The last prompt token is always read again: its logits give the first new token.
        shared = min(shared, len(prompt) - 1)
        if shared > 0 and model.forget_sequence_from(best, shared):
            seq.prefilled = seq.cached_tokens = shared
            seq.kv_tokens = list(prompt[:shared])
        else:
            model.forget_sequence(best)
        self._slot_tokens.pop(best, None)

    def _decode_step(self, model: LlamaModel, out: _Delivery) -> None:
        started = time.perf_counter()
        # The budget bounds how long running streams wait for a step; with none running, a
        # step stalls nobody, and prompts are read as fast as a decode call allows.
        streaming = any(not seq.in_prefill for seq in self._active)
        budget = min(self._step_tokens, model.batch_capacity) if streaming else model.batch_capacity
        plan = plan_step(self._active, budget)
        decoding = set(plan.decode)
        chunks = dict(plan.prefill)
        rows: list[tuple[int, int, int, bool]] = []
        sampling: list[tuple[_Sequence, int]] = []
        prompt_read: Counter[Tenant] = Counter()
        # Rows in sequence-id order let llama.cpp split a batch into few micro-batches.
        for seq in self._active:
            if seq in decoding:
                position = len(seq.prompt) + seq.completion_tokens - 1
                sampling.append((seq, len(rows)))
                rows.append((seq.last_token, position, seq.slot, True))
                seq.kv_tokens.append(seq.last_token)
            elif seq in chunks:
                start = seq.prefilled
                chunk = seq.prompt[start : start + chunks[seq]]
                seq.prefilled += len(chunk)
                last = len(chunk) - 1
                for i, token in enumerate(chunk):
                    rows.append((token, start + i, seq.slot, i == last and not seq.in_prefill))
                seq.kv_tokens.extend(chunk)
                prompt_read[seq.tenant] += len(chunk)
                if not seq.in_prefill:
                    sampling.append((seq, len(rows) - 1))
        status = model.decode(rows)
        if status != 0:
            self._fail_active(model, f"llama_decode failed with status {status}", out)
            return
        stamp = now_ns()
        for seq, index in sampling:
            token = seq.sampler.sample(model.logits(index))
            self._advance(model, seq, token, stamp, out)
        # Once per tenant and step, not per token: each charge takes the scheduler's lock.
        generated = Counter(seq.tenant for seq, _ in sampling)
        for tenant in prompt_read.keys() | generated.keys():
            tenant.charge(prompt=prompt_read[tenant], generated=generated[tenant])
        self.steps.record(len(rows), time.perf_counter() - started)

    def _advance(
        self, model: LlamaModel, seq: _Sequence, token: int, stamp: int, out: _Delivery
    ) -> None:
        if seq.completion_tokens == 0:
            seq.first_token_ns = stamp
        if model.is_end_of_generation(token) and not seq.request.params.ignore_eos:
            self._finish(model, seq, "stop", out)
            return
        seq.completion_tokens += 1
        seq.last_token = token
        seq.pending_ids.append(token)
        text = seq.assembler.feed(model.piece(token))
        if seq.assembler.stopped:
            self._emit(seq, text, stamp, out)
            self._finish(model, seq, "stop", out)
        elif seq.completion_tokens >= seq.request.params.max_tokens:
            self._emit(seq, text + seq.assembler.flush(), stamp, out)
            self._finish(model, seq, "length", out)
        elif text:
            self._emit(seq, text, stamp, out)

    @staticmethod
    def _emit(seq: _Sequence, text: str, stamp: int, out: _Delivery) -> None:
        if not text and not seq.pending_ids:
            return
        out.append((seq.stream, TokenDelta(text, tuple(seq.pending_ids), stamp)))
        seq.pending_ids.clear()

    def _finish(
        self,
        model: LlamaModel,
        seq: _Sequence,
        reason: FinishReason,
        out: _Delivery,
        error: str | None = None,
    ) -> None:
        if reason == "stop" and not seq.assembler.stopped:
            tail = seq.assembler.flush()
            if tail:
                self._emit(seq, tail, now_ns(), out)
        self._active.remove(seq)
        if error is None:
            self._slot_tokens[seq.slot] = seq.kv_tokens
        self._free_slots.append(seq.slot)
        out.append((seq.stream, seq.completion(reason, error)))

    def _fail_active(self, model: LlamaModel, message: str, out: _Delivery) -> None:
        log.error("%s; failing %d active sequences", message, len(self._active))
        for seq in list(self._active):
            self._finish(model, seq, "error", out, message)
        model.forget_all()
        self._slot_tokens.clear()

    def _finish_everything(self, reason: FinishReason, error: str | None) -> None:
        out: _Delivery = []
        with self._lock:
            model = self._model
            for seq in list(self._active):
                if model is not None:
                    self._finish(model, seq, reason, out, error)
            while self._pending:
                seq = self._pending.popleft()
                out.append((seq.stream, seq.completion(reason, error)))
        deliver_threadsafe(out)


def _common_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    n = min(len(cached), len(prompt))
    for i in range(n):
        if cached[i] != prompt[i]:
            return i
    return n
