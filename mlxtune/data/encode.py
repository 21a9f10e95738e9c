"""Rows -> token ids + a loss mask, through the tokenizer's own chat template. Framework-free.

Which tokens carry loss in a chat is found on the rendered text, not by re-tokenizing prefixes:
an assistant turn k spans from where `render(messages[:k], add_generation_prompt=True)` stops
agreeing with the full render, to where `render(messages[:k+1])` stops agreeing with it. Using
the longest common prefix (not "is a prefix") keeps this right for templates whose generation prompt is not a prefix of the finished turn (Gemma 4 26B/31B put an empty thought block there)
and for turns a tool call leaves open. Tokens overlapping a span (by the tokenizer's character
offsets) carry loss: the turn's text, its tool calls and its end-of-turn marker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np

from ..errors import DataError
from .media import MediaItem, MediaPlan
from .rows import Row


@dataclass(frozen=True)
class Encoded:
    """One example: `loss[i]` says whether token `ids[i]` is a prediction target. `media` are its
    images and clips, each standing at `start` as begin token, soft tokens, end token."""

    ids: np.ndarray  # int32 [n]
    loss: np.ndarray  # bool [n]
    where: str
    media: tuple[MediaItem, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def truncate(self, n: int) -> Encoded:
        """The first n tokens, cut before any media span that would not fit whole."""
        for item in self.media:
            if item.start + item.tokens + 2 > n:
                n = min(n, item.start)
        kept = tuple(m for m in self.media if m.start + m.tokens + 2 <= n)
        return Encoded(self.ids[:n], self.loss[:n], self.where, kept)


def encode(
    row: Row,
    tokenizer,
    loss_on: str = "assistant",
    stop_ids: frozenset[int] = frozenset(),
    media: MediaPlan | None = None,
) -> Encoded:
    """Encode one row. `tokenizer` is a Hugging Face (fast) tokenizer; `stop_ids` are the
    model's end-of-turn ids beyond `tokenizer.eos_token_id`; `media` says how the model takes
    images and audio (None: it takes none)."""
    if row.media:
        field, kind, _ = row.media[0]
        if media is None:
            raise DataError(
                f"{row.where}: {field}: {kind} parts need a multimodal model (Gemma 4 or Gemma 3n)"
            )
        return expand_media(_chat(row, tokenizer, loss_on, stop_ids | {tokenizer.eos_token_id},
                                  media), row, media)  # fmt: skip
    if row.kind == "text":
        ids = _with_bos(tokenizer, tokenizer(row.text, add_special_tokens=True)["input_ids"])
        ids = ids + [tokenizer.eos_token_id]
        return _encoded(ids, [True] * len(ids), row.where)
    if not tokenizer.chat_template:
        if row.kind == "completion":
            return _plain_completion(row, tokenizer, loss_on)
        raise DataError(f"{row.where}: messages: the tokenizer has no chat template")
    return _chat(row, tokenizer, loss_on, stop_ids | {tokenizer.eos_token_id})


def _chat(row: Row, tokenizer, loss_on: str, stop_ids: frozenset[int],
          media: MediaPlan | None = None) -> Encoded:  # fmt: skip
    messages = list(row.messages)
    full = _render(tokenizer, row, messages, generation_prompt=False, media=media)
    if loss_on == "all":
        spans = [(0, len(full))]
    else:
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise DataError(f"{row.where}: messages: no assistant turn to learn from")
        if loss_on == "last_assistant":
            turns = turns[-1:]
        spans = []
        for k in turns:
            start = _common_prefix(_render(tokenizer, row, messages[:k], True, media), full)
            end = _common_prefix(_render(tokenizer, row, messages[: k + 1], False, media), full)
            if end <= start:
                raise DataError(f"{row.where}: messages[{k}]: the chat template drops this turn")
            spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    ends = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)[:, 1]
    loss = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        inside = (ends > start) & (ends <= end)
        loss |= inside
        after = np.flatnonzero(ends > end)[:1]
        if after.size and int(ids[after[0]]) in stop_ids:
            loss[after] = True
    return _encoded(ids, loss, row.where)


def expand_media(enc: Encoded, row: Row, plan: MediaPlan) -> Encoded:
    """Each placeholder the template wrote becomes begin, N soft tokens, end; none carry loss."""
    items = [plan.item(kind, path, f"{row.where}: {field}") for field, kind, path in row.media]
    placeholder = {plan.span(kind)[1]: kind for kind in ("image", "audio")}
    at = [i for i, t in enumerate(enc.ids.tolist()) if t in placeholder]
    written = [placeholder[int(enc.ids[i])] for i in at]
    if written != [m.kind for m in items]:
        raise DataError(
            f"{row.where}: messages: the chat template wrote placeholders for "
            f"{_count(written)} but the row has {_count([m.kind for m in items])}"
        )
    ids, loss, placed, prev, shift = [], [], [], 0, 0
    for i, item in zip(at, items, strict=True):
        begin, soft, end = plan.span(item.kind)
        ids += [enc.ids[prev:i], np.array([begin, *[soft] * item.tokens, end], np.int32)]
        loss += [enc.loss[prev:i], np.zeros(item.tokens + 2, bool)]
        placed.append(replace(item, start=i + shift))
        shift += item.tokens + 1
        prev = i + 1
    ids.append(enc.ids[prev:])
    loss.append(enc.loss[prev:])
    return Encoded(np.concatenate(ids), np.concatenate(loss), enc.where, tuple(placed))


def _count(kinds: list[str]) -> str:
    parts = [f"{kinds.count(k)} {k}" for k in ("image", "audio") if kinds.count(k)]
    return " and ".join(parts) or "no media"


def _render(tokenizer, row: Row, messages: list[dict], generation_prompt: bool,
            media: MediaPlan | None = None) -> str:  # fmt: skip
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tools=list(row.tools) or None,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
    except Exception as e:  # jinja2 errors, raise_exception() in templates
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{row.where}: messages: the chat template failed: {message}") from None
    return surround_placeholders(text, tokenizer, media)


def surround_placeholders(text: str, tokenizer, media: MediaPlan | None) -> str:
    """The text the model's processor writes around each image and clip (Gemma 3n: a blank
    line each side), before tokenizing, so the tokens next to a placeholder come out as the
    processor's do."""
    if media is None or not media.around:
        return text
    for i in (media.tokens.image, media.tokens.audio):
        if i is not None:
            mark = tokenizer.convert_ids_to_tokens(int(i))
            text = text.replace(mark, media.around + mark + media.around)
    return text


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return len(os.path.commonprefix([a, b]))


