"""The GPU checks of the cuda backend, in one script that fits a lent GPU's 15 minutes.

    make gpu-wheels        # here: bitsandbytes + transformers wheels into .whl/ (the GPU has
                           # no network); then, on the GPU machine, with .whl carried:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_check.py --out $OUT

1. `pytest -m cuda tests/test_cuda_gpu.py`: side-stream streaming equals the in-model layer,
   page-locked blocks, bitsandbytes NF4, exact resume with dropout on the GPU.
2. Host -> device bandwidth from an exactly page-locked block (how experts stream) and from
   pageable memory.
3. A scaled Maverick (real widths and vocabulary, 2 layers, 16 experts, 9.3 GB in bf16 shards)
   is prepared on the GPU, then trained for 2 steps with the recipe's settings on the CPU
   (the reference) and on the GPU under a 24 GiB cap: the losses must agree; peak GPU memory
   while loading and while training against the plan.
4. Throughput: the same model with 8,192 tokens per step: tokens/s, peak GPU memory, the bytes
   streamed per second, and the extrapolation to the full Maverick from the plan.
5. The Gemma-4-shaped benchmark model (4 layers, width 256, 262,144-token vocabulary) in bf16:
   CPU and GPU losses agree.

Everything goes to OUT/gpu_check.json and a summary on stdout. `--rehearse` runs the same flow
on this CPU with a smaller model, to check the script before spending GPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30
CAP_GB = 24.0


def step(name: str, results: dict, fn, *args):
    """Run one check; a failure is recorded and the next check still runs."""
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        results[name] = fn(*args)
    except Exception as e:  # noqa: BLE001 - every check reports, none stops the others
        results[name] = {"error": f"{type(e).__name__}: {str(e)[-1500:]}"}
    results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(results[name], indent=1), flush=True)


def cuda_tests() -> dict:
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                        "tests/test_cuda_gpu.py"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)  # fmt: skip
    return {"returncode": r.returncode, "tail": r.stdout[-1500:] + r.stderr[-500:]}


def bandwidth() -> dict:
    import torch

    from cuda_backend.assemble import PinnedBlock

    n = 1 << 30
    pinned = PinnedBlock(torch.empty(n, dtype=torch.uint8)).tensor
    pageable = torch.empty(n, dtype=torch.uint8)
    dest = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = {"page_locked_in_place": bool(pinned.is_pinned())}
    for name, src in (("pinned_gbps", pinned), ("pageable_gbps", pageable)):
        dest.copy_(src, non_blocking=True)  # warm-up
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            dest.copy_(src, non_blocking=True)
        end.record()
        torch.cuda.synchronize()
        out[name] = round(5 * n / (start.elapsed_time(end) / 1e3) / 1e9, 2)
    return out


def phases_vs_plan(sets: list[str], env: dict) -> dict:
    from mlxtune import plan
    from mlxtune.config import load_config
    from mlxtune.measure import run_phase

    cfg = load_config(None, sets)
    p = plan.plan(cfg, CAP_GB, None, on_cpu=env.get("CUDA_VISIBLE_DEVICES") == "")
    out = {
        "plan_gpu_gib": round(p.gpu / GIB, 3),
        "plan_load_gpu_gib": round(p.phases["load"][0] / GIB, 3),
    }
    for phase in ("load", "train"):
        r = run_phase(phase, sets, env)
        out[phase] = {k: v for k, v in r.items() if k != "tokens_per_s"}
        if "gpu_peak" in r:
            out[phase]["gpu_peak_gib"] = round(r["gpu_peak"] / GIB, 3)
        if phase == "train":
            out["tokens_per_s"] = r["tokens_per_s"]
    return out


def maverick(work: Path, rehearse: bool) -> dict:
    from cuda_backend.scaled import make_scaled
    from mlxtune.measure import recipe_sets, run_phase

    model = make_scaled(work / "maverick", "maverick", layers=2, experts=2 if rehearse else 16,
                        echo=lambda line: None)  # fmt: skip
    sets = recipe_sets(model, work)
    gpu = dict(os.environ, MLXTUNE_GPU_CAP_GB=str(CAP_GB))
    cpu = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = {"prepare": run_phase("prepare", sets, gpu if not rehearse else cpu)}
    out["cpu"] = phases_vs_plan(sets, cpu)
    if not rehearse:
        out["gpu"] = phases_vs_plan(sets, gpu)
        ours, ref = out["gpu"]["train"]["losses"], out["cpu"]["train"]["losses"]
        out["losses_agree"] = all(
            abs(a - b) <= 2e-2 * abs(b) for a, b in zip(ours, ref, strict=True)
        )
        big = recipe_sets(model, work, "data.max_seq_len=4096", "train.iters=3",
                          "train.ce_chunk_tokens=512", "output.dir=" + str(work / "run-big"))  # fmt: skip
        # data: long rows, packed; 2 x 4096 = 8,192 tokens per step
        big = [x for x in big if not x.startswith("data.train=")] + [
            "data.train=" + str(long_chats(work / "long.jsonl"))
        ]
        out["throughput"] = phases_vs_plan(big, gpu)
        out["full_maverick"] = extrapolate(out["throughput"])
    return out


def long_chats(path: Path) -> Path:
    from mlxtune.measure import chats

    return chats(path, n=64, words=400)


def extrapolate(measured: dict) -> dict:
    """The full Maverick at the same tokens per step, from the plan and the measured rate."""
    from mlxtune import plan
    from mlxtune.config import load_config

    cfg = load_config(ROOT / "configs" / "llama4-maverick-24gb.yaml",
                      ["data.max_seq_len=4096", "train.batch_size=2"])  # fmt: skip
    p = plan.plan(cfg, 24, 256)
    return {"plan_gpu_gib": round(p.gpu / GIB, 2), "plan_host_gib": round(p.host / GIB, 2),
            "streamed_gb_per_step": round(p.streamed_per_step / 1e9, 1),
            "note": "time per step at a measured H2D rate R GB/s: streamed / R (see bandwidth)"}  # fmt: skip


def gemma4(work: Path, rehearse: bool) -> dict:
    from mlxtune.measure import chats, run_phase
    from mlxtune.tiny import Sizes, make_tiny

    model = make_tiny(work / "gemma4", "gemma4", sizes=Sizes(256, 4, 262_144))
    sets = [f"model.path={model}", "model.backend=cuda", "model.dtype=bfloat16",
            f"data.train={chats(work / 'g.jsonl', 32, 100)}", "data.max_seq_len=512",
            "train.batch_size=2", "train.iters=4", "train.report_every=1", "train.eval_every=0",
            "train.save_every=0", "train.lr_schedule=constant", "train.learning_rate=1e-3",
            f"output.dir={work / 'g-run'}", "output.overwrite=true"]  # fmt: skip
    cpu = run_phase("train", sets, dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    out = {"cpu_losses": cpu["losses"]}
    if not rehearse:
        gpu = run_phase("train", sets, dict(os.environ))
        out |= {"gpu_losses": gpu["losses"], "gpu_tokens_per_s": gpu["tokens_per_s"],
                "gpu_peak_gib": round(gpu["gpu_peak"] / GIB, 3)}  # fmt: skip
        out["losses_agree"] = all(abs(a - b) <= 2e-2 * abs(b)
                                  for a, b in zip(gpu["losses"], cpu["losses"], strict=True))  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    ap.add_argument("--rehearse", action="store_true", help="CPU only, a smaller model")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    results = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        results["device"] = torch.cuda.get_device_name(0)
    elif not args.rehearse:
        sys.exit("no CUDA device: run with --rehearse to check the script on a CPU")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.rehearse:
            step("cuda tests", results, cuda_tests)
            step("bandwidth", results, bandwidth)
        step("scaled maverick", results, maverick, work, args.rehearse)
        step("gemma4 shape", results, gemma4, work, args.rehearse)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
