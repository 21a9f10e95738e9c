"""mlxtune vs mlx-vlm's trainer on Gemma 4 with pictures and audio, side by side in one run.

    python benchmarks/bench_multimodal.py [--rows 96] [--work DIR]

Needs mlx-vlm (a benchmark-only dependency: `make bench` installs `.[bench]`).

The model is a tiny-but-realistic Gemma 4: the decoder has 4 layers of width 256 and the real
262,144-token vocabulary; the vision and audio towers have 4 layers of width 128 (E2B: 16 x 768
and 12 x 1024); everything else is E2B's layout (per-layer embeddings, KV sharing, clipped tower
linears, 3x3 pooled 16 px patches, the conformer's chunked attention). The data is the demo's
task: pictures of colours, tones of pitches and rows with both, at the processor's default
budget of 280 soft tokens per picture, loss on the answers.

Both tools train one epoch of the same rows with the same LoRA (rank 8, alpha 16, attention and
MLP of every decoder layer), AdamW at a constant 1e-4, on one row per step: mlx-vlm 0.7.10 cannot
train Gemma 4 on more (its attention mask does not broadcast over a batch). mlxtune then runs
again with data.packing: true, several rows in each 1,024-token step.

Time is the training loop's wall time as each tool reports it (compiling and data preparation
included, model loading not). Peak memory is MLX's own peak as each tool reports it, and each
process's maximum resident set. Two faults of mlx-vlm 0.7.10 are worked around or noted, not
fixed: its Gemma 4 audio tower builds a module without `Module.__init__`, so `model.freeze()`
fails (the benchmark adds the two missing attributes after loading); and it counts a clip's
placeholders as ceil(ms / 40), which for some lengths is one more than the soft tokens its
tower makes (the benchmark reports how many of the clips that hits).
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
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, LR = 8, 16, 1e-4


def make_data(work: Path, rows: int) -> dict:
    """The demo task for mlxtune, and the same rows in mlx-vlm's layout (media in top-level
    `images` / `audio` lists, text-only message contents)."""
    from mlxtune.demo import write_media_task

    train, _ = write_media_task(work / "data", n_train=rows, n_valid=3)
    (work / "vlm").mkdir(exist_ok=True)
    lines, clips = [], []
    for line in train.read_text().splitlines():
        row = json.loads(line)
        parts = row["messages"][0]["content"]
        out = {"messages": [
            {"role": "user", "content": " ".join(p["text"] for p in parts if p["type"] == "text")},
            row["messages"][1]]}  # fmt: skip
        for kind, key in (("image", "images"), ("audio", "audio")):
            paths = [str(train.parent / p[kind]) for p in parts if p["type"] == kind]
            if paths:
                out[key] = paths
        clips += out.get("audio", [])
        lines.append(json.dumps(out))
    (work / "vlm" / "train.jsonl").write_text("\n".join(lines) + "\n")
    return {"rows": rows, "train": train, "clips": clips}


def miscounted(clips: list[str]) -> int:
    """Clips whose placeholder count by mlx-vlm's rule differs from transformers' (ours)."""
    import math

    from mlxtune.data.media import AudioSpec, audio_tokens, read_audio

    spec, wrong = AudioSpec(), 0
    for path in clips:
        n = len(read_audio(path, path, spec))
        wrong += min(math.ceil(n / 640), spec.max_tokens) != audio_tokens(n, spec)  # 40 ms
    return wrong


def run_mlxtune(work: Path, model: Path, train: Path, env: dict, packed: bool) -> dict:
    name = "mlxtune-packed" if packed else "mlxtune"
    shape = ["data.max_seq_len=1024", "train.batch_size=1", f"data.packing={str(packed).lower()}"]
    overrides = [f"model.path={model}", f"data.train={train}", f"output.dir={work / name}",
                 "output.overwrite=true", f"lora.rank={RANK}", f"lora.alpha={ALPHA}",
                 "train.epochs=1", f"train.learning_rate={LR}", "train.lr_schedule=constant",
                 "train.report_every=4", "train.eval_every=0", "train.save_every=0", *shape]  # fmt: skip
    body = f"""
