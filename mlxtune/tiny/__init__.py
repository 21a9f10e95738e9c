"""Tiny random-weight checkpoints in Hugging Face format, for tests, demos and benchmarks.

`python -m mlxtune.tiny OUT_DIR --arch gemma4|gemma3n|llama4|llama [--seed N]` writes
`config.json`, `model.safetensors`, the tokenizer files (a small BPE vocab holding the family's
real special tokens and chat template) and, for multimodal families, the processor configs.
Each family lives in a module named after its `model_type`; `ARCHS` is derived from the files.
`real` is not a family: `python -m mlxtune.tiny.real` writes a real trained model (SmolLM2-135M).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

NOT_FAMILIES = ("real",)
ARCHS = tuple(
    sorted(p.stem for p in Path(__file__).parent.glob("*.py")
           if not p.stem.startswith("_") and p.stem not in NOT_FAMILIES)
)  # fmt: skip


@dataclass(frozen=True)
class Sizes:
    """Optional shape overrides; None keeps the family's tiny default."""

    hidden_size: int | None = None
    num_layers: int | None = None
    vocab_size: int | None = None  # >= tokenizer size; the extra rows are never produced
    tower_hidden: int | None = None  # Gemma 4: width of the vision and audio towers
    tower_layers: int | None = None  # Gemma 4: layers of each tower
    experts: int | None = None  # Llama 4: routed experts per MoE layer
    # Gemma 3n: the square side pictures are resized to (768 as real). MobileNetV5's attention
    # at 768 px costs seconds per picture on a CPU; 256 keeps 256 soft tokens for quick runs.
    image_size: int | None = None
    # Gemma 3n: the decoder's sliding window (tiny default 32, so test prompts cross it; the real
    # 512 lets every layer see a picture's 256 and a clip's 188 soft tokens).
    sliding_window: int | None = None
    # Llama and Gemma 4 text: real attention and MLP widths for scaled real-shape checkpoints
    # (benchmarks/bench_text_lora.py --shape); None keeps the tiny ones (4 heads, MLP 2 x hidden).
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    intermediate: int | None = None


def make_tiny(out_dir: str | Path, arch: str, seed: int = 0, sizes: Sizes = Sizes()) -> Path:
    """Write a tiny checkpoint for `arch` into `out_dir` (which must be absent or empty)."""
    from ._common import build_tokenizer, random_tensors, tokenizer_files, write_folder

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    family = importlib.import_module(f"{__name__}.{arch}")
    spec = family.TOKENIZER
    tok = build_tokenizer(spec)
    n_tok = tok.get_vocab_size()
    vocab_size = sizes.vocab_size or n_tok
    if vocab_size < n_tok:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({n_tok})")
    ids = {t: tok.token_to_id(t) for t in spec.special_tokens}
    ckpt = family.build(ids, vocab_size, sizes)
    files = {"config.json": ckpt.config, **tokenizer_files(spec, tok), **ckpt.files}
    tensors = random_tensors(ckpt.params, seed)
    if ckpt.shape is not None:
        ckpt.shape(tensors)
    return write_folder(Path(out_dir), files, tensors)
