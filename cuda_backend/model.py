"""Load a transformers model for training: the twin of mlxtune/model.py.

- `load()`: on CUDA when present and on the CPU otherwise, in the compute dtype. With
  `model.quantize: 4` or `model.offload_experts`, from the prepared copy (`prepare`, made on
  first use): the skeleton on the meta device, frozen linear layers in NF4 straight from disk
  (bitsandbytes on CUDA, `nf4.NF4Linear` elsewhere; the head and embeddings stay as they are),
  Llama 4's routed experts in one block per layer, in host RAM when streamed (`assemble`).
  Otherwise the checkpoint through transformers (AutoModelForCausalLM, or
  AutoModelForImageTextToText for a multimodal config). Llama 4's MoE layers become sparse
  top-1 layers (`moe.SparseMoe`) either way.
- `split_head()`: the model as body (-> final hidden states, media merged) + head, so the loss
  can run the head in chunks; checked against the model's own logits.
- `positions()`: position ids that restart at each packed example. transformers then masks
  attention to each example itself (`masking_utils.find_packed_sequence_indices`), and the
  positions are exactly those the example would have alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mlxtune.config import ModelConfig
from mlxtune.data.media import MediaPlan
from mlxtune.errors import ModelError
from mlxtune.hub import resolve_path
from mlxtune.plan.cuda import uses_cache

from . import assemble, moe, prepare

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any
    config: dict
    path: Path
    stop_ids: frozenset[int]
    device: torch.device
    stores: list = field(default_factory=list)  # streamed experts, one store per MoE layer
    prefix: str = ""  # what the checkpoint's names carry in front of the model's (Llama 4: text)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    def media_plan(self, image_soft_tokens: int | None = None) -> MediaPlan | None:
        """How this model takes images and audio (Gemma 4); None otherwise."""
        return MediaPlan.for_model("cuda", self.path, self.config, image_soft_tokens)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(cfg: ModelConfig) -> Loaded:
    import transformers

    path = resolve_path(cfg.path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if cfg.quantize not in (None, 4):
        raise ModelError("model.quantize: 8 is the MLX backend's 8-bit format; the cuda backend "
                         "quantizes to 4-bit NF4 (QLoRA's, read by bitsandbytes): use 4, or null")  # fmt: skip
    where = device()
    prefix = ""
    if uses_cache(cfg):
        folder = prepare.prepare(cfg)  # at once when the prepared copy is complete
        model, stores, prefix = assemble.assemble(cfg, path, config, folder, where)
    else:
        model, stores = _whole(cfg, path, config), []
        model.to(where)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    model.eval()
    stop = _stop_ids(config, tokenizer)
    return Loaded(model, tokenizer, config, path, stop, where, stores, prefix)


def _whole(cfg: ModelConfig, path: Path, config: dict) -> nn.Module:
    """The checkpoint through transformers (no quantizing, no streaming); Llama 4's MoE layers
    made sparse in place."""
    import transformers

    multimodal = bool(config.get("vision_config") or config.get("audio_config"))
    auto = (
        transformers.AutoModelForImageTextToText
        if multimodal
        else transformers.AutoModelForCausalLM
    )
    try:
        model = auto.from_pretrained(str(path), dtype=DTYPES.get(cfg.dtype, "auto"))
    except (ValueError, KeyError, OSError) as e:
        reason = str(e).splitlines()[0]
        raise ModelError(
            f"model.path: {path}: transformers cannot load this model: {reason}"
        ) from None
    moe.sparsify(model)
    return model


def _stop_ids(config: dict, tokenizer) -> frozenset[int]:
    ids = set()
    for source in (config, config.get("text_config") or {}):
        eos = source.get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)


@dataclass(frozen=True)
class Split:
    body: Callable[..., torch.Tensor]  # (inputs, positions, media) -> hidden [B, L, D]
    head: Callable[[torch.Tensor], torch.Tensor]  # hidden [..., D] -> logits [..., V]


def _decoder(model: nn.Module) -> nn.Module | None:
    """The module from input ids (and media) to final hidden states: `model.model` by
    transformers' convention (`base_model_prefix` is not reliable: Llama 4 names modules that
    do not exist). Llama 4's wrapper has no multimodal base model: its text decoder sits in
    `language_model.model`."""
    lm = getattr(model, "language_model", None)
    if isinstance(lm, nn.Module) and isinstance(getattr(lm, "model", None), nn.Module) and \
            lm.get_output_embeddings() is model.get_output_embeddings():  # fmt: skip
        return lm.model
    base = getattr(model, "model", None)
    return base if isinstance(base, nn.Module) else getattr(model, model.base_model_prefix, None)


def split_head(model: nn.Module) -> Split | None:
    """Body and head, or None when the split does not reproduce the model's logits."""
    base = _decoder(model)
    project = model.get_output_embeddings()
    if base is None or project is None:
        return None
    config = model.config.get_text_config()
    cap = getattr(config, "final_logit_softcapping", None)

    def head(h: torch.Tensor) -> torch.Tensor:
        out = project(h)
        return torch.tanh(out / cap) * cap if cap else out

    def body(inputs, positions=None, media=None):
        # No KV cache: with one, transformers would not build the packed-example masks.
        return base(input_ids=inputs, position_ids=positions, use_cache=False,
                    **(media or {})).last_hidden_state  # fmt: skip

    where = next(p.device for p in model.parameters() if not p.is_meta)
    probe = torch.arange(1, 9, device=where)[None] % config.vocab_size
    with torch.no_grad():
        try:
            want = model(input_ids=probe).logits
            got = head(body(probe))
        except (TypeError, AttributeError, ValueError):
            return None
    if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=1e-3,
                                                     atol=1e-3):  # fmt: skip
        return None
    return Split(body, head)


def positions(segments: np.ndarray) -> np.ndarray:
    """[B, L] position ids restarting at 0 where each packed example (segment) starts."""
    out = np.zeros_like(segments, dtype=np.int64)
    for r, row in enumerate(segments):
        starts = np.flatnonzero(np.diff(row, prepend=-1) != 0)
        for a, b in zip(starts, [*starts[1:], len(row)], strict=True):
            out[r, a:b] = np.arange(b - a)
    return out


def media_kwargs(media: dict, dtype: torch.dtype, where: torch.device) -> dict:
    """Our collated media (data.batching.media_arrays) as transformers' Gemma 4 takes them."""
    out = {}
    if "image_patches" in media:
        pixels = torch.from_numpy(media["image_patches"]).to(where, torch.float32) / 255
        out["pixel_values"] = pixels.to(dtype)
        out["image_position_ids"] = torch.from_numpy(media["image_positions"]).to(where).long()
    if "audio_features" in media:
        out["input_features"] = torch.from_numpy(media["audio_features"]).to(where, dtype)
        out["input_features_mask"] = torch.from_numpy(media["audio_valid"]).to(where)
    return out