from mlxtune.config import load_config
from mlxtune.trainer import train
train(load_config(None, {overrides!r}), echo=lambda line: None)
"""
    _, rss = run_child(body, env)
    rows = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "train"]
    return {"seconds": sum(r["elapsed_s"] for r in rows), "steps": rows[-1]["step"],
            "mlx_peak_gb": max(r["peak_memory_gb"] for r in rows), "rss_gb": rss / 1e9,
            "loss": rows[-1]["loss"]}  # fmt: skip


def run_mlx_vlm(work: Path, model: Path, rows: int, env: dict) -> dict:
    argv = ["--model", str(model), "--data", str(work / "vlm"), "--iters", str(rows),
            "--batch-size", "1", "--learning-rate", str(LR), "--lora-rank", str(RANK),
            "--lora-alpha", str(ALPHA), "--steps-per-report", "4", "--steps-per-eval", "1000000",
            "--steps-per-save", "1000000", "--max-seq-length", "1024", "--train-on-completions",
            "--output-path", str(work / "mlx-vlm-run"), "--target-modules", *TARGETS]  # fmt: skip
    body = f"""
import json
import mlx_vlm.train as T
from mlx_vlm.trainer.common.callbacks import TrainingCallback
load = T._load_model
def load_and_mend(task, path):
    model, processor = load(task, path)
    for _, m in model.named_modules():  # modules built with __new__ lack Module.__init__'s state
        if "_no_grad" not in m.__dict__:
            object.__setattr__(m, "_no_grad", set())
            object.__setattr__(m, "_training", True)
    return model, processor
T._load_model = load_and_mend
class Record(TrainingCallback):
    def on_train_loss_report(self, info):
        print("REPORT", json.dumps({{k: v for k, v in info.items() if isinstance(v, (int, float))}}), flush=True)
args, settings = T.parse_args({argv!r})
T.run(args, settings, Record())
"""
    stdout, rss = run_child(body, env)
    reports = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("REPORT ")]
    if not reports:
        sys.exit(f"mlx-vlm reported nothing:\n{stdout[-2000:]}")
    last = reports[-1]
    return {"seconds": last["elapsed_time"], "steps": last["optimizer_step"],
            "mlx_peak_gb": max(r["peak_memory"] for r in reports), "rss_gb": rss / 1e9,
            "loss": last["train_loss"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=96, help="training rows (pictures, tones, both)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from mlxtune.tiny import Sizes, make_tiny

    work = args.work or Path(tempfile.mkdtemp(prefix="mlxtune-bench-mm-"))
    model = work / "gemma4"
    if not model.exists():
        make_tiny(model, "gemma4", sizes=Sizes(256, 4, 262_144, tower_hidden=128, tower_layers=4))
    data = make_data(work, args.rows)
    env = {**os.environ, "MLXTUNE_NO_REEXEC": "1"}
    theirs = run_mlx_vlm(work, model, data["rows"], env)
    ours = run_mlxtune(work, model, data["train"], env, packed=False)
    packed = run_mlxtune(work, model, data["train"], env, packed=True)
    n = data["rows"]
    print(f"Gemma 4 (decoder 4 x 256, vocab 262,144; towers 4 x 128): {n} rows of pictures, "
          f"tones and both, one epoch; {miscounted(data['clips'])} of {len(data['clips'])} clips "
          "get a wrong placeholder count from mlx-vlm")  # fmt: skip
    print(f"{'':26}{'rows/s':>8}{'steps/s':>9}{'train s':>9}{'steps':>7}{'MLX peak GB':>13}"
          f"{'max RSS GB':>12}{'loss':>8}")  # fmt: skip
    table = (("mlx-vlm 0.7.10, 1 row/step", theirs), ("mlxtune, 1 row/step", ours),
             ("mlxtune, packed 1 x 1024", packed))  # fmt: skip
    for name, r in table:
        print(f"{name:26}{n / r['seconds']:>8.2f}{r['steps'] / r['seconds']:>9.2f}"
              f"{r['seconds']:>9.1f}{r['steps']:>7}{r['mlx_peak_gb']:>13.2f}{r['rss_gb']:>12.2f}"
              f"{r['loss']:>8.3f}")  # fmt: skip
    for name, r in table[1:]:
        print(f"{name} / mlx-vlm: {theirs['seconds'] / r['seconds']:.2f}x faster, "
              f"MLX peak {r['mlx_peak_gb'] / theirs['mlx_peak_gb']:.2f}x, "
              f"max RSS {r['rss_gb'] / theirs['rss_gb']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
