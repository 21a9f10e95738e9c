"""`mlxtune fusion serve` under hostile or careless input: malformed requests, odd headers, a
public bind, key-shaped variable names, what clients may see of the members, and a judge that
fails mid-stream."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time

import pytest
from _providers import Providers, Reply
from test_fusion_server import (
    ASK,
    EXE,
    MERGED,
    mlxtune,
    providers_for,
    with_server,
    write_config,
)

from fusion import wire
from mlxtune.config import load_config
from mlxtune.errors import ConfigError

KEY_SHAPED = "gsk_" + "a1B2" * 13  # a valid variable name by the config's rule, yet a key
ANSWER = "Two and two make four."
MEMBER_TEXTS = ("Four, since two plus two", "It is 4 because addition", "model-a", "model-b")


def message(**fields) -> dict:
    return {"model": "fusion", "messages": [{"role": "user", "content": "hi"} | fields]}


BAD_REQUESTS = {  # name: (body bytes, extra headers, status, param)
    "not utf-8": (b'{"model": "fusion", "messages": [{"role": "user", "content": "\xff"}]}', {},
                  400, None),
    "not json": (b"{model: fusion", {}, 400, None),
    "deep nesting": (b"[" * 50_000 + b"]" * 50_000, {}, 400, None),
    "a list": (b"[]", {}, 400, None),
    "model a list": ({"model": ["fusion"], "messages": ASK}, {}, 400, "model"),
    "model a number": ({"model": 7, "messages": ASK}, {}, 400, "model"),
    "unknown model": ({"model": "gpt-9", "messages": ASK}, {}, 404, "model"),
    "no messages": ({"model": "fusion"}, {}, 400, "messages"),
    "messages a string": ({"model": "fusion", "messages": "hi"}, {}, 400, "messages"),
    "messages empty": ({"model": "fusion", "messages": []}, {}, 400, "messages"),
    "message a string": ({"model": "fusion", "messages": ["hi"]}, {}, 400, "messages[0]"),
    "role a number": (message(role=3), {}, 400, "messages[0].role"),
    "role unknown": (message(role="wizard"), {}, 400, "messages[0].role"),
    "role missing": ({"model": "fusion", "messages": [{"content": "hi"}]}, {}, 400,
                     "messages[0].role"),
    "content a number": (message(content=42), {}, 400, "messages[0].content"),
    "content missing": ({"model": "fusion", "messages": [{"role": "user"}]}, {}, 400,
                        "messages[0].content"),
    "part not an object": (message(content=["hi"]), {}, 400, "messages[0].content[0]"),
    "part text a number": (message(content=[{"type": "text", "text": 1}]), {}, 400,
                           "messages[0].content[0].text"),
    "name a number": (message(name=5), {}, 400, "messages[0].name"),
    "stream a string": ({"model": "fusion", "messages": ASK, "stream": "yes"}, {}, 400, "stream"),
    "max_tokens a string": ({"model": "fusion", "messages": ASK, "max_tokens": "9"}, {}, 400,
                            "max_tokens"),
    "max_tokens a bool": ({"model": "fusion", "messages": ASK, "max_tokens": True}, {}, 400,
                          "max_tokens"),
    "max_tokens zero": ({"model": "fusion", "messages": ASK, "max_tokens": 0}, {}, 400,
                        "max_tokens"),
    "temperature a string": ({"model": "fusion", "messages": ASK, "temperature": "hot"}, {}, 400,
                             "temperature"),
    "n of 2": ({"model": "fusion", "messages": ASK, "n": 2}, {}, 400, "n"),
    "stream_options a list": ({"model": "fusion", "messages": ASK, "stream_options": []}, {}, 400,
                              "stream_options"),
    "depth not an int": ({"model": "fusion", "messages": ASK}, {wire.DEPTH_HEADER: "deep"}, 400,
                         wire.DEPTH_HEADER),
}  # fmt: skip


def test_malformed_requests_get_openais_error_shape_and_the_server_keeps_serving(tmp_path):
    async def test(http, base, p):
        out = {}
        for name, (body, headers, _, _) in BAD_REQUESTS.items():
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            async with http.post(f"{base}/chat/completions", data=data,
                                 headers={"Content-Type": "application/json", **headers}) as r:  # fmt: skip
                out[name] = (r.status, r.content_type, await r.read())
        parts = {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]}
        fine = {"model": "fusion", "messages": [{"role": "system", "content": "Be brief."}, parts],
                "stream": False, "max_tokens": 50, "temperature": 0.2, "n": 1, "user": "u1"}  # fmt: skip
        async with http.post(f"{base}/chat/completions", json=fine) as r:
            return out, r.status, await r.json()

    out, status, body = with_server(tmp_path, test)
    for name, (_, _, want_status, want_param) in BAD_REQUESTS.items():
        got_status, ctype, raw = out[name]
        assert (got_status, ctype) == (want_status, "application/json"), (name, raw)
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert error["type"] == "invalid_request_error" and error["param"] == want_param, name
        assert isinstance(error["code"], str) and error["message"], name
    assert status == 200 and body["choices"][0]["message"]["content"] == ANSWER


async def _raw_post(base: str, headers: bytes, body: bytes) -> tuple[int, dict]:
    """A request written byte by byte: a client library would refuse a non-ASCII header."""
    host, port = base.split("//")[1].split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                 % (len(body), headers, body))  # fmt: skip
    raw = await reader.read()
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest) if rest.startswith(b"{") else {"raw": rest}


def test_a_non_ascii_authorization_header_is_401_not_500(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_SERVER_TOKEN", "tok-123")

    async def test(http, base, p):
        body = json.dumps({"model": "fusion", "messages": ASK}).encode()
        bad = await _raw_post(base, "Authorization: Bearer tök-123\r\n".encode(), body)
        latin = await _raw_post(base, b"Authorization: Bearer t\xf6k-123\r\n", body)
        good = await _raw_post(base, b"Authorization: Bearer tok-123\r\n", body)
        return bad, latin, good

    bad, latin, good = with_server(tmp_path, test, server_token_env="FUSION_SERVER_TOKEN")
    for status, body in (bad, latin):
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert good[0] == 200 and good[1]["choices"][0]["message"]["content"] == ANSWER


def _fail_both_members(p: Providers) -> None:
    detail = '{"error": {"message": "upstream says acct 991 over quota"}}'
    p.add("a", Reply(status=401, error_body=detail))
    p.add("b", Reply(status=403, error_body=detail))


async def _plain_stream_and_failure(http, base, p):
    body = {"model": "fusion", "messages": ASK}
    async with http.post(f"{base}/chat/completions", json=body) as r:
        plain = await r.text()
    async with http.post(f"{base}/chat/completions", json=body | {"stream": True}) as r:
        streamed = await r.text()
    _fail_both_members(p)
    async with http.post(f"{base}/chat/completions", json=body) as r:
        failed = (r.status, await r.text())
    async with http.post(f"{base}/chat/completions", json=body | {"stream": True}) as r:
        failed_stream = await r.text()
    return plain, streamed, failed, failed_stream


def test_members_stay_private_unless_expose_members(tmp_path):
    plain, streamed, (status, failed), failed_stream = with_server(tmp_path,
                                                                   _plain_stream_and_failure)  # fmt: skip
    assert json.loads(plain)["choices"][0]["message"]["content"] == ANSWER
    assert "fusion" not in json.loads(plain) and json.loads(plain)["usage"]["total_tokens"] == 45
    assert ANSWER.split()[0] in streamed and '"fusion":' not in streamed
    assert status == 502 and "only 0 of 2 members answered" in failed
    for text in (plain, streamed, failed, failed_stream):
        assert not any(secret in text for secret in (*MEMBER_TEXTS, "acct 991", "judge", "jm"))
        assert '"a:' not in text and "HTTP 401" not in text

    shown = with_server(tmp_path, _plain_stream_and_failure, expose_members=True)
    plain, streamed, (status, failed), failed_stream = shown
    assert [m["model"] for m in json.loads(plain)["fusion"]["members"]] == ["model-a", "model-b"]
    assert '"fusion":' in streamed and "model-a" in streamed
    assert status == 502 and "acct 991" in failed and "acct 991" in failed_stream


def judge_dies_after_the_marker(chunks: int = 12) -> Reply:
    at = MERGED.index("Two and") + 5
    size = -(-len(MERGED) // chunks)
    return Reply(MERGED, chunks=chunks, error_after=-(-at // size))


def test_a_judge_failing_mid_stream_ends_the_stream_with_an_error_not_a_second_answer(tmp_path):
    async def test(http, base, p):
        p.add("judge", judge_dies_after_the_marker())
        body = {"model": "fusion", "messages": ASK}
        async with http.post(f"{base}/chat/completions", json=body | {"stream": True}) as r:
            parser, events = wire.SSEParser(), []
            async for chunk in r.content.iter_any():
                events += parser.feed(chunk)
        async with http.post(f"{base}/chat/completions", json=body) as r:
            plain = await r.json()
        return events, plain

    events, plain = with_server(tmp_path, test)
    assert events[-1].data == "[DONE]"
    objects = [json.loads(e.data) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in objects if "choices" in c)
    assert text and ANSWER.startswith(text) and text != ANSWER  # part of the judge's answer only
    error = objects[-1]["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "fusion_failed"
    assert error["type"] == "server_error" and objects[-1]["choices"][0]["finish_reason"] == "error"
    assert all("error" not in c for c in objects[:-1])
    # Not streamed: nothing went out yet, so a member's answer is a coherent reply.
    assert plain["choices"][0]["message"]["content"].startswith(("Four", "It is 4"))


def test_the_openai_client_raises_on_a_judge_failing_mid_stream(tmp_path):
    openai = pytest.importorskip("openai")

    async def test(http, base, p):
        p.add("judge", judge_dies_after_the_marker())
        client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
        pieces = []
        stream = await client.chat.completions.create(model="fusion", messages=ASK, stream=True)
        with pytest.raises(openai.APIError, match="after its answer began streaming"):
            async for c in stream:
                pieces.append(c.choices[0].delta.content or "" if c.choices else "")
        await client.close()
        return "".join(pieces)

    text = with_server(tmp_path, test)
    assert text and ANSWER.startswith(text)


def test_key_shaped_variable_names_are_refused_and_never_shown(tmp_path):
    with Providers().thread() as p:
        providers_for(p)
        path = write_config(tmp_path, p, server_token_env=KEY_SHAPED)
        with pytest.raises(ConfigError, match="server_token_env") as refused:
            load_config(path)
    assert KEY_SHAPED not in str(refused.value)


def test_fusion_ask_never_prints_a_key_shaped_variable_name(tmp_path):
    with Providers().thread() as p:
        providers_for(p)
        r = mlxtune("fusion", "ask", write_config(tmp_path, p, {"api_key_env": KEY_SHAPED}), "hi")
    assert r.returncode == 2 and "api_key_env" in r.stderr
    assert KEY_SHAPED not in r.stderr + r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_public_bind_without_a_token_is_refused(tmp_path):
    with Providers().thread() as p:
        providers_for(p)
        r = mlxtune("fusion", "serve", write_config(tmp_path, p), "--host", "0.0.0.0",
                    "--port", _free_port(), timeout=30)  # fmt: skip
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlxtune: error: --host 0.0.0.0: ")
    assert "fusion.server_token_env" in lines[0] and "--insecure-no-token" in lines[0]


def test_insecure_no_token_warns_once_then_serves(tmp_path):
    port = _free_port()
    with Providers().thread() as p:
        providers_for(p)
        args = [EXE, "fusion", "serve", str(write_config(tmp_path, p)), "--host", "0.0.0.0",
                "--port", str(port), "--insecure-no-token"]  # fmt: skip
        server = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            status = _wait_for_models(port, server)
        finally:
            server.terminate()
            out, err = server.communicate(timeout=20)
    assert status == 200, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "no token" in warnings[0] and "0.0.0.0" in warnings[0]
    assert out.startswith(f"fusion serving http://0.0.0.0:{port}/v1")


def _wait_for_models(port: int, server: subprocess.Popen) -> int | None:
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                return r.status
        except OSError:
            time.sleep(0.1)
    return None
