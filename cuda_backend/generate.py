"""Greedy generation with transformers' KV cache, and exact-match accuracy: the twin of
`mlxtune/generate.py`'s `complete` and `exact_match`. Prompts (chat template, pictures and
clips expanded to their soft tokens) come from the same framework-free `chat_prompt`."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from mlxtune.data.rows import Row
from mlxtune.generate import Prompt, answered, chat_prompt

from . import model as model_lib


class _KnownIds:
    """Generation stays within the tokenizer's ids: a model's vocabulary can be larger (padded
    rows, Gemma's multimodal ids), and no text decodes from those."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] > self.n:
            scores[:, self.n :] = -float("inf")
        return scores


def complete(loaded: model_lib.Loaded, prompt: Prompt | str, max_tokens: int,
             temp: float = 0.0) -> str:  # fmt: skip
    """The reply to `prompt` (greedy at `temp` 0), special tokens dropped."""
    return "".join(stream(loaded, prompt, max_tokens, temp))


def stream(loaded: model_lib.Loaded, prompt: Prompt | str, max_tokens: int,
           temp: float = 0.0) -> Iterator[str]:  # fmt: skip
    """Pieces of the reply as transformers generates them (in a thread, through its
    TextIteratorStreamer), special tokens dropped."""
    import transformers

    tokenizer, where = loaded.tokenizer, loaded.device
    if isinstance(prompt, str):
        prompt = Prompt(text=prompt)
    ids = prompt.ids.tolist() if prompt.ids is not None else \
        tokenizer(prompt.text, add_special_tokens=False)["input_ids"]  # fmt: skip
    dtype = next(p.dtype for p in loaded.model.parameters() if p.is_floating_point())
    media = model_lib.media_kwargs(prompt.media, dtype, where) if prompt.media else {}
    inputs = torch.tensor([ids], device=where)
    stop = sorted(loaded.stop_ids)
    pieces = transformers.TextIteratorStreamer(tokenizer, skip_prompt=True,
                                               skip_special_tokens=True)  # fmt: skip
    sampling = {"do_sample": True, "temperature": temp, "top_k": 0} if temp > 0 else \
        {"do_sample": False}  # fmt: skip
    failed: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                loaded.model.generate(
                    input_ids=inputs, attention_mask=torch.ones_like(inputs),
                    max_new_tokens=max_tokens, eos_token_id=stop,
                    pad_token_id=stop[0] if stop else None, streamer=pieces,
                    logits_processor=transformers.LogitsProcessorList([_KnownIds(len(tokenizer))]),
                    **sampling, **media)  # fmt: skip
        except BaseException as e:  # raised again in the caller's thread
            failed.append(e)
            pieces.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    for piece in pieces:
        if piece:
            yield piece
    worker.join()
    if failed:
        raise failed[0]


def exact_match(loaded: model_lib.Loaded, rows: list[Row], max_rows: int | None = None,
                plan=None) -> dict:  # fmt: skip
    """Greedy answers to every row that ends in an assistant answer, compared after strip()."""
    cases = [c for c in map(answered, rows) if c is not None][:max_rows]
    hits = 0
    for question, answer in cases:
        budget = len(loaded.tokenizer(answer, add_special_tokens=False)["input_ids"]) + 8
        prompt = chat_prompt(loaded.tokenizer, question, plan, round_up=False)
        hits += complete(loaded, prompt, budget).strip() == answer.strip()
    n = len(cases)
    return {"exact_match": hits / n if n else None, "exact_match_rows": n}
