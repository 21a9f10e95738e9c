"""The modes: best-of, merge, debate and self. Each runs the pool, then the judge.

- best-of: the judge, at temperature 0, reads the answers under anonymous labels in a seeded
  random order and names the best; its reply must end in {"best": "<label>"} (one repair try).
- merge: the judge lists agreements, contradictions, unique points and errors as JSON, then
  writes one answer after `FINAL ANSWER:` (what follows the marker streams to the caller).
- debate: every member sees the others' answers and revises, for `rounds` rounds or until they
  agree; the judge reads the whole exchange and writes the answer as in merge.
- self: the first pool member answers `samples` times at temperature >= 0.7; merged as above.

`first` hands a mode the pool's first answers already made (evaluation reuses them per mode).

When every answer gives the same short or numeric answer, no judge is called. When the judge
fails, or the budget is spent, the answer is the member answer most others agree with (ties:
the fastest), and the result says so. Streaming (`on_text`) sends the judge's answer as it is
written, so a judge that fails after part of its answer went out cannot be replaced: that is a
FusionError ("the judge failed after its answer began streaming"), never a member's answer
glued to the judge's half; the caller ends its stream with an error. Before the first streamed
character, and without streaming, the fallback applies as above.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections import Counter
from dataclasses import replace

from .result import Call, FusionError, FusionResult

LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MARKER = "FINAL ANSWER:"

BEST_OF = """You judge answers that several assistants gave to the same request. They are \
labelled with letters in a random order; the letters and the order mean nothing. Pick the one \
answer that serves the user best: correct first, then complete, then clear. A longer answer is \
not a better one. Compare them in at most five sentences, then end your reply with one line \
holding only this JSON: {"best": "<letter>", "confidence": <0 to 1>}"""

MERGE = """You turn several assistants' answers to the same request into the one best answer. \
They are labelled with letters; the letters mean nothing, and no answer is right because many \
share it. First write your analysis as JSON between <analysis> and </analysis>, with the keys \
"agreements" (points most answers share), "contradictions" (points they disagree on, and which \
side is right and why), "unique_points" (useful points only one answer makes) and "errors" \
(claims that are wrong). Then write a line with only "FINAL ANSWER:" and, after it, the answer \
itself, written to the user, complete, without mentioning the other answers."""

DEBATE_TURN = """Other assistants answered the same request:

{others}

Reconsider your answer. Keep it unless you can point to a specific error in it or a better \
argument in theirs; agreeing with them is not a reason. Reply with your complete answer."""

REPAIR = """Your reply did not end with the verdict. Reply with only this JSON line: \
{{"best": "<one of {labels}>", "confidence": <0 to 1>}}"""


# ------------------------------------------------------------------------------------ modes


async def best_of(client, messages, on_text=None, first=None) -> FusionResult:
    cfg = client.cfg
    started, calls, result = await _opening(client, messages, first, "best-of", on_text)
    if result is not None:
        return result
    ok = [c for c in calls if c.ok]
    order = _shuffled(ok, messages, cfg.seed)
    prompt = [{"role": "system", "content": BEST_OF},
              {"role": "user", "content": _request_and_answers(messages, order)}]  # fmt: skip
    labels = [LABELS[i] for i in range(len(order))]
    judge = await client.call(cfg.judge, prompt, temperature=0.0, label=cfg.judge.label)
    verdict = _best_verdict(judge.text, labels) if judge.ok else None
    if judge.ok and verdict is None:  # one repair: ask for the verdict line alone
        retry = prompt + [{"role": "assistant", "content": judge.text},
                          {"role": "user", "content": REPAIR.format(labels=", ".join(labels))}]  # fmt: skip
        repair = await client.call(cfg.judge, retry, temperature=0.0, label=cfg.judge.label)
        judge = _add(judge, repair)
        verdict = _best_verdict(repair.text, labels) if repair.ok else None
    result = FusionResult("", "best-of", calls, judge)
    result.verdict = {"order": {lab: c.member for lab, c in zip(labels, order, strict=True)}}
    if verdict is None:
        why = judge.error if not judge.ok else "no valid verdict after one repair"
        return _fallback(result, f"judge failed: {why}", started, on_text)
    chosen = order[labels.index(verdict["best"])]
    result.verdict |= verdict | {"member": chosen.member}
    return _finish(result, chosen.text, started, on_text)


