"""Gemma 4 with its vision and audio towers: our towers around mlx-lm's text decoder.

mlx-lm loads the text decoder and drops the towers; `wrap()` puts them back, with the weights
read from the checkpoint under their Hugging Face names. A forward pass does what transformers'
`Gemma4Model.forward` does:

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

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..data.media import MediaTokens
from ..errors import ModelError
from ._layers import Embedder
from .gemma4_audio import AudioArgs, AudioTower
from .gemma4_vision import VisionArgs, VisionTower

TOWERS = ("vision_tower", "embed_vision", "audio_tower", "embed_audio")


def is_multimodal(config: dict) -> bool:
    return config.get("model_type") == "gemma4" and bool(
        config.get("vision_config") or config.get("audio_config")
    )


class Gemma4(nn.Module):
    """Drop-in for mlx-lm's gemma4.Model (same parameter paths for the decoder) that also takes
    `media`. Without media it is exactly mlx-lm's text model."""

    def __init__(self, language_model: nn.Module, config: dict):
        super().__init__()
        self.language_model = language_model
        self.model_type = "gemma4"
        self.ids = MediaTokens.from_config(config)
        width = config["text_config"]["hidden_size"]
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
        return self.language_model(inputs, cache=cache, input_embeddings=embeddings,
                                   per_layer_inputs=per_layer)  # fmt: skip

    def hidden(self, inputs: mx.array, cache=None, media: dict | None = None) -> mx.array:
        """Final hidden states (before the head), for the chunked loss."""
        embeddings, per_layer = self._decoder_inputs(inputs, media)
        return self.decoder(inputs, cache=cache, input_embeddings=embeddings,
                            per_layer_inputs=per_layer)  # fmt: skip

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
        if "image_patches" in media:
            soft.append(self.image_features(media))
        if "audio_features" in media:
            soft.append(self.audio_features(media))
        table = text.reshape(b * n, width)
        if soft:
            scaled = mx.concatenate(soft, axis=0) / self.decoder.embed_scale
            table = mx.concatenate([table, scaled.astype(table.dtype)], axis=0)
        return table[media["source"]].reshape(b, n, width)

    def image_features(self, media: dict) -> mx.array:
        """Soft tokens of every image, in placeholder order, at the text width."""
        out = self.vision_tower(
            media["image_patches"], media["image_positions"], media["image_pool"]
        )
        out = _frozen_or_not(self.vision_tower, out)
        out = out.astype(self.decoder.norm.weight.dtype)
        return self.embed_vision(out.reshape(-1, out.shape[-1])[media["image_take"]])

    def audio_features(self, media: dict) -> mx.array:
        out = self.audio_tower(media["audio_features"], media["audio_valid"])
        out = _frozen_or_not(self.audio_tower, out)
        return self.embed_audio(out.reshape(-1, out.shape[-1])[media["audio_take"]])


def _frozen_or_not(tower: nn.Module, out: mx.array) -> mx.array:
    """A frozen tower's output needs no gradient: autodiff keeps none of its activations."""
    return out if tree_flatten(tower.trainable_parameters()) else mx.stop_gradient(out)


def wrap(text_model: nn.Module, config: dict, folder: Path) -> Gemma4:
    """mlx-lm's loaded gemma4 model + the towers and embedders from the checkpoint in `folder`."""
    model = Gemma4(text_model.language_model, config)
    weights = tower_weights(Path(folder))
    dtype = model.decoder.norm.weight.dtype  # the compute dtype, even for a quantized decoder
    for name in TOWERS:
        if name not in model:
            continue
        items = [(k[len(name) + 1 :], v) for k, v in weights.items() if k.startswith(name + ".")]
        module = model[name]
        items = _to_mlx_layout(module, items)
        try:
            module.load_weights(items, strict=True)
        except ValueError as e:
            raise ModelError(f"{folder}: {name} weights do not fit: {e}") from None
        module.apply(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a)
    mx.eval(model.parameters())
    return model


def tower_weights(folder: Path) -> dict[str, mx.array]:
    """Tensors of the towers and embedders, names without the leading `model.`."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        for key, value in mx.load(str(path)).items():
            name = key.removeprefix("model.")
            if name.split(".", 1)[0] in TOWERS:
                out[name] = value
    return out


def _to_mlx_layout(module: nn.Module, items: list[tuple[str, mx.array]]):
    """PyTorch conv kernels ([out, in, *k]) to MLX's ([out, *k, in]); already-MLX ones stay."""
    want = dict(tree_flatten(module.parameters()))
    out = []
    for key, value in items:
        shape = want.get(key, value).shape
        if value.ndim >= 3 and value.shape != shape:
            moved = mx.moveaxis(value, 1, -1)
            if moved.shape == shape:
                value = moved
        out.append((key, value))
    return out


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
