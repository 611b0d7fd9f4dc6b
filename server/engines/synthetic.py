"""A load-test engine: deterministic tokens at a configured first-token delay and rate.

It exercises everything between the socket and the engine (parsing, admission, SSE, events)
without a model, so the serving path can be measured at thousands of streams. It is never the
default and calls itself synthetic in /v1/models.
"""

from __future__ import annotations

import asyncio
import zlib

from llmserve.server.chat_template import CHATML_TEMPLATE, ChatTemplate
from llmserve.server.config import SyntheticSection
from llmserve.server.engines.base import (
    Engine,
    FinishReason,
    Generation,
    GenerationRequest,
    GenerationStream,
    ModelInfo,
    TokenDelta,
    now_ns,
)
from llmserve.server.engines.text_output import TextAssembler

_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
VOCAB_SIZE = 50_000


class SyntheticEngine(Engine):
    kind = "synthetic"

    def __init__(self, settings: SyntheticSection, *, model_id: str | None) -> None:
        super().__init__()
        self._info = ModelInfo(
            model_id=model_id or "synthetic",
            engine=self.kind,
            source="synthetic (no model: deterministic tokens for load tests)",
            context_length=settings.context_length,
            parallel=settings.parallel,
            description="synthetic load-test engine",
        )
        self._template = ChatTemplate(CHATML_TEMPLATE)
        self._first_token = settings.first_token_seconds
        self._interval = settings.token_interval_seconds
        self._length = settings.completion_tokens
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def parallel(self) -> int:
        return self.info.parallel

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def active_sequences(self) -> int:
        return len(self._tasks)

    async def load(self) -> ModelInfo:
        return self.info

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        # One token per whitespace-separated word keeps counts predictable for tests.
        return [zlib.crc32(word.encode()) % VOCAB_SIZE for word in text.split()] or [0]

    def start(self, request: GenerationRequest) -> GenerationStream:
        if self.failed:
            return self._ended_by_fault(request)
        holder: list[asyncio.Task[None]] = []
        stream = GenerationStream(cancel=lambda: _cancel(holder[0]))
        task = asyncio.get_running_loop().create_task(self._generate(request, stream))
        holder.append(task)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return stream

    async def _generate(self, request: GenerationRequest, stream: GenerationStream) -> None:
        loop = asyncio.get_running_loop()
        started = now_ns()
        generation = Generation(request, stream, submitted_ns=started, started_ns=started)
        begin = loop.time()
        limit = min(self._length, request.params.max_tokens)
        assembler = TextAssembler(request.params.stop)
        reason: FinishReason = "length"
        error = None
        try:
            for i in range(limit):
                await asyncio.sleep(begin + self._first_token + i * self._interval - loop.time())
                stamp = now_ns()
                generation.first_token_ns = generation.first_token_ns or stamp
                generation.completion_tokens += 1
                text = assembler.feed(f"{_WORDS[i % len(_WORDS)]} ".encode())
                if assembler.stopped:
                    reason = "stop"
                if text or assembler.stopped:
                    stream.deliver(TokenDelta(text, (i % VOCAB_SIZE,), stamp))
                if assembler.stopped:
                    break
            tail = assembler.flush()
            if tail:
                stream.deliver(TokenDelta(tail, (), now_ns()))
        except asyncio.CancelledError:
            if self.failed:
                reason, error = "error", self._fault.message
            else:
                self._cancelled_total += 1
                reason = "cancelled"
        except Exception as exc:
            # Like a decode thread dying: this engine stops, and so do the other generations.
            reason, error = "error", self._fault.record(exc)
            for task in self._tasks - {asyncio.current_task()}:
                task.cancel()
        # Charged once at the end: admission sees the service a little late (fair over many
        # requests), and the load tests this engine exists for pay no lock per token.
        request.tenant.charge(
            prompt=len(request.prompt_tokens), generated=generation.completion_tokens
        )
        # Not active any more once the reader can see the result (the done callback runs later).
        current = asyncio.current_task()
        if current is not None:
            self._tasks.discard(current)
        stream.deliver(generation.completion(reason, error))


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
