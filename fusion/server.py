"""`mlxtune fusion serve`: the configured fusion as an OpenAI-compatible endpoint.

    POST /v1/chat/completions   {"model": "fusion" | "fusion-<mode>", "messages": [...], "stream"?}
    GET  /v1/models

`fusion` runs the configured mode; `fusion-best-of`, `fusion-merge`, `fusion-debate` and
`fusion-self` run that mode on the same pool and judge. Any OpenAI client works against it (the
official `openai` package is tested). Loopback by default; a bind beyond loopback needs
`fusion.server_token_env` (or, knowingly, `--insecure-no-token`). With a token, clients must
send `Authorization: Bearer <that variable's value>`; anything else, non-ASCII included, is 401.
Bodies over `fusion.max_request_kb` get 413, more than `fusion.max_concurrent` requests at once
get 429, and every error has OpenAI's shape: {"error": {"message", "type", "param", "code"}};
a malformed request is a 400 naming the field (fusion.request checks every one). A request
that itself comes from a fusion (the depth header) is refused, so a fusion never fans out to
itself.

Clients see the fused answer and the summed usage. Each member's answer, model id and upstream
error text (the `fusion` field, and the detail in a failure's message) go out only with
`fusion.expose_members`.

Streaming sends the judge's answer as it is written. If the judge fails after part of it went
out, the stream ends with an error event in OpenAI's shape ({"error": {...}} with
finish_reason "error", then [DONE]; the `openai` client raises APIError) instead of a member's
answer glued after the half: the text received is not an answer. A judge that fails before its
answer starts, and any failure without streaming, still gets the member fallback.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import secrets
import time
from urllib.parse import urlparse

from aiohttp import web

from mlxtune.config import Config
from mlxtune.errors import ConfigError

from . import wire
from .client import FusionClient
from .request import ApiError, ChatRequest, chat_request, fusion_depth
from .result import FusionError, FusionResult

MODES = ("best-of", "merge", "debate", "self")
CLIENT = web.AppKey("client", FusionClient)
SLOTS = web.AppKey("slots", asyncio.Semaphore)
log = logging.getLogger(__name__)


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


def check_bind(cfg: Config, host: str, insecure_no_token: bool = False) -> str | None:
    """Refuse to serve beyond loopback without a token: anyone who reaches the port would spend
    the pool's API keys. With `insecure_no_token`, the warning to print instead."""
    if cfg.fusion.server_token_env or is_loopback(host):
        return None
    if not insecure_no_token:
        raise ConfigError(f"--host {host}: serving beyond loopback needs fusion.server_token_env "
                          "(a bearer token clients must send); pass --insecure-no-token to "
                          "serve without one")  # fmt: skip
    return (f"mlxtune: warning: serving on {host} with no token: anyone who can reach it "
            "spends the pool's API keys")  # fmt: skip


def is_loopback(host: str) -> bool:
    """Only this machine can connect (a host name other than localhost could be anything)."""
    if host.strip("[]").lower() in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def make_app(cfg: Config) -> web.Application:
    name = cfg.fusion.server_token_env
    token = os.environ.get(name) if name else None
    if name and not token:
        raise ConfigError(f"fusion.server_token_env: {name} is not set")
    app = web.Application(client_max_size=cfg.fusion.max_request_kb * 1024,
                          middlewares=[_errors_as_openai(token)])  # fmt: skip
    models = model_ids(cfg)
    expose = cfg.fusion.expose_members

    async def start(app: web.Application) -> None:
        app[CLIENT] = await FusionClient(cfg, depth=0).__aenter__()
        app[SLOTS] = asyncio.Semaphore(cfg.fusion.max_concurrent)

    async def stop(app: web.Application) -> None:
        await app[CLIENT].__aexit__(None, None, None)

    async def list_models(request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "mlxtune"} for m in models]
        return web.json_response({"object": "list", "data": data})

    async def chat(request: web.Request) -> web.StreamResponse:
        if fusion_depth(request.headers.get(wire.DEPTH_HEADER)) > 0:
            raise ApiError(400, "this request comes from a fusion; fusions do not nest",
                           "fusion_recursion")  # fmt: skip
        req = chat_request(await request.read(), models)
        slots = request.app[SLOTS]
        if slots.locked():
            raise ApiError(429, f"busy: {cfg.fusion.max_concurrent} requests are running",
                           "too_many_requests", retry_after=1)  # fmt: skip
        async with slots:
            client = request.app[CLIENT]
            if req.stream:
                return await _stream(request, client, req, expose)
            result = await _run(client, req, expose)
            return web.json_response(_completion(result, req.model, expose))

    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


