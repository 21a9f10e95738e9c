"""Alpaca, ShareGPT and CSV rows to and from mlxtune rows (see `rows.py`). Framework-free:
stdlib only. `convert.py` drives these and writes the files.

    alpaca    {"instruction", "input"?, "output", "system"?}                 JSON array or JSONL
    sharegpt  {"conversations": [{"from", "value"}], "images"?, "audios"?, "tools"?}    same
    csv       one of LAYOUTS by header, as the Gemma multimodal fine-tuner writes them

Readers return (row, "file:line") pairs and name the source field in every error; writers raise
a DataError naming the row when the target format cannot hold it. Relative media paths go
through `rebase`, which keeps them naming the same files from the output's folder.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import DataError
from .rows import Row, _kind, json_lines

LAYOUTS = {  # csv layout -> its columns; when writing, the first layout every row fits wins
    "text": ("prompt", "response"),
    "completion": ("text",),
    "image": ("image_path", "caption"),
    "vqa": ("image_path", "question", "answer"),
    "audio": ("audio_path", "text"),
}
IGNORED_COLUMNS = ("id", "language", "duration")  # the fine-tuner's bookkeeping, not training text
PROMPTS = {"image": "Describe this image.", "audio": "Please transcribe this audio."}
SHAREGPT_ROLES = {
    "system": "system", "developer": "developer", "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "function_call": "assistant",
    "observation": "tool", "tool": "tool", "function": "tool",
}  # fmt: skip
SHAREGPT_NAMES = {"system": "system", "developer": "system", "user": "human",
                  "assistant": "gpt", "tool": "observation"}  # fmt: skip
MARKERS = {"image": "<image>", "audio": "<audio>"}

Rebase = Callable[[str], str]


# ---------------------------------------------------------------------------------- alpaca


def from_alpaca(path: Path, rebase: Rebase, prompt: str | None) -> list[tuple[dict, str]]:
    out = []
    for obj, where in _records(path):
        rec = _object(obj, where)
        if rec.get("history"):
            raise DataError(
                f"{where}: history: multi-turn alpaca rows are not supported; "
                "convert them as sharegpt"
            )
        instruction, output = _field(rec, "instruction", where), _field(rec, "output", where)
        extra = _field(rec, "input", where, required=False)
        system = _field(rec, "system", where, required=False)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        out.append(({"messages": _with_system(system, messages)}, where))
    return out


def to_alpaca(row: Row, rebase: Rebase) -> dict:
    system, user, reply, at = _single_turn(row, "alpaca")
    user = _plain(user, row.where, at, "alpaca")
    # The forward direction joined instruction and input with a blank line: split there again.
    instruction, _, extra = user.partition("\n\n")
    if not instruction.strip() or not extra:
        instruction, extra = user, ""
    rec = {"instruction": instruction, "input": extra, "output": reply}
    return {**rec, "system": system} if system else rec


# -------------------------------------------------------------------------------- sharegpt


def from_sharegpt(path: Path, rebase: Rebase, prompt: str | None) -> list[tuple[dict, str]]:
    out = []
    for obj, where in _records(path):
        rec = _object(obj, where)
        key = "conversations" if "conversations" in rec else "messages"
        turns = rec.get(key)
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: conversations: expected a non-empty list of turns")
        messages = [_share_turn(t, where, f"{key}[{i}]") for i, t in enumerate(turns)]
        system = _field(rec, "system", where, required=False)
        media = {kind: _share_media(rec, kind, where, path.parent) for kind in MARKERS}
        _place_media(messages, {k: [rebase(p) for p in v] for k, v in media.items()}, where)
        row = {"messages": _with_system(system, messages)}
        if rec.get("tools"):
            row["tools"] = _tools(rec["tools"], where)
        out.append((row, where))
    return out


def _share_turn(turn: Any, where: str, at: str) -> dict:
    turn = _object(turn, f"{where}: {at}")
    name = turn.get("from", turn.get("role"))
    if name not in SHAREGPT_ROLES:
        raise DataError(f"{where}: {at}.from: {name!r} is not one of {', '.join(SHAREGPT_ROLES)}")
    value = turn.get("value", turn.get("content"))
    if not isinstance(value, str):
        raise DataError(f"{where}: {at}.value: expected a string, got {_kind(value)}")
    role = SHAREGPT_ROLES[name]
    if name == "function_call":
        return {"role": role, "content": None, "tool_calls": _calls(value, where, at)}
    if role == "assistant" and not value.strip():
        raise DataError(f"{where}: {at}.value: empty")
    return {"role": role, "content": value}


def _calls(value: str, where: str, at: str) -> list[dict]:
    try:
        calls = json.loads(value)
    except json.JSONDecodeError:
        calls = None
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise DataError(f'{where}: {at}.value: expected JSON {{"name": ..., "arguments": ...}}')
    return [
        {"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
        for c in calls
    ]


def _tools(value: Any, where: str) -> list:
    try:
        tools = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        tools = None
    tools = [tools] if isinstance(tools, dict) else tools
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: tools: expected a list of tool schemas (or its JSON text)")
    return tools


def _share_media(rec: dict, kind: str, where: str, folder: Path) -> list[str]:
    key = f"{kind}s" if f"{kind}s" in rec else kind  # LLaMA-Factory lists; LLaVA one string
    value = rec.get(key) or []
    files = [value] if isinstance(value, str) else value
    if not isinstance(files, list):
        raise DataError(f"{where}: {key}: expected a path or a list of paths")
    for i, file in enumerate(files):
        _media_file(file, where, f"{key}[{i}]" if isinstance(value, list) else key, folder)
    return files


def _place_media(messages: list[dict], media: dict[str, list[str]], where: str) -> None:
    """Each <image>/<audio> marker in a user turn becomes that part, in place; media of a kind
    with no markers go before the text of the first user turn."""
    users = [m for m in messages if m["role"] == "user"]
    marked = {k: sum(m["content"].count(MARKERS[k]) for m in users) for k, v in media.items() if v}
    for kind, n in marked.items():
        if n and n != len(media[kind]):
            raise DataError(
                f"{where}: {kind}s: {len(media[kind])} files but {n} {MARKERS[kind]} markers"
            )
    queues = {MARKERS[kind]: iter(media[kind]) for kind, n in marked.items() if n}
    front = [_part(kind, f) for kind, n in marked.items() if not n for f in media[kind]]
    if front and not users:
        raise DataError(f"{where}: conversations: media but no user turn to carry them")
    # A marker of a kind with no files stays text: it may be a literal "<image>" in the prose.
    split = re.compile("(" + "|".join(map(re.escape, queues)) + ")")
    for i, message in enumerate(users):
        pieces = split.split(message["content"]) if queues else [message["content"]]
        parts = [_marked(p, queues) for p in pieces if p]
        parts = (front if i == 0 else []) + parts
        if any(p["type"] != "text" for p in parts):
            message["content"] = parts


def _marked(piece: str, queues: dict) -> dict:
    if piece in queues:
        kind = next(k for k, marker in MARKERS.items() if marker == piece)
        return _part(kind, next(queues[piece]))
    return _part("text", piece)


def to_sharegpt(row: Row, rebase: Rebase) -> dict:
    if row.kind == "text":
        raise DataError(f"{row.where}: text: a plain text row has no turns for sharegpt")
    turns, media = [], {kind: [] for kind in MARKERS}
    for i, message in enumerate(row.messages):
        value = message.get("content") or ""
        if isinstance(value, list):
            value = "".join(
                _marker(p, row.where, f"messages[{i}].content[{j}]", message, media, rebase)
                for j, p in enumerate(value)
            )
        if value or not message.get("tool_calls"):
            turns.append({"from": SHAREGPT_NAMES[message["role"]], "value": value})
        if message.get("tool_calls"):
            calls = [c.get("function", c) for c in message["tool_calls"]]
            calls = [{"name": c["name"], "arguments": c.get("arguments", {})} for c in calls]
            value = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            turns.append({"from": "function_call", "value": value})
    rec = {"conversations": turns} | {f"{k}s": files for k, files in media.items() if files}
    return rec | ({"tools": json.dumps(list(row.tools), ensure_ascii=False)} if row.tools else {})


def _marker(part: dict, where: str, at: str, message: dict, media: dict, rebase: Rebase) -> str:
    if part["type"] == "text":
        return part["text"]
    if message["role"] != "user":  # markers are read back from user turns only
        raise DataError(f"{where}: {at}: sharegpt holds {part['type']} only in user turns")
    media[part["type"]].append(rebase(part[part["type"]]))
    return MARKERS[part["type"]]


# ------------------------------------------------------------------------------------- csv


def from_csv(path: Path, rebase: Rebase, prompt: str | None) -> list[tuple[dict, str]]:
    out = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            layout = _layout(header, path)
            while True:
                line = reader.line_num + 1  # a quoted field may span lines: report the first
                values = next(reader, None)
                if values is None:
                    break
                if values:
                    where = f"{path}:{line}"
                    if len(values) != len(header):
                        raise DataError(
                            f"{where}: expected {len(header)} fields "
                            f"({','.join(header)}), got {len(values)}"
                        )
                    rec = dict(zip(header, values, strict=True))
                    out.append((_csv_row(layout, rec, where, path.parent, rebase, prompt), where))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: {e}") from None
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def _layout(header: list[str], path: Path) -> str:
    columns = set(header) - {"system", *IGNORED_COLUMNS}
    for name, wanted in LAYOUTS.items():
        # Plain text rows have no turns, so no system message either.
        system_ok = name != "completion" or "system" not in header
        if columns == set(wanted) and len(set(header)) == len(header) and system_ok:
            return name
    accepted = " | ".join(",".join(c) for c in LAYOUTS.values())
    raise DataError(
        f"{path}:1: header {','.join(header) or '(empty)'}: expected one of "
        f"{accepted} (plus optional system; {', '.join(IGNORED_COLUMNS)} ignored)"
    )


def _csv_row(
    layout: str, rec: dict, where: str, folder: Path, rebase: Rebase, prompt: str | None
) -> dict:
    for column in LAYOUTS[layout]:
        if not rec[column].strip():
            raise DataError(f"{where}: {column}: empty")
    if layout == "completion":
        return {"text": rec["text"]}
    *_, reply = (rec[c] for c in LAYOUTS[layout])  # the last column is the assistant's
    if layout == "text":
        user = rec["prompt"]
    else:
        kind = "audio" if layout == "audio" else "image"
        file = _media_file(rec[f"{kind}_path"], where, f"{kind}_path", folder)
        text = rec["question"] if layout == "vqa" else prompt or PROMPTS[kind]
        user = [_part(kind, rebase(file)), _part("text", text)]
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {"messages": _with_system(rec.get("system", ""), messages)}


def to_csv(rows: list[Row], rebase: Rebase, prompt: str | None) -> str:
    fits = [_csv_fits(row, rebase, prompt) for row in rows]
    common = list(LAYOUTS)
    for row, fit in zip(rows, fits, strict=True):
        if not [name for name in common if name in fit]:
            raise DataError(
                f"{row.where}: a csv file holds one layout; this row fits "
                f"{' or '.join(fit)}, the rows before it {' or '.join(common)}"
            )
        common = [name for name in common if name in fit]
    columns = list(LAYOUTS[common[0]]) + (
        ["system"] if any("system" in f[common[0]] for f in fits) else []
    )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(fit[common[0]] for fit in fits)
    return buf.getvalue()


def _csv_fits(row: Row, rebase: Rebase, prompt: str | None) -> dict[str, dict]:
    """The csv layouts this row can be written in, each with its record."""
    if row.kind == "text":
        return {"completion": {"text": row.text}}
    system, user, reply, at = _single_turn(row, "csv")
    extra = {"system": system} if system else {}
    if isinstance(user, str) or all(p["type"] == "text" for p in user):
        return {"text": {"prompt": _plain(user, row.where, at, "csv"), "response": reply} | extra}
    kinds = [p["type"] for p in user]
    if kinds not in (["image", "text"], ["audio", "text"]):
        raise DataError(
            f"{row.where}: {at}: csv holds one image or audio clip followed by text, "
            f"not {' + '.join(kinds)}"
        )
    kind, file, text = kinds[0], rebase(user[0][kinds[0]]), user[1]["text"]
    instruction = prompt or PROMPTS[kind]
    if kind == "audio":
        if text != instruction:
            raise DataError(
                f"{row.where}: {at}[1].text: csv audio rows say {instruction!r} "
                f"(see --prompt), this one {text!r}"
            )
        return {"audio": {"audio_path": file, "text": reply} | extra}
    fits = {"vqa": {"image_path": file, "question": text, "answer": reply} | extra}
    if text == instruction:
        fits["image"] = {"image_path": file, "caption": reply} | extra
    return fits


# ---------------------------------------------------------------------------------- shared


def _records(path: Path) -> list[tuple[Any, str]]:
    """(object, "file:line" or "file:[index]") of a JSON array file or a JSONL file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.start})") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}"
            ) from None
        found = [(item, f"{path}:[{i}]") for i, item in enumerate(items)]
    else:
        found = list(json_lines(path))
    if not found:
        raise DataError(f"{path}: no rows")
    return found


