"""Data-parallel scaling: tokens/s of 1 process vs 2 ranks on the same model and data, for the
MLX trainer (mlx.launch, ring backend over localhost) and the PyTorch twin (torchrun, gloo).

    python benchmarks/bench_distributed.py [--backend mlx|cuda|both] [--iters N] [--work DIR]
    python benchmarks/bench_distributed.py --method full --iters 6   # the twin's FSDP2 memory

The model is SmolLM2-135M-Instruct (the real trained model `make real-model` caches), fp32; the
data are bench_text_lora's single-turn chats. Each rank gets train.batch_tokens B (per rank, as
users set it), so 2 ranks take 2B tokens per step. Three runs per backend:

- `1 process, all cores`: what one process does with the whole machine (BLAS on every core);
- `1 process, 1 core`: one rank's share of the machine (BLAS and torch limited to one thread);
- `2 ranks, 1 core each`: two ranks on this machine, each limited to one thread;
- `2 lone processes, 1 core each`: two independent 1-core runs at the same time, with no
  communication: what this machine gives two processes at all (they share its memory
  bandwidth and caches), the ceiling for two ranks here.

Throughput = the run's real tokens / its training time, from metrics.jsonl, without the first
report window (compilation, warm-up). Scaling efficiency = 2-rank tokens/s / (2 x 1-core
tokens/s): 100% means the all-reduce and the waiting cost nothing; against the two lone
processes it shows what the collectives and the split cost beyond sharing the machine. On one
machine the ranks share its cores, memory bandwidth and caches, and MLX's ring backend spins
on a core while it waits for the other rank, so this is a floor for two Macs (each with its
own cores and memory), not a prediction.

`--method full` fine-tunes every block instead (the twin only): one 1-core process against two
ranks that shard the weights, gradients and AdamW state (FSDP2), each rank's peak resident
memory beside what `mlxtune plan` planned for it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_text_lora import make_data  # noqa: E402

ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def config(work: Path, model: Path, backend: str, budget: int, iters: int,
           method: str = "lora") -> Path:  # fmt: skip
    settings = {
        "model": {"path": str(model), "backend": backend},
        "data": {"train": str(work / "data" / "train.jsonl"), "max_seq_len": 1024},
        "lora": {"rank": 8, "alpha": 16, "method": method},
        "train": {
            "iters": iters,
            "batch_tokens": budget,
            "learning_rate": 1e-4,
            "lr_schedule": "constant",
            "report_every": 2,
            "eval_every": 0,
            "save_every": 0,
        },  # fmt: skip
    }
    path = work / f"{backend}-{method}.yaml"
    path.write_text(json.dumps(settings))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lone_pair(cfg: Path, work: Path, backend: str) -> dict:
    """Two independent 1-core runs started together; their summed tokens/s."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda k: run(cfg, work / f"{backend}-lone{k}", 1, backend, True), (0, 1))
    return {"tok_s": a["tok_s"] + b["tok_s"], "wall": max(a["wall"], b["wall"]),
            "peak": max(a["peak"], b["peak"])}  # fmt: skip


def run(cfg: Path, out: Path, ranks: int, backend: str, threads_one: bool,
        extra: tuple[str, ...] = ()) -> dict:  # fmt: skip
    exe = str(Path(sys.executable).parent / "mlxtune")
    env = {**os.environ, "MLXTUNE_NO_REEXEC": "1", **(ONE_THREAD if threads_one else {})}
    sets = ["--set", f"output.dir={out}", "--set", "output.overwrite=true"]
    sets += [a for s in extra for a in ("--set", s)]
    if ranks == 1:
        cmd = [exe, "train", str(cfg), *sets]
    elif backend == "mlx":
        cmd = [exe, "train", str(cfg), *sets, "--hosts", ",".join(["localhost"] * ranks)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               f"--master_port={free_port()}", "-m", "mlxtune", "train", str(cfg), *sets]  # fmt: skip
    t0 = time.perf_counter()
    got = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if got.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{got.stdout[-2000:]}\n{got.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "train"][1:]  # without compiling and warm-up
    seconds = sum(r["elapsed_s"] for r in rows)
    return {"tok_s": sum(r["real_tokens"] for r in rows) / seconds, "wall": wall,
            "peak": max(r["peak_memory_gb"] for r in rows),
            "loss": [r["loss"] for r in rows]}  # fmt: skip


