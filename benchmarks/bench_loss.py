"""The loss alone: full fp32 logits (what mlx-lm computes) vs mlxtune's chunked loss.

    python benchmarks/bench_loss.py [--tokens 2048] [--hidden 256] [--chunks 32,128]

A Gemma-style head: tied embedding over the real 262,144-token vocabulary with logit
softcapping at 30. Each variant computes the loss and its gradient for the same hidden states
(through one trainable matrix), in one process, after a warm-up; prints time and MLX's peak
memory above the inputs, and the ratios to the full-logits baseline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

VOCAB = 262_144


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--chunks", default="32,128")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mlx.core as mx
    import mlx.nn as nn

    from mlxtune.loss import chunked_loss, full_logits_loss

    mx.random.seed(0)
    emb = nn.Embedding(VOCAB, args.hidden)
    proj = mx.random.normal((args.hidden, args.hidden)) * 0.05
    x = mx.random.normal((args.tokens, args.hidden))
    targets = mx.random.randint(0, VOCAB, (args.tokens,))
    weights = mx.ones((args.tokens,))
    mx.eval(emb.parameters(), proj, x, targets, weights)

    def head(h):
        return mx.tanh(emb.as_linear(h) / 30.0) * 30.0

    variants = {"full logits": lambda p: full_logits_loss(head(x @ p), targets, weights)}
    for c in map(int, args.chunks.split(",")):
        variants[f"chunked {c}"] = lambda p, c=c: chunked_loss(head, c)(x @ p, targets, weights)
    print(f"{args.tokens} tokens, hidden {args.hidden}, vocab {VOCAB:,}, softcapped tied head")
    base = None
    for name, fn in variants.items():
        step = mx.value_and_grad(fn)
        mx.eval(step(proj))  # warm-up
        mx.reset_peak_memory()
        floor = mx.get_active_memory()
        start = time.perf_counter()
        loss, grad = step(proj)
        mx.eval(loss, grad)
        seconds, peak = time.perf_counter() - start, (mx.get_peak_memory() - floor) / 2**30
        base = base or (seconds, peak)
        print(f"  {name:12} {seconds:7.2f} s  peak {peak:6.2f} GiB  loss {loss.item():.3f}  "
              f"time {seconds / base[0]:.2f}x  memory {peak / base[1]:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