async def _run(client, req: ChatRequest, expose: bool) -> FusionResult:
    try:
        return await client.run(req.messages, req.mode)
    except FusionError as e:
        raise ApiError(502, str(e) if expose else e.brief, "fusion_failed") from None


async def _stream(request, client, req: ChatRequest, expose: bool) -> web.StreamResponse:
    ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})  # fmt: skip
    await resp.prepare(request)
    pieces: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(client.run(req.messages, req.mode, pieces.put_nowait))
    task.add_done_callback(lambda _: pieces.put_nowait(None))

    async def send(obj) -> None:
        await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {"id": ident, "object": "chat.completion.chunk", "created": created,
                "model": req.model, "choices": [{"index": 0, "delta": delta,
                                                 "finish_reason": finish}]}  # fmt: skip

    await send(chunk({"role": "assistant", "content": ""}))
    failure = None
    try:
        while (piece := await pieces.get()) is not None:
            await send(chunk({"content": piece}))
        result = task.result()
    except FusionError as e:
        failure = ApiError(502, str(e) if expose else e.brief, "fusion_failed")
    except ConnectionError:
        raise  # the client went away: nobody to tell
    except Exception:  # our bug, not the client's: logged; the stream still ends well-formed
        log.exception("fusion serve: a streamed request failed")
        failure = ApiError(500, "internal error (the server's log has the details)",
                           "internal_error")  # fmt: skip
    finally:
        if not task.done():
            task.cancel()
    if failure is not None:  # OpenAI's streamed error: the text so far is not an answer
        await send(failure.body() | chunk({"content": ""}, "error"))
    else:
        final = chunk({}, "stop")
        final["usage"] = _usage(result)
        if expose:
            final["fusion"] = _summary(result)
        await send(final)
    await resp.write(b"data: [DONE]\n\n")
    return resp


def _completion(result: FusionResult, model: str, expose: bool) -> dict:
    out = {
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
    }
    return out | ({"fusion": _summary(result)} if expose else {})


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


def _response(e: ApiError) -> web.Response:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
    return web.json_response(e.body(), status=e.status, headers=headers)


def _authorized(header: str, token: str) -> bool:
    """Constant-time, on bytes: a str compare raises on non-ASCII (surrogatepass: any str)."""
    given = header.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(given, f"Bearer {token}".encode("utf-8", "surrogatepass"))


def _errors_as_openai(token: str | None):
    @web.middleware
    async def middleware(request: web.Request, handler):
        if token is not None and not _authorized(request.headers.get("Authorization", ""), token):
            return _response(ApiError(401, "missing or wrong bearer token", "invalid_api_key"))
        try:
            return await handler(request)
        except ApiError as e:
            return _response(e)
        except web.HTTPRequestEntityTooLarge as e:
            return _response(ApiError(413, f"request body too large ({e.text})",
                                      "request_too_large"))  # fmt: skip
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return _response(ApiError(e.status, e.reason, "http_error"))
        except ConnectionError:
            raise  # the client went away: nobody to answer
        except Exception:  # our bug: logged, and still OpenAI's shape, without the details
            log.exception("fusion serve: %s %s failed", request.method, request.path)
            return _response(ApiError(500, "internal error (the server's log has the details)",
                                      "internal_error"))  # fmt: skip

    return middleware