async def merge(client, messages, on_text=None, first=None) -> FusionResult:
    started, calls, result = await _opening(client, messages, first, "merge", on_text)
    if result is not None:
        return result
    order = _shuffled([c for c in calls if c.ok], messages, client.cfg.seed)
    return await _synthesize(client, messages, calls, order, _request_and_answers(messages, order),
                             "merge", started, on_text)  # fmt: skip


async def debate(client, messages, on_text=None, first=None) -> FusionResult:
    cfg = client.cfg
    started, calls, result = await _opening(client, messages, first, "debate", on_text)
    if result is not None:
        return result
    latest = {c.member: c for c in calls if c.ok}
    members = {m.label: m for m in cfg.pool}
    stopped = "rounds done"
    for r in range(1, cfg.rounds + 1):
        if _agreed(list(latest.values())):
            stopped = f"consensus after round {r - 1}"
            break
        if _over_budget(calls, cfg):
            stopped = f"budget spent after round {r - 1}"
            break
        jobs = []
        for name, mine in latest.items():
            others = "\n\n".join(f"[Answer {LABELS[i]}]\n{c.text}\n[End of answer {LABELS[i]}]"
                                 for i, c in enumerate(x for x in latest.values() if x is not mine))  # fmt: skip
            turn = [*messages, {"role": "assistant", "content": mine.text},
                    {"role": "user", "content": DEBATE_TURN.format(others=others)}]  # fmt: skip
            jobs.append((members[name], turn, None, name))
        revised = await client.gather(jobs, round=r)
        calls += revised
        latest |= {c.member: c for c in revised if c.ok}  # a failed revision keeps the last answer
    final = list(latest.values())
    if cfg.skip_judge_on_agreement and _agreed(final):
        result = FusionResult("", "debate", calls, verdict={"stopped": stopped})
        result.judge_skipped = f"the {len(final)} members agree on {extract(final[0].text)!r}"
        return _finish(result, min(final, key=lambda c: c.total_s).text, started, on_text)
    order = _shuffled(final, messages, cfg.seed)
    labels = {c.member: LABELS[i] for i, c in enumerate(order)}
    rounds = sorted({c.round for c in calls})
    exchange = [_request(messages)]
    for r in rounds:
        for c in sorted((c for c in calls if c.round == r and c.ok and c.member in labels),
                        key=lambda c: labels[c.member]):  # fmt: skip
            exchange.append(f"[Round {r}, answer {labels[c.member]}]\n{c.text}\n"
                            f"[End of round {r}, answer {labels[c.member]}]")  # fmt: skip
    result = await _synthesize(client, messages, calls, order, "\n\n".join(exchange), "debate",
                               started, on_text)  # fmt: skip
    result.verdict["stopped"] = stopped
    return result


async def self_mode(client, messages, on_text=None, first=None) -> FusionResult:
    started, cfg = time.perf_counter(), client.cfg
    if not cfg.pool:
        raise FusionError("fusion.pool: self mode samples the first member, and there is none")
    ep = cfg.pool[0]
    temperature = max(ep.temperature, 0.7)
    jobs = [(ep, messages, temperature, f"{ep.label}#{i + 1}") for i in range(cfg.samples)]
    calls = await client.gather(jobs, quorum=cfg.quorum)
    result = _early(calls, "self", started, client, on_text)
    if result is not None:
        return result
    order = _shuffled([c for c in calls if c.ok], messages, cfg.seed)
    return await _synthesize(client, messages, calls, order, _request_and_answers(messages, order),
                             "self", started, on_text)  # fmt: skip


MODES = {"best-of": best_of, "merge": merge, "debate": debate, "self": self_mode}


# ---------------------------------------------------------------------------- shared steps


