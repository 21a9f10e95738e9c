"""One attention layer, forward and backward, over the same examples laid out three ways.

    python benchmarks/bench_attention.py [--rows 2] [--lengths 600,300,124] [--heads 9 --kv 3]

The default shape is SmolLM2-135M's attention (9 query heads over 3 KV heads of 64), float32.
Each of `--rows` rows holds the examples of `--lengths` (1,024 tokens in all by default):

- packed, with the mask a packed row needs: boolean `[rows, 1, L, L]` (what mlxtune hands
  mlx-lm's models with `data.packing: true`), or additive in the compute dtype;
- packed, causal only (not a correct packed attention: the floor of what any mask costs);
- one example per row: each example its own causal row, padded to a multiple of 32, the
  layout of mlxtune's default batches.

Prints the best of 3 wall times and MLX's peak memory for each, and the ratios to the packed
boolean mask.
"""

from __future__ import annotations

import argparse
import time


def measure(q, k, v, mask) -> tuple[float, float]:
    import mlx.core as mx

    def loss(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask).sum()

    step = mx.value_and_grad(loss, argnums=(0, 1, 2))
    mx.eval(step(q, k, v))  # warm
    best, peak = float("inf"), 0.0
    for _ in range(3):
        mx.eval(q, k, v)
        mx.reset_peak_memory()
        t = time.perf_counter()
        mx.eval(step(q, k, v))
        best = min(best, time.perf_counter() - t)
        peak = max(peak, mx.get_peak_memory() / 1e6)
    return best, peak


def main() -> None:
    import mlx.core as mx

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--lengths", default="600,300,124", help="examples in each row, in tokens")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    b, h, kv, d, n = args.rows, args.heads, args.kv, args.head_dim, sum(lengths)

    def qkv(rows: int, length: int):
        return (mx.random.normal((rows, h, length, d)), mx.random.normal((rows, kv, length, d)),
                mx.random.normal((rows, kv, length, d)))  # fmt: skip

    segments = mx.array([sum(([s] * m for s, m in enumerate(lengths, 1)), [])] * b)
    i = mx.arange(n)
    causal = i[:, None] >= i[None, :]
    boolean = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]
    additive = mx.where(boolean, 0.0, -1e9).astype(mx.float32)
    q, k, v = qkv(b, n)
    results = {
        "packed, boolean mask": measure(q, k, v, boolean),
        "packed, additive mask": measure(q, k, v, additive),
        "packed, causal only (floor)": measure(q, k, v, "causal"),
    }
    seconds, peak = 0.0, 0.0
    for m in lengths:  # each example its own causal row, padded as collate pads
        t, mem = measure(*qkv(b, -(-m // 32) * 32), "causal")
        seconds, peak = seconds + t, max(peak, mem)
    results["one example per row"] = (seconds, peak)
    print(f"attention fwd+bwd: {b} rows of {lengths} tokens, {h} heads over {kv} KV heads of {d}")
    base_t, base_m = results["packed, boolean mask"]
    print(f"{'layout':30}{'ms':>9}{'peak MB':>10}{'time':>8}{'memory':>8}")
    for name, (t, mem) in results.items():
        print(f"{name:30}{t * 1e3:>9.1f}{mem:>10.1f}{t / base_t:>7.2f}x{mem / base_m:>7.2f}x")


if __name__ == "__main__":
    main()
