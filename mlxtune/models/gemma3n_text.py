"""Gemma 3n's text decoder in MLX, correct in the training (cache-free) forward pass.

transformers' `Gemma3nTextModel` is the reference, and the names are its own. What it does:

- AltUp: the hidden state is carried as `altup_num_inputs` streams. The first is the token
  embedding; the others are projections of it rescaled to its magnitude. Each layer *predicts*
  every stream from all of them (coefficients from a router over the active stream), runs
  attention and MLP on the active one, then *corrects* every stream with the innovation. At the
  end the extra streams are projected back, rescaled, and all are averaged.
- LAuReL: a low-rank residual (left, right, norm) beside attention; the two are averaged.
- Per-layer inputs (PLE): a per-token embedding for every layer, mixed with a projection of the
  input embedding, gated into the first stream after each layer.
- KV sharing: the last `num_kv_shared_layers` layers have no K/V projections; each reuses the
  K/V of the last earlier layer of its type (sliding or full), from the same forward pass. That
  holds with or without a cache (mlx-lm's model uses the layer's own K/V when there is no cache,
  mlx-lm issue 1674; and it cannot load checkpoints that, as transformers writes them, have no
  K/V weights in those layers).
- MLP activation sparsity: the first layers keep only the gate values above a Gaussian quantile.
- The AltUp coefficients are applied per token, so any batch size is right (the mlx-vlm bug
  that limited Gemma 3n training to batches of one broadcast them across the batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from ._layers import args_from, rms_norm


@dataclass(frozen=True)
class TextArgs:
    hidden_size: int = 2048
    num_hidden_layers: int = 30
    intermediate_size: int | list = 8192
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    vocab_size: int = 262400
    vocab_size_per_layer_input: int = 262144
    hidden_size_per_layer_input: int = 256
    num_kv_shared_layers: int = 15
    sliding_window: int = 512
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    final_logit_softcapping: float | None = 30.0
    layer_types: list = field(default_factory=list)
    activation_sparsity_pattern: list | None = None
    altup_num_inputs: int = 4
    altup_active_idx: int = 0
    altup_coef_clip: float | None = 120.0
    altup_correct_scale: bool = True
    laurel_rank: int = 64

    @classmethod
    def from_config(cls, config: dict) -> TextArgs:
        args = dict(config)
        rope = args.get("rope_parameters") or {}
        if "full_attention" in rope:  # transformers 5's layout
            args.setdefault("rope_theta", rope["full_attention"].get("rope_theta"))
            args.setdefault("rope_local_base_freq", rope["sliding_attention"].get("rope_theta"))
        return args_from(cls, args)

    def width(self, layer: int) -> int:
        inter = self.intermediate_size
        return inter[layer] if isinstance(inter, list) else inter

    @property
    def first_shared(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight.astype(mx.float32), self.eps)


class Attention(nn.Module):
    def __init__(self, a: TextArgs, layer: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            a.num_attention_heads,
            a.num_key_value_heads,
            a.head_dim,
        )
        self.shared = layer >= a.first_shared
        sliding = a.layer_types[layer] == "sliding_attention"
        self.q_proj = nn.Linear(a.hidden_size, self.heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, a.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, a.rms_norm_eps)
        if not self.shared:
            self.k_proj = nn.Linear(a.hidden_size, self.kv_heads * self.head_dim, bias=False)
            self.v_proj = nn.Linear(a.hidden_size, self.kv_heads * self.head_dim, bias=False)
            self.k_norm = RMSNorm(self.head_dim, a.rms_norm_eps)
        self.eps = a.rms_norm_eps
        base = a.rope_local_base_freq if sliding else a.rope_theta
        self.rope = nn.RoPE(self.head_dim, traditional=False, base=base)

    def __call__(self, x, mask, cache, offset: int, shared_kv=None):
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, n, -1, self.head_dim)).transpose(0, 2, 1, 3)
        q = self.rope(q, offset=offset)
        if self.shared:
            k, v = shared_kv
        else:
            k = self.k_norm(self.k_proj(x).reshape(b, n, -1, self.head_dim)).transpose(0, 2, 1, 3)
            k = self.rope(k, offset=offset)
            v = rms_norm(self.v_proj(x).reshape(b, n, -1, self.head_dim), None, self.eps)
            v = v.transpose(0, 2, 1, 3)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, n, -1)), (k, v)


class MLP(nn.Module):
    def __init__(self, a: TextArgs, layer: int):
        super().__init__()
        width = a.width(layer)
        self.gate_proj = nn.Linear(a.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(a.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, a.hidden_size, bias=False)
        sparsity = (a.activation_sparsity_pattern or [0.0] * (layer + 1))[layer]
        # The Gaussian quantile of the kept fraction (transformers: Normal(0, 1).icdf).
        self.cut = math.sqrt(2.0) * _erfinv(2 * sparsity - 1) if sparsity > 0 else None

    def __call__(self, x):
        gate = self.gate_proj(x)
        if self.cut is not None:
            g = gate.astype(mx.float32)
            cutoff = g.mean(-1, keepdims=True) + g.std(-1, keepdims=True) * self.cut
            gate = nn.relu(g - cutoff).astype(gate.dtype)
        return self.down_proj(nn.gelu_approx(gate) * self.up_proj(x))


def _erfinv(y: float) -> float:
    """The inverse error function, by Newton steps on math.erf (host side, once)."""
    x = 0.0
    for _ in range(60):
        x -= (math.erf(x) - y) / (2 / math.sqrt(math.pi) * math.exp(-x * x))
    return x


class AltUp(nn.Module):
    def __init__(self, a: TextArgs):
        super().__init__()
        n = a.altup_num_inputs
        self.a = a
        self.correct_output_scale = mx.zeros((a.hidden_size,))
        self.correction_coefs = nn.Linear(n, n, bias=False)
        self.prediction_coefs = nn.Linear(n, n * n, bias=False)
        self.modality_router = nn.Linear(a.hidden_size, n, bias=False)
        self.router_norm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def _modalities(self, x):
        routed = self.modality_router(self.router_norm(x) * (self.a.hidden_size**-1.0))
        return mx.tanh(routed.astype(mx.float32)).astype(x.dtype)

    def _coefs(self, layer: nn.Linear, x):
        w = layer.weight
        if self.a.altup_coef_clip is not None:
            w = mx.clip(w, -self.a.altup_coef_clip, self.a.altup_coef_clip)
        return x @ w.T

    def predict(self, streams):
        """streams [n, B, L, D] -> predictions [n, B, L, D]."""
        n = self.a.altup_num_inputs
        m = self._modalities(streams[self.a.altup_active_idx])  # [B, L, n]
        coefs = self._coefs(self.prediction_coefs, m).reshape(*m.shape[:-1], n, n)  # [B, L, i, j]
        # prediction_i = sum_j coefs[i, j] * stream_j, per token
        mixed = mx.einsum("blij,jbld->ibld", coefs, streams)
        return (mixed + streams).astype(streams.dtype)

    def correct(self, predictions, activated):
        m = self._modalities(activated)
        coefs = self._coefs(self.correction_coefs, m) + 1.0  # [B, L, n]
        innovation = activated - predictions[self.a.altup_active_idx]
        return (predictions + coefs.transpose(2, 0, 1)[..., None] * innovation[None]).astype(
            activated.dtype
        )


class Laurel(nn.Module):
    def __init__(self, a: TextArgs):
        super().__init__()
        self.linear_left = nn.Linear(a.hidden_size, a.laurel_rank, bias=False)
        self.linear_right = nn.Linear(a.laurel_rank, a.hidden_size, bias=False)
        self.post_laurel_norm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def __call__(self, x):
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class DecoderLayer(nn.Module):
    def __init__(self, a: TextArgs, layer: int):
        super().__init__()
        self.a = a
        self.layer_type = a.layer_types[layer]
        self.self_attn = Attention(a, layer)
        self.mlp = MLP(a, layer)
        eps, d = a.rms_norm_eps, a.hidden_size
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_per_layer_input_norm"):  # fmt: skip
            setattr(self, name, RMSNorm(d, eps))
        self.altup = AltUp(a)
        self.laurel = Laurel(a)
        self.per_layer_input_gate = nn.Linear(d, a.hidden_size_per_layer_input, bias=False)
        self.per_layer_projection = nn.Linear(a.hidden_size_per_layer_input, d, bias=False)

    def __call__(self, streams, mask, cache, per_layer_input, offset: int = 0, shared_kv=None):
        a = self.a
        predictions = self.altup.predict(streams)
        active = predictions[a.altup_active_idx]
        normed = self.input_layernorm(active)
        laurel = self.laurel(normed)
        attn, kv = self.self_attn(normed, mask, cache, offset, shared_kv)
        gated = active + self.post_attention_layernorm(attn)
        mixed = (gated + laurel) * (2.0**-0.5)
        out = mixed + self.post_feedforward_layernorm(
            self.mlp(self.pre_feedforward_layernorm(mixed))
        )
        corrected = self.altup.correct(predictions, out)
        first = corrected[a.altup_active_idx]
        if a.altup_correct_scale:
            first = first * self.altup.correct_output_scale.astype(first.dtype)
        first = nn.gelu_approx(self.per_layer_input_gate(first)) * per_layer_input
        first = self.post_per_layer_input_norm(self.per_layer_projection(first))
        rest = corrected[1:] + first[None]
        return mx.concatenate([corrected[:1], rest], axis=0), kv


class TextModel(nn.Module):
    """inputs [B, L] (or input_embeddings, already scaled) -> final hidden states [B, L, D]."""

    def __init__(self, a: TextArgs):
        super().__init__()
        self.a = a
        d = a.hidden_size
        self.embed_tokens = nn.Embedding(a.vocab_size, d)
        self.embed_tokens_per_layer = nn.Embedding(a.vocab_size_per_layer_input,
                                                   a.num_hidden_layers * a.hidden_size_per_layer_input)  # fmt: skip
        self.per_layer_model_projection = nn.Linear(d, a.num_hidden_layers * a.hidden_size_per_layer_input,
                                                    bias=False)  # fmt: skip
        self.per_layer_projection_norm = RMSNorm(a.hidden_size_per_layer_input, a.rms_norm_eps)
        self.altup_projections = [
            nn.Linear(d, d, bias=False) for _ in range(a.altup_num_inputs - 1)
        ]
        self.altup_unembed_projections = [nn.Linear(d, d, bias=False)
                                          for _ in range(a.altup_num_inputs - 1)]  # fmt: skip
        self.layers = [DecoderLayer(a, i) for i in range(a.num_hidden_layers)]
        self.norm = RMSNorm(d, a.rms_norm_eps)
        self.embed_scale = d**0.5
        # Each shared layer reads the K/V of the last earlier layer of its type.
        self.kv_source = {}
        for i in range(a.first_shared, a.num_hidden_layers):
            kind = a.layer_types[i]
            self.kv_source[i] = max(j for j in range(a.first_shared) if a.layer_types[j] == kind)

    def per_layer_inputs(self, inputs):
        a = self.a
        ids = mx.where((inputs >= 0) & (inputs < a.vocab_size_per_layer_input), inputs, 0)
        out = self.embed_tokens_per_layer(ids) * (a.hidden_size_per_layer_input**0.5)
        return out.reshape(*inputs.shape, a.num_hidden_layers, a.hidden_size_per_layer_input)

    def __call__(self, inputs, cache=None, input_embeddings=None, per_layer_inputs=None):
        a = self.a
        h = (
            self.embed_tokens(inputs) * self.embed_scale
            if input_embeddings is None
            else input_embeddings
        )
        if per_layer_inputs is None:
            per_layer_inputs = self.per_layer_inputs(inputs)
        proj = self.per_layer_model_projection(h) * (a.hidden_size**-0.5)
        proj = self.per_layer_projection_norm(
            proj.reshape(*h.shape[:-1], a.num_hidden_layers, a.hidden_size_per_layer_input)
        )
        per_layer = (proj + per_layer_inputs) * (2.0**-0.5)
        streams = mx.stack([h] + [_rescaled(p(h), h) for p in self.altup_projections], axis=0)
        cache = cache if cache is not None else [None] * len(self.layers)
        cache = list(cache) + [None] * (len(self.layers) - len(cache))
        offset = getattr(cache[0], "offset", 0) if cache[0] is not None else 0
        masks = {}
        for i, kind in enumerate(a.layer_types):
            if kind not in masks:
                window = a.sliding_window if kind == "sliding_attention" else None
                if cache[i] is None:
                    masks[kind] = _causal(h.shape[1], window)
                else:
                    masks[kind] = create_attention_mask(h, cache[i], window_size=window)
        kvs = {}
        for i, layer in enumerate(self.layers):
            shared = kvs[self.kv_source[i]] if i in self.kv_source else None
            streams, kvs[i] = layer(streams, masks[a.layer_types[i]], cache[i], per_layer[:, :, i],
                                    offset, shared)  # fmt: skip
        first = streams[0]
        out = [first] + [_rescaled(p(streams[i + 1]), first)
                         for i, p in enumerate(self.altup_unembed_projections)]  # fmt: skip
        return self.norm(mx.stack(out, axis=0).mean(axis=0))

    def make_cache(self):
        from mlx_lm.models.cache import KVCache, RotatingKVCache

        return [RotatingKVCache(max_size=self.a.sliding_window, keep=0)
                if kind == "sliding_attention" else KVCache()
                for kind in self.a.layer_types[: self.a.first_shared]]  # fmt: skip


def _rescaled(x, like):
    """x with the root-mean-square of `like` (transformers clamps the mean square at 1e-5)."""
    target = mx.sqrt(mx.mean(like.astype(mx.float32) ** 2, axis=-1, keepdims=True))
    have = mx.sqrt(mx.maximum(mx.mean(x.astype(mx.float32) ** 2, axis=-1, keepdims=True), 1e-5))
    return (x * (target / have)).astype(like.dtype)


def _causal(n: int, window: int | None):
    i = mx.arange(n)
    mask = i[:, None] >= i[None, :]
    if window is not None:
        mask = mask & (i[:, None] < i[None, :] + window)
    return mask
