"""A task a tiny random model can learn in a minute, for `mlxtune demo` and the learn test.

Each prompt lists three to six words drawn from one group ("Group: cat dog cat tiger"); the
answer is the group (fruit, animal, tool, colour). Held-out rows are new draws, so passing them
means the model learned what the words have in common, not the training rows. The signal is
spread over the prompt, so even a random model's near-uniform attention carries it to the
answer; LoRA has to learn to read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GROUPS = {
    "fruit": ("apple", "banana", "cherry", "mango"),
    "animal": ("cat", "dog", "horse", "tiger"),
    "tool": ("hammer", "saw", "drill", "wrench"),
    "colour": ("red", "green", "blue", "yellow"),
}


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
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "valid.jsonl"
    for path, data in zip(paths, (rows(seed, n_train), rows(seed + 1000, n_valid)), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    return paths


def run(out: Path, echo) -> dict:
    """Make a tiny model, measure held-out accuracy, fine-tune for ~a minute, measure again."""
    import time

    from .config import load_config
    from .data.rows import read_rows
    from .generate import answered, complete, exact_match
    from .tiny import make_tiny
    from .trainer import setup, train

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        from .errors import ConfigError

        raise ConfigError(f"--out: {out} is not empty; pick another folder")
    model_dir = make_tiny(out / "model", "llama", seed=0)
    train_file, valid_file = write_task(out / "data")
    overrides = [f"model.path={model_dir}", f"data.train={train_file}", f"data.valid={valid_file}",
                 f"output.dir={out / 'run'}", "data.max_seq_len=128", "train.iters=60",
                 "train.batch_size=8", "train.learning_rate=3e-3", "train.warmup_steps=10",
                 "train.report_every=10", "train.eval_every=0", "train.save_every=0"]  # fmt: skip
    cfg = load_config(None, overrides)
    valid = read_rows(valid_file)
    base = setup(cfg)
    before = exact_match(base.model, base.loaded.wrapper, valid)["exact_match"]
    echo(f"tiny random Llama in {model_dir}; held-out accuracy before training: {before:.0%}")
    started = time.perf_counter()
    run_dir = train(cfg, echo=echo)
    seconds = time.perf_counter() - started
    tuned = setup(cfg, adapter=run_dir)
    after = exact_match(tuned.model, tuned.loaded.wrapper, valid)["exact_match"]
    for row in valid[:3]:
        messages, answer = answered(row)
        prompt = tuned.loaded.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        reply = complete(tuned.model, tuned.loaded.wrapper, prompt, 8).strip()
        echo(f"  {messages[0]['content']!r} -> {reply!r} (expected {answer!r})")
    echo(f"held-out accuracy: {before:.0%} -> {after:.0%} on {len(valid)} rows, "
         f"after {seconds:.0f} s of training; adapter in {run_dir}")  # fmt: skip
    return {"before": before, "after": after, "seconds": seconds, "run_dir": str(run_dir)}
