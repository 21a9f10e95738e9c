"""One call against real loopback servers playing providers: retries, deadlines, faults."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time

import pytest
from _providers import Providers, Reply

from fusion.client import FusionClient
from mlxtune.config import EndpointConfig, FusionConfig, load_config
from mlxtune.errors import ConfigError

HI = [{"role": "user", "content": "hi"}]


def endpoint(url: str, **kw) -> EndpointConfig:
    return EndpointConfig(name=kw.pop("name", "m"), base_url=url, model="model-x", **kw)


def call(script, **kw):
    """(the Call, seconds it took, the requests the provider saw)."""

    async def go():
        async with Providers() as p, FusionClient(FusionConfig()) as client:
            url = p.add("p", script)
            start = time.perf_counter()
            result = await client.call(endpoint(url, **kw), HI)
            return result, time.perf_counter() - start, p.requests["p"]

    return asyncio.run(go())


def test_a_plain_streamed_answer_with_usage_and_cost():
    c, _, seen = call(Reply("The answer is 42.", chunks=5, cost=0.0012))
    assert (c.status, c.text, c.attempts) == ("ok", "The answer is 42.", 1)
    assert (c.prompt_tokens, c.completion_tokens, c.cost, c.cost_source) == (10, 5, 0.0012,
                                                                             "provider")  # fmt: skip
    assert c.first_token_s is not None and c.first_token_s <= c.total_s
    assert seen[0]["body"]["max_tokens"] == 1024 and seen[0]["body"]["stream"] is True


def test_crlf_events_and_keepalive_comments_are_read():
    c, _, _ = call(Reply("fine", crlf=True, keepalive=0.2))
    assert c.ok and c.text == "fine" and c.first_token_s >= 0.2


def test_429_waits_for_retry_after_then_succeeds():
    c, seconds, seen = call([Reply(status=429, retry_after=0.4), Reply("ok")])
    assert c.ok and c.attempts == 2 and len(seen) == 2
    assert seconds >= 0.4


@pytest.mark.parametrize("status", [500, 502, 503, 408])
def test_server_errors_are_retried_with_backoff(status):
    c, seconds, seen = call([Reply(status=status), Reply(status=status), Reply("ok")])
    assert c.ok and c.attempts == 3 and len(seen) == 3
    assert seconds >= 0.5 * 0.75 + 1.0 * 0.75  # two backoffs: 0.5 s and 1 s, less jitter


def test_retries_stop_at_max_retries_with_a_typed_reason():
    c, _, seen = call(Reply(status=503), max_retries=1)
    assert (c.status, c.reason, c.http_status, len(seen)) == ("failed", "server-error", 503, 2)
    assert "HTTP 503" in c.error


@pytest.mark.parametrize("status, reason", [(400, "http-error"), (401, "auth"), (403, "refused")])
def test_client_errors_are_never_retried(status, reason):
    c, _, seen = call(Reply(status=status))
    assert (c.status, c.reason, c.attempts, len(seen)) == ("failed", reason, 1, 1)


def test_a_retry_after_past_the_deadline_is_not_waited_for():
    c, seconds, _ = call(Reply(status=429, retry_after=30), timeout_s=2)
    assert c.reason == "rate-limited" and seconds < 1


def test_keepalive_comments_do_not_count_as_a_first_token():
    c, seconds, _ = call(Reply("late", keepalive=3.0), first_token_s=0.5, max_retries=0)
    assert (c.status, c.reason) == ("failed", "first-token-timeout")
    assert 0.5 <= seconds < 1.5


def test_the_total_deadline_holds_while_content_trickles():
    c, seconds, _ = call(Reply("x" * 50, chunks=50, chunk_delay=0.1), timeout_s=1.0)
    assert (c.status, c.reason) == ("failed", "timeout") and seconds < 1.5


def test_malformed_json_is_a_bad_response_and_mid_stream_errors_are_partial():
    c, _, _ = call(Reply("abcdef", chunks=6, malformed=True))
    assert (c.status, c.reason) == ("failed", "partial")  # content had streamed: not an answer
    c, _, seen = call(Reply("abcdef", chunks=1, malformed=True))
    assert (c.status, c.reason, len(seen)) == ("failed", "bad-response", 1)
    c, _, seen = call(Reply("abcdef", chunks=6, error_after=2))
    assert (c.status, c.reason, len(seen)) == ("failed", "partial", 1)  # never retried
    assert "provider died" in c.error


def test_an_error_event_before_any_content_is_retried():
    c, _, seen = call([Reply("abc", error_after=0), Reply("ok")])
    assert c.ok and len(seen) == 2


def test_connection_reset_is_retried_and_refused_connections_fail_typed():
    c, _, seen = call([Reply(reset=True), Reply("ok")])
    assert c.ok and len(seen) == 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes

    async def go():
        async with FusionClient(FusionConfig()) as client:
            return await client.call(endpoint(f"http://127.0.0.1:{port}/v1", max_retries=1), HI)

    c = asyncio.run(go())
    assert (c.status, c.reason, c.attempts) == ("failed", "connection", 2)


def test_an_empty_answer_is_retried_once_then_reported():
    c, _, seen = call(Reply(""), max_retries=1)
    assert (c.status, c.reason, len(seen)) == ("failed", "empty", 2)


def test_a_hedge_wins_when_the_first_request_stalls():
    c, seconds, seen = call([Reply("slow", delay=3.0), Reply("fast")], hedge_after_s=0.3)
    assert c.ok and c.text == "fast" and len(seen) == 2 and seconds < 1.5


def test_the_key_comes_from_the_environment_and_never_shows(monkeypatch):
    monkeypatch.setenv("FUSION_TEST_KEY", "sk-very-secret-value")

    def echo_key(body):
        return Reply(
            status=401, error_body='{"error": {"message": "bad key sk-very-secret-value"}}'
        )

    c, _, seen = call(echo_key, api_key_env="FUSION_TEST_KEY")
    assert seen[0]["headers"]["Authorization"] == "Bearer sk-very-secret-value"
    assert c.reason == "auth" and "sk-very-secret-value" not in c.error and "[redacted]" in c.error
    monkeypatch.delenv("FUSION_TEST_KEY")
    c, _, seen = call(Reply("x"), api_key_env="FUSION_TEST_KEY")
    assert c.reason == "auth" and "FUSION_TEST_KEY is not set" in c.error and not seen


@pytest.mark.parametrize("value", ["soon", "Mon, 99 Foo 2024 25:61:00 GMT", "nan"])
def test_a_garbage_retry_after_falls_back_to_the_normal_backoff(value):
    c, seconds, seen = call([Reply(status=429, headers={"Retry-After": value}), Reply("ok")])
    assert c.ok and c.attempts == 2 and len(seen) == 2
    assert 0.5 * 0.75 <= seconds < 2.0  # the first backoff step, not a wait read from the header


def test_an_http_date_retry_after_is_honoured():
    date = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: waits 1 to 2 s
    c, seconds, seen = call([Reply(status=503, headers={"Retry-After": date}), Reply("ok")])
    assert c.ok and c.attempts == 2 and seconds >= 1.0


def test_usage_counts_that_are_not_numbers_fail_that_call_typed():
    c, _, seen = call(Reply("fine", usage={"prompt_tokens": "lots", "completion_tokens": 5}))
    assert (c.status, c.reason, len(seen)) == ("failed", "bad-response", 1)
    assert "usage.prompt_tokens" in c.error and c.tokens == 0


def test_a_key_shaped_api_key_env_is_refused_and_never_shown():
    """A key pasted where a variable's name belongs is refused by the schema, before any call,
    and the message names the key, never the value (neither from YAML nor from --set)."""
    shaped = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567"  # a valid identifier, shaped like a token
    with pytest.raises(ConfigError) as refused:
        load_config(
            None, [f"fusion.pool=[{{base_url: 'http://x', model: m, api_key_env: {shaped}}}]"]
        )
    assert "api_key_env" in str(refused.value) and shaped not in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        load_config(None, [f"fusion.server_token_env={shaped}"])
    assert "(not shown)" in str(refused.value) and shaped not in str(refused.value)


def test_a_response_aiohttp_cannot_parse_fails_that_call_typed():
    c, _, seen = call(Reply("ok", headers={"X-Padding": "a" * 9000}))  # over aiohttp's 8190
    assert (c.status, c.reason, len(seen)) == ("failed", "bad-response", 1)