async def _opening(client, messages, first, mode, on_text):
    """(start time, the pool's first answers, a finished result if the judge is not needed)."""
    started, cfg = time.perf_counter(), client.cfg
    if first is None:
        if not cfg.pool:
            raise FusionError("fusion.pool: no members")
        jobs = [(ep, messages, None, ep.label) for ep in cfg.pool]
        first = await client.gather(jobs, quorum=cfg.quorum)
    calls = list(first)
    return started, calls, _early(calls, mode, started, client, on_text)


def _early(calls, mode, started, client, on_text) -> FusionResult | None:
    """Stop before the judge: too few answers (an error), all agree, the budget, no judge."""
    cfg = client.cfg
    ok = [c for c in calls if c.ok]
    if len(ok) < cfg.min_successful:
        why = "; ".join(f"{c.member}: {c.reason} ({c.error})" for c in calls if not c.ok)
        brief = (f"only {len(ok)} of {len(calls)} members answered "
                 f"(fusion.min_successful is {cfg.min_successful})")  # fmt: skip
        raise FusionError(f"{brief}: {why}", brief)
    result = FusionResult("", mode, calls)
    if cfg.skip_judge_on_agreement and _agreed(ok):
        result.judge_skipped = f"all {len(ok)} answers give {extract(ok[0].text)!r}"
        fastest = min(ok, key=lambda c: c.total_s)
        return _finish(result, fastest.text, started, on_text)
    if cfg.judge is None:
        return _fallback(result, "no judge configured", started, on_text)
    if _over_budget(calls, cfg):
        return _fallback(result, "budget spent before the judge", started, on_text)
    return None


async def _synthesize(client, messages, calls, order, body, mode, started, on_text):
    """The judge's analysis and answer (merge, debate, self); only the answer streams out."""
    cfg = client.cfg
    prompt = [{"role": "system", "content": MERGE}, {"role": "user", "content": body}]
    gate = _AfterMarker(on_text)
    judge = await client.call(cfg.judge, prompt, temperature=0.0, on_text=gate,
                              label=cfg.judge.label)  # fmt: skip
    result = FusionResult("", mode, calls, judge)
    result.verdict = {"order": {LABELS[i]: c.member for i, c in enumerate(order)}}
    analysis, answer = split_synthesis(judge.text)
    if gate.sent and not (judge.ok and answer.strip()):  # a fallback now would be a second answer
        brief = "the judge failed after its answer began streaming"
        raise FusionError(f"{brief}: {judge.reason} ({judge.error})", brief)
    if not judge.ok:
        return _fallback(result, f"judge failed: {judge.reason} ({judge.error})", started, on_text)
    result.verdict |= analysis
    if not answer.strip():
        return _fallback(result, "the judge wrote no answer", started, on_text)
    if not gate.open:  # no marker: the whole reply was held back; it goes out now
        on_text and on_text(answer)
    return _finish(result, answer, started, None)


class _AfterMarker:
    """Passes on only what the judge writes after the FINAL ANSWER marker, from its first
    non-blank character; `sent` says whether anything went out."""

    def __init__(self, on_text):
        self.on_text, self.seen, self.open, self.sent = on_text, "", False, False

    def __call__(self, piece: str) -> None:
        if self.on_text is None:
            return
        if not self.open:
            self.seen += piece
            at = self.seen.find(MARKER)
            if at < 0:
                return
            self.open, piece = True, self.seen[at + len(MARKER) :]
        piece = piece if self.sent else piece.lstrip()
        if piece:
            self.sent = True
            self.on_text(piece)


def split_synthesis(text: str) -> tuple[dict, str]:
    """(the analysis JSON, the final answer) of a merge-style judge reply."""
    analysis: dict = {}
    found = re.search(r"<analysis>(.*?)</analysis>", text, re.S)
    if found:
        try:
            parsed = json.loads(found.group(1).strip())
            analysis = parsed if isinstance(parsed, dict) else {"analysis": parsed}
        except json.JSONDecodeError:
            analysis = {"analysis_unparsed": found.group(1).strip()[:2000]}
    at = text.rfind(MARKER)
    if at >= 0:
        return analysis, text[at + len(MARKER) :].strip()
    return analysis, (text[found.end() :] if found else text).strip()


