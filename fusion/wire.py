"""The wire: request payloads and headers, the SSE parser, response, usage and error decoding.

Pure functions and one small parser class: no I/O, no asyncio, so every rule here is tested on
bytes. The SSE parser follows the WHATWG event-stream rules: lines end in CRLF, LF or CR (split
anywhere across network chunks), lines starting with ':' are comments (OpenRouter's
`: OPENROUTER PROCESSING` keep-alives), several `data:` lines join with '\\n', an empty line ends
an event, and a field name without a colon has an empty value.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from dataclasses import dataclass
from datetime import timezone
from urllib.parse import urlparse

from mlxtune.config import EndpointConfig

DEPTH_HEADER = "X-Mlxtune-Fusion-Depth"  # sent on every member call: a fusion never calls itself
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is not waited for


class BadResponse(ValueError):
    """The endpoint answered something that is not the OpenAI wire format."""


def chat_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/chat/completions"


def is_openrouter(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host == "openrouter.ai" or host.endswith(".openrouter.ai")


def payload(ep: EndpointConfig, messages: list[dict], stream: bool = True,
            temperature: float | None = None) -> dict:  # fmt: skip
    """The request body. max_tokens and temperature are always sent: mlx_lm.server's defaults
    (512 tokens, temperature 0) would otherwise apply silently."""
    body = {
        "model": ep.model,
        "messages": messages,
        "max_tokens": ep.max_tokens,
        "temperature": ep.temperature if temperature is None else temperature,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if is_openrouter(ep.base_url):
        body["usage"] = {"include": True}  # older OpenRouter copies need it; harmless otherwise
    return body


def headers(ep: EndpointConfig, key: str | None, depth: int, app_url: str | None = None,
            app_title: str | None = None) -> dict[str, str]:  # fmt: skip
    out = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
    out |= ep.headers
    if key:
        out["Authorization"] = f"Bearer {key}"
    attribution = ep.attribution if ep.attribution is not None else is_openrouter(ep.base_url)
    if attribution:
        if app_url:
            out["HTTP-Referer"] = app_url
        if app_title:
            out["X-Title"] = out["X-OpenRouter-Title"] = app_title
    out[DEPTH_HEADER] = str(depth + 1)
    return out


@dataclass(frozen=True)
class Event:
    data: str
    event: str = "message"


class SSEParser:
    """Incremental event-stream parser: feed() bytes as they arrive, get whole events back."""

    def __init__(self) -> None:
        self._buffer = ""
        self._pending_cr = False
        self._data: list[str] = []
        self._event = ""
        self._decoder = _utf8_decoder()

    def feed(self, chunk: bytes) -> list[Event]:
        text = self._decoder.decode(chunk)
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]  # the LF of a CRLF split across chunks
        self._pending_cr = text.endswith("\r")
        self._buffer += text
        lines = self._buffer.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._buffer = lines.pop()  # an unfinished line waits for the next chunk
        events = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> Event | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = Event("\n".join(self._data), self._event or "message")
            self._data, self._event = [], ""
            return event
        if line.startswith(":"):
            return None  # a comment: keep-alive, not progress
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None  # id, retry and unknown fields change nothing here


def _utf8_decoder():
    import codecs

    return codecs.getincrementaldecoder("utf-8")(errors="replace")


@dataclass(frozen=True)
class Chunk:
    """One streamed chunk (or a whole response) reduced to what fusion needs."""

    content: str = ""
    usage: dict | None = None
    error: dict | None = None  # a top-level error object, mid-stream with HTTP 200
    finish_reason: str | None = None
    done: bool = False  # the [DONE] sentinel
    provider: str | None = None


def parse_chunk(data: str) -> Chunk:
    """A `data:` payload of a streamed chat completion."""
    if data.strip() == "[DONE]":
        return Chunk(done=True)
    obj = _json(data)
    choice = _first_choice(obj)
    delta = _object(choice.get("delta") or choice.get("message") or {}, "delta")
    content = delta.get("content") or ""
    if not isinstance(content, str):
        raise BadResponse(f"delta.content is {type(content).__name__}, not a string")
    return Chunk(content, _usage(obj), _error(obj), choice.get("finish_reason"),
                 provider=obj.get("provider"))  # fmt: skip


def parse_completion(body: bytes | str) -> Chunk:
    """A whole (non-streamed) chat completion."""
    obj = _json(body)
    message = _object(_first_choice(obj).get("message") or {}, "message")
    content = message.get("content") or ""
    if not isinstance(content, str):
        raise BadResponse("message.content is not a string")
    return Chunk(content, _usage(obj), _error(obj), _first_choice(obj).get("finish_reason"),
                 provider=obj.get("provider"))  # fmt: skip


def _json(data: bytes | str) -> dict:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadResponse(f"malformed JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(obj, dict):
        raise BadResponse(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _first_choice(obj: dict) -> dict:
    choices = obj.get("choices") or []
    if not isinstance(choices, list) or (choices and not isinstance(choices[0], dict)):
        raise BadResponse("choices is not a list of objects")
    return choices[0] if choices else {}


def _object(value, name: str) -> dict:
    if not isinstance(value, dict):
        raise BadResponse(f"{name} is {type(value).__name__}, not an object")
    return value


def _usage(obj: dict) -> dict | None:
    usage = obj.get("usage")
    return usage if isinstance(usage, dict) else None


def _error(obj: dict) -> dict | None:
    error = obj.get("error")
    if error is None:
        return None
    return error if isinstance(error, dict) else {"message": str(error)}


def error_of(status: int, body: bytes) -> tuple[str, dict]:
    """(message, metadata) of an error response, whatever shape its body has."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace").strip().splitlines()
        return (text[0][:200] if text else f"HTTP {status}"), {}
    error = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or f"HTTP {status}")[:500], error.get("metadata") or {}
    if isinstance(error, str):
        return error[:500], {}
    return f"HTTP {status}", {}


