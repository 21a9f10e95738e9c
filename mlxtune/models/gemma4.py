"""Gemma 4 with its vision and audio towers: our towers around mlx-lm's text decoder.

mlx-lm loads the text decoder and drops the towers; `wrap()` puts them back, with the weights
read from the checkpoint under their Hugging Face names. A tower it cannot load (no config
section, no weights, quantized or misfitting weights) is left out, said in one line: the model
then trains on text (and the other tower's media), and rows needing it are refused as data
errors. A forward pass does what transformers' `Gemma4Model.forward` does:

1. Image and audio placeholder ids become the pad id for the token embedding and for the
   per-layer embeddings (PLE).
2. The towers encode the media; the embedders (scale-free RMSNorm + projection) bring the soft
   tokens to the text width, and they replace the placeholders' embeddings in order.
3. The decoder runs on those embeddings. mlx-lm's decoder multiplies whatever embeddings it is
   given by sqrt(hidden), so soft tokens are passed divided by it.

The media arrive as one dict of arrays per micro-batch (`data.batching.media_arrays`): pixels and
patch positions, mel features and masks, and `source`, which says for every position of the
batch which row of [token embeddings; image tokens; audio tokens] it takes.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..data.media import MediaTokens
from ..errors import ModelError
from ._layers import Embedder
from ._towers import SoftTokenCache, frozen_or_not, load_towers, to_mlx_layout, tower_weights
from .gemma4_audio import AudioArgs, AudioTower
from .gemma4_vision import VisionArgs, VisionTower

__all__ = ["Gemma4", "SoftTokenCache", "is_multimodal", "wrap"]

TOWER_KINDS = {"vision": ("vision_tower", "embed_vision"), "audio": ("audio_tower", "embed_audio")}


def is_multimodal(config: dict) -> bool:
    """A Gemma 4 checkpoint of the multimodal family (its towers may still be absent)."""
    return config.get("model_type") == "gemma4"


class Gemma4(nn.Module):
    """Drop-in for mlx-lm's gemma4.Model (same parameter paths for the decoder) that also takes
    `media`. Without media it is exactly mlx-lm's text model."""

    def __init__(self, language_model: nn.Module, config: dict):
        super().__init__()
        self.language_model = language_model
        self.model_type = "gemma4"
        self.ids = MediaTokens.from_config(config)
        # The larger Gemma 4 models let an image's soft tokens see each other in sliding layers.
        text_config = config["text_config"]
        self.bidirectional = text_config.get("use_bidirectional_attention") == "vision"
        width = text_config["hidden_size"]
        vision, audio = config.get("vision_config"), config.get("audio_config")
        if vision:
            va = VisionArgs.from_config(vision)
            self.vision_tower = VisionTower(va)
            self.embed_vision = Embedder(va.hidden_size, width, va.rms_norm_eps)
        if audio:
            aa = AudioArgs.from_config(audio)
            self.audio_tower = AudioTower(aa)
            self.embed_audio = Embedder(aa.output_proj_dims, width, aa.rms_norm_eps)

    @property
    def layers(self):
        return self.language_model.layers

    def make_cache(self):
        return self.language_model.make_cache()

    @property
    def decoder(self) -> nn.Module:
        return self.language_model.model

    def __call__(self, inputs, cache=None, input_embeddings=None, per_layer_inputs=None,
                 media=None):  # fmt: skip
        """Logits; mlx-lm's generation calls this with `input_embeddings` from `embed()`."""
        embeddings, per_layer = self._decoder_inputs(inputs, media, input_embeddings)
        per_layer = per_layer if per_layer_inputs is None else per_layer_inputs
        return self.language_model(inputs, cache=self._masks(inputs, cache),
                                   input_embeddings=embeddings, per_layer_inputs=per_layer)  # fmt: skip

    def hidden(self, inputs: mx.array, cache=None, media: dict | None = None) -> mx.array:
        """Final hidden states (before the head), for the chunked loss."""
        embeddings, per_layer = self._decoder_inputs(inputs, media)
        return self.decoder(inputs, cache=self._masks(inputs, cache), input_embeddings=embeddings,
                            per_layer_inputs=per_layer)  # fmt: skip

    def _masks(self, inputs: mx.array, cache):
        """For bidirectional-vision models, caches whose masks open each image block."""
        if not self.bidirectional or cache is None or self.ids.image is None:
            return cache
        is_image = inputs == self.ids.image
        if self.ids.video is not None:
            is_image = is_image | (inputs == self.ids.video)
        before = mx.pad(is_image[:, :-1], [(0, 0), (1, 0)])
        group = mx.cumsum((is_image & ~before).astype(mx.int32), axis=1) - 1
        blocks = mx.where(is_image, group, -1)
        return [None if c is None else VisionBlocks(c, blocks) for c in cache]

    def _decoder_inputs(self, inputs, media, embeddings=None):
        if media:
            embeddings = self.embed(inputs, media)
        per_layer = None
        if self.decoder.hidden_size_per_layer_input:
            per_layer = self.decoder._get_per_layer_inputs(self.text_ids(inputs))
        return embeddings, per_layer

    def text_ids(self, inputs: mx.array) -> mx.array:
        """Placeholders -> pad, as transformers does before both token embeddings."""
        soft = mx.zeros(inputs.shape, dtype=mx.bool_)
        for i in self.ids.soft:
            soft = soft | (inputs == i)
        return mx.where(soft, self.ids.pad, inputs)

    def embed(self, inputs: mx.array, media: dict) -> mx.array:
        """Token embeddings with the media's soft tokens in the placeholders' places (unscaled,
        as mlx-lm's decoder expects its `input_embeddings`)."""
        text = self.decoder.embed_tokens(self.text_ids(inputs))
        b, n, width = text.shape
        soft = []
        if "image_patches" in media or "image_soft" in media:
            soft.append(self.image_features(media))
        if "audio_features" in media or "audio_soft" in media:
            soft.append(self.audio_features(media))
        table = text.reshape(b * n, width)
        if soft:
            scaled = mx.concatenate(soft, axis=0) / self.decoder.embed_scale
            table = mx.concatenate([table, scaled.astype(table.dtype)], axis=0)
        return table[media["source"]].reshape(b, n, width)

    def image_features(self, media: dict) -> mx.array:
        """Soft tokens of every image, in placeholder order, at the text width."""
        soft = media.get("image_soft")
        if soft is None:
            soft = frozen_or_not(self.vision_tower, self.tower_tokens("image", media))
        return self.embed_vision(soft.astype(self.decoder.norm.weight.dtype))

    def audio_features(self, media: dict) -> mx.array:
        soft = media.get("audio_soft")
        if soft is None:
            soft = frozen_or_not(self.audio_tower, self.tower_tokens("audio", media))
        return self.embed_audio(soft.astype(self.decoder.norm.weight.dtype))

    def tower_tokens(self, kind: str, media: dict) -> mx.array:
        """A tower's real output rows [tokens, width] (before the embedder), in batch order."""
        if kind == "image":
            out = self.vision_tower(
                media["image_patches"], media["image_positions"], media["image_pool"]
            )
        else:
            out = self.audio_tower(media["audio_features"], media["audio_valid"])
        return out.reshape(-1, out.shape[-1])[media[f"{kind}_take"]]

    def tower_frozen(self, kind: str) -> bool:
        name = f"{'vision' if kind == 'image' else 'audio'}_tower"
        return name in self and not tree_flatten(self[name].trainable_parameters())


