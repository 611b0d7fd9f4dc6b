"""Drive one concurrency level: N workers, each sending streaming requests back to back, and a
timed record of every response as the client saw it."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

__all__ = ["RequestResult", "Target", "run_level", "stream_into"]

# Plain, varied English: most tokenizers make about one token of each word.
_TEXT = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
    "bright jars of pickled plums under an amber sky near the old harbour wall"
)
_WORDS = _TEXT.split()
_SENT = itertools.count()


@dataclass(frozen=True)
class Target:
    base_url: str
    model: str
    endpoint: str
    api_key: str | None
    prompt_words: int
    max_tokens: int
    ignore_eos: bool
    timeout_seconds: float
    # 0 is greedy; 1 is what OpenAI's API and client assume when a request names none.
    temperature: float = 0.0

    def url(self) -> str:
        return (
            f"{self.base_url}/v1/{'chat/completions' if self.endpoint == 'chat' else 'completions'}"
        )

    def body(self) -> dict[str, Any]:
        # A first word never sent before in this process (warm-up, levels and runs included),
        # so no server answers from a cache of an earlier identical prompt. What follows the
        # server's own fixed prefix (a default system prompt) must still be computed.
        unique = next(_SENT)
        words = [str(unique), *(_WORDS[i % len(_WORDS)] for i in range(self.prompt_words - 1))]
        prompt = " ".join(words)
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class RequestResult:
    status: int = 0
    error: str | None = None
    started: float = 0.0
    token_times: list[float] = field(default_factory=list)
    ended: float = 0.0
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    finished: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def truncated(self) -> bool:
        """Answered 200, but the stream ended without a finish reason or [DONE]."""
        return self.status == 200 and not self.finished

    @property
    def tokens(self) -> int:
        return (
            self.completion_tokens if self.completion_tokens is not None else len(self.token_times)
        )


def _content(chunk: dict[str, Any]) -> tuple[str, str | None]:
    choices = chunk.get("choices") or []
    if not choices:
        return "", None
    choice = choices[0]
    text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    return text, choice.get("finish_reason")


async def _one(session: aiohttp.ClientSession, target: Target) -> RequestResult:
    result = RequestResult()
    await stream_into(result, session, target)
    return result


async def stream_into(
    result: RequestResult, session: aiohttp.ClientSession, target: Target
) -> None:
    """Send one request and record its response in `result` as it arrives, so a caller that
    cancels it (a run's deadline) keeps what was received."""
    result.started = time.perf_counter()
    saw_finish = saw_done = False
    try:
        async with session.post(
            target.url(), json=target.body(), headers=target.headers()
        ) as response:
            result.status = response.status
            if response.status != 200:
                result.error = (await response.text())[:300]
                return
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    saw_done = True
                    break
                chunk = json.loads(data)
                text, finish = _content(chunk)
                if text:
                    result.token_times.append(time.perf_counter())
                saw_finish = saw_finish or finish is not None
                if usage := chunk.get("usage"):
                    result.completion_tokens = usage.get("completion_tokens")
                    result.prompt_tokens = usage.get("prompt_tokens")
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.ended = time.perf_counter()
    result.finished = saw_finish or saw_done


async def run_level(
    target: Target,
    concurrency: int,
    requests: int,
    on_done: Callable[[], None],
    *,
    ramp_seconds: float = 0.0,
) -> tuple[list[RequestResult], float]:
    """Send `requests` streams with `concurrency` in flight; results and the wall time.

    With `ramp_seconds`, the workers start evenly over that time instead of all at once, so
    thousands of connections do not arrive in one burst and overflow the listen backlog."""
    timeout = aiohttp.ClientTimeout(total=target.timeout_seconds)
    # A fresh connection per request: servers differ in when they close kept-alive ones, and a
    # request written to a connection the server just closed would count as its error.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    counter = iter(range(requests))
    results: list[RequestResult] = []

    workers = min(concurrency, requests)

    async def worker(session: aiohttp.ClientSession, number: int) -> None:
        await asyncio.sleep(ramp_seconds * number / workers)
        for _ in counter:
            results.append(await _one(session, target))
            on_done()

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session, number) for number in range(workers)))
        return results, time.perf_counter() - started
