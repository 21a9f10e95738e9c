"""Shared pieces of the tiny-checkpoint writer: tokenizer, random tensors, atomic folder write.

Everything here is numpy + safetensors + tokenizers: no torch, no mlx, so a checkpoint can be
made on a Mac that has neither installed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

# Text the tiny BPE learns its merges from: plain English, digits, code-ish punctuation and the
# words the synthetic learn tasks answer with, so common words become single tokens.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A tiny model learns to answer short questions.
What colour is this image? The image is red. The image is green. The image is blue.
Is this tone high, mid or low? The tone is high. The tone is mid. The tone is low.
You are a helpful assistant. Please answer the question in one word. Yes. No. Maybe.
User: hello! Assistant: Hello, how can I help you today? Thank you, that is all.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024. 3.14 + 2.71 = 5.85; x = y * 2.
def add(a, b): return a + b  # code {"key": "value", "list": [1, 2, 3]} <html></html>
Translate to French: the cat sits on the mat. Le chat est assis sur le tapis.
Summarise: fine-tuning adapts a pretrained language model to a new task with little data.
weather today sunny cloudy rain snow wind morning evening night week month year time
Group: fruit. apple banana cherry mango. Group: animal. cat dog horse tiger.
Group: tool. hammer saw drill wrench. Group: colour. red green blue yellow.
fruit
animal
tool
colour
"""

# The tokenizer's learned part is this size unless a family asks otherwise; the model's vocab
# can be padded past it (benchmarks use the real 262,144) without changing the tokenizer.
DEFAULT_LEARNED = 512


@dataclass(frozen=True)
class TokenizerSpec:
    """What a family needs from its tokenizer. Special tokens take ids 0..len-1 in this order."""

    style: Literal["sentencepiece", "bytelevel"]
    special_tokens: tuple[str, ...]
    chat_template: str
    bos: str
    eos: str
    pad: str
    unk: str | None = None
    add_bos: bool = True  # the post-processor prepends bos when add_special_tokens=True
    tokenizer_config: dict = field(default_factory=dict)  # extra keys for tokenizer_config.json


@dataclass(frozen=True)
class Checkpoint:
    """A family's answer: config.json, parameters by HF name, and any extra JSON/text files."""

    config: dict
    params: dict[
        str, tuple[tuple[int, ...], str]
    ]  # (shape, init: normal[:<s>]|ones|zeros|const:<v>)
    files: dict[str, dict | str] = field(default_factory=dict)
    # Edits the drawn tensors in place (for structure a per-tensor init cannot express).
    shape: Callable[[dict[str, np.ndarray]], None] | None = None


def build_tokenizer(spec: TokenizerSpec, learned: int = DEFAULT_LEARNED):
    """A small BPE tokenizer with the family's real special tokens at ids 0..k-1."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    if spec.style == "sentencepiece":
        # Gemma's layout: spaces become '▁', byte-fallback tokens <0x00>..<0xFF> cover any text,
        # and no token mixes newlines with other text (llama.cpp's gemma4 tokenizer splits
        # newline runs off before merging, as the real vocabulary allows).
        normalizer = normalizers.Replace(" ", "▁")
        pre = pre_tokenizers.Sequence([
            pre_tokenizers.Split("▁", behavior="merged_with_next"),
            pre_tokenizers.Split(Regex("\n+"), behavior="isolated"),
        ])  # fmt: skip
        decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        base = [f"<0x{b:02X}>" for b in range(256)]
        alphabet: list[str] = []
    else:
        # Llama 3/4's layout: GPT-2 byte-level BPE, every byte is a printable base symbol.
        normalizer = None
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        decoder = decoders.ByteLevel()
        base = []
        alphabet = pre_tokenizers.ByteLevel.alphabet()

    # Learn merges on the fixed corpus, then lay the vocab out as specials | bytes | learned.
    probe = Tokenizer(BPE(byte_fallback=spec.style == "sentencepiece"))
    if normalizer is not None:
        probe.normalizer = normalizer
    probe.pre_tokenizer = pre
    trainer = BpeTrainer(
        vocab_size=len(alphabet) + learned, initial_alphabet=alphabet, show_progress=False
    )
    probe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    trained = json.loads(probe.to_str())["model"]
    learned_tokens = sorted(trained["vocab"], key=trained["vocab"].get)

    vocab: dict[str, int] = {}
    for tok in [*spec.special_tokens, *base, *learned_tokens]:
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            unk_token=spec.unk,
            byte_fallback=spec.style == "sentencepiece",
            fuse_unk=spec.style == "sentencepiece",
        )
    )
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoder
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in spec.special_tokens]
    )
    if spec.add_bos:
        bos_id = vocab[spec.bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A",
            pair=f"{spec.bos} $A {spec.bos} $B",
            special_tokens=[(spec.bos, bos_id)],
        )
    return tok


def tokenizer_files(spec: TokenizerSpec, tok) -> dict[str, dict | str]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in spec.special_tokens
    }
    cfg = {
        "added_tokens_decoder": added,
        "bos_token": spec.bos,
        "eos_token": spec.eos,
        "pad_token": spec.pad,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": spec.add_bos,
        **({"unk_token": spec.unk} if spec.unk else {}),
        **spec.tokenizer_config,
    }
    special_map = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad}
    if spec.unk:
        special_map["unk_token"] = spec.unk
    return {
        "tokenizer.json": json.loads(tok.to_str()),
        "tokenizer_config.json": cfg,
        "special_tokens_map.json": special_map,
        "chat_template.jinja": spec.chat_template,
    }


def random_tensors(
    params: dict[str, tuple[tuple[int, ...], str]], seed: int
) -> dict[str, np.ndarray]:
    """Deterministic for a seed: each tensor draws from its own stream keyed by its name.

    Matrices get std 1/sqrt(fan_in) (fan-in: the last axis of a 2-D weight, all but the first
    of a conv kernel), so activations and logits have the scale of a trained model's: with a
    fixed 0.02 a 64-wide model's logits span barely 2 nats and nothing it is taught can show.
    Vectors (biases, embeddings of one row) get 0.02.
    """
    out = {}
    for name in sorted(params):
        shape, init = params[name]
        if init == "ones":
            out[name] = np.ones(shape, np.float32)
        elif init == "zeros":
            out[name] = np.zeros(shape, np.float32)
        elif init.startswith("const:"):
            out[name] = np.full(shape, float(init.removeprefix("const:")), np.float32)
        elif init == "normal" or init.startswith("normal:"):  # normal:<s> scales the std by s
            fan_in = shape[-1] if len(shape) == 2 else int(np.prod(shape[1:]))
            std = 0.02 if len(shape) < 2 else fan_in**-0.5
            std *= float(init.removeprefix("normal").removeprefix(":") or 1)
            key = int.from_bytes(name.encode(), "little") % (2**63)
            rng = np.random.default_rng([seed, key])
            out[name] = (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)
        else:
            raise ValueError(f"{name}: unknown init {init!r}")
    return out


def write_folder(out_dir: Path, files: dict[str, dict | str], tensors: dict[str, np.ndarray]):
    """Write everything into a temp folder beside out_dir, then rename: never half-written."""
    from safetensors.numpy import save_file

    from ..io import atomic_folder

    with atomic_folder(Path(out_dir)) as tmp:
        for name, content in files.items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2) + "\n"
            (tmp / name).write_text(text, encoding="utf-8")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in tmp.iterdir():
            f.chmod(0o644)
    return Path(out_dir)