def _object(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_kind(obj)}")
    return obj


def _field(rec: dict, key: str, where: str, required: bool = True) -> str:
    value = rec.get(key)
    if value is None and not required:
        return ""
    if key not in rec:
        raise DataError(f"{where}: {key}: missing")
    if not isinstance(value, str):
        raise DataError(f"{where}: {key}: expected a string, got {_kind(value)}")
    if required and not value.strip():
        raise DataError(f"{where}: {key}: empty")
    return value


def _media_file(value: Any, where: str, field: str, folder: Path) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {field}: expected a file path, got {_kind(value)}")
    if not value.strip():
        raise DataError(f"{where}: {field}: empty")
    if not (folder / Path(value).expanduser()).is_file():
        raise DataError(f"{where}: {field}: file not found: {value}")
    return value


def _part(kind: str, value: str) -> dict:
    return {"type": kind, kind: value}


def _with_system(system: str, messages: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + messages


def _single_turn(row: Row, fmt: str) -> tuple[str, str | list, str, str]:
    """(system text, user content, reply text, user content's field) of a row that is one
    exchange, as alpaca and csv hold them; anything more is an error naming the row."""
    if row.kind == "text":
        raise DataError(f"{row.where}: text: a plain text row has no prompt and reply for {fmt}")
    if row.tools:
        raise DataError(f"{row.where}: tools: {fmt} has no tools")
    messages = list(row.messages)
    system = messages.pop(0)["content"] if messages[0]["role"] in ("system", "developer") else ""
    roles = [m["role"] for m in messages]
    if roles != ["user", "assistant"] or messages[1].get("tool_calls"):
        raise DataError(
            f"{row.where}: messages: {fmt} holds one user turn and one plain reply (after an "
            f"optional system message), not {', '.join(roles) or 'nothing'}"
        )
    first = 1 if system != "" else 0
    system = _plain(system, row.where, "messages[0].content", fmt)
    reply = _plain(messages[1]["content"], row.where, f"messages[{first + 1}].content", fmt)
    return system, messages[0]["content"], reply, f"messages[{first}].content"


def _plain(content: str | list | None, where: str, field: str, fmt: str) -> str:
    if not isinstance(content, list):
        return content or ""
    for j, part in enumerate(content):
        if part["type"] != "text":
            raise DataError(f"{where}: {field}[{j}]: {fmt} holds no {part['type']} here")
    return "".join(part["text"] for part in content)


READERS = {"alpaca": from_alpaca, "sharegpt": from_sharegpt, "csv": from_csv}
RECORD_WRITERS = {"alpaca": to_alpaca, "sharegpt": to_sharegpt}  # per row; csv: to_csv, per file
