"""`mlxtune fusion eval CONFIG TASKS.jsonl`: is the fusion better than its best member?

Each row holds a question and its gold answer: {"prompt": "...", "answer": "..."} or
{"messages": [...], "answer": "..."}. The pool answers each row once; every mode then runs on
those same first answers (self mode samples anew). A reply is correct when its extracted short
answer (\\boxed{}, "answer: X", or a reply of a few words) equals the gold one after
normalisation; a reply with no extractable answer counts as wrong (the parse rate is reported).

Reported: each member's accuracy; oracle@n (some member is right: the most any selection can
do); majority vote; each mode's accuracy and its judge regret (mode minus the best member); the
cost multiple (a mode's tokens, or dollars when every call reported them, over the best
member's); the latency overhead (a mode's wall time over the fastest and the slowest member's).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from mlxtune.config import Config
from mlxtune.errors import DataError

from .client import FusionClient
from .modes import MODES, extract, normalise
from .result import FusionError


def read_tasks(path: str | Path) -> list[tuple[list[dict], str]]:
    from mlxtune.data.rows import json_lines

    rows = []
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    for row, where in json_lines(Path(path)):
        if not isinstance(row, dict) or "answer" not in row:
            raise DataError(f"{where}: answer: required (the gold answer)")
        messages = row.get("messages") or (
            [{"role": "user", "content": row["prompt"]}] if isinstance(row.get("prompt"), str)
            else None)  # fmt: skip
        if not isinstance(messages, list):
            raise DataError(f"{where}: expected prompt (a string) or messages (a list)")
        rows.append((messages, str(row["answer"])))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def correct(text: str, gold: str) -> bool:
    got = extract(text)
    return got is not None and got == normalise(gold)


async def evaluate(cfg: Config, rows, modes: list[str], echo=print) -> dict:
    members = [m.label for m in cfg.fusion.pool]
    tally: dict = {"rows": len(rows), "members": {m: _stats() for m in members},
                   "oracle": 0, "majority": 0, "modes": {m: _stats() for m in modes}}  # fmt: skip
    async with FusionClient(cfg) as client:
        for i, (messages, gold) in enumerate(rows, start=1):
            started = time.perf_counter()
            first = await client.gather([(ep, messages, None, ep.label) for ep in cfg.fusion.pool])
            first_s = time.perf_counter() - started
            for call in first:
                _count(tally["members"][call.member], call.text if call.ok else "", gold,
                       call.tokens, call.cost, call.total_s)  # fmt: skip
            right = [c.ok and correct(c.text, gold) for c in first]
            tally["oracle"] += any(right)
            votes = Counter(extract(c.text) for c in first if c.ok and extract(c.text))
            tally["majority"] += bool(votes) and votes.most_common(1)[0][0] == normalise(gold)
            for mode in modes:
                stats = tally["modes"][mode]
                try:
                    reuse = None if mode == "self" else first
                    result = await MODES[mode](client, messages, None, reuse)
                except FusionError:
                    _count(stats, "", gold, 0, None, 0.0)
                    continue
                extra = 0.0 if reuse is None else first_s  # the first answers' time, shared
                _count(stats, result.answer, gold, result.tokens, result.cost,
                       result.wall_s + extra)  # fmt: skip
            echo(f"row {i}/{len(rows)}: " + ", ".join(
                f"{m} {s['correct']}/{i}" for m, s in tally["modes"].items()))  # fmt: skip
    return report(tally)


def _stats() -> dict:
    return {"correct": 0, "parsed": 0, "tokens": 0, "cost": 0.0, "cost_known": True, "seconds": 0.0}


def _count(stats: dict, text: str, gold: str, tokens: int, cost, seconds: float) -> None:
    stats["correct"] += correct(text, gold)
    stats["parsed"] += extract(text) is not None
    stats["tokens"] += tokens
    stats["cost"] += cost or 0.0
    stats["cost_known"] &= cost is not None
    stats["seconds"] += seconds


def report(t: dict) -> dict:
    n = t["rows"]
    members = {m: _summary(s, n) for m, s in t["members"].items()}
    best_name = max(members, key=lambda m: (members[m]["accuracy"], -members[m]["seconds"]))
    best = t["members"][best_name]
    fastest = min(s["seconds"] for s in t["members"].values()) / n
    slowest = max(s["seconds"] for s in t["members"].values()) / n
    modes = {}
    for mode, s in t["modes"].items():
        row = _summary(s, n)
        row["judge_regret"] = round(row["accuracy"] - members[best_name]["accuracy"], 4)
        dollars = s["cost_known"] and best["cost_known"] and best["cost"] > 0
        num, den = (s["cost"], best["cost"]) if dollars else (s["tokens"], best["tokens"])
        row["cost_multiple"] = round(num / den, 3) if den else None
        row["cost_unit"] = "USD" if dollars else "tokens"
        row["latency_vs_fastest"] = round(row["seconds"] / fastest, 3) if fastest else None
        row["latency_vs_slowest"] = round(row["seconds"] / slowest, 3) if slowest else None
        modes[mode] = row
    return {"rows": n, "members": members, "best_member": best_name,
            "oracle_at_n": round(t["oracle"] / n, 4), "majority": round(t["majority"] / n, 4),
            "modes": modes}  # fmt: skip


def _summary(s: dict, n: int) -> dict:
    return {"accuracy": round(s["correct"] / n, 4), "parse_rate": round(s["parsed"] / n, 4),
            "tokens": s["tokens"], "cost": round(s["cost"], 6) if s["cost_known"] else None,
            "seconds": round(s["seconds"] / n, 4)}  # fmt: skip


def table(r: dict) -> str:
    lines = [f"{r['rows']} rows; oracle@n {r['oracle_at_n']:.0%}, majority vote "
             f"{r['majority']:.0%}, best member {r['best_member']}",
             f"{'':16}{'accuracy':>9}{'parsed':>8}{'regret':>8}{'cost x':>8}"
             f"{'s/row':>8}{'vs fastest':>11}{'vs slowest':>11}"]  # fmt: skip
    for name, m in r["members"].items():
        lines.append(f"{name[:15]:<16}{m['accuracy']:>9.0%}{m['parse_rate']:>8.0%}{'':>8}{'':>8}"
                     f"{m['seconds']:>8.2f}")  # fmt: skip
    for name, m in r["modes"].items():
        cost = f"{m['cost_multiple']:.2f}" if m["cost_multiple"] is not None else "-"
        lines.append(f"{name[:15]:<16}{m['accuracy']:>9.0%}{m['parse_rate']:>8.0%}"
                     f"{m['judge_regret']:>+8.0%}{cost:>8}{m['seconds']:>8.2f}"
                     f"{m['latency_vs_fastest'] or 0:>11.2f}{m['latency_vs_slowest'] or 0:>11.2f}")  # fmt: skip
    return "\n".join(lines)
