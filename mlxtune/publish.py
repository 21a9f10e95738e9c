"""`mlxtune export RUN OUT --format F --push-to-hub REPO [--private]`: the exported folder, with
a model card made from the run, uploaded through huggingface-hub (`HfApi.create_repo`, then
`upload_folder`: one commit). The endpoint is huggingface-hub's (`HF_ENDPOINT`, default the
Hub) and the token its own (`HF_TOKEN` or `hf auth login`).

The card (README.md) holds the Hub's metadata block (base model, library, tags, datasets when
they are Hub ids), what was trained and how (method, rank, targets, the config), the data
(rows, tokens trained on), the final losses, the loss plot (loss.png beside it) and how to
load the result.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .config import Config
from .errors import ModelError
from .hub import is_repo_id

LIBRARY = {"peft": "peft", "merged": "transformers", "mlx-lm": "mlx", "gguf": "gguf",
           "gguf-lora": "gguf"}  # fmt: skip


def model_card(run_dir: Path, cfg: Config, repo: str, fmt: str) -> str:
    """README.md for the uploaded export of `run_dir`."""
    from .progress import read_metrics

    base = str(cfg.model.path)
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    valid = [r for r in rows if r["kind"] == "valid"]
    meta = ["---"]
    if is_repo_id(base):
        meta.append(f"base_model: {base}")
    meta += [f"library_name: {LIBRARY[fmt]}", "tags:", "- mlxtune", f"- {cfg.lora.method}"]
    if fmt.startswith("gguf"):
        meta.append("- gguf")
    datasets = [p for p in (cfg.data.train, cfg.data.valid) if p and is_repo_id(str(p))]
    if datasets:
        meta += ["datasets:", *[f"- {d}" for d in datasets]]
    meta.append("---")
    lora = cfg.lora
    how = ("full fine-tuning of the decoder blocks" if lora.method == "full" else
           f"{lora.method.upper()} rank {lora.rank}, alpha {lora.alpha:g} (scale {lora.scale:g})"
           f", dropout {lora.dropout:g}, targets {', '.join(lora.targets) or 'the defaults'}")  # fmt: skip
    lines = [*meta, "", f"# {repo.split('/')[-1]}", "",
             f"Fine-tuned from `{base}` with [mlxtune](https://github.com/mlxtune/mlxtune) "
             f"({cfg.model.backend} backend): {how}.", "", "## Data", ""]  # fmt: skip
    lines += [f"- {split}: `{Path(str(p)).name}`, {_count_rows(p)} rows"
              for split, p in (("train", cfg.data.train), ("valid", cfg.data.valid)) if p]  # fmt: skip
    if train:
        tokens = sum(r.get("loss_tokens", 0) for r in train)
        real = sum(r.get("real_tokens", 0) for r in train)
        lines.append(f"- trained on {real:,} tokens ({tokens:,} with loss) in {train[-1]['step']} "
                     f"steps, sequences up to {cfg.data.max_seq_len} tokens")  # fmt: skip
    lines += ["", "## Results", ""]
    if train:
        lines.append(f"- final training loss {train[-1]['loss']:.4f} (step {train[-1]['step']})")
    if valid:
        lines.append(f"- validation loss {valid[-1]['loss']:.4f}, perplexity "
                     f"{valid[-1]['perplexity']:.2f} (step {valid[-1]['step']})")  # fmt: skip
    if (run_dir / "loss.png").is_file() or train:
        lines += ["", "![loss](loss.png)"]
    lines += ["", "## Use", "", "```python", *_usage(repo, base, fmt), "```", "",
              "## Training config", "", "```yaml", cfg.to_yaml().rstrip(), "```", ""]  # fmt: skip
    return "\n".join(lines)


def _count_rows(path) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f"{sum(1 for line in f if line.strip()):,}"
    except OSError:
        return "?"


def _usage(repo: str, base: str, fmt: str) -> list[str]:
    if fmt == "peft":
        return ["from peft import AutoPeftModelForCausalLM",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")']  # fmt: skip
    if fmt == "merged":
        return ["import mlxtune as mt", f'print(mt.load("{repo}").generate("Hello"))', "",
                "# or: transformers.AutoModelForCausalLM.from_pretrained("
                f'"{repo}")']  # fmt: skip
    if fmt == "mlx-lm":
        return ["from mlx_lm import load",
                f'model, tokenizer = load("{base}", adapter_path="<download of {repo}>")']  # fmt: skip
    return [f"# ollama run hf.co/{repo}", f"# llama-cli -hf {repo} -cnv"]


def push(folder: Path, run_dir: Path, cfg: Config, repo: str, fmt: str,
         private: bool = False) -> str:  # fmt: skip
    """Upload `folder` (an export of `run_dir`) with its model card to `repo`; the repo's URL."""
    from huggingface_hub import HfApi

    if not is_repo_id(repo) and "/" not in repo:
        raise ModelError(f"--push-to-hub {repo}: expected a repo id like user/name")
    card = folder / "README.md"
    card.write_text(model_card(run_dir, cfg, repo, fmt), encoding="utf-8")
    _plot(run_dir, folder)
    api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder),
                          commit_message=f"mlxtune export of {run_dir.name} ({fmt})")  # fmt: skip
    except Exception as e:  # the Hub's (or the network's) reason, on one line
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ModelError(f"--push-to-hub {repo}: {reason[:300]}") from None
    return str(url)


def _plot(run_dir: Path, folder: Path) -> None:
    """loss.png for the card: the run's, drawn now if matplotlib is there."""
    src = run_dir / "loss.png"
    if not src.is_file():
        try:
            from .plot import plot_run

            plot_run(run_dir)
        except Exception:  # no matplotlib: the card goes without its picture
            return
    if src.is_file():
        shutil.copy2(src, folder / "loss.png")


def read_card_meta(text: str) -> dict:
    """The card's metadata block as a dict (what the Hub shows), for tests and checks."""
    import yaml

    if not text.startswith("---\n"):
        return {}
    return yaml.safe_load(text[4 : text.index("\n---", 4)]) or {}
