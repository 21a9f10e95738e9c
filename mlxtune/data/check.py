"""`mlxtune data validate` and `mlxtune data stats`: every row of a JSONL file checked and
counted, without loading model weights or any ML framework.

With a model (`model.path` from a config, `--set` or `--model`), rows are encoded exactly as
training encodes them: its tokenizer and chat template, its media plan (soft tokens per picture
and clip), `data.loss_on`; lengths are checked against `data.max_seq_len` and packing is
simulated with the trainer's own first-fit packer. With or without one, every picture and clip
is decoded (unless `decode=False`: then encoding reads only the pictures' headers); a file that
cannot be, an image past pillow's decompression-bomb limit included, is one problem line.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import DataError
from .batching import Batching, _first_fit
from .encode import encode
from .media import AudioSpec, MediaPlan, open_image, read_audio
from .rows import Row, scan_rows


@dataclass
class Tokenizing:
    """What encoding needs from a model: no weights."""

    name: str
    tokenizer: object
    stop_ids: frozenset[int]
    media: MediaPlan | None


@dataclass
class Report:
    path: Path
    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line each, "file:line: ..."
    bad_rows: int = 0
    lengths: list[int] = field(default_factory=list)  # tokens per good row (with a model)
    loss_tokens: int = 0


def tokenizing(cfg: Config) -> Tokenizing | None:
    """The config's model as far as encoding needs it; None when no model is set."""
    if not cfg.model.path:
        return None
    from transformers import AutoTokenizer

    from ..hub import resolve_path

    folder = resolve_path(cfg.model.path)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    media = MediaPlan.for_model(cfg.model.backend, folder, config, cfg.data.image_soft_tokens)
    return Tokenizing(cfg.model.path, tokenizer, _stop_ids(folder, config), media)


def _stop_ids(folder: Path, config: dict) -> frozenset[int]:
    """End-of-turn ids as mlx-lm reads them: generation_config.json, else config.json."""
    ids = config.get("eos_token_id", config.get("text_config", {}).get("eos_token_id"))
    gen = folder / "generation_config.json"
    if gen.is_file():
        ids = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id", ids)
    ids = [ids] if isinstance(ids, int) else ids or []
    return frozenset(int(i) for i in ids)


PROGRESS_EVERY = 1000  # rows between progress calls: decoding media can take minutes


def check(path: str | Path, cfg: Config, model: Tokenizing | None,
          progress: Callable[[int], None] | None = None,
          decode: bool = True) -> Report:  # fmt: skip
    """Every row: schema, roles, media decode, and with a model its encoded length.
    `progress(rows so far)` is called every PROGRESS_EVERY rows. `decode=False` (for counting
    only) skips decoding the pictures, whose tokens need only their headers."""
    report = Report(Path(path))
    d = cfg.data
    for n, item in enumerate(scan_rows(path), start=1):
        if progress is not None and n % PROGRESS_EVERY == 0:
            progress(n)
        if isinstance(item, DataError):
            report.problems.append(str(item))
            report.bad_rows += 1
            continue
        try:
            if decode:
                _decode_media(item, clips=model is None)  # with a model, encoding reads clips
            if model is not None:
                ex = encode(item, model.tokenizer, d.loss_on, model.stop_ids, model.media)
                if not ex.loss[1:].any():
                    raise DataError(f"{item.where}: no token carries loss (data.loss_on: "
                                    f"{d.loss_on})")  # fmt: skip
                if len(ex) > d.max_seq_len:
                    fate = "truncated" if d.overlong == "truncate" else "skipped"
                    report.problems.append(
                        f"{item.where}: {len(ex)} tokens, over data.max_seq_len {d.max_seq_len} "
                        f"(training will have it {fate}: data.overlong)"
                    )
                report.lengths.append(len(ex))
                report.loss_tokens += int(ex.loss[1:].sum())
        except DataError as e:
            report.problems.append(str(e))
            report.bad_rows += 1
            continue
        report.rows.append(item)
    if not report.rows and not report.problems:
        report.problems.append(f"{path}: no rows")
    return report


def _decode_media(row: Row, clips: bool = True) -> None:
    for where, kind, file in row.media:
        at = f"{row.where}: {where}"
        if kind == "image":
            open_image(file, at)
        elif clips:
            read_audio(file, at, AudioSpec())


