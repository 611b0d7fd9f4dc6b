"""JSON bodies of OpenAI responses and stream chunks, for chat and legacy completions.

A stream writes one chunk per token, so the parts that never change within a stream (id,
created, model) are serialised once and only the token text is encoded per chunk. The shapes
match the response models in `protocol.py`; the tests hold them to that.
"""

from __future__ import annotations

import abc
import json
import time
import uuid
from typing import Any

from llmserve.server.engines.base import Completion

__all__ = ["ChatFormat", "CompletionFormat", "ResponseFormat"]


def _usage(completion: Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": completion.cached_tokens},
    }


class ResponseFormat(abc.ABC):
    """Shared framing: one id and one `created` for every chunk of a response."""

    object_name: str
    chunk_object_name: str
    id_prefix: str

    def __init__(self, model: str, *, include_usage: bool) -> None:
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        head = {"id": self.id, "object": self.chunk_object_name, "created": self.created}
        self._head = json.dumps({**head, "model": model}, separators=(",", ":"))[:-1]
        self._tail = ',"usage":null}' if include_usage else "}"

    def _chunk(self, choice: str) -> str:
        return f'{self._head},"choices":[{choice}]{self._tail}'

    @abc.abstractmethod
    def delta(self, text: str) -> str: ...

    @abc.abstractmethod
    def finish(self, reason: str) -> str: ...

    def usage(self, completion: Completion) -> str:
        """The include_usage chunk: empty choices, usage filled in."""
        usage = json.dumps(_usage(completion), separators=(",", ":"))
        return f'{self._head},"choices":[],"usage":{usage}}}'

    @abc.abstractmethod
    def _choice(self, text: str, completion: Completion) -> dict[str, Any]: ...

    def full(self, text: str, completion: Completion) -> dict[str, Any]:
        """The whole non-streaming response."""
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": [self._choice(text, completion)],
            "usage": _usage(completion),
        }


class ChatFormat(ResponseFormat):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def role(self) -> str:
        """First chunk of a chat stream: the role, with empty content."""
        return self._chunk(
            '{"index":0,"delta":{"role":"assistant","content":""},'
            '"logprobs":null,"finish_reason":null}'
        )

    def delta(self, text: str) -> str:
        return self._chunk(
            f'{{"index":0,"delta":{{"content":{json.dumps(text)}}},'
            '"logprobs":null,"finish_reason":null}'
        )

    def finish(self, reason: str) -> str:
        return self._chunk(f'{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"{reason}"}}')

    def _choice(self, text: str, completion: Completion) -> dict[str, Any]:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": completion.finish_reason,
        }


class CompletionFormat(ResponseFormat):
    object_name = "text_completion"
    chunk_object_name = "text_completion"
    id_prefix = "cmpl-"

    def delta(self, text: str) -> str:
        return self._chunk(
            f'{{"index":0,"text":{json.dumps(text)},"logprobs":null,"finish_reason":null}}'
        )

    def finish(self, reason: str) -> str:
        return self._chunk(f'{{"index":0,"text":"","logprobs":null,"finish_reason":"{reason}"}}')

    def _choice(self, text: str, completion: Completion) -> dict[str, Any]:
        return {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": completion.finish_reason,
        }
