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


@pytest.mark.parametrize("value", ["soon", "", "  ", "nan", "1,5", "Mon, 99 Foo 2024 25:61:00 GMT"])
def test_a_garbage_retry_after_is_ignored_not_raised(value):
    assert wire.retry_after({"Retry-After": value}) is None
    assert wire.retry_after({"retry-after-ms": value, "Retry-After": "2"}) == 2.0


def test_retry_after_dates_and_seconds_are_capped_alike():
    later = email.utils.formatdate(time.time() + 3600, usegmt=True)
    assert wire.retry_after({"Retry-After": later}) == wire.MAX_RETRY_AFTER_S
    assert wire.retry_after({"Retry-After": "3600"}) == wire.MAX_RETRY_AFTER_S
    assert wire.retry_after({"Retry-After": "inf"}) == wire.MAX_RETRY_AFTER_S
    past = email.utils.formatdate(time.time() - 3600, usegmt=True)
    assert wire.retry_after({"Retry-After": past}) == 0.0
    assert wire.retry_after({"Retry-After": "-3"}) == 0.0
    naive = "Wed, 21 Oct 2015 07:28:00 -0000"  # no zone: read as UTC, long past
    assert wire.retry_after({"Retry-After": naive}) == 0.0


@pytest.mark.parametrize("count", ["many", True, -1, float("nan"), float("inf"), [3], {"n": 1}])
def test_usage_counts_that_are_not_counts_are_a_bad_response(count):
    with pytest.raises(wire.BadResponse, match="usage.completion_tokens"):
        wire.tokens({"prompt_tokens": 3, "completion_tokens": count})
    assert wire.tokens({"prompt_tokens": "12", "completion_tokens": 4.0}) == (12, 4)


def test_a_delta_or_message_that_is_not_an_object_is_a_bad_response():
    with pytest.raises(wire.BadResponse, match="delta"):
        wire.parse_chunk('{"choices": [{"delta": "hi"}]}')
    with pytest.raises(wire.BadResponse, match="message"):
        wire.parse_completion('{"choices": [{"message": ["hi"]}]}')


@pytest.mark.parametrize("name, secret", [
    ("OPENROUTER_API_KEY", False), ("HF_TOKEN", False), ("hf_token", False),
    ("GROQ_API_KEY", False), ("AZURE_OPENAI_API_KEY_PRODUCTION_EASTUS2", False),
    ("hf_cache_directory_x", False), ("FUSION_SERVER_TOKEN", False), ("K", False), ("", False),
    ("hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567", True),
    ("gsk_" + "a1B2" * 13, True), ("sk-or-v1-" + "0f" * 32, True), ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", True),
    ("AKIAIOSFODNN7EXAMPLE", True), ("3f9a1c0e7b2d4f6a8c0e1b3d5f7a9c2e", True),
    ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", True), ("abcdefghijklmnopqrstuvwxyzabcdefgh", True),
])  # fmt: skip
def test_key_shaped_names_are_told_from_variable_names(name, secret):
    from mlxtune.keys import looks_like_secret

    assert looks_like_secret(name) is secret


@pytest.mark.parametrize("reported", [True, float("nan"), float("inf"), -1.0, "0.5", [1]])
def test_a_cost_that_is_not_a_cost_gives_way_to_the_price_table(reported):
    ep = EndpointConfig(base_url="http://h/v1", model="m", input_price=1.0, output_price=1.0)
    usage = {"prompt_tokens": 500_000, "completion_tokens": 500_000, "cost": reported}
    assert wire.cost(usage, ep) == (1.0, "price table")
