"""The modes against loopback members and a scripted judge: who is picked, what streams, when
the judge is skipped or replaced, quorum, budgets."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
from _providers import Providers, Reply

from fusion.client import FusionClient
from fusion.modes import extract
from fusion.result import FusionError
from mlxtune.config import EndpointConfig, FusionConfig

ASK = [{"role": "user", "content": "What is the capital of France?"}]
ANSWERS = {"a": "It is Lyon, the old silk city.", "b": "It is Paris, on the Seine river.",
           "c": "Marseille is the capital, by the sea."}  # fmt: skip


def judge_request(body: dict) -> str:
    return body["messages"][-1]["content"]


def picks_paris(body: dict) -> Reply:
    """A judge that names the label whose answer says Paris."""
    text = judge_request(body)
    label = re.search(r"\[Answer ([A-Z])\]\nIt is Paris", text).group(1)
    return Reply(f"B is wordy; {label} is right.\n{json.dumps({'best': label, 'confidence': 0.9})}")


MERGED = ('<analysis>{"agreements": [], "contradictions": ["which city"], "unique_points": [],'
          ' "errors": ["Lyon", "Marseille"]}</analysis>\nFINAL ANSWER:\nParis is the capital.')  # fmt: skip


def run(members: dict, judge, mode: str, on_text=None, **cfg):
    """(result, wall seconds, the providers) for a pool of scripted members and a judge."""

    async def go():
        async with Providers() as p:
            pool = tuple(EndpointConfig(name=n, base_url=p.add(n, s), model=f"model-{n}")
                         for n, s in members.items())  # fmt: skip
            judge_ep = EndpointConfig(name="judge", base_url=p.add("judge", judge), model="jm")
            config = FusionConfig(mode=mode, pool=pool, judge=judge_ep, **cfg)
            async with FusionClient(config) as client:
                start = time.perf_counter()
                result = await client.run(ASK, on_text=on_text)
                return result, time.perf_counter() - start, p

    return asyncio.run(go())


def test_best_of_picks_through_anonymous_shuffled_labels():
    result, _, p = run({n: Reply(t) for n, t in ANSWERS.items()}, picks_paris, "best-of")
    assert result.answer == ANSWERS["b"] and result.verdict["member"] == "b"
    assert result.judge.ok and result.fallback is None and result.judge_skipped is None
    seen = p.requests["judge"][0]["body"]
    assert seen["temperature"] == 0.0
    text = judge_request(seen)
    assert not any(name in text for name in ("model-a", "model-b", "model-c"))
    labels = sorted(result.verdict["order"])
    assert labels == ["A", "B", "C"] and sorted(result.verdict["order"].values()) == ["a", "b", "c"]
    again, _, _ = run({n: Reply(t) for n, t in ANSWERS.items()}, picks_paris, "best-of")
    assert again.verdict["order"] == result.verdict["order"]  # seeded: reproducible
    other, _, _ = run({n: Reply(t) for n, t in ANSWERS.items()}, picks_paris, "best-of", seed=5)
    assert other.answer == ANSWERS["b"]


def test_best_of_repairs_one_verdict_then_falls_back_flagged():
    judge = [Reply("I like B the most."), Reply('{"best": "B"}')]
    result, _, p = run({n: Reply(t) for n, t in ANSWERS.items()}, judge, "best-of")
    assert len(p.requests["judge"]) == 2 and result.fallback is None
    assert result.answer == ANSWERS[result.verdict["order"]["B"]]
    result, _, _ = run({n: Reply(t) for n, t in ANSWERS.items()}, Reply("no verdict"), "best-of")
    assert result.fallback.startswith("judge failed: no valid verdict")
    assert result.answer in ANSWERS.values()


def test_a_failing_judge_falls_back_to_the_answer_most_agree_with():
    members = {"a": Reply("answer: 12"), "b": Reply("answer: 13", delay=0.1),
               "c": Reply("answer: 13", delay=0.2)}  # fmt: skip
    result, _, _ = run(members, Reply(status=400), "merge")
    assert result.answer == "answer: 13" and "judge failed: http-error" in result.fallback
    assert result.judge.status == "failed"


def test_merge_streams_only_the_final_answer_and_keeps_the_analysis():
    pieces = []
    result, _, _ = run({n: Reply(t) for n, t in ANSWERS.items()}, Reply(MERGED, chunks=12),
                       "merge", on_text=pieces.append)  # fmt: skip
    assert result.answer == "Paris is the capital." == "".join(pieces)
    assert result.verdict["errors"] == ["Lyon", "Marseille"]
    assert set(result.verdict["order"].values()) == set(ANSWERS)


def test_the_judge_is_skipped_when_everyone_gives_the_same_short_answer():
    members = {"a": Reply("The answer is: 42", delay=0.2), "b": Reply("42."),
               "c": Reply("\\boxed{42}", delay=0.1)}  # fmt: skip
    result, _, p = run(members, picks_paris, "best-of")
    assert p.requests["judge"] == [] and result.judge is None
    assert result.judge_skipped == "all 3 answers give '42'" and result.answer == "42."


def test_debate_revises_then_stops_on_consensus():
    def member(name, first):
        def reply(body):
            if "Other assistants answered" in body["messages"][-1]["content"]:
                return Reply("Having checked: answer: 7")
            return Reply(first)

        return reply

    members = {"a": member("a", "answer: 7"), "b": member("b", "answer: 9"),
               "c": member("c", "answer: 8")}  # fmt: skip
    result, _, p = run(members, Reply(MERGED), "debate", rounds=3)
    assert [len(p.requests[n]) for n in "abc"] == [2, 2, 2]  # round 0, round 1, then consensus
    assert result.judge is None and "agree on '7'" in result.judge_skipped
    assert result.verdict["stopped"] == "consensus after round 1"
    revision = p.requests["a"][1]["body"]["messages"]
    assert revision[-2] == {"role": "assistant", "content": "answer: 7"}
    assert "answer: 9" in revision[-1]["content"] and "model-b" not in revision[-1]["content"]


def test_debate_without_consensus_gives_the_judge_every_round():
    members = {n: Reply(t) for n, t in ANSWERS.items()}
    result, _, p = run(members, Reply(MERGED), "debate", rounds=2)
    assert [len(p.requests[n]) for n in "abc"] == [3, 3, 3]
    text = judge_request(p.requests["judge"][0]["body"])
    assert "[Round 0, answer A]" in text and "[Round 2, answer C]" in text
    assert result.answer == "Paris is the capital." and result.verdict["stopped"] == "rounds done"
    assert {c.round for c in result.calls} == {0, 1, 2}


def test_self_samples_the_first_member_and_merges():
    sample = Reply("I am fairly sure that it is Paris, the largest city.")
    result, _, p = run({"a": sample}, Reply(MERGED), "self", samples=4)
    seen = p.requests["a"]
    assert len(seen) == 4 and all(r["body"]["temperature"] >= 0.7 for r in seen)
    assert [c.member for c in result.calls] == ["a#1", "a#2", "a#3", "a#4"]
    assert result.answer == "Paris is the capital."


def test_quorum_goes_on_without_the_straggler():
    members = {"fast": Reply("It is Paris, on the Seine river.", delay=0.2),
               "mid": Reply("It is Lyon, the old silk city.", delay=0.5),
               "slow": Reply("Marseille is the capital, by the sea.", delay=3.0)}  # fmt: skip

    def judge(body):
        reply = picks_paris(body)
        reply.delay = 0.1
        return reply

    result, wall, _ = run(members, judge, "best-of", quorum=2, grace_s=0.3)
    status = {c.member: (c.status, c.reason) for c in result.calls}
    assert status == {"fast": ("ok", None), "mid": ("ok", None), "slow": ("late", "late")}
    assert wall < 0.5 + 0.3 + 0.1 + 0.5  # second fastest + grace + judge, with room for CI
    assert result.answer.startswith("It is Paris")


def test_too_few_answers_is_an_error_that_names_each_failure():
    members = {"a": Reply(status=401), "b": Reply(status=400), "c": Reply("fine answer here")}
    with pytest.raises(FusionError, match=r"only 1 of 3 members answered \(fusion.min_successful "
                                          r"is 2\): a: auth \(HTTP 401"):  # fmt: skip
        run(members, picks_paris, "best-of", min_successful=2)


def test_a_token_budget_skips_the_judge_and_debate_rounds():
    members = {n: Reply(t) for n, t in ANSWERS.items()}
    result, _, p = run(members, picks_paris, "best-of", max_total_tokens=30)
    assert p.requests["judge"] == [] and result.fallback.startswith("budget spent")
    result, _, p = run(members, Reply(MERGED), "debate", rounds=3, max_total_tokens=60)
    assert len(p.requests["a"]) == 2 and result.verdict.get("stopped") in (
        "budget spent after round 1", None)  # fmt: skip


def test_result_reports_latency_tokens_cost_and_overhead():
    members = {"a": Reply(ANSWERS["a"], delay=0.1, cost=0.001),
               "b": Reply(ANSWERS["b"], delay=0.4, cost=0.002)}  # fmt: skip
    result, _, _ = run(members, picks_paris, "best-of")
    o = result.overhead()
    assert 0.1 <= o["fastest_member_s"] < o["slowest_member_s"] and o["vs_slowest"] >= 1.0
    assert result.tokens == 3 * 15 and result.cost == pytest.approx(0.003)
    table = result.table()
    assert "judge: judge" in table and "fastest member" in table and "0.002000" in table
    assert json.loads(json.dumps(result.to_dict()))["members"][0]["member"] == "a"


@pytest.mark.parametrize("text, value", [
    ("\\boxed{1,234}", "1234"), ("So the final answer is 3.50.", "3.5"), ("Paris", "paris"),
    ("A long paragraph about many things that never says what the answer is.", None),
    ("Answer: **Blue**", "blue"),
])  # fmt: skip
def test_short_answers_are_extracted_and_normalised(text, value):
    assert extract(text) == value


def test_one_members_bad_header_or_usage_is_its_own_failure_not_the_fusions():
    members = {"a": Reply("It is Paris, on the Seine river."),
               "b": [Reply(status=429, headers={"Retry-After": "soon"}), Reply(ANSWERS["a"])],
               "c": Reply(ANSWERS["c"], usage={"prompt_tokens": "many", "completion_tokens": 1})}  # fmt: skip
    result, _, _ = run(members, picks_paris, "best-of", quorum=2)
    status = {c.member: (c.status, c.reason) for c in result.calls}
    assert status == {"a": ("ok", None), "b": ("ok", None), "c": ("failed", "bad-response")}
    assert result.answer == ANSWERS["b"]


def judge_dies_after_the_marker(chunks: int = 12) -> Reply:
    """A merge judge whose stream breaks once part of its final answer has gone out."""
    at = MERGED.index("Paris") + 3
    size = -(-len(MERGED) // chunks)
    return Reply(MERGED, chunks=chunks, error_after=-(-at // size))


def test_a_judge_failing_mid_answer_is_an_error_not_two_answers_glued():
    pieces = []
    with pytest.raises(FusionError, match="after its answer began streaming"):
        run({n: Reply(t) for n, t in ANSWERS.items()}, judge_dies_after_the_marker(), "merge",
            on_text=pieces.append)  # fmt: skip
    sent = "".join(pieces)
    assert sent and "Paris is the capital.".startswith(sent)
    assert not any(answer in sent for answer in ANSWERS.values())
    # Nothing streamed to anyone: the answer most members agree with, flagged, as before.
    result, _, _ = run({n: Reply(t) for n, t in ANSWERS.items()}, judge_dies_after_the_marker(),
                       "merge")  # fmt: skip
    assert result.answer in ANSWERS.values() and result.fallback.startswith("judge failed: partial")
