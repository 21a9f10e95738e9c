"""Loopback OpenAI-compatible servers that play providers, with scripted delays and faults.

    async with Providers() as p:
        url = p.add("fast", Reply("42", delay=0.2))           # every call answers "42"
        url = p.add("flaky", [Reply(status=429, retry_after=0.3), Reply("ok")])  # in turn
        url = p.add("judge", lambda body: Reply(...))         # computed from the request

A Reply streams `text` in `chunks` SSE events (or one JSON body when the request has no
stream), after `delay` seconds, with optional keep-alive comments, a usage object (any shape), a
mid-stream error, malformed JSON, a dropped connection, or any response headers. Every request is recorded with its headers.
The last entry of a list repeats. `Providers.thread()` runs the same in a background thread,
for tests that drive the real console script.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Reply:
    text: str = "ok"
    delay: float = 0.0  # before the response starts
    status: int = 200
    chunks: int = 3
    chunk_delay: float = 0.0
    keepalive: float = 0.0  # seconds of `: OPENROUTER PROCESSING` comments before content
    usage: dict | None = field(default_factory=lambda: {"prompt_tokens": 10,
                                                        "completion_tokens": 5})  # fmt: skip
    cost: float | None = None  # usage.cost, as OpenRouter reports it
    retry_after: float | None = None
    error_after: int | None = None  # a mid-stream error event after this many chunks
    malformed: bool = False  # a chunk that is not JSON
    reset: bool = False  # close the connection without an answer
    crlf: bool = False  # CRLF line ends
    error_body: str | None = None  # for status != 200
    headers: dict[str, str] = field(default_factory=dict)  # sent as is (a bad Retry-After, ...)


Script = Reply | list[Reply] | Callable[[dict], Reply]


class Providers:
    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.calls: dict[str, int] = {}
        self.requests: dict[str, list[dict]] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    def add(self, name: str, script: Script) -> str:
        self.scripts[name] = script
        self.calls[name] = 0
        self.requests[name] = []
        return self.url(name)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}/v1"

    async def __aenter__(self) -> Providers:
        app = web.Application()
        app.router.add_post("/{name}/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()

    def _reply(self, name: str, body: dict) -> Reply:
        script = self.scripts[name]
        n = self.calls[name]
        self.calls[name] += 1
        if callable(script) and not isinstance(script, Reply):
            return script(body)
        if isinstance(script, list):
            return script[min(n, len(script) - 1)]
        return script

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        body = await request.json()
        self.requests[name].append({"headers": dict(request.headers), "body": body})
        r = self._reply(name, body)
        await asyncio.sleep(r.delay)
        if r.reset:
            request.transport.close()
            return web.Response()
        if r.status != 200:
            headers = {"Retry-After": str(r.retry_after)} if r.retry_after is not None else {}
            headers |= r.headers
            text = r.error_body or json.dumps({"error": {"code": r.status,
                                                         "message": f"scripted {r.status}"}})  # fmt: skip
            return web.Response(status=r.status, text=text, headers=headers,
                                content_type="application/json")  # fmt: skip
        usage = dict(r.usage or {})
        if r.cost is not None:
            usage["cost"] = r.cost
        if not body.get("stream"):
            return web.json_response({"choices": [{"message": {"role": "assistant",
                                      "content": r.text}, "finish_reason": "stop"}],
                                      "usage": usage or None})  # fmt: skip
        try:
            return await self._stream(request, r, usage)
        except ConnectionResetError:  # the client went away (a late member, cancelled)
            return web.Response()

    async def _stream(self, request, r: Reply, usage: dict) -> web.StreamResponse:
        end = "\r\n" if r.crlf else "\n"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **r.headers})
        await resp.prepare(request)
        waited = 0.0
        while waited < r.keepalive:
            await resp.write(f": OPENROUTER PROCESSING{end}{end}".encode())
            await asyncio.sleep(0.05)
            waited += 0.05
        pieces = _split(r.text, r.chunks)
        for i, piece in enumerate(pieces):
            if r.error_after is not None and i == r.error_after:
                event = {"error": {"code": 502, "message": "provider died"},
                         "choices": [{"index": 0, "delta": {"content": ""},
                                      "finish_reason": "error"}]}  # fmt: skip
                await resp.write(f"data: {json.dumps(event)}{end}{end}".encode())
                return resp
            if r.malformed and i == len(pieces) // 2:
                await resp.write(f"data: {{not json{end}{end}".encode())
                return resp
            chunk = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}{end}{end}".encode())
            await asyncio.sleep(r.chunk_delay)
        last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}
        await resp.write(f"data: {json.dumps(last)}{end}{end}data: [DONE]{end}{end}".encode())
        return resp

    def thread(self) -> _Background:
        return _Background(self)


def _split(text: str, n: int) -> list[str]:
    n = max(1, min(n, len(text) or 1))
    size = -(-len(text) // n) if text else 0
    return [text[i : i + size] for i in range(0, len(text), size)] if text else []


class _Background:
    """The providers on their own event loop in a thread (for subprocess tests)."""

    def __init__(self, providers: Providers):
        self.p = providers
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Providers:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.p.__aenter__(), self.loop).result(10)
        return self.p

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.p.__aexit__(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
