"""cuda_backend vs transformers + PEFT on a Llama-4-shaped MoE model, side by side in one run.

    python benchmarks/bench_cuda_backend.py [--rows 32] [--work DIR]

The model is a tiny-but-realistic Llama 4 (Maverick's layout: dense and MoE layers alternate,
top-1 routed experts plus a shared expert, NoPE every 4th layer) with 4 layers of width 512, 16
experts, and the real 202,048-token vocabulary. Both train one epoch of the same chats (20 to
1,000 tokens) with the same LoRA targets (attention, shared expert, dense FFN; rank 8), AdamW
at a constant 1e-4, on whatever device is present (CUDA if there is one, else the CPU):

- transformers + PEFT, as a user would run them: one chat per step, full logits, transformers'
  own Llama 4 (every token through every expert);
- cuda_backend: the same chats packed into rows of 1,024 tokens, one row per step, sparse top-1
  MoE, the chunked loss.

Time is each side's training loop (model loading excluded). Peak memory is CUDA's allocator peak
on a GPU; on the CPU, the process's resident-set high-water mark during the training loop (Linux
VmHWM, reset when training starts), weights included. Prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from _child import run_child

ROOT = Path(__file__).resolve().parents[1]
RANK, ALPHA, LR = 8, 16, 1e-4

REFERENCE = """
import json, time, torch, peft, transformers
from mlxtune.config import load_config
from cuda_backend import trainer as T
cfg = load_config(None, {overrides!r})
engine = T.setup(cfg)  # for the data and the target names only
targets = sorted(set(engine.hf_names.values()))
data = engine.dataset(cfg.data.train)
device = engine.loaded.device
del engine
model = transformers.AutoModelForImageTextToText.from_pretrained({model!r}).to(device)
model = peft.get_peft_model(model, peft.LoraConfig(r={rank}, lora_alpha={alpha}, target_modules=targets))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr={lr})
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
T.reset_peak_rss()
start, tokens = time.perf_counter(), 0
for ex in data.examples:
    ids = torch.tensor(ex.ids[None].astype("int64"), device=device)
    w = torch.tensor(ex.loss[1:].astype("float32"), device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    ce = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="none")
    ((ce * w).sum() / w.sum()).backward()
    opt.step(); opt.zero_grad()
    tokens += len(ex.ids)
if device.type == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else T.peak_rss()
print("RESULT", json.dumps({{"seconds": seconds, "tokens": tokens, "steps": len(data.examples),
                            "cuda_peak": peak, "device": str(device),
                            "name": torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"}}))
"""


def make_model(work: Path) -> Path:
    from mlxtune.tiny import Sizes, make_tiny

    model = work / "llama4"
    if not model.exists():
        make_tiny(model, "llama4", sizes=Sizes(512, 4, 202_048, experts=16))
    return model


def overrides(work: Path, model: Path) -> list[str]:
    return [f"model.path={model}", "model.backend=cuda", f"data.train={work / 'data' / 'train.jsonl'}",
            f"output.dir={work / 'twin-run'}", "output.overwrite=true", "data.max_seq_len=1024",
            f"lora.rank={RANK}", f"lora.alpha={ALPHA}", "train.epochs=1", "train.batch_size=1",
            f"train.learning_rate={LR}", "train.lr_schedule=constant", "train.report_every=4",
            "train.eval_every=0", "train.save_every=0"]  # fmt: skip


def run_twin(work: Path, model: Path, env: dict) -> dict:
    body = f"""
from mlxtune.config import load_config
from cuda_backend.trainer import train
train(load_config(None, {overrides(work, model)!r}), echo=lambda line: None)
"""
    _, rss = run_child(body, env)
    rows = [json.loads(x) for x in (work / "twin-run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "train"]
    return {"seconds": sum(r["elapsed_s"] for r in rows), "steps": rows[-1]["step"],
            "tokens": sum(r["real_tokens"] for r in rows), "peak_gb": max(r["peak_memory_gb"] for r in rows),
            "rss_gb": rss / 1e9}  # fmt: skip


def run_reference(work: Path, model: Path, env: dict) -> dict:
    body = REFERENCE.format(overrides=overrides(work, model), model=str(model), rank=RANK,
                            alpha=ALPHA, lr=LR)  # fmt: skip
    stdout, rss = run_child(body, env)
    r = json.loads(next(x for x in stdout.splitlines() if x.startswith("RESULT "))[7:])
    return r | {"peak_gb": r["cuda_peak"] / 1e9, "rss_gb": rss / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench_text_lora import make_data

    work = args.work or Path(tempfile.mkdtemp(prefix="mlxtune-bench-cuda-"))
    model = make_model(work)
    (work / "data").mkdir(parents=True, exist_ok=True)
    make_data(work / "data", model, args.rows, seed=0)
    env = {**os.environ, "MLXTUNE_NO_REEXEC": "1"}
    theirs = run_reference(work, model, env)
    ours = run_twin(work, model, env)
    device = theirs["name"]
    print(f"Llama-4-shaped MoE (4 layers x 512, 16 experts, vocab 202,048) on {device}: "
          f"{args.rows} chats, {theirs['tokens']:,} tokens, one epoch each")  # fmt: skip
    print(f"{'':24}{'tok/s':>8}{'train s':>9}{'steps':>7}{'peak GB':>9}{'max RSS GB':>12}")
    for name, r in (("transformers + PEFT", theirs), ("mlxtune cuda_backend", ours)):
        print(f"{name:24}{theirs['tokens'] / r['seconds']:>8.0f}{r['seconds']:>9.1f}"
              f"{r['steps']:>7}{r['peak_gb']:>9.2f}{r['rss_gb']:>12.2f}")  # fmt: skip
    kind = "CUDA allocator" if theirs["device"].startswith("cuda") else "resident set in training"
    print(f"cuda_backend / transformers + PEFT: {theirs['seconds'] / ours['seconds']:.2f}x "
          f"tokens/s, peak memory {ours['peak_gb'] / theirs['peak_gb']:.2f}x ({kind})")  # fmt: skip


if __name__ == "__main__":
    main()
