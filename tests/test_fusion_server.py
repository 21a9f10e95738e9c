"""`mlxtune fusion serve`: OpenAI-compatible, streaming and not, guarded; and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from _providers import Providers, Reply
from aiohttp import web

from fusion import wire
from fusion.server import check_not_self, make_app
from mlxtune.config import load_config
from mlxtune.errors import ConfigError

EXE = shutil.which("mlxtune", path=str(Path(sys.executable).parent)) or "mlxtune"
MERGED = '<analysis>{"agreements": ["4"]}</analysis>\nFINAL ANSWER:\nTwo and two make four.'
ASK = [{"role": "user", "content": "What is 2 + 2? Explain."}]


def write_config(folder: Path, p: Providers, member: dict | None = None, **fusion) -> Path:
    """A merge config of members a and b (each with `member`'s extra keys) and a judge."""
    pool = [{"name": n, "base_url": p.url(n), "model": f"model-{n}"} | (member or {})
            for n in ("a", "b")]  # fmt: skip
    config = {"fusion": {"mode": "merge", "pool": pool,
                         "judge": {"name": "judge", "base_url": p.url("judge"), "model": "jm"},
                         **fusion}}  # fmt: skip
    path = folder / "fusion.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def providers_for(p: Providers) -> None:
    p.add("a", Reply("Four, since two plus two is four.", delay=0.1))
    p.add("b", Reply("It is 4 because addition works that way.", delay=0.2))
    p.add("judge", Reply(MERGED, chunks=8))


async def serve(cfg, **kw):
    """A running server (its runner, base URL)."""
    runner = web.AppRunner(make_app(cfg), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/v1"


def with_server(tmp_path, test, **fusion):
    async def go():
        async with Providers() as p:
            providers_for(p)
            cfg = load_config(write_config(tmp_path, p, **fusion))
            runner, base = await serve(cfg)
            try:
                async with aiohttp.ClientSession() as http:
                    return await test(http, base, p)
            finally:
                await runner.cleanup()

    return asyncio.run(go())


def test_models_and_a_plain_completion(tmp_path):
    async def test(http, base, p):
        async with http.get(f"{base}/models") as r:
            models = [m["id"] for m in (await r.json())["data"]]
        async with http.post(f"{base}/chat/completions",
                             json={"model": "fusion", "messages": ASK}) as r:  # fmt: skip
            return models, r.status, await r.json()

    models, status, body = with_server(tmp_path, test, expose_members=True)
    assert models == ["fusion", "fusion-best-of", "fusion-merge", "fusion-debate", "fusion-self"]
    assert status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant",
                                             "content": "Two and two make four."}  # fmt: skip
    assert body["usage"]["total_tokens"] == 3 * 15
    assert [m["member"] for m in body["fusion"]["members"]] == ["a", "b"]


def test_streaming_sends_the_judges_answer_as_chunks(tmp_path):
    async def test(http, base, p):
        async with http.post(f"{base}/chat/completions",
                             json={"model": "fusion-merge", "messages": ASK, "stream": True}) as r:  # fmt: skip
            parser, events = wire.SSEParser(), []
            async for chunk in r.content.iter_any():
                events += parser.feed(chunk)
            return r.headers["Content-Type"], events

    ctype, events = with_server(tmp_path, test)
    assert ctype.startswith("text/event-stream") and events[-1].data == "[DONE]"
    chunks = [wire.parse_chunk(e.data) for e in events[:-1]]
    text = "".join(c.content for c in chunks)
    assert text == "Two and two make four." and sum(bool(c.content) for c in chunks) > 1
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage["total_tokens"] == 45


def test_the_official_openai_client_works_against_it(tmp_path):
    openai = pytest.importorskip("openai")

    async def test(http, base, p):
        client = openai.AsyncOpenAI(base_url=base, api_key="unused")
        plain = await client.chat.completions.create(model="fusion", messages=ASK)
        stream = await client.chat.completions.create(model="fusion-best-of", messages=ASK,
                                                      stream=True)  # fmt: skip
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        models = [m.id async for m in client.models.list()]
        await client.close()
        return plain, "".join(pieces), models

    plain, streamed, models = with_server(tmp_path, test)
    assert plain.choices[0].message.content == "Two and two make four."
    assert streamed in ("Four, since two plus two is four.",
                        "It is 4 because addition works that way.")  # fmt: skip
    assert "fusion-debate" in models


def test_errors_have_openais_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_SERVER_TOKEN", "tok-123")

    async def test(http, base, p):
        out = {}
        ok = {"Authorization": "Bearer tok-123"}
        cases = {
            "no token": ({}, {"model": "fusion", "messages": ASK}),
            "unknown model": (ok, {"model": "gpt-9", "messages": ASK}),
            "bad messages": (ok, {"model": "fusion", "messages": "hi"}),
            "too large": (ok, {"model": "fusion", "messages": [{"role": "user",
                                                                "content": "x" * 3000}]}),
            "recursion": (ok | {wire.DEPTH_HEADER: "1"}, {"model": "fusion", "messages": ASK}),
        }  # fmt: skip
        for name, (headers, body) in cases.items():
            async with http.post(f"{base}/chat/completions", json=body, headers=headers) as r:
                out[name] = (r.status, await r.json())
        return out

    got = with_server(tmp_path, test, server_token_env="FUSION_SERVER_TOKEN", max_request_kb=2)
    expected = {"no token": (401, "invalid_api_key"), "unknown model": (404, "model_not_found"),
                "bad messages": (400, "invalid_messages"), "too large": (413, "request_too_large"),
                "recursion": (400, "fusion_recursion")}  # fmt: skip
    for name, (status, code) in expected.items():
        assert got[name][0] == status, name
        error = got[name][1]["error"]
        assert error["code"] == code and error["message"] and "type" in error and "param" in error


def test_busy_servers_say_429_and_failed_fusions_502(tmp_path):
    async def test(http, base, p):
        p.add("a", Reply("slow answer from a member", delay=0.5))
        body = {"model": "fusion", "messages": ASK}
        first = asyncio.create_task(http.post(f"{base}/chat/completions", json=body))
        await asyncio.sleep(0.1)
        async with http.post(f"{base}/chat/completions", json=body) as r:
            busy = (r.status, r.headers.get("Retry-After"), (await r.json())["error"]["code"])
        (await first).release()
        p.add("a", Reply(status=401))
        p.add("b", Reply(status=401))
        async with http.post(f"{base}/chat/completions", json=body) as r:
            failed = (r.status, (await r.json())["error"])
        return busy, failed

    busy, failed = with_server(tmp_path, test, max_concurrent=1)
    assert busy == (429, "1", "too_many_requests")
    assert failed[0] == 502 and failed[1]["code"] == "fusion_failed"
    assert "only 0 of 2 members answered" in failed[1]["message"]


def test_a_pool_pointing_at_the_server_itself_is_refused(tmp_path):
    path = tmp_path / "self.yaml"
    path.write_text(json.dumps({"fusion": {"pool": [
        {"name": "me", "base_url": "http://localhost:8400/v1", "model": "fusion"}]}}))  # fmt: skip
    with pytest.raises(ConfigError, match=r"fusion.pool\[0\].base_url: .* is this fusion server"):
        check_not_self(load_config(path), "127.0.0.1", 8400)


# -------------------------------------------------------------------------- the console script


def mlxtune(*args, timeout=60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OPENROUTER_API_KEY"}
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


def test_fusion_ask_prints_the_answer_then_the_member_table(tmp_path):
    with Providers().thread() as p:
        providers_for(p)
        config = write_config(tmp_path, p)
        r = mlxtune("fusion", "ask", config, "What is 2 + 2?")
        j = mlxtune("fusion", "ask", config, "What is 2 + 2?", "--json", "--mode", "best-of")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "Two and two make four."
    assert any(line.startswith("a ") and "ok" in line for line in lines)
    assert any(line.startswith("judge: judge") for line in lines)
    assert any(line.startswith("fusion ") and "fastest member" in line for line in lines)
    assert j.returncode == 0, j.stderr
    result = json.loads(j.stdout)
    assert result["mode"] == "best-of" and len(result["members"]) == 2


def test_fusion_ask_failure_is_one_line(tmp_path):
    with Providers().thread() as p:
        p.add("a", Reply(status=401))
        p.add("b", Reply(status=403))
        p.add("judge", Reply(MERGED))
        r = mlxtune("fusion", "ask", write_config(tmp_path, p), "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "mlxtune: error: only 0 of 2 members answered (fusion.min_successful is 1): "
        "a: auth (HTTP 401: scripted 401); b: refused (HTTP 403: scripted 403)"
    ]


def test_fusion_eval_scores_members_modes_and_the_oracle(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n"
                             for i in range(3)))  # fmt: skip

    def right(body):  # member a: always right
        return Reply(f"answer: {body['messages'][-1]['content'][1:]}")

    def wrong(body):  # member b: right on q0 only
        q = body["messages"][-1]["content"]
        return Reply(f"answer: {q[1:] if q == 'q0' else 99}")

    def judge(body):  # trusts answer A, whoever it is
        text = body["messages"][-1]["content"]
        if "FINAL ANSWER" in body["messages"][0]["content"]:
            picked = text.split("[Answer A]\n")[1].split("\n")[0]
            return Reply(f"<analysis>{{}}</analysis>\nFINAL ANSWER:\n{picked}")
        return Reply('{"best": "A"}')

    with Providers().thread() as p:
        p.add("a", right)
        p.add("b", wrong)
        p.add("judge", judge)
        config = write_config(tmp_path, p)
        r = mlxtune("fusion", "eval", config, tasks, "--json", "--modes", "best-of,merge")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["members"]["a"]["accuracy"] == 1.0
    assert report["members"]["b"]["accuracy"] == pytest.approx(1 / 3, abs=1e-3)
    assert report["oracle_at_n"] == 1.0 and report["best_member"] == "a"
    assert set(report["modes"]) == {"best-of", "merge"}
    for mode in report["modes"].values():
        assert mode["judge_regret"] == round(mode["accuracy"] - 1.0, 4)
        assert mode["cost_unit"] == "tokens" and mode["cost_multiple"] > 1
        assert mode["latency_vs_slowest"] > 0