def retry_after(headers) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date), capped
    at MAX_RETRY_AFTER_S; None when absent or unreadable (garbage means the normal backoff)."""
    ms = _seconds(headers.get("retry-after-ms"))
    if ms is not None:
        return min(max(ms / 1000.0, 0.0), MAX_RETRY_AFTER_S)
    value = headers.get("Retry-After")
    seconds = _seconds(value)
    if seconds is None and value:
        try:
            when = email.utils.parsedate_to_datetime(value)
            if when.tzinfo is None:  # "-0000": UTC by RFC 5322
                when = when.replace(tzinfo=timezone.utc)
            seconds = when.timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return None if seconds is None else min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _seconds(value) -> float | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(seconds) else seconds


def retryable(status: int, wait: float | None) -> bool:
    """408, 429 and 5xx are worth another try; 400/401/403 never; 402 only when told when."""
    if status == 402:
        return wait is not None
    return status in RETRY_STATUSES or status >= 500


def tokens(usage: dict | None) -> tuple[int, int]:
    """(prompt, completion) tokens of a usage object (0 when absent)."""
    if not usage:
        return 0, 0
    return _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")


def _count(usage: dict, key: str) -> int:
    """A token count: a finite number or a digit string; anything else is BadResponse."""
    value = usage.get(key)
    if value is None:
        return 0
    try:
        if isinstance(value, bool):
            raise ValueError
        count = int(value)
    except (TypeError, ValueError, OverflowError):
        raise BadResponse(f"usage.{key} is {str(value)[:40]!r}, not a token count") from None
    if count < 0:
        raise BadResponse(f"usage.{key} is {count}, not a token count")
    return count


def cost(usage: dict | None, ep: EndpointConfig) -> tuple[float | None, str]:
    """(USD, where it came from): the provider's usage.cost, else the config's price table."""
    reported = usage.get("cost") if usage else None
    if is_number(reported) and reported >= 0:  # anything else: the price table decides
        return float(reported), "provider"
    if ep.input_price is None and ep.output_price is None:
        return None, "unknown"
    prompt, completion = tokens(usage)
    total = prompt * (ep.input_price or 0.0) + completion * (ep.output_price or 0.0)
    return total / 1e6, "price table"


def is_number(value) -> bool:
    """A finite int or float, not a bool (JSON's true is no count, NaN no cost)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def redact(text: str, secrets: list[str]) -> str:
    """Never let a key reach a message, a log or a trace, even echoed back by a server."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    return text
