"""Padding: mlx-lm's own batching vs mlxtune's packing, on the same chats; and the packer's speed.
Seconds, no training.

    python benchmarks/bench_packing.py [--rows 1000] [--batch 4]
                                       [--sizes 5000,20000,100000,1000000] [--linear-up-to 20000]

The chats are bench_text_lora's (single turns of 20 to 1,000 tokens). mlx-lm's side is its own
`load_dataset` + `iterate_batches` over one epoch (batches of `--batch`, max length 1,024); ours
is `plan_epoch` + `collate` with packing into rows of 1,024 (half as many rows per batch, so
about the same tokens per step). Prints the share of batch positions holding a real token
(`--rows 0` skips it).

Then the first-fit packer alone on `--sizes` examples of 20 to 1,000 tokens (uniform, longest
first, rows of 1,024): mlxtune's max-tree and the linear scan it replaced (same rows; run up to
`--linear-up-to` examples, as it is quadratic), best of 3, and a whole epoch's `plan_epoch`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 1024


def mlx_lm_share(data_dir: Path, model: Path, batch: int) -> float:
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.trainer import iterate_batches
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model)
    args = types.SimpleNamespace(data=str(data_dir), train=True, test=False, mask_prompt=True)
    train, _, _ = load_dataset(args, tokenizer)
    real = slots = 0
    for tokens, lengths in iterate_batches(CacheDataset(train), batch, MAX_LEN):
        real += int(lengths[:, 1].sum().item())  # each row's length (mlx-lm's own bookkeeping)
        slots += tokens.size
    return real / slots


def mlxtune_share(data_dir: Path, model: Path, batch: int) -> float:
    from transformers import AutoTokenizer

    from mlxtune.data.batching import Batching, collate, plan_epoch, prepare
    from mlxtune.data.rows import read_rows

    data = prepare(
        read_rows(data_dir / "train.jsonl"), AutoTokenizer.from_pretrained(model), MAX_LEN
    )
    real = slots = 0
    for rows in plan_epoch(data.lengths, Batching(MAX_LEN, True, rows=batch), seed=0, epoch=0):
        b = collate(data.examples, rows, MAX_LEN)
        real, slots = real + b.real_tokens, slots + b.inputs.size
    return real / slots


def padding_share(args) -> None:
    from bench_text_lora import make_data

    from mlxtune.tiny import make_tiny

    work = Path(tempfile.mkdtemp(prefix="mlxtune-packing-"))
    model = make_tiny(work / "gemma4", "gemma4")  # only its tokenizer and chat template are used
    (work / "data").mkdir()
    make_data(work / "data", model, args.rows, seed=0)
    theirs = mlx_lm_share(work / "data", model, args.batch)
    ours = mlxtune_share(work / "data", model, max(1, args.batch // 2))
    print(f"{args.rows} chats of 20-1,000 tokens, rows of up to {MAX_LEN}")
    print(f"  mlx_lm lora (batches of {args.batch}, padded): real-token share {theirs:.1%}")
    print(
        f"  mlxtune (packed, {max(1, args.batch // 2)} rows per batch): real-token share {ours:.1%}"
    )
    print(
        f"  padding: {1 - theirs:.1%} vs {1 - ours:.1%}; compute per real token: {ours / theirs:.2f}x"
    )


def best_of(runs: int, fn, *args) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, out


def packer_speed(sizes: list[int], linear_up_to: int) -> None:
    import numpy as np

    from mlxtune.data.batching import Batching, _first_fit, plan_epoch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_data_packing import first_fit_linear  # the former packer: the tests' reference

    print(f"first-fit packing of examples of 20-1,000 tokens into rows of {MAX_LEN} (best of 3):")
    measured = None  # (examples, seconds) of the largest linear scan timed
    for n in sizes:
        lengths = np.random.default_rng(0).integers(20, 1001, n)
        order = np.argsort(-lengths, kind="stable")
        tree, rows = best_of(3, _first_fit, lengths, order, MAX_LEN)
        epoch, _ = best_of(3, plan_epoch, lengths, Batching(MAX_LEN, True, rows=4), 0, 0)
        line = f"  {n:>9,} examples -> {len(rows):,} rows: tree {tree:7.3f} s"
        if n <= linear_up_to:
            linear, old = best_of(3, first_fit_linear, lengths, order, MAX_LEN)
            assert old == rows, "the packers disagree"
            measured = (n, linear)
            line += f", linear scan {linear:7.3f} s ({linear / tree:,.0f}x)"
        elif measured:
            guess = measured[1] * (n / measured[0]) ** 2
            line += f", linear scan not run (~{guess:,.0f} s by its quadratic growth)"
        print(line + f"; plan_epoch {epoch:.3f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument(
        "--batch", type=int, default=4, help="mlx-lm's batch size; mlxtune packs half as many rows"
    )
    p.add_argument(
        "--sizes",
        default="5000,20000,100000,1000000",
        help="examples to pack in the speed test (empty: skip it)",
    )
    p.add_argument("--linear-up-to", type=int, default=20_000,
                   help="time the former linear scan up to this many examples")  # fmt: skip
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if args.rows:
        padding_share(args)
    if args.sizes:
        packer_speed([int(n) for n in args.sizes.split(",")], args.linear_up_to)


if __name__ == "__main__":
    main()
