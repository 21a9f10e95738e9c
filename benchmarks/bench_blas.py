"""mlx[cpu] on Linux: bundled reference BLAS vs Debian's OpenBLAS, side by side in one run.

    python benchmarks/bench_blas.py [--size 1024] [--reps 20]

Each side runs in its own subprocess (LD_PRELOAD must be set before MLX loads) and times
`reps` fp32 matmuls of size x size after one warm-up. Prints both times and the ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = """
import time, mlx.core as mx
n, reps = {size}, {reps}
a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
mx.eval(a @ b)
t = time.perf_counter()
for _ in range(reps):
    mx.eval(a @ b)
print(time.perf_counter() - t)
"""


def timed(size: int, reps: int, preload: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    code = CHILD.format(size=size, reps=reps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    out.check_returncode()
    return float(out.stdout.strip())


def main() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from mlxtune.env import APT_HINT, bundled_blas, openblas_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    if bundled_blas() is None:
        sys.exit("no bundled BLAS: this benchmark is for mlx[cpu] on Linux")
    lib = openblas_path()
    if lib is None:
        sys.exit(f"OpenBLAS not installed: {APT_HINT}")
    slow = timed(args.size, args.reps, None)
    fast = timed(args.size, args.reps, str(lib))
    flop = 2 * args.size**3 * args.reps
    print(f"{args.reps} x {args.size}x{args.size} fp32 matmul")
    print(f"  bundled BLAS : {slow:7.3f} s  ({flop / slow / 1e9:7.1f} GFLOP/s)")
    print(f"  OpenBLAS     : {fast:7.3f} s  ({flop / fast / 1e9:7.1f} GFLOP/s)")
    print(f"  speed-up     : {slow / fast:.1f}x")


if __name__ == "__main__":
    main()
