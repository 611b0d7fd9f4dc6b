"""(d) The floor for this stack: a minimal aiohttp + uvloop SSE handler, nothing else."""

from __future__ import annotations

import asyncio
import json

import uvloop
from aiohttp import web
from common import MODELS, arguments, chunks


def main() -> None:
    args = arguments()

    async def completions(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(args.first_token_seconds)
        for index, data in enumerate(chunks(body["model"], args.tokens)):
            if 1 < index <= args.tokens:
                await asyncio.sleep(args.token_interval_seconds)
            await response.write(f"data: {data}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response(MODELS)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/v1/models", models)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, backlog=2048, print=None)


if __name__ == "__main__":
    main()
