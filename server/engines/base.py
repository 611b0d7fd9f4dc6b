"""The interface every engine implements, what all engines share, and the records they pass.

The HTTP layer never knows which engine it talks to: it hands over prompt token ids and sampling
parameters, and reads back an async stream of token deltas that ends in one `Completion` record.
Engines that decode on a worker thread push into the stream with `deliver_threadsafe`, so the
event loop never waits on a forward pass.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, TypeVar

from llmserve.server.chat_template import ChatTemplate
from llmserve.server.engines.fault import WorkerFault
from llmserve.server.scheduler import StepStats, Tenant

FinishReason = Literal["stop", "length", "cancelled", "error"]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling settings with neutral defaults: a field left alone changes nothing."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_tokens: Sequence[int]
    params: SamplingParams
    # Whose service this is: orders the engine's work and is charged for it. A request made
    # outside the server (tests, benchmarks) belongs to a tenant of its own, charged nothing.
    tenant: Tenant = field(default_factory=lambda: Tenant("direct"))


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """New text for the client; `text` may be empty while a multi-byte character is incomplete."""

    text: str
    token_ids: tuple[int, ...]
    time_ns: int


@dataclass(slots=True)
class Completion:
    """How a generation ended, with the counts and engine timings (monotonic ns)."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    queue_ns: int = 0
    prefill_ns: int = 0
    decode_ns: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What /v1/models and the startup log say about the loaded model."""

    model_id: str
    engine: str
    source: str
    context_length: int
    parallel: int
    description: str = ""
    load_seconds: float = 0.0
    details: dict[str, str | int | float] = field(default_factory=dict)


class GenerationStream:
    """Async iterator of `TokenDelta`s, then `completion` is set.

    Use it as an async context manager: leaving the block early (client gone, error, shutdown)
    cancels the work in the engine, and cancelling twice or after the end is harmless.
    """

    __slots__ = ("_cancel", "_loop", "_queue", "completion")

    def __init__(self, cancel: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[TokenDelta | Completion] = asyncio.Queue()
        self._cancel = cancel
        self.completion: Completion | None = None

    def deliver(self, item: TokenDelta | Completion) -> None:
        """Hand over an item from the event loop's own thread."""
        self._queue.put_nowait(item)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def __aiter__(self) -> AsyncIterator[TokenDelta]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TokenDelta]:
        while self.completion is None:
            item = await self._queue.get()
            if isinstance(item, Completion):
                self.completion = item
                return
            yield item

    def cancel(self) -> None:
        if self.completion is None:
            self._cancel()

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()


