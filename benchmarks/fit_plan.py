"""Fit the planner's measured constants on runs of their own; the tests check other runs.

    python benchmarks/fit_plan.py [--part mlx|cuda-cpu|both] [--work DIR]

mlx: six short MLX runs (Llama and Gemma 4 shapes, real-sized vocabularies, with and without
gradient checkpointing), MLX's peak from metrics.jsonl, least squares for MLX_BASE,
MLX_LOGIT_BYTES and MLX_SOFTCAP_BYTES (mlxtune/plan/__init__.py). tests/test_plan.py checks the
fitted plan against three *other* runs.

cuda-cpu: the cuda backend on this CPU, on a scaled Scout (real widths and vocabulary, 1 layer,
4 experts): peak resident set of `prepare`, of `load` and of 2 training steps, each in its own
process; CPU_BASE[phase] = measured - planned without the base (mlxtune/plan/cuda.py).
tests/test_maverick_scaled.py checks the fitted plan against a scaled Maverick.

Prints the constants to paste; changes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30


def fit_mlx(work: Path) -> None:
    from mlxtune import plan
    from mlxtune.measure import chats, mlx_peak
    from mlxtune.tiny import Sizes, make_tiny

    data = chats(work / "mlx.jsonl", 32, 150)
    runs = [("llama", Sizes(384, 3, 24000), ["data.max_seq_len=320", "train.batch_size=4"]),
            ("llama", Sizes(256, 2, 48000), ["data.max_seq_len=320", "train.batch_size=4",
                                             "train.ce_chunk_tokens=256"]),
            ("llama", Sizes(384, 3, 24000), ["data.max_seq_len=320", "train.batch_size=4",
                                             "train.grad_checkpoint=true"]),
            ("gemma4", Sizes(192, 3, 48000), ["data.max_seq_len=320", "train.batch_size=4"]),
            ("llama", Sizes(512, 2, 16000), ["data.max_seq_len=320", "train.batch_size=2"]),
            ("gemma4", Sizes(256, 3, 32000), ["data.max_seq_len=320", "train.batch_size=4",
                                              "train.grad_checkpoint=true"])]  # fmt: skip
    rows, targets = [], []
    for i, (arch, sizes, extra) in enumerate(runs):
        model = make_tiny(work / f"mlx-{arch}-{i}", arch, sizes=sizes)
        cfg, measured = mlx_peak(model, data, work / f"mlx-run{i}", *extra)
        p = plan.plan(cfg)
        fixed = sum(r.gpu for r in p.rows if r.name != "logits chunk" and "fitted" not in r.name)
        text = json.loads((model / "config.json").read_text())
        text = text.get("text_config", text)
        logits = cfg.train.ce_chunk_tokens * text["vocab_size"]
        softcap = logits if text.get("final_logit_softcapping") else 0
        rows.append([1.0, logits, softcap])
        targets.append(measured - fixed)
        print(f"  {arch} {extra}: measured {measured / GIB:.3f} GiB, planned before fit "
              f"{p.gpu / GIB:.3f} GiB")  # fmt: skip
    # the base is an intercept: it also absorbs what the per-row estimates miss on average
    base, per_logit, per_softcap = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)[0]
    print(f"MLX_BASE = {base / GIB:.3f} * GIB")
    print(f"MLX_LOGIT_BYTES = {per_logit:.0f}")
    print(f"MLX_SOFTCAP_BYTES = {per_softcap:.0f}")


def fit_cuda_cpu(work: Path) -> None:
    from cuda_backend.scaled import make_scaled
    from mlxtune import plan
    from mlxtune.config import load_config
    from mlxtune.measure import phase_peaks, recipe_sets
    from mlxtune.plan import cuda as cuda_plan

    model = make_scaled(work / "scout", "scout", layers=1, experts=4)
    sets = recipe_sets(model, work)
    peaks = phase_peaks(sets)
    measured = {k: v["train_peak" if k == "train" else "rss_peak"] for k, v in peaks.items()}
    p = plan.plan(load_config(None, sets), on_cpu=True)
    planned = {"prepare": p.phases["prepare"][1], "load": p.phases["load"][1], "train": p.host}
    for phase, value in measured.items():
        fitted = cuda_plan.CPU_BASE[phase] + value - planned[phase]
        print(f"  {phase}: measured {value / GIB:.3f} GiB, planned {planned[phase] / GIB:.3f} GiB"
              f" -> CPU_BASE[{phase!r}] = {fitted / GIB:.3f} * GIB")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["mlx", "cuda-cpu", "both"], default="both")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        if args.part in ("mlx", "both"):
            fit_mlx(Path(tmp))
        if args.part in ("cuda-cpu", "both"):
            fit_cuda_cpu(Path(tmp))


if __name__ == "__main__":
    main()
