"""Generation with mlx-lm's sampler and KV cache, and exact-match accuracy on answered rows.

A prompt with images or audio goes through the same placeholder expansion as training; the
model's `embed()` puts the soft tokens in, and mlx-lm generates from those embeddings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data.batching import media_arrays
from .data.encode import Encoded, expand_media, surround_placeholders
from .data.media import MediaPlan
from .data.rows import Row


@dataclass(frozen=True)
class Prompt:
    """Rendered text (text-only prompts), or token ids plus the media arrays they need."""

    text: str = ""
    ids: np.ndarray | None = None
    media: dict[str, np.ndarray] = field(default_factory=dict)


def user_prompt(tokenizer, text: str) -> str:
    """A single user turn through the chat template, or the bare text without one."""
    if not tokenizer.chat_template:
        return text
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_prompt(tokenizer, row: Row, plan: MediaPlan | None = None,
                round_up: bool = True) -> Prompt:  # fmt: skip
    """The row's messages as a prompt awaiting the model's turn (`round_up`: as
    `media_arrays`; transformers' towers take the media unpadded)."""
    messages = list(row.messages)
    if not tokenizer.chat_template:
        return Prompt(text=messages[0]["content"])
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not row.media or plan is None:
        return Prompt(text=text)
    text = surround_placeholders(text, tokenizer, plan)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    ex = expand_media(Encoded(ids, np.zeros(len(ids), bool), row.where), row, plan)
    placed = [(m.start, m) for m in ex.media]
    return Prompt(ids=ex.ids, media=media_arrays(placed, len(ex.ids), round_up=round_up))


def media_prompt(loaded, text: str, images=(), audio=(), image_soft_tokens=None,
                 round_up: bool = True) -> Prompt:  # fmt: skip
    """One user turn: the images, then the clips, then the text (`mlxtune generate`);
    `round_up` as `chat_prompt`'s."""
    from .errors import MlxtuneError

    plan = loaded.media_plan(image_soft_tokens)
    if plan is None:
        raise MlxtuneError(f"--image/--audio: {loaded.path} takes no images or audio")
    parts = [{"type": kind, kind: str(Path(path).resolve())}
             for kind, paths in (("image", images), ("audio", audio)) for path in paths]  # fmt: skip
    for part in parts:  # each file checked once, with the option it came from in the message
        plan.item(part["type"], part[part["type"]], f"--{part['type']}")
    message = {"role": "user", "content": [*parts, {"type": "text", "text": text}]}
    return chat_prompt(loaded.tokenizer, Row("prompt", "chat", (message,)), plan, round_up)


def stream(model, wrapper, prompt: Prompt | str, max_tokens: int, temp: float = 0.0
           ) -> Iterator[str]:  # fmt: skip
    """Text pieces as they are generated (greedy at temp 0)."""
    for response in responses(model, wrapper, prompt, max_tokens, temp):
        yield response.text


def responses(model, wrapper, prompt: Prompt | str, max_tokens: int, temp: float = 0.0
              ) -> Iterator:  # fmt: skip
    """mlx-lm's GenerationResponse for each generated token (`.token`, `.text`, `.logprobs`);
    the last one's token is the stop id when the model stopped."""
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    if isinstance(prompt, str):
        prompt = Prompt(text=prompt)
    kwargs: dict = {"max_tokens": max_tokens, "sampler": make_sampler(temp=temp),
                    "logits_processors": [_known_ids(len(wrapper._tokenizer))]}  # fmt: skip
    tokens: str | mx.array = prompt.text
    if prompt.ids is not None:
        tokens = mx.array(prompt.ids)
        media = {k: mx.array(v) for k, v in prompt.media.items()}
        kwargs["input_embeddings"] = model.embed(tokens[None], media)[0]
    yield from stream_generate(model, wrapper, tokens, **kwargs)


def _known_ids(n: int):
    """A logits processor that keeps generation to the tokenizer's ids: a model's vocabulary
    can be larger (Gemma 3n's multimodal ids, padded rows), and no text decodes from those."""
    import mlx.core as mx

    def keep(_tokens, logits):
        if logits.shape[-1] <= n:
            return logits
        return mx.where(mx.arange(logits.shape[-1]) < n, logits, -mx.inf)

    return keep


def complete(model, wrapper, prompt: Prompt | str, max_tokens: int) -> str:
    return "".join(stream(model, wrapper, prompt, max_tokens))


def answered(row: Row) -> tuple[Row, str] | None:
    """(the row cut before its answer, the expected answer) for rows that end in one."""
    if row.kind == "text" or row.messages[-1]["role"] != "assistant":
        return None
    answer = row.messages[-1]["content"]
    if not isinstance(answer, str) or row.messages[-1].get("tool_calls"):
        return None
    return Row(row.where, row.kind, row.messages[:-1], row.tools, folder=row.folder), answer


def exact_match(model, wrapper, rows: list[Row], max_rows: int | None = None,
                plan: MediaPlan | None = None) -> dict:  # fmt: skip
    """Greedy answers to every row that ends in an assistant answer, compared after strip()."""
    tokenizer = wrapper._tokenizer
    cases = [c for c in map(answered, rows) if c is not None][:max_rows]
    hits = 0
    for question, answer in cases:
        budget = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 8
        reply = complete(model, wrapper, chat_prompt(tokenizer, question, plan), budget)
        hits += reply.strip() == answer.strip()
    n = len(cases)
    return {"exact_match": hits / n if n else None, "exact_match_rows": n}
