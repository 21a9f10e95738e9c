"""Tasks a tiny random model can learn in minutes, for `mlxtune demo` and the learn tests.

- `media` (the demo's default, on a tiny Gemma 4; `media-3n` the same on a tiny Gemma 3n, with
  longer tones as its soft tokens hold 4x more sound): pictures of three colours answered
  with the colour's name, tones of three pitches answered with high / mid / low, and rows
  holding both ("low, red"). Every picture and clip is drawn anew (shade, speckle, size; pitch jitter,
  length, loudness, sample rate, channels), so held-out rows are new files: passing them means
  the whole path (files, collation, towers, decoder, loss, adapter) learned to look and listen.
- `text` (a tiny Llama): the group of the words in a prompt ("Group: cat dog tiger" -> animal).
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import numpy as np

GROUPS = {
    "fruit": ("apple", "banana", "cherry", "mango"),
    "animal": ("cat", "dog", "horse", "tiger"),
    "tool": ("hammer", "saw", "drill", "wrench"),
    "colour": ("red", "green", "blue", "yellow"),
}
COLOURS = {"red": (210, 30, 30), "green": (30, 180, 40), "blue": (30, 50, 210)}
PITCHES = {"high": 3200.0, "mid": 800.0, "low": 200.0}  # Hz, two octaves apart
RATES = (8_000, 16_000, 22_050, 44_100)
ASK_IMAGE = "What colour is this image?"
ASK_AUDIO = "Is this tone high, mid or low?"
ASK_BOTH = "Is the tone high, mid or low, and what colour is the image?"


def rows(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    groups = list(GROUPS)
    out = []
    for _ in range(n):
        group = groups[rng.integers(len(groups))]
        words = " ".join(rng.choice(GROUPS[group], size=rng.integers(3, 7)))
        out.append({"messages": [{"role": "user", "content": f"Group: {words}"},
                                 {"role": "assistant", "content": group}]})  # fmt: skip
    return out


def write_task(
    folder: Path, n_train: int = 400, n_valid: int = 48, seed: int = 0
) -> tuple[Path, Path]:
    """train.jsonl and valid.jsonl in `folder`; valid uses a different seed (new filler)."""
    return _write_splits(folder, rows(seed, n_train), rows(seed + 1000, n_valid))


def _write_splits(folder: Path, train: list[dict], valid: list[dict]) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "valid.jsonl"
    for path, data in zip(paths, (train, valid), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    return paths


def preference_rows(seed: int, n: int, conversational: bool = True) -> list[dict]:
    """Preference pairs of the same task: chosen names the words' group, rejected another
    group (TRL's shapes: conversational message lists, or plain strings)."""
    rng = np.random.default_rng(seed)
    groups = list(GROUPS)
    out = []
    for _ in range(n):
        k = int(rng.integers(len(groups)))
        words = " ".join(rng.choice(GROUPS[groups[k]], size=rng.integers(3, 7)))
        wrong = groups[(k + 1 + int(rng.integers(len(groups) - 1))) % len(groups)]
        prompt, chosen, rejected = f"Group: {words}", groups[k], wrong
        if conversational:
            prompt = [{"role": "user", "content": prompt}]
            chosen = [{"role": "assistant", "content": chosen}]
            rejected = [{"role": "assistant", "content": rejected}]
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def write_preference_task(
    folder: Path, n_train: int = 200, n_valid: int = 48, seed: int = 0
) -> tuple[Path, Path]:
    """train.jsonl and valid.jsonl of preference pairs in `folder`."""
    return _write_splits(folder, preference_rows(seed, n_train),
                         preference_rows(seed + 1000, n_valid))  # fmt: skip


# ------------------------------------------------------------------------------ media task


def picture(rng: np.random.Generator, colour: str):
    """A speckled field of one colour at a random size and shade."""
    from PIL import Image

    h, w = (int(v) for v in rng.integers(24, 120, 2))
    base = np.array(COLOURS[colour], dtype=np.float64) * rng.uniform(0.7, 1.0)
    pixels = base + rng.normal(0, 18, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def tone(rng: np.random.Generator, pitch: str, seconds=(0.3, 1.2)) -> tuple[np.ndarray, int]:
    """(samples [n, channels], rate): a sine near the pitch, with a little noise."""
    rate = int(rng.choice(RATES))
    hz = min(PITCHES[pitch] * rng.uniform(0.9, 1.1), 0.45 * rate)
    t = np.arange(int(rate * rng.uniform(*seconds))) / rate
    wave = rng.uniform(0.2, 0.4) * np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi))
    wave = wave + rng.normal(0, 0.005, len(t))
    channels = int(rng.integers(1, 3))
    return np.repeat(wave[:, None], channels, axis=1).astype(np.float32), rate


