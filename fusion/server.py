"""`mlxtune fusion serve`: the configured fusion as an OpenAI-compatible endpoint.

    POST /v1/chat/completions   {"model": "fusion" | "fusion-<mode>", "messages": [...], "stream"?}
    GET  /v1/models

`fusion` runs the configured mode; `fusion-best-of`, `fusion-merge`, `fusion-debate` and
`fusion-self` run that mode on the same pool and judge. Any OpenAI client works against it (the
official `openai` package is tested). Loopback by default; with `fusion.server_token_env` set,
clients must send `Authorization: Bearer <that variable's value>`. Bodies over
`fusion.max_request_kb` get 413, more than `fusion.max_concurrent` requests at once get 429, and
every error has OpenAI's shape: {"error": {"message", "type", "param", "code"}}. A request that
itself comes from a fusion (the depth header) is refused, so a fusion never fans out to itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from urllib.parse import urlparse

from aiohttp import web

from mlxtune.config import Config
from mlxtune.errors import ConfigError

from . import wire
from .client import FusionClient
from .result import FusionError, FusionResult

MODES = ("best-of", "merge", "debate", "self")
CLIENT = web.AppKey("client", FusionClient)
SLOTS = web.AppKey("slots", asyncio.Semaphore)


def model_ids(cfg: Config) -> dict[str, str]:
    """Served model id -> mode."""
    return {"fusion": cfg.fusion.mode} | {f"fusion-{m}": m for m in MODES}


def check_not_self(cfg: Config, host: str, port: int) -> None:
    """Refuse a pool or judge that points at this very server (it would call itself)."""
    local = {"127.0.0.1", "localhost", "::1", "0.0.0.0", host}
    members = [(f"fusion.pool[{i}]", ep) for i, ep in enumerate(cfg.fusion.pool)]
    members += [("fusion.judge", cfg.fusion.judge)] if cfg.fusion.judge else []
    for key, ep in members:
        url = urlparse(ep.base_url)
        if url.hostname in local and (url.port or (443 if url.scheme == "https" else 80)) == port:
            raise ConfigError(f"{key}.base_url: {ep.base_url} is this fusion server itself")


def make_app(cfg: Config) -> web.Application:
    token = os.environ.get(cfg.fusion.server_token_env) if cfg.fusion.server_token_env else None
    if cfg.fusion.server_token_env and not token:
        raise ConfigError(f"fusion.server_token_env: {cfg.fusion.server_token_env} is not set")
    app = web.Application(client_max_size=cfg.fusion.max_request_kb * 1024,
                          middlewares=[_errors_as_openai(token)])  # fmt: skip
    models = model_ids(cfg)

    async def start(app: web.Application) -> None:
        app[CLIENT] = await FusionClient(cfg, depth=0).__aenter__()
        app[SLOTS] = asyncio.Semaphore(cfg.fusion.max_concurrent)

    async def stop(app: web.Application) -> None:
        await app[CLIENT].__aexit__(None, None, None)

    async def list_models(request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "mlxtune"} for m in models]
        return web.json_response({"object": "list", "data": data})

    async def chat(request: web.Request) -> web.StreamResponse:
        if int(request.headers.get(wire.DEPTH_HEADER, "0") or 0) > 0:
            raise _Error(400, "this request comes from a fusion; fusions do not nest",
                         "fusion_recursion")  # fmt: skip
        body = await _json_body(request)
        model = body.get("model", "fusion")
        if model not in models:
            raise _Error(404, f"model {model!r} not found; this server has {', '.join(models)}",
                         "model_not_found", "model")  # fmt: skip
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and "role" in m for m in messages)
        ):
            raise _Error(400, "messages: expected a non-empty list of {role, content} objects",
                         "invalid_messages", "messages")  # fmt: skip
        slots = request.app[SLOTS]
        if slots.locked():
            raise _Error(429, f"busy: {cfg.fusion.max_concurrent} requests are running",
                         "too_many_requests", retry_after=1)  # fmt: skip
        async with slots:
            client = request.app[CLIENT]
            if body.get("stream"):
                return await _stream(request, client, messages, models[model], model)
            result = await _run(client, messages, models[model])
            return web.json_response(_completion(result, model))

    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


async def _run(client, messages, mode, on_text=None) -> FusionResult:
    try:
        return await client.run(messages, mode, on_text)
    except FusionError as e:
        raise _Error(502, str(e), "fusion_failed") from None


async def _stream(request, client, messages, mode, model) -> web.StreamResponse:
    ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})  # fmt: skip
    await resp.prepare(request)
    pieces: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(client.run(messages, mode, pieces.put_nowait))
    task.add_done_callback(lambda _: pieces.put_nowait(None))

    async def send(obj) -> None:
        await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip

    await send(chunk({"role": "assistant", "content": ""}))
    try:
        while (piece := await pieces.get()) is not None:
            await send(chunk({"content": piece}))
        result = task.result()
    except FusionError as e:
        await send({"error": {"message": str(e), "type": "fusion_failed", "code": 502}} | chunk(
            {"content": ""}, "error"))  # fmt: skip
        await resp.write(b"data: [DONE]\n\n")
        return resp
    finally:
        if not task.done():
            task.cancel()
    final = chunk({}, "stop")
    final["usage"] = _usage(result)
    final["fusion"] = _summary(result)
    await send(final)
    await resp.write(b"data: [DONE]\n\n")
    return resp


def _completion(result: FusionResult, model: str) -> dict:
    return {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": result.answer},
            }
        ],  # fmt: skip
        "usage": _usage(result),
        "fusion": _summary(result),
    }


def _usage(result: FusionResult) -> dict:
    calls = result.calls + ([result.judge] if result.judge else [])
    prompt = sum(c.prompt_tokens for c in calls)
    completion = sum(c.completion_tokens for c in calls)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
             "total_tokens": prompt + completion}  # fmt: skip
    if result.cost is not None:
        usage["cost"] = result.cost
    return usage


def _summary(result: FusionResult) -> dict:
    out = result.to_dict()
    out.pop("answer")
    return out


class _Error(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 retry_after: int | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after = retry_after

    def response(self) -> web.Response:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}  # fmt: skip
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return web.json_response(body, status=self.status, headers=headers)


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except json.JSONDecodeError as e:
        raise _Error(400, f"the body is not JSON ({e.msg})", "invalid_json") from None
    if not isinstance(body, dict):
        raise _Error(400, "the body must be a JSON object", "invalid_json")
    return body


def _errors_as_openai(token: str | None):
    @web.middleware
    async def middleware(request: web.Request, handler):
        if token is not None and not secrets.compare_digest(
            request.headers.get("Authorization", ""), f"Bearer {token}"
        ):
            return _Error(401, "missing or wrong bearer token", "invalid_api_key").response()
        try:
            return await handler(request)
        except _Error as e:
            return e.response()
        except web.HTTPRequestEntityTooLarge as e:
            return _Error(413, f"request body too large ({e.text})", "request_too_large").response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return _Error(e.status, e.reason, "http_error").response()

    return middleware
