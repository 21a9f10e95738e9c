"""mlxtune vs mlx-lm-lora (a bench-only dependency) on DPO and GRPO: the same model, data and
settings, side by side in one run.

    python benchmarks/bench_preference.py [--method dpo|grpo|both] [--iters N] [--grpo-iters N]
                                          [--work DIR]

The model is a real trained one, SmolLM2-135M-Instruct (30 layers, width 576, vocabulary
49,152; `make real-model`), in float32. Both tools adapt the same seven projections of every
layer with rank 8 and the same scale, AdamW at a constant learning rate, no checkpoints or
evaluations during the timed steps.

- DPO: 64 pairs of the demo's group task as plain strings (both tools render them through
  the model's chat template), 4 pairs per step, beta 0.1, sigmoid loss.
- GRPO: 32 prompts of the same task with a system turn, 2 prompts per step, 4 answers per
  prompt, at most 16 answer tokens, temperature 1, beta 0.04 (both compute a reference
  pass), the same reward (a point for the right group).

On a machine without Metal, mlx-lm-lora's two Metal-only calls (the wired-memory limit) are
stubbed; nothing else of it is changed. Steps per second come from each tool's own report
windows after the first (which holds the compile), by the wall clock: mlxtune's `elapsed_s`
per window, the time between mlx-lm-lora's reports (its own "it/s" leaves part of the step
out). Peak memory is MLX's
own peak (each tool reports it) and the process's maximum resident set. Prints the ratios.
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
MODEL = ROOT / ".cache" / "smollm2-135m-instruct"
RANK, ALPHA, LR, MAX_LEN = 8, 16.0, 1e-5, 256
SYSTEM = "Answer with the group of the words only."
THEIR_REWARD = """
from mlx_lm_lora.trainer.grpo_reward_functions import register_reward_function


@register_reward_function()
def right_group(prompts, completions, answer, types=None):
    return [1.0 if c.strip().startswith(a) else 0.0 for c, a in zip(completions, answer)]
"""
OUR_REWARD = """
def right_group(prompts, completions, answer, **kw):
    texts = [c[0]["content"] for c in completions]  # conversational prompts: message lists
    return [1.0 if c.strip().startswith(a) else 0.0 for c, a in zip(texts, answer)]
"""


def make_data(work: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from mlxtune import demo

    dpo = work / "dpo"
    dpo.mkdir(parents=True, exist_ok=True)
    for name, seed, n in (("train", 0, 64), ("valid", 1000, 8)):
        rows = demo.preference_rows(seed, n, conversational=False)
        (dpo / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    grpo = work / "grpo"
    grpo.mkdir(parents=True, exist_ok=True)
    for name, seed, n in (("train", 0, 32), ("valid", 1000, 4)):
        theirs, ours = [], []
        for r in demo.rows(seed, n):
            prompt, answer = r["messages"][0]["content"], r["messages"][1]["content"]
            theirs.append({"prompt": prompt, "answer": answer, "system": SYSTEM})
            ours.append({"prompt": [{"role": "system", "content": SYSTEM},
                                    {"role": "user", "content": prompt}], "answer": answer})  # fmt: skip
        (grpo / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in theirs))
        (grpo / f"ours-{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ours))
    (grpo / "their_rewards.py").write_text(THEIR_REWARD)
    (grpo / "our_rewards.py").write_text(OUR_REWARD)


def run_mlxtune(work: Path, method: str, iters: int, env: dict) -> dict:
    data = work / method
    train = {"method": method, "iters": iters, "learning_rate": LR, "lr_schedule": "constant",
             "report_every": max(iters // 4, 1), "eval_every": 0, "save_every": 0,
             "batch_tokens": None}  # fmt: skip
    if method == "dpo":
        files = {"train": str(data / "train.jsonl")}
        train |= {"batch_size": 4, "beta": 0.1}
    else:
        files = {"train": str(data / "ours-train.jsonl")}
        train |= {"batch_size": 2, "group_size": 4, "max_completion_tokens": 16,
                  "temperature": 1.0, "beta": 0.04, "grpo_loss": "grpo",
                  "reward_functions": str(data / "our_rewards.py")}  # fmt: skip
    out = work / f"mlxtune-{method}"
    body = f"""
import mlxtune as mt
mt.train(model={str(MODEL)!r}, data={{**{files!r}, "max_seq_len": {MAX_LEN}}},
         lora={{"rank": {RANK}, "alpha": {ALPHA}}}, train={train!r},
         output={{"dir": {str(out)!r}, "overwrite": True}}, echo=None)
