"""Padding: mlx-lm's own batching vs mlxtune's packing, on the same chats. Seconds, no training.

    python benchmarks/bench_packing.py [--rows 1000] [--batch 4]

The chats are bench_text_lora's (single turns of 20 to 1,000 tokens). mlx-lm's side is its own
`load_dataset` + `iterate_batches` over one epoch (batches of `--batch`, max length 1,024); ours
is `plan_epoch` + `collate` with packing into rows of 1,024 (half as many rows per batch, so
about the same tokens per step). Prints the share of batch positions holding a real token.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
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

    from mlxtune.data.batching import collate, plan_epoch, prepare
    from mlxtune.data.rows import read_rows

    data = prepare(
        read_rows(data_dir / "train.jsonl"), AutoTokenizer.from_pretrained(model), MAX_LEN
    )
    real = slots = 0
    for rows in plan_epoch(data.lengths, batch, MAX_LEN, True, seed=0, epoch=0):
        b = collate(data.examples, rows, MAX_LEN)
        real, slots = real + b.real_tokens, slots + b.inputs.size
    return real / slots


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument(
        "--batch", type=int, default=4, help="mlx-lm's batch size; mlxtune packs half as many rows"
    )
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
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


if __name__ == "__main__":
    main()
