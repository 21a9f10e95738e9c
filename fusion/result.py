"""What a fusion run gives back: each model call's record and the run's result and report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from mlxtune.errors import MlxtuneError

Status = Literal["ok", "failed", "late"]
# Why a call failed. "partial": the stream broke after content had come (the text is kept but
# not used as an answer); "late": cancelled after the quorum's grace window.
Reason = Literal["rate-limited", "auth", "refused", "http-error", "server-error", "connect-timeout",
                 "first-token-timeout", "timeout", "connection", "bad-response", "partial",
                 "empty", "late", "budget"]  # fmt: skip


class FusionError(MlxtuneError):
    """Fusion could not produce an answer (too few members answered, bad configuration).

    `brief` says the same without member names, model ids or upstream error texts: what an
    endpoint tells clients that may not see the members (`fusion.expose_members` off)."""

    def __init__(self, message: str, brief: str | None = None):
        super().__init__(message)
        self.brief = message if brief is None else brief


@dataclass
class Call:
    """One request to one model: its answer or its failure, timings, tokens and cost."""

    member: str
    model: str
    status: Status = "ok"
    reason: Reason | None = None
    error: str | None = None  # one line, keys redacted
    text: str = ""
    first_token_s: float | None = None  # from the call's start to its first content token
    total_s: float = 0.0
    attempts: int = 0
    http_status: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None
    cost_source: str = "unknown"  # provider | price table | unknown
    round: int = 0  # debate round (0 = the first answers)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class FusionResult:
    answer: str
    mode: str
    calls: list[Call]  # every member call, all rounds
    judge: Call | None = None
    verdict: dict = field(default_factory=dict)  # the judge's structured verdict
    judge_skipped: str | None = None  # why no judge call was made
    fallback: str | None = None  # why the answer is a member's own, not the judge's
    wall_s: float = 0.0

    @property
    def first_answers(self) -> list[Call]:
        return [c for c in self.calls if c.round == 0]

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self._all())

    @property
    def cost(self) -> float | None:
        known = [c.cost for c in self._all() if c.cost is not None]
        return sum(known) if known else None

    def _all(self) -> list[Call]:
        return self.calls + ([self.judge] if self.judge else [])

    def overhead(self) -> dict:
        """Fusion's wall time against its fastest and slowest answering member."""
        times = [c.total_s for c in self.first_answers if c.ok]
        if not times:
            return {"wall_s": round(self.wall_s, 4)}
        fastest, slowest = min(times), max(times)
        return {
            "wall_s": round(self.wall_s, 4),
            "fastest_member_s": round(fastest, 4),
            "slowest_member_s": round(slowest, 4),
            "vs_fastest": round(self.wall_s / fastest, 3) if fastest else None,
            "vs_slowest": round(self.wall_s / slowest, 3) if slowest else None,
        }

    def to_dict(self) -> dict:
        return {
            "answer": self.answer,
            "mode": self.mode,
            "members": [asdict(c) for c in self.calls],
            "judge": asdict(self.judge) if self.judge else None,
            "verdict": self.verdict,
            "judge_skipped": self.judge_skipped,
            "fallback": self.fallback,
            "tokens": self.tokens,
            "cost": self.cost,
            "overhead": self.overhead(),
        }

    def table(self) -> str:
        """The members (and the judge), one line each, then the overhead."""
        rows = [f"{'member':<16}{'round':>6}  {'status':<22}{'first s':>8}{'total s':>9}"
                f"{'tokens':>8}{'cost $':>11}"]  # fmt: skip
        for c in self._all():
            name = "judge: " + c.member if c is self.judge else c.member
            status = c.status + (f" ({c.reason})" if c.reason else "")
            first = f"{c.first_token_s:.2f}" if c.first_token_s is not None else "-"
            cost = f"{c.cost:.6f}" if c.cost is not None else "-"
            rows.append(f"{name[:15]:<16}{c.round:>6}  {status[:21]:<22}{first:>8}"
                        f"{c.total_s:>9.2f}{c.tokens:>8}{cost:>11}")  # fmt: skip
        o = self.overhead()
        line = f"fusion {o['wall_s']:.2f} s"
        if "fastest_member_s" in o:
            line += (f"; fastest member {o['fastest_member_s']:.2f} s ({o['vs_fastest']:.2f}x), "
                     f"slowest {o['slowest_member_s']:.2f} s ({o['vs_slowest']:.2f}x)")  # fmt: skip
        total = f"; {self.tokens:,} tokens" + (f", ${self.cost:.6f}" if self.cost else "")
        notes = [n for n in (self.judge_skipped and f"judge skipped: {self.judge_skipped}",
                             self.fallback and f"fallback: {self.fallback}") if n]  # fmt: skip
        return "\n".join([*rows, line + total, *notes])
