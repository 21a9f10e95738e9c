"""`mlxtune data convert` and `mlxtune data split`. Framework-free: stdlib only.

convert: alpaca, sharegpt or csv (see `formats.py`) to mlxtune JSONL, or back. Every converted
row passes `rows.parse_row`; relative media paths are rewritten so they still name the same
files from the output's folder. Round trips give back the same rows, except where a format has
two spellings of one thing: alpaca's instruction/input split is found again at the first blank
line; sharegpt comes back as conversations/from/value with <image>/<audio> markers and media
lists; csv comes back with its columns in LAYOUTS order, without id/language/duration.

Output goes to temp files beside the targets, renamed into place once all are written: an
error leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

from ..errors import ConfigError, DataError
from ..io import atomic_files
from . import formats
from .rows import Row, parse_row, read_rows

FORMATS = ("alpaca", "sharegpt", "csv")


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    from_format: str | None = None,
    to_format: str | None = None,
    prompt: str | None = None,
    force: bool = False,
) -> str:
    """Convert `src` from a format to mlxtune JSONL (`from_format`) or back (`to_format`);
    returns a one-line summary."""
    src, dst = Path(src), Path(dst)
    if (from_format is None) == (to_format is None):
        raise ConfigError("give one of --from FORMAT (to mlxtune JSONL) or --to FORMAT (from it)")
    fmt = from_format or to_format
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if prompt is not None and (fmt != "csv" or not prompt.strip()):
        raise ConfigError("--prompt: a non-empty instruction, only for csv image and audio rows")
    if not src.is_file():
        raise DataError(f"{src}: file not found")
    if dst.exists() and dst.resolve() == src.resolve():
        raise DataError(f"{dst}: is the input file; write the output elsewhere")
    if dst.exists() and not force:
        raise DataError(f"{dst}: exists; pass --force to overwrite it")
    src_dir, dst_dir = src.parent.resolve(), dst.parent.resolve()

    def rebase(path: str) -> str:
        # Relative media paths start at the file's folder: keep them naming the same file.
        if src_dir == dst_dir or Path(path).expanduser().is_absolute():
            return path
        return os.path.relpath(src_dir / path, dst_dir)

    if from_format:
        objs = formats.READERS[fmt](src, rebase, prompt)
        rows = [parse_row(obj, where, str(dst.parent)) for obj, where in objs]
        text = "".join(json.dumps(obj, ensure_ascii=False) + "\n" for obj, _ in objs)
    else:
        rows = read_rows(src)
        for row in rows:
            _check_files(row)
        if fmt == "csv":
            text = formats.to_csv(rows, rebase, prompt)
        else:
            text = _dump([formats.RECORD_WRITERS[fmt](row, rebase) for row in rows], dst)
    _write_files({dst: text})
    kinds = Counter("+".join(sorted({k for _, k, _ in row.media})) or "text" for row in rows)
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    return f"wrote {len(rows)} {to_format or 'mlxtune'} rows to {dst}: {counts}"


def _check_files(row: Row) -> None:
    for field, _, path in row.media:
        if not Path(path).is_file():
            raise DataError(f"{row.where}: {field}: file not found: {path}")


def _dump(records: list[dict], dst: Path) -> str:
    # .jsonl: one record a line; anything else: one JSON array, as alpaca and sharegpt ship.
    if dst.suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return json.dumps(records, ensure_ascii=False, indent=2) + "\n"


def _write_files(files: dict[Path, str]) -> None:
    """Write each file to a temp file beside it, then rename them all: an error leaves none."""
    with atomic_files(*files) as temps:
        for tmp, text in zip(temps, files.values(), strict=True):
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(text)


# ----------------------------------------------------------------------------------- split


def split(
    path: str | Path, valid: str | int | float = 0.05, seed: int = 0, force: bool = False
) -> str:
    """Shuffle the rows of a JSONL file by `seed` and write `<stem>.train.jsonl` and
    `<stem>.valid.jsonl` beside it (so relative media paths still hold); returns a summary."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    lines = _verbatim_lines(path)
    if len(lines) < 2:
        raise DataError(f"{path}: {len(lines)} rows; a split needs at least 2")
    n_valid = valid_count(valid, len(lines), path)
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    train = path.with_name(f"{path.stem}.train.jsonl")
    held = path.with_name(f"{path.stem}.valid.jsonl")
    for out in (train, held):
        if out.exists() and not force:
            raise DataError(f"{out}: exists; pass --force to overwrite it")
    _write_files(
        {
            train: "".join(lines[i] for i in order[n_valid:]),
            held: "".join(lines[i] for i in order[:n_valid]),
        }
    )
    return f"wrote {len(lines) - n_valid} rows to {train} and {n_valid} to {held} (seed {seed})"


def valid_count(valid: str | int | float, n: int, path: Path) -> int:
    """Validation rows out of `n`: `valid` is a share in (0, 1) or a count >= 1."""
    text = str(valid).strip()
    try:
        count = int(text)
    except ValueError:
        try:
            share = float(text)
        except ValueError:
            share = 0.0
        if not 0 < share < 1:
            raise ConfigError(
                f"--valid {valid}: expected a share in (0, 1) or a row count >= 1"
            ) from None
        return min(max(1, round(n * share)), n - 1)  # both sides keep at least one row
    if count < 1:
        raise ConfigError(f"--valid {valid}: expected a share in (0, 1) or a row count >= 1")
    if count >= n:
        raise DataError(f"{path}: --valid {count} leaves no training rows ({n} rows)")
    return count


def _verbatim_lines(path: Path) -> list[str]:
    lines = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.strip():
                    json.loads(line)
                    lines.append(line + "\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not UTF-8 (byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{number}: invalid JSON: {e.msg} at column {e.colno}"
                ) from None
    return lines
