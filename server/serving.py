"""From a validated OpenAI request to engine work, and from engine output to the HTTP response.

Everything that can fail because of the request (unknown model, a prompt that does not fit, a
chat template that refuses the conversation) is checked before the first response byte, so it
is still a plain 4xx; only engine failures after that point travel in-band as an `error` event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from llmserve.server.admission import AdmissionGate
from llmserve.server.chat_template import ChatTemplateError
from llmserve.server.chunks import ChatFormat, CompletionFormat, ResponseFormat
from llmserve.server.engines.base import (
    Completion,
    Engine,
    EngineError,
    GenerationRequest,
    GenerationStream,
    RequestTooLarge,
    SamplingParams,
)
from llmserve.server.errors import (
    InternalError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ServiceUnavailable,
    envelope,
)
from llmserve.server.keys import KeyEntry
from llmserve.server.protocol import ChatCompletionRequest, CompletionRequest
from llmserve.server.ratelimit.admission import KeyAdmission
from llmserve.server.request_life import Outcome, RequestLife
from llmserve.server.sse import ClientStalled, EventStream
from llmserve.server.state import ServerState
from llmserve.server.telemetry import RequestTelemetry
from llmserve.shared.client import EventSender

log = logging.getLogger("llmserve.serving")
_T = TypeVar("_T")
# Until authentication names a key, a request is attributed to this one.
UNAUTHENTICATED_KEY = "unauthenticated"

# Larger prompts are rendered and tokenized on a worker thread so the event loop stays free.
_INLINE_PROMPT_CHARS = 4096


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request that passed every check: ready to run."""

    generation: GenerationRequest
    format: ResponseFormat
    stream: bool
    include_usage: bool

    @property
    def reserved_tokens(self) -> int:
        """What the request may use at most: its prompt and max_tokens."""
        return len(self.generation.prompt_tokens) + self.generation.params.max_tokens