class VisionBlocks:
    """A cache (KV cache or packed-attention mask) whose sliding-window masks also let the soft
    tokens of one image attend to each other both ways, as transformers'
    `create_masks_for_vision_model` does: full layers stay causal; sliding layers take
    window AND (causal OR same image). Everything else is the wrapped cache's."""

    def __init__(self, cache, blocks: mx.array):
        self._cache, self._blocks = cache, blocks  # blocks [B, N]: image number, -1 elsewhere

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        if window_size is None:
            return self._cache.make_mask(n, return_array=return_array, window_size=None)
        base = self._cache.make_mask(n, return_array=True, window_size=window_size)
        b = self._blocks
        i = mx.arange(n)
        same = (b[:, :, None] == b[:, None, :]) & (b[:, :, None] >= 0)
        same = same & (i[None, :, None] < i[None, None, :] + window_size)
        past = base.shape[-1] - n  # columns for tokens already in the cache
        same = mx.pad(same, [(0, 0), (0, 0), (past, 0)])[:, None]
        return base | same


def wrap(text_model: nn.Module, config: dict, folder: Path) -> tuple[Gemma4, dict, str | None]:
    """mlx-lm's loaded gemma4 model + the towers and embedders from the checkpoint in `folder`.

    A tower that cannot be loaded (no config, no weights, quantized or misfitting weights) is
    left out rather than failing the load: the text model trains as it is. Returns the model,
    the config without the skipped towers' sections (so the media plan refuses their rows),
    and the line that says what was skipped (None when nothing was)."""
    folder = Path(folder)
    weights = tower_weights(folder)
    skipped = {kind: why for kind in TOWER_KINDS if (why := _unloadable(kind, config, weights))}
    kept = {k: v for k, v in config.items() if k not in {f"{t}_config" for t in skipped}}
    model = Gemma4(text_model.language_model, kept)
    dtype = model.decoder.norm.weight.dtype  # the compute dtype, even for a quantized decoder
    for kind, names in TOWER_KINDS.items():
        if kind in skipped:
            continue
        try:
            load_towers(model, weights, folder, dtype, names)
        except ModelError as e:
            skipped[kind] = str(e).removeprefix(f"{folder}: ")  # "<name> weights do not fit: ..."
            kept.pop(f"{kind}_config")
            for name in names:
                delattr(model, name)
    mx.eval(model.parameters())
    return model, kept, _skipped_line(skipped)


def _unloadable(kind: str, config: dict, weights: dict[str, mx.array]) -> str | None:
    """Why the checkpoint's `kind` tower cannot be loaded as it is, or None."""
    if not config.get(f"{kind}_config"):
        return f"config.json has no {kind}_config"
    for name in TOWER_KINDS[kind]:
        mine = [k for k in weights if k.startswith(name + ".")]
        if not mine:
            return f"the checkpoint has no {name} weights"
        packed = [k for k in mine if k.endswith(".scales") or weights[k].dtype == mx.uint32]
        if packed:
            return f"its weights are quantized ({min(packed)}), which the towers do not load"
    return None


def _skipped_line(skipped: dict[str, str]) -> str | None:
    if not skipped:
        return None
    parts = [f"{kind} tower skipped: {skipped[kind]}" for kind in TOWER_KINDS if kind in skipped]
    left = {"vision": "images", "audio": "audio"}
    rest = [left[k] for k in TOWER_KINDS if k not in skipped]
    what = " and ".join(["text", *rest]) if rest else "text only"
    return f"model: Gemma 4 {'; '.join(parts)}; training on {what}"


_to_mlx_layout = to_mlx_layout  # the name the tower tests import
