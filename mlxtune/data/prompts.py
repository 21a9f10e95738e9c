"""Prompt rows for GRPO, in TRL's shapes. Framework-free.

    {"prompt": "...", "answer": "..."}                       standard
    {"prompt": [messages], "pitch": "high"}                  conversational (media allowed)

Every other key of a row is a column that reward functions receive by name, one value per
completion (TRL's `**kwargs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from .rows import Row, _kind, _messages, read_rows


@dataclass(frozen=True)
class PromptRow:
    where: str
    messages: tuple[dict, ...]
    plain: bool  # a string prompt (given to reward functions as a string)
    columns: dict = field(default_factory=dict)
    folder: str = "."

    @property
    def row(self) -> Row:
        return Row(self.where, "completion" if self.plain else "chat", self.messages,
                   folder=self.folder)  # fmt: skip

    @property
    def prompt(self) -> str | list[dict]:
        """The prompt as reward functions get it: TRL's string or message list."""
        return self.messages[0]["content"] if self.plain else [dict(m) for m in self.messages]


def parse_prompt(obj: Any, where: str, folder: str = ".") -> PromptRow:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_kind(obj)}")
    if "prompt" not in obj:
        found = ", ".join(sorted(obj)) or "none"
        raise DataError(f"{where}: prompt: missing (grpo rows need a prompt; found: {found})")
    prompt = obj["prompt"]
    columns = {k: v for k, v in obj.items() if k != "prompt"}
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: prompt: empty")
        return PromptRow(where, ({"role": "user", "content": prompt},), True, columns, folder)
    messages = _messages(prompt, where, "prompt")
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: prompt: ends with an assistant turn; the model answers it")
    return PromptRow(where, tuple(messages), False, columns, folder)


def read_prompts(path: str | Path) -> list[PromptRow]:
    """Every prompt row of a JSONL file, validated; raises DataError at the first bad one."""
    return read_rows(path, parse_prompt)
