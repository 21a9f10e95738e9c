"""The async client: one aiohttp session, per-call deadlines and retries, quorum fan-out.

    async with FusionClient(config) as client:
        result = await client.run(messages, mode="merge")

`call()` makes one streamed request and always returns a `Call` (an answer or a typed failure),
never raises for what an endpoint does: a body, delta or usage count that is not the wire format,
or a response aiohttp cannot parse, is that call's `bad-response`, never the fusion's. Its
deadlines: connect, first *content* token (SSE comments are keep-alives, not progress) and
total, retries included. It retries only 408, 429, 5xx, empty answers and connection errors,
waiting `Retry-After` (seconds or an HTTP date, or `retry-after-ms`; at most 60 s; an unreadable
one is ignored) when given, else 0.5 s x 2^n capped at 8 s with jitter; never 400/401/403, and
never once content has streamed (a broken stream is a `partial` failure: its text is not an
answer). An `api_key_env` shaped like a key is refused and never shown. With
`hedge_after_s`, a second identical request starts if the first has no content by then, and
whichever streams first wins.

`gather()` runs calls in parallel and returns once `quorum` of them have answered and `grace_s`
more has passed; the rest are cancelled and marked `late`.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from mlxtune.config import Config, EndpointConfig, FusionConfig

from . import wire
from .result import Call, FusionResult

OnText = Callable[[str], None]
MAX_BACKOFF_S = 8.0


@dataclass
class _Stream:
    """What one attempt has received so far."""

    text: str = ""
    usage: dict | None = None
    first_token: float | None = None  # loop time of the first content token
    status: int | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)


class _Failed(Exception):
    def __init__(self, reason: str, message: str, status: int | None = None,
                 retry: bool = False, wait: float | None = None):  # fmt: skip
        super().__init__(message)
        self.reason, self.message, self.status, self.retry, self.wait = (
            reason, message, status, retry, wait)  # fmt: skip


class FusionClient:
    def __init__(self, config: Config | FusionConfig, depth: int = 0):
        self.cfg = config.fusion if isinstance(config, Config) else config
        self.depth = depth  # how many fusions this request already went through
        self._session: aiohttp.ClientSession | None = None
        self._rng = random.Random(self.cfg.seed)

    async def __aenter__(self) -> FusionClient:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=self.cfg.max_per_host)
        self._session = aiohttp.ClientSession(connector=connector,
                                              timeout=aiohttp.ClientTimeout(total=None))  # fmt: skip
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self, messages: list[dict], mode: str | None = None,
                  on_text: OnText | None = None) -> FusionResult:  # fmt: skip
        """The pool answers, the judge combines; the final answer streams to `on_text`."""
        from .modes import MODES

        return await MODES[mode or self.cfg.mode](self, messages, on_text)

    # ------------------------------------------------------------------------------ fan-out

    async def gather(self, jobs: list[tuple[EndpointConfig, list[dict], float | None, str]],
                     round: int = 0, quorum: int | None = None) -> list[Call]:  # fmt: skip
        """Run (endpoint, messages, temperature, member label) jobs in parallel, in job order."""
        started = time.perf_counter()
        tasks = [asyncio.create_task(self.call(ep, msgs, round=round, temperature=t, label=name))
                 for ep, msgs, t, name in jobs]  # fmt: skip
        need = min(quorum or len(tasks), len(tasks))
        pending, answered = set(tasks), 0
        while pending and answered < need:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            answered += sum(t.result().ok for t in done)
        if pending and self.cfg.grace_s > 0:
            _, pending = await asyncio.wait(pending, timeout=self.cfg.grace_s)
        for task in pending:
            task.cancel()
        out = []
        for task, (ep, _, _, name) in zip(tasks, jobs, strict=True):
            if task in pending:
                late = time.perf_counter() - started
                out.append(Call(name, ep.model, "late", "late", "cancelled after the quorum",
                                total_s=late, round=round))  # fmt: skip
            else:
                out.append(task.result())
        await asyncio.gather(*pending, return_exceptions=True)
        return out

    # ----------------------------------------------------------------------------- one call

    async def call(self, ep: EndpointConfig, messages: list[dict], round: int = 0,
                   temperature: float | None = None, on_text: OnText | None = None,
                   label: str | None = None) -> Call:  # fmt: skip
        call = Call(label or ep.label, ep.model, round=round)
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + ep.timeout_s
        key = os.environ.get(ep.api_key_env) if ep.api_key_env else None
        if ep.api_key_env and not key:
            return self._fail(
                call, start, "auth", f"environment variable {ep.api_key_env} is not set"
            )
        body = wire.payload(ep, messages, stream=True, temperature=temperature)
        headers = wire.headers(ep, key, self.depth, self.cfg.app_url, self.cfg.app_title)
        secrets = [key] if key else []
        while True:
            call.attempts += 1
            try:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                got = await asyncio.wait_for(self._hedged(ep, body, headers, on_text), remaining)
                return self._done(call, start, got, ep)
            except wire.BadResponse as e:  # the usage object: a bad field fails this call only
                return self._fail(call, start, "bad-response", wire.redact(str(e), secrets))
            except _Failed as f:
                message = wire.redact(f.message, secrets)
                wait = self._backoff(call.attempts, f.wait)
                if not (f.retry and call.attempts <= ep.max_retries and
                        loop.time() + wait < deadline):  # fmt: skip
                    call.http_status = f.status
                    return self._fail(call, start, f.reason, message)
                await asyncio.sleep(wait)
            except asyncio.TimeoutError:
                return self._fail(
                    call, start, "timeout", f"no complete answer in {ep.timeout_s:g} s"
                )

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:  # already read and capped by wire.retry_after
            return retry_after
        return min(0.5 * 2 ** (attempt - 1), MAX_BACKOFF_S) * self._rng.uniform(0.75, 1.0)

    def _done(self, call: Call, start: float, got: _Stream, ep: EndpointConfig) -> Call:
        call.prompt_tokens, call.completion_tokens = wire.tokens(got.usage)  # may raise first
        call.cost, call.cost_source = wire.cost(got.usage, ep)
        call.text = got.text
        call.http_status = got.status
        call.total_s = asyncio.get_running_loop().time() - start
        call.first_token_s = None if got.first_token is None else got.first_token - start
        return call

    @staticmethod
    def _fail(call: Call, start: float, reason: str, message: str) -> Call:
        call.status, call.reason, call.error = "failed", reason, message.splitlines()[0][:300]
        call.total_s = asyncio.get_running_loop().time() - start
        return call

    async def _hedged(self, ep: EndpointConfig, body: dict, headers: dict,
                      on_text: OnText | None) -> _Stream:  # fmt: skip
        """One attempt; with hedging, two racing ones: the first to stream content wins, and its
        text is passed on in one piece when it is complete."""
        if ep.hedge_after_s is None:
            return await self._stream(ep, body, headers, _Stream(), on_text)
        first = _Stream()
        primary = asyncio.create_task(self._stream(ep, body, headers, first, None))
        racers, winner = {primary: first}, None
        try:
            winner = await _first_to_stream(racers, ep.hedge_after_s)
            if winner is None:  # nothing yet: hedge
                second = _Stream()
                racers[asyncio.create_task(self._stream(ep, body, headers, second, None))] = second
                winner = await _first_to_stream(racers, None) or primary
            got = await winner
        finally:
            for task in racers:
                if task is not winner:
                    task.cancel()
        if on_text is not None and got.text:
            on_text(got.text)
        return got

    async def _stream(self, ep: EndpointConfig, body: dict, headers: dict, got: _Stream,
                      on_text: OnText | None) -> _Stream:  # fmt: skip
        loop = asyncio.get_running_loop()
        first_deadline = loop.time() + ep.first_token_s
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=ep.connect_timeout_s)
        assert self._session is not None, "use `async with FusionClient(...)`"
        try:
            async with self._session.post(wire.chat_url(ep.base_url), json=body, headers=headers,
                                          timeout=timeout) as resp:  # fmt: skip
                got.status = resp.status
                if resp.status != 200:
                    raw = await resp.read()
                    message, _ = wire.error_of(resp.status, raw)
                    wait = wire.retry_after(resp.headers)
                    raise _Failed(_reason(resp.status), f"HTTP {resp.status}: {message}",
                                  resp.status, wire.retryable(resp.status, wait), wait)  # fmt: skip
                if "text/event-stream" not in resp.headers.get("Content-Type", ""):
                    raw = await asyncio.wait_for(resp.read(), first_deadline - loop.time())
                    _take(got, wire.parse_completion(raw), loop, on_text)
                else:
                    await self._events(resp, got, first_deadline, loop, on_text)
        except (aiohttp.ServerTimeoutError, aiohttp.ClientConnectorError) as e:
            kind = "connect-timeout" if isinstance(e, aiohttp.ServerTimeoutError) else "connection"
            raise _Failed(kind, f"{kind}: {_text(e)}", retry=True) from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError,
                aiohttp.ServerDisconnectedError) as e:  # fmt: skip
            if got.text:
                raise _Failed("partial", f"the stream broke after content: {_text(e)}") from None
            raise _Failed("connection", f"connection lost: {_text(e)}", retry=True) from None
        except (wire.BadResponse, aiohttp.ClientError) as e:  # e.g. a malformed status line
            raise _Failed("partial" if got.text else "bad-response", _text(e)) from None
        except asyncio.TimeoutError:
            if got.first_token is None:
                raise _Failed("first-token-timeout",
                              f"no content token in {ep.first_token_s:g} s") from None  # fmt: skip
            raise
        if not got.text:
            raise _Failed("empty", "the answer is empty", got.status, retry=True)
        return got

    @staticmethod
    async def _events(resp, got: _Stream, first_deadline: float, loop, on_text) -> None:
        parser = wire.SSEParser()
        while True:
            if got.first_token is None:  # keep-alive comments do not move this deadline
                chunk = await asyncio.wait_for(resp.content.readany(),
                                               max(first_deadline - loop.time(), 0))  # fmt: skip
            else:
                chunk = await resp.content.readany()
            if not chunk:
                return
            for event in parser.feed(chunk):
                piece = wire.parse_chunk(event.data)
                if piece.done:
                    return
                _take(got, piece, loop, on_text)


def _take(got: _Stream, piece: wire.Chunk, loop, on_text: OnText | None) -> None:
    if piece.error is not None:
        code = piece.error.get("code")
        message = f"error in the stream: {piece.error.get('message') or code}"
        if got.text:
            raise _Failed("partial", message)
        status = code if isinstance(code, int) else 500
        raise _Failed(_reason(status), message, status, wire.retryable(status, None))
    if piece.content:
        if got.first_token is None:
            got.first_token = loop.time()
            got.started.set()
        got.text += piece.content
        if on_text is not None:
            on_text(piece.content)
    if piece.usage:
        got.usage = piece.usage
    if piece.finish_reason == "error":
        raise _Failed("partial" if got.text else "server-error", "the stream ended in an error")


async def _first_to_stream(racers: dict[asyncio.Task, _Stream], timeout: float | None):
    """The racer that streamed content (or finished well) first; None if none did in time.
    A racer that fails leaves the race; when all have failed, the first one is returned."""
    waits = {asyncio.create_task(s.started.wait()): t for t, s in racers.items()}
    pending: set = set(racers) | set(waits)
    loop = asyncio.get_running_loop()
    end = None if timeout is None else loop.time() + timeout
    try:
        while pending:
            left = None if end is None else max(end - loop.time(), 0)
            done, pending = await asyncio.wait(pending, timeout=left,
                                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if not done:
                return None
            for d in done:
                if d in waits:
                    return waits[d]
                if not d.cancelled() and d.exception() is None:
                    return d
            if all(t.done() for t in racers):
                return next(iter(racers))
        return next(iter(racers))
    finally:
        for w in waits:
            w.cancel()


def _reason(status: int) -> str:
    if status == 429:
        return "rate-limited"
    if status in (401, 402):
        return "auth"
    if status == 403:
        return "refused"
    if status >= 500:
        return "server-error"
    return "http-error"


def _text(e: BaseException) -> str:
    return (str(e) or type(e).__name__).splitlines()[0][:200]