def _plain_completion(row: Row, tokenizer, loss_on: str) -> Encoded:
    prompt, completion = (m["content"] for m in row.messages)
    head = _with_bos(tokenizer, tokenizer(prompt, add_special_tokens=True)["input_ids"])
    tail = tokenizer(completion, add_special_tokens=False)["input_ids"]
    tail = tail + [tokenizer.eos_token_id]
    loss = [loss_on == "all"] * len(head) + [True] * len(tail)
    return _encoded(head + tail, loss, row.where)


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    return [bos, *ids] if bos is not None and ids[:1] != [bos] else ids


def _encoded(ids, loss, where: str) -> Encoded:
    return Encoded(np.asarray(ids, dtype=np.int32), np.asarray(loss, dtype=bool), where)


def encode_prompt(row: Row, tokenizer, media: MediaPlan | None = None) -> Encoded:
    """A row's messages as a prompt awaiting the model's answer (the template's generation
    prompt after them), its images and clips expanded; no token carries loss."""
    if row.media and media is None:
        field, kind, _ = row.media[0]
        raise DataError(
            f"{row.where}: {field}: {kind} parts need a multimodal model (Gemma 4 or Gemma 3n)"
        )
    if not tokenizer.chat_template:
        if row.kind != "completion":
            raise DataError(f"{row.where}: prompt: the tokenizer has no chat template")
        ids = _with_bos(tokenizer, tokenizer(row.messages[0]["content"])["input_ids"])
        return _encoded(ids, [False] * len(ids), row.where)
    text = _render(tokenizer, row, list(row.messages), generation_prompt=True, media=media)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    enc = Encoded(ids, np.zeros(len(ids), bool), row.where)
    return expand_media(enc, row, media) if row.media else enc