def media_rows(folder: Path, seed: int, n: int, prefix: str, seconds=(0.3, 1.2)) -> list[dict]:
    """n rows (a third images, a third tones, a third both), their files written to folder."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        kind = ("image", "audio", "both")[i % 3]
        parts, answer = [], []  # for both: the pitch first, then the colour
        if kind in ("audio", "both"):
            pitch = str(rng.choice(list(PITCHES)))
            name = f"{prefix}{i:04d}.wav"
            sf.write(folder / name, *tone(rng, pitch, seconds))
            parts.append({"type": "audio", "audio": name})
            answer.append(pitch)
        if kind in ("image", "both"):
            colour = str(rng.choice(list(COLOURS)))
            name = f"{prefix}{i:04d}.png"
            picture(rng, colour).save(folder / name)
            parts.append({"type": "image", "image": name})
            answer.append(colour)
        ask = {"image": ASK_IMAGE, "audio": ASK_AUDIO, "both": ASK_BOTH}[kind]
        parts.append({"type": "text", "text": ask})
        out.append({"messages": [{"role": "user", "content": parts},
                                 {"role": "assistant", "content": ", ".join(answer)}]})  # fmt: skip
    return out


def write_media_task(
    folder: Path, n_train: int = 240, n_valid: int = 60, seed: int = 0, seconds=(0.3, 1.2)
) -> tuple[Path, Path]:
    """train.jsonl and valid.jsonl in `folder`, with their pictures and clips beside them;
    clips last `seconds` (low, high), drawn uniformly."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "valid.jsonl"
    data = (media_rows(folder, seed, n_train, "t", seconds),
            media_rows(folder, seed + 1000, n_valid, "v", seconds))  # fmt: skip
    for path, rows_ in zip(paths, data, strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows_), encoding="utf-8")
    return paths


# ------------------------------------------------------------------------------- the demo

# task -> (tiny family, its size overrides, data writer, config overrides)
TASKS = {
    "media": ("gemma4", {}, write_media_task,
              ["data.max_seq_len=256", "data.image_soft_tokens=70", "train.iters=120",
               "train.batch_size=8", "data.packing=true", "train.learning_rate=2e-3", "train.warmup_steps=10"]),
    # Gemma 3n: 256 + 188 soft tokens per picture and clip; pictures at 256 px, as MobileNetV5's
    # attention at the real 768 px takes seconds per picture on a CPU. The real 512-token window,
    # so every layer sees the media (the tiny default of 32 leaves them to the full layers). A
    # soft token holds 160 ms of sound (Gemma 4's: 40 ms), so the tones last four times as long
    # (the same 7-30 tokens of evidence); still the padded 188-token clip and the random towers
    # take twice Gemma 4's steps.
    "media-3n": ("gemma3n", {"image_size": 256, "sliding_window": 512},
                 partial(write_media_task, seconds=(1.2, 4.8)),
                 ["data.max_seq_len=512", "train.iters=240", "train.batch_size=8", "data.packing=true",
                  "train.learning_rate=2e-3", "train.warmup_steps=10"]),
    "text": ("llama", {}, write_task,
             ["data.max_seq_len=128", "train.iters=60", "train.batch_size=8", "data.packing=true",
              "train.learning_rate=3e-3", "train.warmup_steps=10"]),
}  # fmt: skip


def run(out: Path, echo, task: str = "media") -> dict:
    """Make a tiny model, measure held-out accuracy, fine-tune, measure again, show answers."""
    from .config import load_config
    from .data.rows import read_rows
    from .errors import ConfigError
    from .generate import answered, exact_match
    from .tiny import Sizes, make_tiny
    from .trainer import setup, train

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out: {out} is not empty; pick another folder")
    arch, sizes, writer, settings = TASKS[task]
    model_dir = make_tiny(out / "model", arch, seed=0, sizes=Sizes(**sizes))
    train_file, valid_file = writer(out / "data")
    overrides = [f"model.path={model_dir}", f"data.train={train_file}", f"data.valid={valid_file}",
                 f"output.dir={out / 'run'}", "train.report_every=10", "train.eval_every=0",
                 "train.save_every=0", *settings]  # fmt: skip
    cfg = load_config(None, overrides)
    valid = read_rows(valid_file)
    shown = [answered(row) for row in valid[:4]]
    base = setup(cfg)
    before = exact_match(base.model, base.loaded.wrapper, valid, plan=base.media)["exact_match"]
    replies = _replies(base, shown)
    echo(f"tiny random {arch} in {model_dir}; held-out accuracy before training: {before:.0%}")
    started = time.perf_counter()
    run_dir = train(cfg, echo=echo)
    seconds = time.perf_counter() - started
    tuned = setup(cfg, adapter=run_dir)
    after = exact_match(tuned.model, tuned.loaded.wrapper, valid, plan=tuned.media)["exact_match"]
    echo("held-out answers, before -> after training:")
    for (question, answer), old, new in zip(shown, replies, _replies(tuned, shown), strict=True):
        echo(f"  {_describe(question)}: {old!r} -> {new!r} (expected {answer!r})")
    echo(f"held-out accuracy: {before:.0%} -> {after:.0%} on {len(valid)} rows, "
         f"after {seconds:.0f} s of training; adapter in {run_dir}")  # fmt: skip
    return {"before": before, "after": after, "seconds": seconds, "run_dir": str(run_dir)}


def _replies(engine, cases) -> list[str]:
    from .generate import chat_prompt, complete

    tokenizer, wrapper = engine.loaded.tokenizer, engine.loaded.wrapper
    return [complete(engine.model, wrapper, chat_prompt(tokenizer, q, engine.media), 8).strip()
            for q, _ in cases]  # fmt: skip


def _describe(question) -> str:
    content = question.messages[-1]["content"]
    if isinstance(content, str):
        return repr(content)
    return " + ".join(p[p["type"]] if p["type"] != "text" else repr(p["text"]) for p in content)