def _best_verdict(text: str, labels: list[str]) -> dict | None:
    """The last {"best": ...} object in the reply, if it names one of the labels."""
    for match in reversed(list(re.finditer(r"\{[^{}]*\"best\"[^{}]*\}", text))):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        best = str(obj.get("best", "")).strip().upper()
        if best in labels:
            return {"best": best, "confidence": obj.get("confidence")}
    return None


def _finish(result: FusionResult, answer: str, started: float, on_text) -> FusionResult:
    result.answer = answer
    if on_text is not None and answer:
        on_text(answer)
    result.wall_s = time.perf_counter() - started
    return result


def _fallback(result: FusionResult, why: str, started: float, on_text) -> FusionResult:
    """The member answer most others agree with (ties: the fastest), flagged."""
    ok = [c for c in result.calls if c.ok and c.round == max(x.round for x in result.calls)]
    ok = ok or [c for c in result.calls if c.ok]
    votes = Counter(extract(c.text) for c in ok if extract(c.text) is not None)
    best = min(ok, key=lambda c: (-votes.get(extract(c.text), 0), c.total_s))
    result.fallback = f"{why}; answer of {best.member}"
    return _finish(result, best.text, started, on_text)


def _add(a: Call, b: Call) -> Call:
    """The judge's first reply and its repair, counted as one call."""
    return replace(b, text=b.text, attempts=a.attempts + b.attempts, total_s=a.total_s + b.total_s,
                   first_token_s=a.first_token_s, prompt_tokens=a.prompt_tokens + b.prompt_tokens,
                   completion_tokens=a.completion_tokens + b.completion_tokens,
                   cost=None if a.cost is None and b.cost is None else (a.cost or 0) + (b.cost or 0))  # fmt: skip


def _over_budget(calls: list[Call], cfg) -> bool:
    spent_tokens = sum(c.tokens for c in calls)
    spent = sum(c.cost or 0.0 for c in calls)
    return bool((cfg.max_total_tokens is not None and spent_tokens >= cfg.max_total_tokens) or
                (cfg.max_cost is not None and spent >= cfg.max_cost))  # fmt: skip


def _shuffled(calls: list[Call], messages, seed: int) -> list[Call]:
    """A random order, fixed by the seed and the request (a position carries no meaning)."""
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
    rng = random.Random(seed * 1_000_003 + int.from_bytes(digest[:8], "little"))
    order = list(calls)
    rng.shuffle(order)
    return order


def _request(messages: list[dict]) -> str:
    turns = []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, str):
            content = " ".join(p.get("text", "") for p in content or [] if isinstance(p, dict))
        turns.append(f"{m.get('role', 'user')}: {content}")
    return "[Request]\n" + "\n".join(turns) + "\n[End of request]"


def _request_and_answers(messages: list[dict], order: list[Call]) -> str:
    answers = [f"[Answer {LABELS[i]}]\n{c.text}\n[End of answer {LABELS[i]}]"
               for i, c in enumerate(order)]  # fmt: skip
    return "\n\n".join([_request(messages), *answers])


# ------------------------------------------------------------------------ answer extraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract(text: str) -> str | None:
    """The short answer a reply gives, normalised, or None for a long free-form reply: a
    \\boxed{} value, an "answer: X" line, or the whole reply when it is a few words."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    marked = re.findall(r"(?:final answer|answer)\s*(?:is\s*:?|:)\s*(.+)", text, re.I)
    stripped = text.strip()
    short = stripped if len(stripped) <= 40 and len(stripped.split()) <= 6 else None
    for found in (boxed[-1] if boxed else None, marked[-1] if marked else None, short):
        value = normalise(found) if found else ""
        if value and len(value.split()) <= 8:
            return value
    return None


def normalise(value: str) -> str:
    value = value.strip().strip("*_`").strip().rstrip(".!").strip()
    number = _NUMBER.fullmatch(value.replace("$", "").strip())
    if number:
        n = float(number.group(0).replace(",", ""))
        return str(int(n)) if n.is_integer() else repr(n)
    return re.sub(r"\s+", " ", value.lower())


def _agreed(calls: list[Call]) -> bool:
    values = {extract(c.text) for c in calls}
    return len(calls) >= 2 and len(values) == 1 and None not in values
