"""Preference rows (DPO, ORPO) in TRL's shapes, encoded as chosen / rejected example pairs.
Framework-free.

    {"prompt": "...", "chosen": "...", "rejected": "..."}                          standard
    {"prompt": [messages], "chosen": [assistant message], "rejected": [...]}      conversational
    {"chosen": [messages], "rejected": [messages]}                                implicit prompt

An implicit prompt is the messages both sides share. Prompt messages may hold image and audio
parts; each side is one assistant message. Each side is encoded as a chat row (prompt + that
answer) through the model's template, with loss only on the answer; its media come with it,
so chosen and rejected each see the prompt's pictures and clips.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .batching import Batch, Batching, collate, plan_epoch
from .encode import Encoded, encode
from .media import MediaPlan, open_image
from .rows import Row, _kind, _messages, json_lines, read_rows

SIDES = ("chosen", "rejected")
# Rows of pairs (and of GRPO's answers) pad to a multiple of 8, not of 32: a micro-batch of
# pairs holds few rows of similar short lengths, where 32 would pad a 40-token row by 60%;
# the few extra shapes compile once each.
ROW_MULTIPLE = 8


@dataclass(frozen=True)
class PairRow:
    where: str
    prompt: tuple[dict, ...]
    chosen: dict
    rejected: dict
    plain: bool  # string prompt and answers: encoded as prompt / completion rows
    folder: str = "."

    def side(self, name: str) -> Row:
        turns = (*self.prompt, getattr(self, name))
        return Row(self.where, "completion" if self.plain else "chat", turns, folder=self.folder)


def read_pairs(path: str | Path) -> list[PairRow]:
    """Every preference row of a JSONL file, validated; raises DataError at the first bad one."""
    return read_rows(path, parse_pair)


def holds_pairs(path: str | Path) -> bool:
    """Whether the JSONL file's first row is a preference pair (has chosen and rejected)."""
    for obj, _ in json_lines(Path(path), tolerant=True):
        return isinstance(obj, dict) and "chosen" in obj and "rejected" in obj
    return False


def parse_pair(obj: Any, where: str, folder: str = ".") -> PairRow:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_kind(obj)}")
    for key in SIDES:
        if key not in obj:
            found = ", ".join(sorted(obj)) or "none"
            raise DataError(f"{where}: {key}: missing (preference rows need prompt, chosen and "
                            f"rejected; found: {found})")  # fmt: skip
    prompt = obj.get("prompt")
    if isinstance(prompt, str) or (prompt is None and isinstance(obj["chosen"], str)):
        if not isinstance(prompt, str):
            raise DataError(f"{where}: prompt: missing (string answers need a string prompt)")
        answers = {}
        for key in SIDES:
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise DataError(
                    f"{where}: {key}: expected a non-empty string, as the prompt is one"
                )
            answers[key] = {"role": "assistant", "content": obj[key]}
        turns = ({"role": "user", "content": prompt},)
        return PairRow(where, turns, answers["chosen"], answers["rejected"], True, folder)
    sides = {k: _messages(obj[k], where, k) for k in SIDES}
    if prompt is None:  # implicit: the messages both sides share
        n = 0
        while n < min(map(len, sides.values())) - 1 and sides["chosen"][n] == sides["rejected"][n]:
            n += 1
        turns = tuple(sides["chosen"][:n])
        sides = {k: v[n:] for k, v in sides.items()}
    else:
        turns = tuple(_messages(prompt, where, "prompt"))
    if not turns:
        raise DataError(f"{where}: prompt: empty (chosen and rejected share no message)")
    for key, value in sides.items():
        if len(value) != 1 or value[0]["role"] != "assistant":
            raise DataError(f"{where}: {key}: expected one assistant message after the prompt")
        if isinstance(value[0]["content"], list) and any(p["type"] != "text"
                                                         for p in value[0]["content"]):  # fmt: skip
            raise DataError(f"{where}: {key}: images and audio belong in the prompt")
    return PairRow(where, turns, sides["chosen"][0], sides["rejected"][0], False, folder)


@dataclass
class PairStats:
    pairs: int = 0
    truncated: int = 0
    skipped: int = 0
    tokens: int = 0

    def line(self, name: str, max_seq_len: int) -> str:
        over = ""
        if self.truncated or self.skipped:
            over = (f"; over max_seq_len {max_seq_len}: {self.truncated} truncated, "
                    f"{self.skipped} skipped")  # fmt: skip
        return f"{name}: {self.pairs} preference pairs, {self.tokens:,} tokens{over}"


@dataclass(frozen=True)
class Pairs:
    """examples[2p] is pair p's chosen side, examples[2p + 1] its rejected side."""

    examples: list[Encoded]
    stats: PairStats = field(default_factory=PairStats)

    def __len__(self) -> int:
        return len(self.examples) // 2

    @cached_property
    def lengths(self) -> np.ndarray:
        """Positions of each pair's longer side (a batch pads every row to its longest)."""
        n = np.array([len(e) - 1 for e in self.examples], dtype=np.int64)
        return np.maximum(n[0::2], n[1::2])

    @cached_property
    def completion_tokens(self) -> np.ndarray:
        """[pairs, 2]: target tokens of each side's answer."""
        return np.array([int(e.loss[1:].sum()) for e in self.examples]).reshape(-1, 2)


