"""(e) The stack vLLM, TabbyAPI, llama-cpp-python and LiteLLM serve with: FastAPI on uvicorn
(uvloop, httptools), streaming through sse-starlette's EventSourceResponse."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from common import MODELS, arguments, chunks
from fastapi import FastAPI, Request
from sse_starlette.sse import EventSourceResponse


def main() -> None:
    args = arguments()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> EventSourceResponse:
        body = await request.json()

        async def events() -> AsyncIterator[dict[str, Any]]:
            await asyncio.sleep(args.first_token_seconds)
            for index, data in enumerate(chunks(body["model"], args.tokens)):
                if 1 < index <= args.tokens:
                    await asyncio.sleep(args.token_interval_seconds)
                yield {"data": data}
            yield {"data": "[DONE]"}

        return EventSourceResponse(events())

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return MODELS

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        backlog=2048,
    )


if __name__ == "__main__":
    main()