"""
    _, rss = run_child(body, env)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "train"]
    steps = [r["step"] - p for r, p in zip(rows, [0] + [r["step"] for r in rows][:-1],
                                            strict=True)]  # fmt: skip
    later = list(zip(rows, steps, strict=True))[1:]  # after the window that compiles
    per_s = sum(n for _, n in later) / sum(r["elapsed_s"] for r, _ in later)
    return {"steps_per_s": per_s, "mlx_peak_gb": max(r["peak_memory_gb"] for r in rows),
            "rss_gb": rss / 1e9, "last_loss": rows[-1]["loss"]}  # fmt: skip


def run_theirs(work: Path, method: str, iters: int, env: dict) -> dict:
    data = work / method
    config = {
        "model": str(MODEL), "train": True, "train_mode": method, "train_type": "lora",
        "data": str(data), "num_layers": 30, "iters": iters, "learning_rate": LR,
        "optimizer": "adamw", "steps_per_report": max(iters // 4, 1), "steps_per_eval": 10**9,
        "save_every": 10**9, "val_batches": 1, "max_seq_length": MAX_LEN, "seed": 0,
        "fuse": False, "adapter_path": str(work / f"theirs-{method}"), "beta": 0.1,
        "lora_parameters": {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0},
    }  # fmt: skip
    if method == "dpo":
        config |= {"batch_size": 4, "dpo_cpo_loss_type": "sigmoid"}
    else:
        config |= {"batch_size": 2, "group_size": 4, "max_completion_length": 16,
                   "temperature": 1.0, "beta": 0.04, "grpo_loss_type": "grpo",
                   "reward_functions_file": str(data / "their_rewards.py"),
                   "reward_functions": "right_group"}  # fmt: skip
    path = work / f"theirs-{method}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    body = f"""
import json, types, yaml
import mlx.core as mx
if "max_recommended_working_set_size" not in mx.device_info():  # no Metal (this CPU)
    info = mx.device_info
    mx.device_info = lambda: {{**info(), "max_recommended_working_set_size": 0}}
    mx.set_wired_limit = lambda limit: 0
import mlx_lm_lora.train as T
from mlx_lm.tuner.callbacks import TrainingCallback
import time
class Record(TrainingCallback):
    def on_train_loss_report(self, info):
        row = {{k: getattr(v, "tolist", lambda: v)() for k, v in info.items()}}
        print("REPORT", json.dumps({{**row, "clock": time.perf_counter()}}), flush=True)
args = T.build_parser().parse_args(["-c", {str(path)!r}])
for k, v in yaml.load(open({str(path)!r}), Loader=T.yaml_loader).items():
    if getattr(args, k, None) is None:
        setattr(args, k, v)
for k, v in T.CONFIG_DEFAULTS.items():
    if getattr(args, k, None) is None:
        setattr(args, k, v)
if args.reward_functions_file:
    T.load_reward_functions_from_file(args.reward_functions_file)
T.run(args, Record())
"""
    stdout, rss = run_child(body, env)
    reports = [json.loads(x[7:]) for x in stdout.splitlines() if x.startswith("REPORT ")]
    if not reports:
        sys.exit(f"mlx-lm-lora reported nothing:\n{stdout[-3000:]}")
    # the wall clock between reports: mlx-lm-lora's own it/s leaves time out (its last window
    # here reports 0.29 it/s over two steps that took 17.9 s)
    steps = reports[-1]["iteration"] - reports[0]["iteration"]
    loss = reports[-1].get("train_loss", reports[-1].get("loss"))
    return {"steps_per_s": steps / (reports[-1]["clock"] - reports[0]["clock"]),
            "mlx_peak_gb": max(r.get("peak_memory", 0.0) for r in reports),
            "rss_gb": rss / 1e9, "last_loss": loss}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["dpo", "grpo", "both"], default="both")
    parser.add_argument("--iters", type=int, default=20, help="DPO steps")
    parser.add_argument("--grpo-iters", type=int, default=8, help="GRPO steps")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    if not (MODEL / "config.json").is_file():
        sys.exit(f"{MODEL}: missing; run `make real-model`")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-pref-"))
    make_data(work)
    env = dict(os.environ)
    methods = ["dpo", "grpo"] if args.method == "both" else [args.method]
    print(f"SmolLM2-135M-Instruct, float32, LoRA rank {RANK} on every layer; DPO {args.iters} "
          f"steps, GRPO {args.grpo_iters}")  # fmt: skip
    print(f"{'method':6} {'tool':12} {'steps/s':>8} {'MLX peak GB':>12} {'RSS GB':>8} {'loss':>8}")
    for method in methods:
        iters = args.iters if method == "dpo" else args.grpo_iters
        ours = run_mlxtune(work, method, iters, env)
        theirs = run_theirs(work, method, iters, env)
        for name, r in (("mlxtune", ours), ("mlx-lm-lora", theirs)):
            print(f"{method:6} {name:12} {r['steps_per_s']:8.3f} {r['mlx_peak_gb']:12.3f} "
                  f"{r['rss_gb']:8.2f} {r['last_loss']:8.4f}")  # fmt: skip
        print(f"{method:6} ratio: {ours['steps_per_s'] / theirs['steps_per_s']:.2f}x the steps/s, "
              f"{ours['mlx_peak_gb'] / max(theirs['mlx_peak_gb'], 1e-9):.2f}x the MLX peak, "
              f"{ours['rss_gb'] / theirs['rss_gb']:.2f}x the RSS")  # fmt: skip


if __name__ == "__main__":
    main()
