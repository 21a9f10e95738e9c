"""Generation with mlx-lm's sampler and KV cache, and exact-match accuracy on answered rows."""

from __future__ import annotations

from collections.abc import Iterator

from .data.rows import Row


def user_prompt(tokenizer, text: str) -> str:
    """A single user turn through the chat template, or the bare text without one."""
    if not tokenizer.chat_template:
        return text
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stream(model, wrapper, prompt: str, max_tokens: int, temp: float = 0.0) -> Iterator[str]:
    """Text pieces as they are generated (greedy at temp 0)."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=temp)
    for response in stream_generate(model, wrapper, prompt, max_tokens=max_tokens, sampler=sampler):
        yield response.text


def complete(model, wrapper, prompt: str, max_tokens: int) -> str:
    return "".join(stream(model, wrapper, prompt, max_tokens))


def answered(row: Row) -> tuple[list[dict], str] | None:
    """(the conversation before the answer, the expected answer) for rows that end in one."""
    if row.kind == "text" or row.messages[-1]["role"] != "assistant":
        return None
    answer = row.messages[-1]["content"]
    if not isinstance(answer, str) or row.messages[-1].get("tool_calls"):
        return None
    return list(row.messages[:-1]), answer


def exact_match(model, wrapper, rows: list[Row], max_rows: int | None = None) -> dict:
    """Greedy answers to every row that ends in an assistant answer, compared after strip()."""
    tokenizer = wrapper._tokenizer
    cases = [c for c in map(answered, rows) if c is not None][:max_rows]
    hits = 0
    for messages, answer in cases:
        if tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        else:
            prompt = messages[0]["content"]
        budget = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 8
        hits += complete(model, wrapper, prompt, budget).strip() == answer.strip()
    n = len(cases)
    return {"exact_match": hits / n if n else None, "exact_match_rows": n}
