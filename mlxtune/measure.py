"""Measured peak memory of short runs: what the planner is fitted on and checked against.

Used by tests/test_plan.py, tests/test_maverick_scaled.py, `benchmarks/fit_plan.py` and
`benchmarks/gpu_check.py`. `mlx_peak()`: MLX's peak over a short MLX run. `phase_peaks(sets)`:
prepare, load and a short training run of a cuda-backend config (`--set` style `sets`), each
in a fresh process so a phase's figure is never the leftover of another's: peak resident set,
and on CUDA peak GPU memory. `run_phase("whole", sets)` is the anchor: the same checkpoint
loaded whole by transformers and run once. Imports nothing heavy until called.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PHASE = """
import json, os, sys, time
sys.path.insert(0, {root!r})
import torch
from mlxtune.config import load_config
cap = float(os.environ.get("MLXTUNE_GPU_CAP_GB", 0))
if cap and torch.cuda.is_available():  # a 24 GB card on a bigger one
    torch.cuda.set_per_process_memory_fraction(cap * 2**30 / torch.cuda.mem_get_info()[1])
cfg = load_config(None, {sets!r})
phase, out, t0 = {phase!r}, {{}}, time.perf_counter()
if phase == "prepare":
    from cuda_backend import prepare
    prepare.prepare(cfg.model, echo=lambda line: None)
elif phase == "load":
    from cuda_backend import model
    model.load(cfg.model)
elif phase == "whole":  # loaded by transformers and run once: every weight is touched
    import transformers
    whole = transformers.AutoModelForImageTextToText.from_pretrained(cfg.model.path,
                                                                     dtype=torch.bfloat16)
    with torch.no_grad():
        whole(input_ids=torch.arange(1, 9)[None])
else:
    from cuda_backend import trainer
    run = trainer.train(cfg, echo=lambda line: print(line, file=sys.stderr, flush=True))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    out["losses"] = [r["loss"] for r in train]
    out["tokens_per_s"] = [r["tokens_per_s"] for r in train]
    out["train_peak"] = max(r["peak_memory_gb"] for r in train) * 1e9
out["seconds"] = time.perf_counter() - t0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        out["rss_peak"] = int(line.split()[1]) * 1024
if torch.cuda.is_available():
    out["gpu_peak"] = torch.cuda.max_memory_allocated()
print("PHASE " + json.dumps(out))
"""


def run_phase(phase: str, sets: list[str], env: dict | None = None) -> dict:
    """One phase ("prepare", "load", "train" or "whole") in a fresh Python process."""
    code = PHASE.format(root=str(ROOT), sets=list(sets), phase=phase)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{phase} failed:\n{r.stderr[-3000:]}")
    return json.loads(next(x[6:] for x in r.stdout.splitlines() if x.startswith("PHASE ")))


def phase_peaks(sets: list[str], env: dict | None = None) -> dict[str, dict]:
    """prepare, load and train of one config, each in its own process."""
    return {phase: run_phase(phase, sets, env) for phase in ("prepare", "load", "train")}


def chats(path: Path, n: int = 8, words: int = 20) -> Path:
    """A chat JSONL of fixed words (one token each in the tiny tokenizers) and a fixed seed, for
    runs whose point is memory, not learning."""
    import random

    rng = random.Random(1)
    vocab = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "weather", "today",
             "sunny", "cloudy"]  # fmt: skip
    lines = []
    for _ in range(n):
        turns = [{"role": role, "content": " ".join(rng.choice(vocab) for _ in range(words))}
                 for role in ("user", "assistant")]  # fmt: skip
        lines.append(json.dumps({"messages": turns}) + "\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


def mlx_peak(model: Path, data: Path, out: Path, *extra: str):
    """(config, MLX's peak bytes) of a 4-step MLX run of `model` on `data` in fp32."""
    from .config import load_config
    from .trainer import train

    cfg = load_config(None, [f"model.path={model}", f"data.train={data}", "model.dtype=float32",
                             f"output.dir={out}", "train.iters=4", "train.report_every=2",
                             "train.eval_every=0", "train.save_every=0", *extra])  # fmt: skip
    run_dir = train(cfg, echo=lambda line: None)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return cfg, max(r["peak_memory_gb"] for r in rows) * 1e9


def recipe_sets(model: Path, work: Path, *extra: str) -> list[str]:
    """The 24 GB recipe's settings on a scaled checkpoint, with short rows and 2 steps (CPU time
    is the limit here)."""
    return [f"model.path={model}", "model.backend=cuda", "model.quantize=4",
            "model.offload_experts=true", "model.expert_chunk=4", "model.dtype=bfloat16",
            f"model.prepared_dir={work / 'prepared'}", f"data.train={chats(work / 'c.jsonl')}",
            "data.max_seq_len=64", "train.batch_size=2", "train.iters=2", "train.report_every=1",
            "train.eval_every=0", "train.save_every=0", "train.grad_checkpoint=true",
            "train.offload_checkpoints=true", "train.ce_chunk_tokens=32", "lora.rank=8",
            "train.lr_schedule=constant", f"output.dir={work / 'run'}", "output.overwrite=true",
            *extra]  # fmt: skip
