"""What `fusion serve` accepts: one validator for a chat request, and OpenAI's error shape.

Pure: bytes and a header value in, a `ChatRequest` or an `ApiError` out, so every rule is
tested without a server. Anything malformed is a 400 (an unknown model: 404) whose `param`
names the field, e.g. `messages[1].content`; nothing a client sends reaches the fusion
unchecked. Sampling fields (`max_tokens`, `temperature`, ...) are type-checked but not used:
the pool's configured values apply. Fields this validator does not know are ignored, as
OpenAI's clients send many.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import wire

ROLES = ("system", "developer", "user", "assistant")
_COUNTS = ("max_tokens", "max_completion_tokens")  # positive integers
_NUMBERS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_UNSUPPORTED = ("tools", "functions")  # a fusion answers in text; it makes no tool calls


class ApiError(Exception):
    """An error response in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 retry_after: int | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after = retry_after

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}  # fmt: skip


@dataclass(frozen=True)
class ChatRequest:
    model: str  # the served id, e.g. "fusion-merge"
    mode: str
    messages: list[dict]
    stream: bool


def fusion_depth(value: str | None) -> int:
    """How many fusions a request already went through (the depth header; absent: 0)."""
    try:
        return int(value or 0)
    except ValueError:
        raise _invalid(wire.DEPTH_HEADER, f"expected an integer, got {_show(value)}",
                       "invalid_header") from None  # fmt: skip


def chat_request(raw: bytes, models: dict[str, str]) -> ChatRequest:
    """The body of POST /v1/chat/completions, checked field by field; `models`: id -> mode."""
    body = _json_object(raw)
    model = body.get("model", "fusion")
    if not isinstance(model, str):
        raise _invalid("model", f"expected a string, got {_show(model)}", "invalid_type")
    if model not in models:
        raise ApiError(404, f"model {model!r} not found; this server has {', '.join(models)}",
                       "model_not_found", "model")  # fmt: skip
    _options(body)
    return ChatRequest(model, models[model], _messages(body.get("messages")),
                       bool(body.get("stream")))  # fmt: skip


def _json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _invalid(None, f"the body is not UTF-8 ({e.reason} at byte {e.start})",
                       "invalid_json") from None  # fmt: skip
    except json.JSONDecodeError as e:
        raise _invalid(None, f"the body is not JSON ({e.msg} at char {e.pos})",
                       "invalid_json") from None  # fmt: skip
    except RecursionError:
        raise _invalid(None, "the body is nested too deeply", "invalid_json") from None
    if not isinstance(body, dict):
        raise _invalid(None, f"the body must be a JSON object, got {_kind(body)}", "invalid_json")
    return body


def _options(body: dict) -> None:
    _check(body, "stream", isinstance(body.get("stream"), bool), "a boolean")
    options = body.get("stream_options")
    _check(body, "stream_options", isinstance(options, dict), "an object")
    if isinstance(options, dict):
        _check(options, "include_usage", isinstance(options.get("include_usage"), bool),
               "a boolean", "stream_options.")  # fmt: skip
    for key in _COUNTS:
        value = body.get(key)
        _check(body, key, isinstance(value, int) and not isinstance(value, bool) and value >= 1,
               "a positive integer")  # fmt: skip
    for key in _NUMBERS:
        _check(body, key, wire.is_number(body.get(key)), "a number")
    _check(body, "seed", isinstance(body.get("seed"), int) and not isinstance(body["seed"], bool),
           "an integer")  # fmt: skip
    _check(body, "user", isinstance(body.get("user"), str), "a string")
    stop = body.get("stop")
    _check(body, "stop", isinstance(stop, str) or isinstance(stop, list) and
           all(isinstance(s, str) for s in stop), "a string or a list of strings")  # fmt: skip
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise _invalid("n", f"a fusion writes one answer; n must be 1, got {_show(body['n'])}",
                       "invalid_value")  # fmt: skip
    for key in _UNSUPPORTED:
        if body.get(key):
            raise _invalid(key, "not supported: a fusion answers in text, without tools",
                           "unsupported_parameter")  # fmt: skip


def _check(obj: dict, key: str, ok: bool, expected: str, prefix: str = "") -> None:
    """`obj[key]`, when given and not null, must be `expected` (`ok` says whether it is)."""
    if obj.get(key) is not None and not ok:
        raise _invalid(prefix + key, f"expected {expected}, got {_show(obj[key])}",
                       "invalid_type")  # fmt: skip


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "expected a non-empty list of {role, content} objects, got "
                       f"{_show(messages)}", "invalid_messages")  # fmt: skip
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(at, f"expected a {{role, content}} object, got {_show(message)}",
                           "invalid_messages")  # fmt: skip
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _invalid(f"{at}.role", f"expected one of {', '.join(ROLES)}, got "
                           f"{_show(role)}", "invalid_messages")  # fmt: skip
        _content(message.get("content"), f"{at}.content")
        if not isinstance(message.get("name", ""), str):
            raise _invalid(f"{at}.name", f"expected a string, got {_show(message['name'])}",
                           "invalid_messages")  # fmt: skip
    return messages


def _content(content, at: str) -> None:
    """A string, or a list of content parts ({"type": "text", "text": ...}, images, ...)."""
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _invalid(at, "expected a string or a list of content parts, got "
                       f"{_show(content)}", "invalid_messages")  # fmt: skip
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _invalid(f"{at}[{j}]", f"expected a content part with a type, got "
                           f"{_show(part)}", "invalid_messages")  # fmt: skip
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise _invalid(f"{at}[{j}].text", f"expected a string, got {_show(part.get('text'))}",
                           "invalid_messages")  # fmt: skip


def _invalid(param: str | None, message: str, code: str) -> ApiError:
    return ApiError(400, f"{param}: {message}" if param else message, code, param)


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")  # fmt: skip


def _show(value) -> str:
    """A value for a message: short, whatever the client sent."""
    if isinstance(value, dict | list):
        return _kind(value)
    text = repr(value) if isinstance(value, float) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
