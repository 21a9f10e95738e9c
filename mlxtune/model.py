"""Load an mlx-lm text model for training, and the pieces the trainer needs around it.

- `load()`: mlx-lm's loader (any text model it knows) on the config as `models.hf_config`
  normalizes it (RoPE settings transformers 5 saves only as `rope_parameters`), the compute
  dtype, optional 4/8-bit quantization of the frozen base (QLoRA), and the tokenizer's stop ids.
  Gemma 4 gets its towers back (`models.gemma4.wrap`); one it cannot load is left out, and a
  line on stderr says so (`Loaded.notes`).
- `PackedAttention`: stands where a KV cache would. mlx-lm models build their attention masks
  from `cache.make_mask()`, so passing one per layer makes every layer attend only inside its
  packed example, with no change to the model code. Positions are not restarted: RoPE is
  relative, so a shifted example attends exactly as it would alone. `packs_exactly()` checks
  that on the loaded model (learned absolute positions fail it, and packing is then turned off).
- `split_head()`: the model as body (-> final hidden states) + head (-> logits), so the loss
  can run the head in chunks. Checked against the model's own logits at load time; a model
  whose head the split does not reproduce falls back to full logits.
- `checkpoint_layers()`: per-layer gradient checkpointing by swapping each block's class for a
  subclass whose `__call__` recomputes in backward. Names and weights stay as they are.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig
from .data.media import MediaPlan
from .errors import ModelError
from .hub import resolve_path

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
QUANT_GROUP_SIZE = 64


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any  # the Hugging Face tokenizer (mlx-lm's wrapper keeps it as `_tokenizer`)
    wrapper: Any  # mlx-lm's TokenizerWrapper, for generation
    config: dict
    path: Path  # the local folder the weights came from
    stop_ids: frozenset[int]
    notes: list[str] = field(default_factory=list)  # what the load left out, said on stderr

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    def media_plan(self, image_soft_tokens: int | None = None) -> MediaPlan | None:
        """How this model takes images and audio; None for a text-only model."""
        if not hasattr(self.model, "embed"):
            return None
        return MediaPlan.from_checkpoint(self.path, self.config, image_soft_tokens)


def load(cfg: ModelConfig) -> Loaded:
    from mlx_lm.utils import load as mlx_lm_load
    from mlx_lm.utils import load_config, quantize_model

    from .models import gemma4, hf_config

    path = resolve_path(cfg.path)
    if _model_type(path) == "gemma3n":  # mlx-lm cannot load it (see models/gemma3n.py)
        return _load_gemma3n(cfg, path)
    try:
        # transformers 5's rope_parameters, which mlx-lm does not read, also as the legacy keys
        raw = load_config(path)
        fixed = hf_config.changed_keys(raw, hf_config.normalize(raw, f"model.path: {path}"))
        model, wrapper, config = mlx_lm_load(str(path), model_config=fixed, return_config=True)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        reason = str(e).splitlines()[0]
        raise ModelError(f"model.path: {path}: mlx-lm cannot load this model: {reason}") from None
    _cast(model, cfg.dtype)
    if cfg.quantize:
        if "quantization" in config:
            raise ModelError(f"model.quantize: {path} is already quantized; set it to null")
        model, config = quantize_model(model, config, QUANT_GROUP_SIZE, cfg.quantize)
    notes = []
    if gemma4.is_multimodal(config):  # the towers stay unquantized, in the compute dtype
        model, config, skipped = gemma4.wrap(model, config, path)
        notes += [skipped] if skipped else []
    mx.eval(model.parameters())
    stop_ids = frozenset(int(i) for i in wrapper.eos_token_ids)
    for note in notes:  # every command loads here: train, eval and generate all say it
        print(note, file=sys.stderr, flush=True)
    return Loaded(model, wrapper._tokenizer, wrapper, config, path, stop_ids, notes)


def _model_type(path: Path) -> str:
    import json

    try:
        return str(json.loads((path / "config.json").read_text(encoding="utf-8"))["model_type"])
    except (OSError, ValueError, KeyError):
        return ""  # mlx-lm's loader says what is wrong


def _cast(model: nn.Module, dtype: str) -> None:
    if dtype != "auto":
        to = DTYPES[dtype]
        model.apply(lambda a: a.astype(to) if mx.issubdtype(a.dtype, mx.floating) else a)


def _load_gemma3n(cfg: ModelConfig, path: Path) -> Loaded:
    """Our own Gemma 3n; the decoder (not the towers) quantized for QLoRA, as mlx-lm would."""
    from mlx_lm.utils import load_tokenizer

    from .models import gemma3n

    config = gemma3n.read_config(path)
    if "quantization" in config:
        raise ModelError(f"model.path: {path}: quantized Gemma 3n checkpoints are not supported; "
                         "use the original weights with model.quantize")  # fmt: skip
    model = gemma3n.load(path, config)
    _cast(model, cfg.dtype)
    if cfg.quantize:
        nn.quantize(model.language_model, QUANT_GROUP_SIZE, cfg.quantize,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % QUANT_GROUP_SIZE == 0)  # fmt: skip
        config["quantization"] = {"group_size": QUANT_GROUP_SIZE, "bits": cfg.quantize}
    mx.eval(model.parameters())
    eos = config["text_config"].get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos
    wrapper = load_tokenizer(path, eos_token_ids=eos)
    stop_ids = frozenset(int(i) for i in wrapper.eos_token_ids)
    return Loaded(model, wrapper._tokenizer, wrapper, config, path, stop_ids)


class PackedAttention:
    """A stateless stand-in for a KV cache that masks attention to each packed example."""

    offset = 0

    def __init__(self, segments: mx.array):
        self.segments = segments  # [B, L] int32, 0 = padding

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        s = self.segments
        i = mx.arange(n)
        causal = i[:, None] >= i[None, :]
        if window_size is not None:
            causal = causal & (i[:, None] < i[None, :] + window_size)
        return ((s[:, :, None] == s[:, None, :]) & causal)[:, None]


def packed_cache(model: nn.Module, segments: mx.array) -> list[PackedAttention]:
    return [PackedAttention(segments)] * len(model.layers)


def packs_exactly(model: nn.Module) -> bool:
    """Whether two sequences packed in one row give the logits they give alone.

    True for RoPE models (attention depends on relative positions only); False for learned
    absolute positions, or a model whose layers do not take the mask (recurrent layers)."""
    vocab = _vocab_size(model)
    a, b = mx.arange(1, 9)[None] % vocab, mx.arange(11, 17)[None] % vocab
    segments = mx.array([[1] * 8 + [2] * 6])
    try:
        alone = mx.concatenate([model(a), model(b)], axis=1).astype(mx.float32)
        packed = model(mx.concatenate([a, b], axis=1), cache=packed_cache(model, segments))
        gap = mx.abs(packed.astype(mx.float32) - alone).max()
        return bool(gap <= 1e-2 * mx.abs(alone).max() + 1e-4)
    except Exception:
        return False


@dataclass(frozen=True)
class Split:
    body: Callable[..., mx.array]  # (inputs, cache, media) -> hidden [B, L, D]
    head: Callable[[mx.array], mx.array]  # hidden [..., D] -> logits [..., V]


def split_head(model: nn.Module) -> Split | None:
    """Body and head of an mlx-lm model, or None when the split does not reproduce its logits."""
    lm = model.get("language_model", model)
    if "model" not in lm or not callable(lm["model"]):
        return None
    inner = lm["model"]
    project = lm["lm_head"] if "lm_head" in lm else getattr(inner, "embed_tokens", None)
    if project is None:
        return None
    project = project if "lm_head" in lm else project.as_linear
    cap = getattr(lm, "final_logit_softcapping", None)
    if cap is None:
        cap = getattr(getattr(lm, "args", None), "final_logit_softcapping", None)

    def head(h: mx.array) -> mx.array:
        out = project(h)
        return mx.tanh(out / cap) * cap if cap else out

    hidden = getattr(model, "hidden", None)  # a multimodal model puts the media in first

    def body(inputs: mx.array, cache: list, media: dict | None = None) -> mx.array:
        if hidden is not None:
            return hidden(inputs, cache=cache, media=media)
        return inner(inputs, cache=cache)

    probe = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]]) % _vocab_size(model)
    try:
        want = model(probe)
        got = head(body(probe, None))
    except Exception:
        return None
    if got.shape != want.shape or not mx.allclose(got, want, rtol=1e-4, atol=1e-4).item():
        return None
    return Split(body, head)


def _vocab_size(model: nn.Module) -> int:
    args = getattr(model, "args", None)
    return int(getattr(args, "vocab_size", 0) or 8)


def checkpoint_layers(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them: the decoder's,
    and those of any tower that trains (a frozen tower keeps no activations anyway)."""
    layers = list(model.layers)
    for name in ("vision_tower", "audio_tower"):
        if name in model and tree_flatten(model[name].trainable_parameters()):
            layers += list(model[name].layers)
    for layer in layers:
        base = type(layer)
        if getattr(base, "_mlxtune_checkpointed", False):
            continue

        def __call__(self, *args, _base=base, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return _base.__call__(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        attrs = {"__call__": __call__, "_mlxtune_checkpointed": True}
        layer.__class__ = type(base.__name__, (base,), attrs)
