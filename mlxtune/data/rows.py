"""Read and validate JSONL training rows. Framework-free: stdlib only.

Three row shapes, as mlx-lm, TRL and the OpenAI API write them:

    {"messages": [{"role": "user", "content": "..."}, ...], "tools": [...]}   chat
    {"prompt": "...", "completion": "..."}                                     completion
    {"text": "..."}                                                            text

`content` is a string or a list of parts: {"type": "text", "text": ...}, {"type": "image",
"image": path}, {"type": "audio", "audio": path}. Assistant turns may carry OpenAI-style
`tool_calls`; `tool` turns answer them. Every problem is a `DataError` naming file:line and the
field, e.g. `train.jsonl:17: messages[1].content[0].image: expected a string`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import DataError

ROLES = ("system", "developer", "user", "assistant", "tool")
PART_TYPES = {"text": "text", "image": "image", "audio": "audio"}  # part type -> its value key


@dataclass(frozen=True)
class Row:
    """One validated row. `messages` holds chat rows and completion rows (as user/assistant)."""

    where: str  # "path:line", for messages about this row
    kind: Literal["chat", "completion", "text"]
    messages: tuple[dict, ...] = ()
    tools: tuple[dict, ...] = ()
    text: str = ""
    folder: str = "."  # the JSONL file's folder: relative media paths start there

    @property
    def media(self) -> list[tuple[str, str, str]]:
        """(field, type, path) of every image/audio part, in the order the template renders them;
        relative paths are resolved against the JSONL file's folder."""
        found = []
        for i, message in enumerate(self.messages):
            content = message.get("content")
            for j, part in enumerate(content if isinstance(content, list) else []):
                kind = part["type"]
                if kind != "text":
                    path = Path(self.folder) / Path(part[kind]).expanduser()
                    found.append((f"messages[{i}].content[{j}].{kind}", kind, str(path)))
        return found


def read_rows(path: str | Path, parse=None) -> list:
    """Every row of a JSONL file, validated (by `parse`, default `parse_row`); raises
    DataError at the first bad one."""
    path = Path(path)
    parse = parse or parse_row
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = [parse(obj, where, str(path.parent)) for obj, where in json_lines(path)]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def scan_rows(path: str | Path) -> Iterator[Row | DataError]:
    """Each row of a JSONL file, or the DataError of each bad line: never stops at the first
    (for `mlxtune data validate`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    for obj, where in json_lines(path, tolerant=True):
        if isinstance(obj, DataError):
            yield obj
            continue
        try:
            yield parse_row(obj, where, str(path.parent))
        except DataError as e:
            yield e


def json_lines(path: Path, tolerant: bool = False) -> Iterator[tuple[Any, str]]:
    """(object, "path:line") per non-blank line; a bad line raises, or with `tolerant` comes
    as (DataError, where)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                yield json.loads(line.rstrip("\r\n")), where
            except UnicodeDecodeError as e:
                error = DataError(f"{where}: not UTF-8 (byte {e.start}: {raw[e.start]:#04x})")
            except json.JSONDecodeError as e:
                error = DataError(f"{where}: invalid JSON: {e.msg} at column {e.colno}")
            else:
                continue
            if not tolerant:
                raise error
            yield error, where


def parse_row(obj: Any, where: str, folder: str = ".") -> Row:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_kind(obj)}")
    if "chosen" in obj or "rejected" in obj:
        raise DataError(f"{where}: chosen, rejected: a preference row; train it with "
                        "train.method dpo or orpo")  # fmt: skip
    if "messages" in obj:
        messages = _messages(obj["messages"], where, "messages")
        tools = obj.get("tools") or []
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise DataError(f"{where}: tools: expected a list of objects")
        return Row(where, "chat", tuple(messages), tuple(tools), folder=folder)
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                raise DataError(f"{where}: {key}: expected a string, got {_kind(obj.get(key))}")
        if not obj["completion"].strip():
            raise DataError(f"{where}: completion: empty")
        turns = [
            {"role": "user", "content": obj["prompt"]},
            {"role": "assistant", "content": obj["completion"]},
        ]
        return Row(where, "completion", tuple(turns))
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise DataError(f"{where}: text: expected a non-empty string")
        return Row(where, "text", text=obj["text"])
    keys = ", ".join(sorted(obj)) or "none"
    raise DataError(f"{where}: no messages, prompt/completion or text field (found: {keys})")


def _messages(value: Any, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {field}: expected a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        at = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: {at}: expected an object, got {_kind(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: {at}.role: {role!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            content = _parts(content, where, f"{at}.content")
        calls = message.get("tool_calls") or []
        if calls and role != "assistant":
            raise DataError(f"{where}: {at}.tool_calls: only assistant messages make tool calls")
        for j, call in enumerate(calls):
            _tool_call(call, where, f"{at}.tool_calls[{j}]")
        if role == "assistant" and not calls and not _has_text(content):
            raise DataError(f"{where}: {at}.content: empty assistant turn")
        out.append({**message, "content": content})
    return out


def _parts(value: Any, where: str, field: str) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(f"{where}: {field}: expected a string or a list of parts")
    for j, part in enumerate(value):
        at = f"{field}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in PART_TYPES:
            raise DataError(f"{where}: {at}.type: expected one of {', '.join(PART_TYPES)}")
        key = PART_TYPES[kind]
        if not isinstance(part.get(key), str):
            raise DataError(f"{where}: {at}.{key}: expected a string, got {_kind(part.get(key))}")
    return value


def _tool_call(call: Any, where: str, field: str) -> None:
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise DataError(
            f"{where}: {field}: expected {{'function': {{'name': ..., 'arguments': ...}}}}"
        )
    if not isinstance(fn.get("arguments", {}), str | dict):
        raise DataError(f"{where}: {field}.function.arguments: expected an object or a JSON string")


def _has_text(content: str | list | None) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    return any(p["type"] != "text" or p["text"].strip() for p in content or [])


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), f"a {type(value).__name__}")
