"""Gemma 3n with its MobileNetV5 vision and USM audio towers, all in our own MLX code.

mlx-lm's gemma3n model drops the towers, cannot load checkpoints whose KV-shared layers have no
K/V weights, and uses the wrong K/V in those layers without a cache (mlx-lm issue 1674); so the
whole model is ours (`gemma3n_text.py` for the decoder). A forward pass does what transformers'
`Gemma3nModel.forward` does:

1. Token embeddings: `embed_tokens` x sqrt(hidden); ids in the vision and audio vocabularies (the
   128 hard tokens each that follow the text vocabulary) take the multimodal embedders' hard
   embeddings instead. Per-layer inputs come from the original ids.
2. Images: the tower's 16 x 16 x 2048 output, as 256 soft tokens x sqrt(2048), through
   `embed_vision`. Audio: the tower's real output rows through `embed_audio`; the rest of a
   clip's 188 placeholders take the hard embedding of the last audio id (we give those
   placeholders that id, so step 1 embeds them).
3. The soft tokens replace their placeholders' embeddings, in order, and the decoder runs.

The media come as one dict of arrays per micro-batch (`data.batching.media_arrays`), with
`source`: for every position of the batch, its row of [token embeddings; image rows; audio rows].
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..data.media import MediaTokens
from ..errors import ModelError
from ._layers import rms_norm
from ._towers import checkpoint_tensors, frozen_or_not, load_towers
from .gemma3n_audio import AudioArgs, AudioTower
from .gemma3n_text import RMSNorm, TextArgs, TextModel
from .gemma3n_vision import VisionArgs, VisionTower


def is_gemma3n(config: dict) -> bool:
    return config.get("model_type") == "gemma3n"


class LanguageModel(nn.Module):
    """The decoder and its tied head (mlx-lm's layout: `.model`, `.args`)."""

    def __init__(self, args: TextArgs):
        super().__init__()
        self.args = args
        self.model_type = "gemma3n"
        self.model = TextModel(args)

    def __call__(self, inputs, cache=None, input_embeddings=None, per_layer_inputs=None):
        return self.head(self.model(inputs, cache, input_embeddings, per_layer_inputs))

    def head(self, h):
        out = self.model.embed_tokens.as_linear(h)
        cap = self.args.final_logit_softcapping
        return mx.tanh(out / cap) * cap if cap else out

    @property
    def layers(self):
        return self.model.layers


class MultimodalEmbedder(nn.Module):
    """Hard tokens (its own small vocabulary) or a tower's soft tokens into the text width."""

    def __init__(self, config: dict, text_hidden: int):
        super().__init__()
        width, self.eps = config["hidden_size"], config.get("rms_norm_eps", 1e-6)
        self.vocab_offset, self.vocab_size = config["vocab_offset"], config["vocab_size"]
        self.embedding = nn.Embedding(self.vocab_size, width)
        self.hard_embedding_norm = RMSNorm(width, self.eps)
        self.soft_embedding_norm = RMSNorm(width, self.eps)
        self.embedding_projection = nn.Linear(width, text_hidden, bias=False)

    def _out(self, x):
        return rms_norm(self.embedding_projection(x), None, self.eps)

    def soft(self, x):
        return self._out(self.soft_embedding_norm(x))

    def hard_table(self):
        """[vocab_size, text width]: every hard token's embedding (cheaper than per position)."""
        return self._out(self.hard_embedding_norm(self.embedding.weight))


class Gemma3n(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        text = TextArgs.from_config(config["text_config"])
        self.args = text
        self.model_type = "gemma3n"
        self.language_model = LanguageModel(text)
        self.ids = MediaTokens.from_config(config)
        self.audio_pad_id = text.vocab_size - 1  # transformers pads clips with this id's embedding
        vision, audio = config.get("vision_config"), config.get("audio_config")
        if vision:
            self.vision_tower = VisionTower(VisionArgs.from_config(vision))
            self.embed_vision = MultimodalEmbedder(vision, text.hidden_size)
            self.vision_scale = vision["hidden_size"] ** 0.5
        if audio:
            self.audio_tower = AudioTower(AudioArgs.from_config(audio))
            self.embed_audio = MultimodalEmbedder(audio, text.hidden_size)

    @property
    def layers(self):
        return self.language_model.layers

    @property
    def decoder(self) -> TextModel:
        return self.language_model.model

    def make_cache(self):
        return self.decoder.make_cache()

    def __call__(self, inputs, cache=None, input_embeddings=None, per_layer_inputs=None,
                 media=None):  # fmt: skip
        """Logits; mlx-lm's generation passes `input_embeddings` from `embed()` for a prompt."""
        h = self.hidden(inputs, cache, media, input_embeddings, per_layer_inputs)
        return self.language_model.head(h)

    def hidden(self, inputs, cache=None, media=None, input_embeddings=None, per_layer_inputs=None):
        """Final hidden states (before the head), for the chunked loss."""
        if input_embeddings is None:
            input_embeddings = self.embed(inputs, media) if media else self.token_embeddings(inputs)
        if per_layer_inputs is None:
            per_layer_inputs = self.decoder.per_layer_inputs(inputs)
        return self.decoder(inputs, cache, input_embeddings, per_layer_inputs)

    def text_ids(self, inputs: mx.array) -> mx.array:
        """Audio placeholders -> the padding id (rows the tower fills are replaced later)."""
        if self.ids.audio is None or "embed_audio" not in self:
            return inputs
        return mx.where(inputs == self.ids.audio, self.audio_pad_id, inputs)

    def token_embeddings(self, inputs: mx.array) -> mx.array:
        """transformers' input embeddings: scaled text embeddings, hard multimodal tokens."""
        ids = self.text_ids(inputs)
        h = self.decoder.embed_tokens(ids) * self.decoder.embed_scale
        for name in ("embed_vision", "embed_audio"):
            if name not in self:
                continue
            e = self[name]
            inside = (ids >= e.vocab_offset) & (ids < e.vocab_offset + e.vocab_size)
            rows = e.hard_table()[mx.clip(ids - e.vocab_offset, 0, e.vocab_size - 1)]
            h = mx.where(inside[..., None], rows.astype(h.dtype), h)
        return h

    def embed(self, inputs: mx.array, media: dict) -> mx.array:
        """Input embeddings with the media's soft tokens in their placeholders' places."""
        text = self.token_embeddings(inputs)
        b, n, width = text.shape
        table = [text.reshape(b * n, width)]
        if "image_pixels" in media or "image_soft" in media:
            table.append(self.image_features(media).astype(text.dtype))
        if "audio_features" in media or "audio_soft" in media:
            table.append(self.audio_features(media).astype(text.dtype))
        return mx.concatenate(table, axis=0)[media["source"]].reshape(b, n, width)

    def image_features(self, media: dict) -> mx.array:
        soft = media.get("image_soft")
        if soft is None:
            soft = frozen_or_not(self.vision_tower, self.tower_tokens("image", media))
        return self.embed_vision.soft(soft.astype(self.dtype) * self.vision_scale)

    def audio_features(self, media: dict) -> mx.array:
        soft = media.get("audio_soft")
        if soft is None:
            soft = frozen_or_not(self.audio_tower, self.tower_tokens("audio", media))
        return self.embed_audio.soft(soft.astype(self.dtype))

    @property
    def dtype(self):
        return self.decoder.norm.weight.dtype

    def tower_tokens(self, kind: str, media: dict) -> mx.array:
        """A tower's real output rows [tokens, width] (before the embedder), in batch order."""
        if kind == "image":
            pixels = media["image_pixels"].astype(self.dtype) * (1 / 255)
            out = self.vision_tower(pixels)
        else:
            features = media["audio_features"].astype(self.dtype)
            out, _ = self.audio_tower(features, ~media["audio_valid"], alone=True)
        return out.reshape(-1, out.shape[-1])[media[f"{kind}_take"]]

    def tower_frozen(self, kind: str) -> bool:
        name = f"{'vision' if kind == 'image' else 'audio'}_tower"
        return name in self and not tree_flatten(self[name].trainable_parameters())


def load(folder: Path, config: dict) -> Gemma3n:
    """A Gemma 3n checkpoint folder (transformers' names) as our model, in the stored dtype."""
    model = Gemma3n(config)
    weights = checkpoint_tensors(folder)
    prefix = "language_model."
    text = [(k[len(prefix) :], v) for k, v in weights.items() if k.startswith(prefix)]
    try:
        model.decoder.load_weights(text, strict=True)
    except ValueError as e:
        raise ModelError(f"{folder}: the text decoder's weights do not fit: {e}") from None
    load_towers(model, weights, Path(folder), model.decoder.embed_tokens.weight.dtype)
    mx.eval(model.parameters())
    return model


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
