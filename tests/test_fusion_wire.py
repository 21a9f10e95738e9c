"""The pure wire code: SSE parsing, chunk decoding, Retry-After, retry rules, headers, cost."""

from __future__ import annotations

import email.utils
import time

import pytest

from fusion import wire
from mlxtune.config import EndpointConfig


def events(*chunks: bytes) -> list[wire.Event]:
    parser = wire.SSEParser()
    return [e for c in chunks for e in parser.feed(c)]


def test_sse_comments_crlf_multiline_and_split_chunks():
    got = events(b": OPENROUTER PROCESSING\r\n\r\n", b"data: {\"a\":", b" 1}\r", b"\n\r\n",
                 b"event: x\ndata: line one\ndata: line two\n\n", b"data:no-space\n\n",
                 b"data: [DONE]\n\n")  # fmt: skip
    assert [(e.event, e.data) for e in got] == [
        ("message", '{"a": 1}'),
        ("x", "line one\nline two"),
        ("message", "no-space"),
        ("message", "[DONE]"),
    ]


def test_sse_lone_cr_line_ends_and_unfinished_event_waits():
    parser = wire.SSEParser()
    assert parser.feed(b"data: a\r\rdata: b") == [wire.Event("a")]
    assert parser.feed(b"\r\r") == [wire.Event("b")]
    assert events(b": only a comment\n\n", b"id: 7\nretry: 100\n\n") == []


def test_sse_multibyte_character_split_across_chunks():
    snowman = "data: \u2603\n\n".encode()
    assert events(snowman[:7], snowman[7:]) == [wire.Event("\u2603")]


def test_chunks_content_usage_done_and_mid_stream_error():
    c = wire.parse_chunk('{"choices": [{"delta": {"content": "hi"}}], "usage": {"cost": 0.5}}')
    assert (c.content, c.usage, c.error) == ("hi", {"cost": 0.5}, None)
    assert wire.parse_chunk("[DONE]").done
    err = wire.parse_chunk('{"error": {"code": 502, "message": "down"}, "choices": '
                           '[{"delta": {"content": ""}, "finish_reason": "error"}]}')  # fmt: skip
    assert err.error["code"] == 502 and err.finish_reason == "error"
    for bad in (
        "{not json",
        "[1, 2]",
        '{"choices": 3}',
        '{"choices": [{"delta": {"content": 5}}]}',
    ):
        with pytest.raises(wire.BadResponse):
            wire.parse_chunk(bad)


def test_error_bodies_of_any_shape():
    assert wire.error_of(429, b'{"error": {"message": "slow down", "code": 429}}')[0] == "slow down"
    assert wire.error_of(500, b"<html>Bad Gateway</html>")[0] == "<html>Bad Gateway</html>"
    assert wire.error_of(503, b"")[0] == "HTTP 503"
    assert wire.error_of(400, b'{"error": "plain string"}')[0] == "plain string"


def test_retry_after_seconds_milliseconds_and_dates():
    assert wire.retry_after({"Retry-After": "2"}) == 2.0
    assert wire.retry_after({"retry-after-ms": "1500", "Retry-After": "9"}) == 1.5
    assert wire.retry_after({}) is None
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < wire.retry_after({"Retry-After": date}) <= 30


@pytest.mark.parametrize("status, wait, retry", [
    (408, None, True), (429, None, True), (500, None, True), (502, None, True),
    (503, 2.0, True), (400, None, False), (401, None, False), (403, None, False),
    (404, None, False), (402, None, False), (402, 1.0, True),
])  # fmt: skip
def test_which_statuses_are_retried(status, wait, retry):
    assert wire.retryable(status, wait) is retry


def test_payload_always_sends_max_tokens_and_temperature():
    ep = EndpointConfig(base_url="http://127.0.0.1:8080/v1", model="m", max_tokens=77)
    body = wire.payload(ep, [{"role": "user", "content": "hi"}])
    assert body["max_tokens"] == 77 and body["temperature"] == 0.7 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and "usage" not in body
    router = EndpointConfig(base_url="https://openrouter.ai/api/v1", model="m")
    assert wire.payload(router, [], temperature=0.0)["usage"] == {"include": True}


def test_attribution_goes_to_openrouter_only_and_depth_is_always_sent():
    local = EndpointConfig(base_url="http://localhost:11434/v1", model="llama3")
    router = EndpointConfig(base_url="https://openrouter.ai/api/v1", model="x/y")
    h = wire.headers(local, None, 0, "https://app.example", "mlxtune")
    assert "HTTP-Referer" not in h and "X-Title" not in h and "Authorization" not in h
    assert h[wire.DEPTH_HEADER] == "1"
    h = wire.headers(router, "sk-secret", 1, "https://app.example", "mlxtune")
    assert h["HTTP-Referer"] == "https://app.example" and h["X-Title"] == "mlxtune"
    assert h["Authorization"] == "Bearer sk-secret" and h[wire.DEPTH_HEADER] == "2"
    forced = EndpointConfig(base_url="http://localhost:1/v1", model="m", attribution=True)
    assert wire.headers(forced, None, 0, None, "t")["X-Title"] == "t"


def test_cost_from_the_provider_or_the_price_table():
    ep = EndpointConfig(base_url="http://h/v1", model="m", input_price=2.0, output_price=6.0)
    assert wire.cost({"cost": 0.25, "prompt_tokens": 9}, ep) == (0.25, "provider")
    usage = {"prompt_tokens": 1_000, "completion_tokens": 500}
    assert wire.cost(usage, ep) == pytest.approx((0.005, "price table"))
    bare = EndpointConfig(base_url="http://h/v1", model="m")
    assert wire.cost(usage, bare) == (None, "unknown")
    assert wire.tokens(usage) == (1_000, 500) and wire.tokens(None) == (0, 0)


def test_keys_are_redacted():
    assert wire.redact("bad key sk-abc123 rejected", ["sk-abc123"]) == "bad key [redacted] rejected"