def prepare_pairs(rows: list[PairRow], tokenizer, max_seq_len: int, overlong: str = "truncate",
                  stop_ids: frozenset[int] = frozenset(),
                  media: MediaPlan | None = None) -> Pairs:  # fmt: skip
    """Encode both sides of each row; a side over `max_seq_len` is truncated (never through an
    image or clip) or the pair skipped; a pair whose answer is cut away entirely is skipped."""
    stats = PairStats()
    examples: list[Encoded] = []
    for row in rows:
        sides = [encode(row.side(k), tokenizer, "last_assistant", stop_ids, media) for k in SIDES]
        for item in sides[0].media:
            if item.kind == "image":
                open_image(item.path, item.where)
        if any(len(e) > max_seq_len for e in sides):
            if overlong == "skip":
                stats.skipped += 1
                continue
            stats.truncated += 1
            sides = [e.truncate(max_seq_len) if len(e) > max_seq_len else e for e in sides]
        if any(len(e) < 2 or not e.loss[1:].any() for e in sides):
            stats.skipped += 1
            continue
        examples += sides
        stats.pairs += 1
        stats.tokens += sum(len(e) for e in sides)
    if not examples:
        where = rows[0].where.rsplit(":", 1)[0] if rows else "data"
        raise DataError(f"{where}: no pair keeps an answer within max_seq_len {max_seq_len}")
    return Pairs(examples, stats)


def pair_batching(cfg, ranks: int = 1) -> Batching:
    """Micro-batches of pairs: `train.batch_size` pairs (two rows each) at most, and
    `train.batch_tokens` slots over both rows; never packed."""
    whole = Batching.of(cfg, ranks)
    tokens = max(whole.tokens // 2, 1) if whole.tokens else None
    return Batching(whole.max_seq_len, False, whole.rows, tokens, ranks)


def plan_pairs(pairs: Pairs, batching: Batching, seed: int, epoch: int,
               shuffle: bool = True) -> list[list[int]]:  # fmt: skip
    """Micro-batches of pair indices, a pure function of (seed, epoch) as plan_epoch's are."""
    plan = plan_epoch(pairs.lengths, batching, seed, epoch, shuffle)
    return [[row[0] for row in batch] for batch in plan]


def pair_rows(batch: list[int]) -> list[list[int]]:
    """The example rows of a micro-batch of pairs: chosen, rejected, chosen, ..."""
    return [[i] for p in batch for i in (2 * p, 2 * p + 1)]


def host_arrays(pairs: Pairs, batch_pairs: list[int], max_seq_len: int, gather_positions,
                reference: np.ndarray | None, orpo: bool) -> tuple[tuple, Batch]:  # fmt: skip
    """A micro-batch of pairs as numpy arrays: the rows (inputs, segments), the gathered
    positions (`gather_positions(mask)` pads them) with their targets and what each is (its
    row, answer token or not, chosen-side token or not, for ORPO's NLL), and the reference
    log-probs [pairs, 2]; then the collated batch (for its media)."""
    batch = collate(pairs.examples, pair_rows(batch_pairs), max_seq_len, ROW_MULTIPLE)
    length = batch.inputs.shape[1]
    answer = batch.weights.reshape(-1) > 0
    row = np.repeat(np.arange(batch.inputs.shape[0]), length)
    whole = (batch.segments.reshape(-1) > 0) & (row % 2 == 0) if orpo else np.zeros_like(answer)
    gather = gather_positions(answer | whole)
    real = np.arange(len(gather)) < int((answer | whole).sum())
    ref = np.zeros((len(batch_pairs), 2), np.float32)
    if reference is not None:
        ref = reference[batch_pairs].astype(np.float32)
    arrays = (batch.inputs, batch.segments, gather, batch.targets.reshape(-1)[gather],
              row[gather], (answer[gather] & real).astype(np.float32),
              (whole[gather] & real).astype(np.float32), ref)  # fmt: skip
    return arrays, batch


def nll_tokens(pairs: Pairs, batch_pairs) -> int:
    """Target positions of the chosen sides of these pairs (ORPO's NLL count)."""
    return sum(len(pairs.examples[2 * p]) - 1 for p in batch_pairs)


REFERENCE = "reference.npz"  # a DPO run's reference log-probabilities, [pairs, 2] per split


def reference_logps(run_dir: Path, data: dict[str, Pairs], resume: bool, score, say,
                    write: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
    """DPO's reference log-probabilities of every pair of each split [pairs, 2]: the policy's
    at step 0 (`score(pairs)` now, once) or, on resume, read from the run folder."""
    import time

    from ..errors import MlxtuneError
    from ..io import atomic_folder

    path = Path(run_dir) / REFERENCE
    if resume:
        if not path.is_file():
            raise MlxtuneError(f"{path}: missing; a DPO run resumes from its reference "
                               "log-probabilities")  # fmt: skip
        saved = dict(np.load(path))
        for name, pairs in data.items():
            held = saved[name].shape[0] if name in saved else 0
            if held != len(pairs):
                raise MlxtuneError(f"{path}: holds {held} {name} pairs, the data has {len(pairs)}")
        return saved
    start = time.perf_counter()
    out = {name: score(pairs) for name, pairs in data.items()}
    say(f"reference: log-probabilities of {sum(map(len, data.values()))} pairs from the starting "
        f"weights in {time.perf_counter() - start:.1f} s")  # fmt: skip
    if write:
        with atomic_folder(Path(run_dir) / ".reference", replace=True) as tmp:
            np.savez(tmp / REFERENCE, **out)
        (Path(run_dir) / ".reference" / REFERENCE).replace(path)
        (Path(run_dir) / ".reference").rmdir()
    return out
