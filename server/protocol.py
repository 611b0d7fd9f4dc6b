"""The OpenAI wire format: request models that validate, response models that document.

Requests are parsed straight from the body bytes by pydantic (strict types, no NaN or infinity),
so a wrong type or value becomes a 400 that names the field. The same models generate the
OpenAPI document, which is how /openapi.json stays true to what the handlers accept and return.
Parameters this server does not implement are refused by name instead of silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "CompletionChunk",
    "CompletionRequest",
    "CompletionResponse",
    "ErrorResponse",
    "ModelList",
    "Usage",
]

_MAX_STOP_SEQUENCES = 16
# Stop strings are matched on every token; a bound keeps that cheap whatever a client sends.
_MAX_STOP_LENGTH = 256


def _unsupported(what: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported", f"{what} is not supported by this server")


def _whole_number(value: Any) -> Any:
    # JSON does not tell 7 from 7.0, and JSON Schema's "integer" admits both; strict parsing
    # would refuse the second, which some languages' encoders write.
    return int(value) if isinstance(value, float) and value.is_integer() else value


WholeNumber = BeforeValidator(_whole_number)


def _only(*accepted: Any, description: str) -> WithJsonSchema:
    """The documented schema of a parameter refused unless neutral: /openapi.json promises only
    the values that are accepted, while the validator still names the parameter in its 400."""
    return WithJsonSchema({"enum": [*accepted, None], "description": description})


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers commonly do, so clients that send
    # newer parameters keep working; known-but-unsupported ones are refused below.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class _GenerationRequest(_Request):
    model: str = Field(description="The id of a model listed by GET /v1/models.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1), WholeNumber] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = Field(
        None, description="0 samples greedily."
    )
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1), WholeNumber] | None = Field(
        None, description="0 or -1 disables it."
    )
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stop: (
        Annotated[str, Field(min_length=1, max_length=_MAX_STOP_LENGTH)]
        | Annotated[
            list[Annotated[str, Field(min_length=1, max_length=_MAX_STOP_LENGTH)]],
            Field(max_length=_MAX_STOP_SEQUENCES),
        ]
        | None
    ) = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1), WholeNumber] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = Field(
        None, description="1 disables it."
    )
    user: Annotated[str, Field(max_length=256)] | None = None
    n: Annotated[
        Annotated[int, Field(ge=1), WholeNumber] | None,
        _only(1, description="Only 1 is supported."),
    ] = None
    logit_bias: Annotated[
        dict[str, float] | None, _only({}, description="Not supported; omit it.")
    ] = None
    ignore_eos: bool = Field(
        False, description="Keep generating past end-of-sequence tokens (for benchmarks)."
    )

    @field_validator("n")
    @classmethod
    def _single_choice(cls, value: int | None) -> int | None:
        if value is not None and value > 1:
            raise _unsupported("n > 1 (several choices per request)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise _unsupported("logit_bias")
        return value

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ResponseFormat(_Request):
    type: Literal["text"] = Field(description="Only plain text output is supported.")


class ChatCompletionRequest(_GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1), WholeNumber] | None = None
    logprobs: Annotated[
        bool | None, _only(False, description="Not supported; omit it or send false.")
    ] = None
    top_logprobs: Annotated[int | None, _only(description="Not supported; omit it.")] = None
    tools: Annotated[
        list[dict[str, Any]] | None, _only([], description="Not supported; omit it.")
    ] = None
    tool_choice: Annotated[
        str | dict[str, Any] | None, _only("none", description="Only 'none'.")
    ] = None
    functions: Annotated[
        list[dict[str, Any]] | None, _only([], description="Not supported; omit it.")
    ] = None
    function_call: Annotated[
        str | dict[str, Any] | None, _only("none", description="Only 'none'.")
    ] = None
    response_format: ResponseFormat | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise _unsupported("logprobs")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise _unsupported("top_logprobs")
        return value

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            raise _unsupported("tool calling")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if value is not None and value != "none":
            raise _unsupported("tool calling")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens else self.max_tokens


class CompletionRequest(_GenerationRequest):
    prompt: (
        str
        # maxItems documents the one-prompt rule that _one_prompt enforces with a clearer 400.
        | Annotated[list[str], Field(min_length=1, json_schema_extra={"maxItems": 1})]
        | Annotated[list[Annotated[int, WholeNumber]], Field(min_length=1)]
    ) = Field(description="A string, a list with one string, or a list of token ids.")
    echo: Annotated[
        bool | None, _only(False, description="Not supported; omit it or send false.")
    ] = None
    suffix: Annotated[str | None, _only("", description="Not supported; omit it.")] = None
    best_of: Annotated[
        Annotated[int, WholeNumber] | None, _only(1, description="Only 1 is supported.")
    ] = None
    logprobs: Annotated[int | None, _only(description="Not supported; omit it.")] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(value, list) and isinstance(value[0], str) and len(value) > 1:
            raise _unsupported("a batch of several prompts in one request")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        if value:
            raise _unsupported("echo")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise _unsupported("suffix")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise _unsupported("best_of other than 1")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise _unsupported("logprobs")
        return value

    def requested_max_tokens(self) -> int | None:
        # OpenAI's legacy completions default to 16 tokens; keep that for drop-in clients.
        return self.max_tokens if self.max_tokens is not None else 16


# Responses: documented in /openapi.json and used by tests to check what the handlers send.


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens read from the prefix cache.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class _Response(BaseModel):
    id: str
    created: int
    model: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    """One `data:` event of a streamed chat completion."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionResponse(_Response):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Response):
    """One `data:` event of a streamed completion."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    engine: str = Field(description="llamacpp, exllamav2, or synthetic (a load-test engine).")
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope, used for every 4xx and 5xx and for in-stream errors."""

    error: ErrorDetail