def deliver_threadsafe(batch: list[tuple[GenerationStream, TokenDelta | Completion]]) -> None:
    """Hand a decode step's output to the streams' event loops, one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationStream, TokenDelta | Completion]]]
    by_loop = {}
    for stream, item in batch:
        by_loop.setdefault(stream.loop, []).append((stream, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver_all, items)
        except RuntimeError:
            # The loop was closed under us (test teardown, shutdown): nobody is listening.
            continue


def _deliver_all(items: list[tuple[GenerationStream, TokenDelta | Completion]]) -> None:
    for stream, item in items:
        stream.deliver(item)


def now_ns() -> int:
    return time.monotonic_ns()


@dataclass(eq=False, slots=True)
class Generation:
    """One request inside an engine: its stream, its counts, and when each phase began (ns)."""

    request: GenerationRequest
    stream: GenerationStream
    submitted_ns: int = field(default_factory=now_ns)
    started_ns: int = 0
    first_token_ns: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def completion(self, reason: FinishReason, error: str | None = None) -> Completion:
        """The record that ends its stream, timed by the engine's clock: a phase it never
        reached took no time."""
        end = now_ns()
        started = self.started_ns or end
        first = self.first_token_ns or end
        return Completion(
            finish_reason=reason,
            prompt_tokens=len(self.request.prompt_tokens),
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
            queue_ns=started - self.submitted_ns,
            prefill_ns=first - started,
            decode_ns=end - first,
            error=error,
        )


async def in_daemon_thread(work: Callable[[], _T], name: str) -> _T:
    """Run blocking `work` (a model load) on a daemon thread and wait for it.

    Unlike `asyncio.to_thread`, whose executor threads the interpreter joins at exit, a process
    told to stop meanwhile (SIGTERM during a long load) exits without waiting for the work.
    """
    future: concurrent.futures.Future[_T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(work())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await asyncio.wrap_future(future)


def require_loaded(part: _T | None) -> _T:
    """A part of the model (set by `load`), or EngineError while it is not loaded."""
    if part is None:
        raise EngineError("the model is not loaded")
    return part


class EngineError(Exception):
    """The engine cannot serve a request; the message is safe to show to the client."""


class RequestTooLarge(EngineError):
    """The prompt, or prompt plus max_tokens, does not fit in a sequence's context."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class Engine(abc.ABC):
    """A model that turns prompt token ids into a stream of token deltas.

    `create_engine` builds every engine the same way, `EngineClass(settings, model_id=...)`:
    its own configuration section (the one named after its `kind`) and `engine.model_id`. This
    base holds what they all share: the model's info and chat template, which exist once `load`
    set them; the worker fault that ends every request once the worker dies; the cancellation
    count; and the token-id check.
    """

    kind: ClassVar[str]

    def __init__(self) -> None:
        self._info: ModelInfo | None = None
        self._template: ChatTemplate | None = None
        self._fault = WorkerFault(self.kind)
        self._cancelled_total = 0
        self.steps = StepStats()

    @property
    def info(self) -> ModelInfo:
        return require_loaded(self._info)

    @property
    def chat_template(self) -> ChatTemplate:
        return require_loaded(self._template)

    @property
    @abc.abstractmethod
    def parallel(self) -> int:
        """How many sequences it generates at once (known before loading)."""

    @property
    def spare_slots(self) -> int:
        """Sequences it can hold beyond `parallel`, for a tenant with nothing running."""
        return 0

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1; EngineError before the model is loaded."""

    @abc.abstractmethod
    async def load(self) -> ModelInfo:
        """Load the model; long loads report progress in the log."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Cancel what is running and free the model."""

    @abc.abstractmethod
    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Prompt text to token ids; thread-safe, so callers may run it off the event loop."""

    def validate_token_ids(self, token_ids: Sequence[int]) -> None:
        """Raise EngineError if any id is outside the vocabulary."""
        vocab = self.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise EngineError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")

    @abc.abstractmethod
    def start(self, request: GenerationRequest) -> GenerationStream:
        """Begin generating; must be called on the event loop that will read the stream."""

    @property
    @abc.abstractmethod
    def active_sequences(self) -> int:
        """Sequences the engine is computing right now (for readiness and tests)."""

    @property
    def cancelled_total(self) -> int:
        """Sequences stopped by cancellation since load."""
        return self._cancelled_total

    @property
    def healthy(self) -> bool:
        """False while the engine recovers from a fault (readiness is 503 meanwhile)."""
        return True

    @property
    def failed(self) -> bool:
        """True once the engine's worker has died: nothing more is generated until a restart."""
        return self._fault.message is not None

    def _ended_by_fault(self, request: GenerationRequest) -> GenerationStream:
        """A stream for `request` that is already over, with the worker's fault as its error."""
        stream = GenerationStream(cancel=lambda: None)
        stream.deliver(Generation(request, stream).completion("error", self._fault.message))
        return stream

    def kv_usage(self) -> float:
        """Share of the KV cache in use (0-1); engines without one report 0."""
        return 0.0

    def check_fits(self, prompt_tokens: int, max_tokens: int | None, prompt_param: str) -> int:
        """Return the max_tokens to use, or raise RequestTooLarge naming the parameter."""
        context = self.info.context_length
        if prompt_tokens >= context:
            raise RequestTooLarge(
                f"The prompt is {prompt_tokens} tokens, but this model's context is {context} "
                f"tokens per request and at least one must be left for the completion.",
                param=prompt_param,
            )
        room = context - prompt_tokens
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise RequestTooLarge(
                f"max_tokens is {max_tokens}, but the prompt is {prompt_tokens} tokens and the "
                f"context is {context}, so at most {room} tokens can be generated.",
                param="max_tokens",
            )
        return max_tokens