RUNS = {
    "1 process, all cores": lambda cfg, work, b: run(cfg, work / f"{b}-1all", 1, b, False),
    "1 process, 1 core": lambda cfg, work, b: run(cfg, work / f"{b}-1one", 1, b, True),
    "2 ranks, 1 core each": lambda cfg, work, b: run(cfg, work / f"{b}-2", 2, b, True),
    "2 lone processes, 1 core each": lone_pair,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["mlx", "cuda", "both"], default="both")
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument(
        "--method",
        choices=["lora", "full"],
        default="lora",
        help="full: the twin's full fine-tuning, 1 process vs 2 sharded ranks",
    )
    p.add_argument("--only", action="append", default=None, choices=list(RUNS),
                   help="run only these (repeatable); the ratios need all four")  # fmt: skip
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from mlxtune.tiny.real import build

    model = build()[0]
    work = args.work or Path(tempfile.mkdtemp(prefix="mlxtune-dist-"))
    (work / "data").mkdir(parents=True, exist_ok=True)
    data = make_data(work / "data", model, args.rows, seed=0)
    budget = int(4 * -(-data["real_tokens"] // data["rows"]))
    print(f"SmolLM2-135M-Instruct fp32, {data['rows']} chats, train.batch_tokens={budget} per "
          f"rank, {args.iters} steps (first report window left out); {os.cpu_count()} CPU cores")  # fmt: skip
    if args.method == "full":
        return sharded_memory(work, model, budget, args.iters)
    backends = ["mlx", "cuda"] if args.backend == "both" else [args.backend]
    for backend in backends:
        cfg = config(work, model, backend, budget, args.iters)
        runs = {label: make(cfg, work, backend) for label, make in RUNS.items()
                if args.only is None or label in args.only}  # fmt: skip
        name = "MLX (ring backend)" if backend == "mlx" else "PyTorch twin (torchrun, gloo)"
        print(f"\n{name}")
        print(f"{'':32}{'real tok/s':>12}{'wall s':>9}{'peak GB':>9}")
        for label, r in runs.items():
            print(f"{label:32}{r['tok_s']:>12,.0f}{r['wall']:>9.1f}{r['peak']:>9.2f}", flush=True)
        if len(runs) == len(RUNS):
            every, one, two, lone = (r["tok_s"] for r in runs.values())
            print(f"scaling efficiency: 2 ranks vs 2 x one 1-core process {two / (2 * one):.0%}, "
                  f"vs two lone processes {two / lone:.0%}; 2 ranks vs 1 process with every "
                  f"core: {two / every:.2f}x")  # fmt: skip


def sharded_memory(work: Path, model: Path, budget: int, iters: int) -> None:
    """Full fine-tuning on the twin: 1 process (1 core) with 2B against 2 sharded ranks with B
    each, so both take the same steps; peak resident memory per rank, measured and planned."""
    from mlxtune import plan
    from mlxtune.config import load_config

    cfg = config(work, model, "cuda", budget, iters, "full")
    print("\nPyTorch twin, lora.method full (FSDP2 over 2 ranks, gloo)")
    print(f"{'':34}{'real tok/s':>12}{'wall s':>9}{'peak GB':>9}{'planned GB':>12}")
    for label, ranks, tokens in (("1 process, 1 core, 2B", 1, 2 * budget),
                                 ("2 sharded ranks, 1 core each, B", 2, budget)):  # fmt: skip
        sets = [f"train.batch_tokens={tokens}"]
        r = run(cfg, work / f"full-{ranks}", ranks, "cuda", True, sets)
        planned = plan.plan(load_config(cfg, sets), on_cpu=True, ranks=ranks).host  # training
        print(f"{label:34}{r['tok_s']:>12,.0f}{r['wall']:>9.1f}{r['peak']:>9.2f}"
              f"{planned / 1e9:>12.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