class GenerationService:
    def __init__(
        self,
        engine: Engine,
        gate: AdmissionGate,
        limits: KeyAdmission,
        state: ServerState,
        *,
        ping_seconds: float,
        send_timeout_seconds: float,
        max_body_bytes: int,
        events: EventSender | None = None,
    ) -> None:
        self.engine = engine
        self.gate = gate
        self.limits = limits
        self.state = state
        self.ping_seconds = ping_seconds
        self.send_timeout_seconds = send_timeout_seconds
        self.max_body_bytes = max_body_bytes
        self.events = events

    def track(self, request: web.Request, request_id: str, endpoint: str) -> RequestLife:
        """The owner of this request's life: `async with` it around all the request does."""
        telemetry = RequestTelemetry(
            self.events,
            request_id=request_id,
            key=UNAUTHENTICATED_KEY,
            model=self.model_label,
            endpoint=endpoint,
            received_ns=time.monotonic_ns(),
            weights=self.gate.share.weights,
        )
        return RequestLife(
            request,
            telemetry,
            state=self.state,
            gate=self.gate,
            limits=self.limits,
            max_body_bytes=self.max_body_bytes,
        )

    @property
    def model_label(self) -> str:
        """The served model's id, or "unknown" before it has loaded (bounded label values)."""
        try:
            return self.engine.info.model_id
        except EngineError:
            return "unknown"

    # preparation ------------------------------------------------------------------------------

    async def prepare(
        self, body: ChatCompletionRequest | CompletionRequest, life: RequestLife
    ) -> Prepared:
        """Render and tokenize; a request without max_tokens gets what its key may spend."""
        request_id = life.telemetry.request_id
        budget = life.token_budget()
        if isinstance(body, ChatCompletionRequest):
            prepared = await self._prepare_chat(body, request_id, budget)
        else:
            prepared = await self._prepare_completion(body, request_id, budget)
        assert life.key is not None, "admit() names the key first"
        tenant = self.gate.share.tenant(life.key.name, life.key.weight)
        return dataclasses.replace(
            prepared, generation=dataclasses.replace(prepared.generation, tenant=tenant)
        )

    async def _prepare_chat(
        self, body: ChatCompletionRequest, request_id: str, budget: int | None
    ) -> Prepared:
        messages = [{"role": _template_role(m.role), "content": m.text()} for m in body.messages]
        if len(messages) > self.engine.info.context_length:
            # Every message renders to at least one token, so this cannot fit; saying so before
            # rendering keeps a flood of tiny messages from costing any CPU.
            raise InvalidRequest(
                f"{len(messages)} messages cannot fit in a context of "
                f"{self.engine.info.context_length} tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        size = sum(len(m["content"]) for m in messages) + 64 * len(messages)
        tokens = await self._off_loop_if(size, self._render_and_tokenize, messages)
        max_tokens = self._fit(len(tokens), body.requested_max_tokens(), "messages", budget)
        fmt = ChatFormat(body.model, include_usage=body.include_usage)
        return self._prepared(body, request_id, tokens, max_tokens, fmt)

    async def _prepare_completion(
        self, body: CompletionRequest, request_id: str, budget: int | None
    ) -> Prepared:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            tokens = [int(t) for t in prompt]
            try:
                self.engine.validate_token_ids(tokens)
            except EngineError as exc:
                raise InvalidRequest(str(exc), param="prompt", code="invalid_value") from None
        else:
            text = prompt if isinstance(prompt, str) else str(prompt[0])
            tokens = await self._off_loop_if(len(text), self._tokenize, text)
        max_tokens = self._fit(len(tokens), body.requested_max_tokens(), "prompt", budget)
        fmt = CompletionFormat(body.model, include_usage=body.include_usage)
        return self._prepared(body, request_id, tokens, max_tokens, fmt)

    def check_model(self, model: str, key: KeyEntry) -> None:
        """The model must be the one served, and one this key may use."""
        served = self.engine.info.model_id
        if model != served:
            raise NotFound(
                f"The model '{model[:100]}' does not exist. This server serves '{served}'.",
                param="model",
                code="model_not_found",
            )
        if not key.allows_model(model):
            raise PermissionDenied(
                f"This API key may not use the model '{model}'.",
                param="model",
                code="model_not_allowed",
            )

    @staticmethod
    async def _off_loop_if(size: int, work: Callable[[_T], list[int]], arg: _T) -> list[int]:
        if size <= _INLINE_PROMPT_CHARS:
            return work(arg)
        return await asyncio.to_thread(work, arg)

    def _render_and_tokenize(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            text = self.engine.chat_template.render(messages)
        except ChatTemplateError as exc:
            raise InvalidRequest(str(exc), param="messages", code="invalid_messages") from None
        return self._guarded_tokenize(text, "messages")

    def _tokenize(self, text: str) -> list[int]:
        return self._guarded_tokenize(text, "prompt")

    def _guarded_tokenize(self, text: str, param: str) -> list[int]:
        try:
            return self.engine.tokenize(text, add_special=True)
        except RequestTooLarge as exc:
            raise InvalidRequest(str(exc), param=param, code="context_length_exceeded") from None

    def _fit(
        self, prompt_tokens: int, max_tokens: int | None, prompt_param: str, budget: int | None
    ) -> int:
        if prompt_tokens == 0:
            raise InvalidRequest("The prompt is empty.", param=prompt_param, code="invalid_value")
        try:
            fitted = self.engine.check_fits(prompt_tokens, max_tokens, prompt_param)
        except RequestTooLarge as exc:
            raise InvalidRequest(
                str(exc), param=exc.param, code="context_length_exceeded"
            ) from None
        if max_tokens is None and budget is not None:
            # Unasked, the completion may run to the end of the context; a key whose token limit
            # is smaller could then never be served, so the default is what the key may spend.
            # A prompt that leaves nothing is refused for good by the limit check.
            fitted = max(1, min(fitted, budget - prompt_tokens))
        return fitted

    @staticmethod
    def _prepared(
        body: ChatCompletionRequest | CompletionRequest,
        request_id: str,
        tokens: list[int],
        max_tokens: int,
        fmt: ResponseFormat,
    ) -> Prepared:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            seed=body.seed,
            stop=body.stop_sequences(),
            ignore_eos=body.ignore_eos,
        )
        return Prepared(
            GenerationRequest(request_id, tokens, params), fmt, body.stream, body.include_usage
        )

    # running ----------------------------------------------------------------------------------

    async def respond(self, life: RequestLife, prepared: Prepared) -> web.StreamResponse:
        """Wait for a slot, run the generation and answer, stating how it ended to `life`.

        The slot and the key's lease are given back before a stream's last bytes are flushed:
        a client that stops reading at the very end holds nothing but its own socket."""
        telemetry = life.telemetry
        async with self.gate.slot(prepared.generation.tenant) as queue_ns:
            generation = self._start(life, prepared.generation)
            telemetry.started(
                stream=prepared.stream,
                prompt_tokens=len(prepared.generation.prompt_tokens),
                queue_ns=queue_ns,
            )
            if not prepared.stream:
                return await self._collect(life, prepared, generation)
            events = EventStream(
                life.request,
                ping_seconds=self.ping_seconds,
                send_timeout_seconds=self.send_timeout_seconds,
                headers=life.headers,
            )
            outcome = await self._stream(events, prepared, generation, telemetry)
        life.release()
        if not await events.close():
            outcome = _STALLED
        life.conclude(outcome)
        return events.response

    def _start(self, life: RequestLife, generation: GenerationRequest) -> GenerationStream:
        try:
            return self.engine.start(generation)
        except EngineError:
            if not self.state.draining:
                raise
            # Queued past the drain timeout: the engine stopped before this request's turn.
            raise life.refused_at_shutdown(
                ServiceUnavailable(
                    "The server is shutting down and stopped generating before this request "
                    "could start. Retry on another replica or after the restart.",
                    code="server_shutting_down",
                    headers={"Retry-After": "5"},
                )
            ) from None

    async def _collect(
        self, life: RequestLife, prepared: Prepared, generation: GenerationStream
    ) -> web.Response:
        parts = []
        async with generation:
            async for delta in generation:
                parts.append(delta.text)
                life.telemetry.written(len(delta.token_ids))
        completion = _completed(generation.completion)
        if completion.finish_reason == "error":
            log.error("generation failed: %s", completion.error)
            life.conclude(_failure(completion, 500))
            raise InternalError("The engine failed while generating this response.")
        if completion.finish_reason == "cancelled":
            life.conclude(_failure(completion, 503))
            raise ServiceUnavailable(
                "The server stopped this generation (it is shutting down).",
                code="generation_cancelled",
            )
        life.conclude(Outcome("ok", 200, completion=completion))
        body = prepared.format.full("".join(parts), completion)
        return web.json_response(body, headers=life.headers)

    async def _stream(
        self,
        events: EventStream,
        prepared: Prepared,
        generation: GenerationStream,
        telemetry: RequestTelemetry,
    ) -> Outcome:
        """Everything but the response's end; the outcome unless the client stalls there."""
        fmt = prepared.format
        try:
            async with generation:
                await events.open()
                if isinstance(fmt, ChatFormat):
                    await events.send(fmt.role())
                # Token ids that bring no text yet are counted with the next text, so the first
                # token's time is when the client first received text.
                unsent = 0
                async for delta in generation:
                    if not delta.text:
                        unsent += len(delta.token_ids)
                        continue
                    await events.send(fmt.delta(delta.text))
                    telemetry.written(unsent + len(delta.token_ids))
                    unsent = 0
                if unsent:
                    telemetry.written(unsent)
            completion = _completed(generation.completion)
            if completion.finish_reason in ("stop", "length"):
                await events.send(fmt.finish(completion.finish_reason))
                if prepared.include_usage:
                    await events.send(fmt.usage(completion))
                outcome = Outcome("ok", 200, completion=completion)
            else:
                await events.send(json.dumps(_in_stream_error(completion)))
                outcome = _failure(completion, 200)
            await events.send("[DONE]")
        except ClientStalled:
            return _STALLED
        except ConnectionError:
            # The client went away mid-write; leaving the engine block cancelled the work.
            return Outcome("cancelled", 200, cancel_reason="client_disconnect")
        return outcome


_STALLED = Outcome("cancelled", 200, cancel_reason="client_stalled")


def _completed(completion: Completion | None) -> Completion:
    if completion is None:
        raise InternalError("The engine ended a stream without a result.")
    return completion


def _failure(completion: Completion, http_status: int) -> Outcome:
    if completion.finish_reason == "cancelled":
        return Outcome("cancelled", http_status, completion=completion, cancel_reason="shutdown")
    return Outcome(
        "error",
        http_status,
        completion=completion,
        error_type="engine_error",
        error=completion.error,
    )


def _in_stream_error(completion: Completion) -> dict[str, object]:
    if completion.finish_reason == "cancelled":
        return envelope(
            "The server stopped this generation (it is shutting down).",
            "server_error",
            None,
            "generation_cancelled",
        )
    log.error("generation failed mid-stream: %s", completion.error)
    return envelope(
        "The engine failed while generating this response.", "server_error", None, "engine_error"
    )


def _template_role(role: str) -> str:
    # OpenAI's newer "developer" role is the system prompt under another name; model templates
    # know only "system".
    return "system" if role == "developer" else role
