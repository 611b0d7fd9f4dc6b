"""What both baseline stacks stream: OpenAI chat chunks at llmserve's synthetic engine's pace.

The baselines do only what any server must: parse the JSON body, then write a role chunk, one
chunk per token, a finish chunk and [DONE]. No auth, limits or metrics: they are the floor.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Iterator

WORDS = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit"]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--first-token-seconds", type=float, default=0.05)
    parser.add_argument("--token-interval-seconds", type=float, default=1.0)
    return parser.parse_args()


def chunks(model: str, tokens: int) -> Iterator[str]:
    """The role chunk, then one chunk per token, then the finish chunk (JSON strings)."""
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }

    def chunk(delta: dict[str, str], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return json.dumps({**base, "choices": [choice]}, separators=(",", ":"))

    yield chunk({"role": "assistant", "content": ""})
    for i in range(tokens):
        yield chunk({"content": WORDS[i % len(WORDS)] + " "})
    yield chunk({}, "length")


MODELS = {"object": "list", "data": [{"id": "synthetic", "object": "model", "owned_by": "bench"}]}