def summary(report: Report) -> str:
    good = len(report.rows)
    total = good + report.bad_rows
    over = len(report.problems) - report.bad_rows
    line = f"{report.path}: {total} rows, {good} ok, {report.bad_rows} with errors"
    return line + (f", {over} over data.max_seq_len" if over else "")


# ------------------------------------------------------------------------------------- stats


def modalities(rows: list[Row]) -> tuple[Counter, Counter]:
    """(rows by what they hold: text / image / audio / image+audio, parts by kind)."""
    by_row, parts = Counter(), Counter()
    for row in rows:
        kinds = sorted({kind for _, kind, _ in row.media})
        by_row["+".join(kinds) or "text"] += 1
        parts.update(kind for _, kind, _ in row.media)
    return by_row, parts


def stats_lines(report: Report, cfg: Config, model: Tokenizing | None) -> list[str]:
    rows = report.rows
    kinds = Counter(r.kind for r in rows)
    by_row, parts = modalities(rows)
    out = [
        f"{report.path}: {len(rows)} rows ("
        + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ")",
        "modalities: " + ", ".join(f"{k} {n}" for k, n in sorted(by_row.items()))
        + "".join(f"; {n} {'pictures' if k == 'image' else 'clips'}"
                  for k, n in sorted(parts.items())),
    ]  # fmt: skip
    if report.bad_rows:
        out.append(f"skipped {report.bad_rows} rows with errors (mlxtune data validate lists them)")
    if model is None:
        out.append("token lengths: give a model (--model PATH, or model.path in -c CONFIG)")
        return out
    n = np.array(report.lengths)
    p = np.percentile(n, [50, 90, 99]).round().astype(int)
    out.append(f"tokens per row ({model.name}): min {n.min()}, p50 {p[0]}, p90 {p[1]}, "
               f"p99 {p[2]}, max {n.max()}; {n.sum():,} in all, {report.loss_tokens:,} with loss")  # fmt: skip
    out += histogram(n)
    out += packing_lines(n, cfg)
    return out


def histogram(lengths: np.ndarray, bins: int = 10, width: int = 40) -> list[str]:
    """Text bars of the length distribution: one per length when there are few, else `bins`
    ranges (each from its low end up to below the next one's)."""
    values = np.unique(lengths)
    if len(values) <= bins:
        counts = [int((lengths == v).sum()) for v in values]
        labels = [str(v) for v in values]
    else:
        counts, edges = np.histogram(lengths, bins=bins)
        starts = np.ceil(edges).astype(int)
        labels = [f"{lo}-{hi - 1}" for lo, hi in zip(starts[:-1], starts[1:], strict=True)]
        labels[-1] = f"{starts[-2]}-{int(lengths.max())}"
    top, pad = max(counts), max(map(len, labels))
    return [f"  {label:>{pad}} {'#' * max(int(c > 0), round(width * c / top)):<{width}} {c}"
            for label, c in zip(labels, counts, strict=True)]  # fmt: skip


def packing_lines(lengths: np.ndarray, cfg: Config) -> list[str]:
    """How full the micro-batches would be, packed and not (tokens / row slots). A row holds
    an example's inputs (its tokens but the last), as the trainer lays them out."""
    batching = Batching.of(cfg)
    cap = batching.max_seq_len
    fitting = np.minimum(lengths - 1, cap)
    packed = _first_fit(fitting, np.argsort(-fitting, kind="stable"), cap)
    used = [int(fitting[r].sum()) for r in packed]
    plain = fitting.tolist()
    fill = {on: sum(plain) / replace(batching, packing=on).slots(used if on else plain)
            for on in (True, False)}  # fmt: skip
    chosen = "packing" if batching.packing else "one example per row"
    return [
        f"micro-batches ({_budget(batching)}; data.packing {str(batching.packing).lower()}: "
        f"{chosen}): {fill[batching.packing]:.1%} of the slots hold tokens",
        f"with data.packing {str(not batching.packing).lower()}: {fill[not batching.packing]:.1%}"
        f" ({len(lengths)} examples in {len(packed)} packed rows of {cap})",
    ]


def _budget(b: Batching) -> str:
    parts = [f"{b.tokens:,} tokens"] * bool(b.tokens) + [f"{b.rows} rows"] * bool(b.rows)
    return " and ".join(parts) + " at most"
