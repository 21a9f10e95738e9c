"""Gemma 4's audio encoder in MLX (`Gemma4AudioModel` in transformers' modeling_gemma4.py).

A USM-style conformer over log-mel frames: two stride-2 3x3 convolutions (each with a channel
LayerNorm and ReLU) cut time by 4 (10 ms frames -> 40 ms tokens), then conformer layers (half-step
feed-forward, chunked local self-attention with relative positions and a logit soft cap, a causal
depthwise "light" convolution, half-step feed-forward), then an output projection.

Attention works in blocks of `attention_chunk_size` queries; each block sees a context of keys
from `attention_context_left - 1` frames back to `attention_context_right` ahead, and a query
attends to the keys within that distance that hold real audio. Padding never reaches a real
frame (masked keys, causal convolutions), so a clip's tokens do not depend on its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ._layers import ClippableLinear, RMSNorm, args_from


@dataclass(frozen=True)
class AudioArgs:
    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    subsampling_conv_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536

    @classmethod
    def from_config(cls, config: dict) -> AudioArgs:
        return args_from(cls, config)

    @property
    def past(self) -> int:
        return self.attention_context_left - 1

    @property
    def context(self) -> int:
        return self.attention_chunk_size + self.past + self.attention_context_right


class SubSampleLayer(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(channels_out, eps=eps, bias=False)

    def __call__(self, x: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        x = x * mask[:, :, None, None].astype(x.dtype)  # [B, T, F, C]: time is the height
        x = nn.relu(self.norm(self.conv(x)))
        return x, mask[:, ::2]


class SubSampleConvProjection(nn.Module):
    def __init__(self, a: AudioArgs):
        super().__init__()
        c0, c1 = a.subsampling_conv_channels
        self.layer0 = SubSampleLayer(1, c0, a.rms_norm_eps)
        self.layer1 = SubSampleLayer(c0, c1, a.rms_norm_eps)
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, a.hidden_size, bias=False)

    def __call__(self, features: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        x, mask = self.layer0(features[..., None], mask)
        x, mask = self.layer1(x, mask)
        b, t = x.shape[:2]
        return self.input_proj_linear(x.reshape(b, t, -1)), mask


class FeedForward(nn.Module):
    def __init__(self, a: AudioArgs):
        super().__init__()
        clip = a.use_clipped_linears
        self.ffw_layer_1 = ClippableLinear(a.hidden_size, 4 * a.hidden_size, clip)
        self.ffw_layer_2 = ClippableLinear(4 * a.hidden_size, a.hidden_size, clip)
        self.pre_layer_norm = RMSNorm(a.hidden_size)
        self.post_layer_norm = RMSNorm(a.hidden_size)
        self.clip, self.scale = a.gradient_clipping, a.residual_weight

    def __call__(self, x: mx.array) -> mx.array:
        h = self.pre_layer_norm(_clamp(x, self.clip))
        h = self.ffw_layer_2(nn.silu(self.ffw_layer_1(h)))
        return x + self.post_layer_norm(_clamp(h, self.clip)) * self.scale


class LightConv1d(nn.Module):
    def __init__(self, a: AudioArgs):
        super().__init__()
        clip, h = a.use_clipped_linears, a.hidden_size
        self.linear_start = ClippableLinear(h, 2 * h, clip)
        self.linear_end = ClippableLinear(h, h, clip)
        self.depthwise_conv1d = nn.Conv1d(h, h, a.conv_kernel_size, groups=h, bias=False)
        self.pre_layer_norm = RMSNorm(h, a.rms_norm_eps)
        self.conv_norm = RMSNorm(h, a.rms_norm_eps)
        self.kernel, self.clip = a.conv_kernel_size, a.gradient_clipping

    def __call__(self, x: mx.array) -> mx.array:
        h = self.linear_start(self.pre_layer_norm(x))
        a, gate = mx.split(h, 2, axis=-1)
        h = a * mx.sigmoid(gate)
        h = mx.pad(h, [(0, 0), (self.kernel - 1, 0), (0, 0)])  # causal: only past frames
        h = self.conv_norm(_clamp(self.depthwise_conv1d(h), self.clip))
        return x + self.linear_end(nn.silu(h))


class Attention(nn.Module):
    def __init__(self, a: AudioArgs):
        super().__init__()
        self.a = a
        self.heads = a.num_attention_heads
        self.head_dim = a.hidden_size // self.heads
        clip = a.use_clipped_linears
        self.q_proj = ClippableLinear(a.hidden_size, a.hidden_size, clip)
        self.k_proj = ClippableLinear(a.hidden_size, a.hidden_size, clip)
        self.v_proj = ClippableLinear(a.hidden_size, a.hidden_size, clip)
        self.post = ClippableLinear(a.hidden_size, a.hidden_size, clip)
        self.relative_k_proj = nn.Linear(a.hidden_size, a.hidden_size, bias=False)
        self.per_dim_scale = mx.zeros((self.head_dim,))

    def __call__(self, x: mx.array, rel_pos: mx.array, mask: mx.array) -> mx.array:
        a, heads, d = self.a, self.heads, self.head_dim
        chunk, ctx = a.attention_chunk_size, a.context
        b, t, _ = x.shape
        f32 = mx.float32
        q = self.q_proj(x).astype(f32).reshape(b, t, heads, d)
        k = self.k_proj(x).astype(f32).reshape(b, t, heads, d)
        v = self.v_proj(x).astype(f32).reshape(b, t, heads, d)
        q = q * ((d**-0.5) / math.log(2)) * nn.softplus(self.per_dim_scale.astype(f32))
        k = k * (math.log(1 + math.e) / math.log(2))
        blocks = -(-t // chunk)
        q = mx.pad(q, [(0, 0), (0, blocks * chunk - t), (0, 0), (0, 0)])
        q = q.reshape(b, blocks, chunk, heads, d).transpose(0, 3, 1, 2, 4)  # [B, H, nb, C, D]
        k, v = _block_context(k, a, blocks), _block_context(v, a, blocks)  # [B, H, nb, X, D]
        scores = q @ k.swapaxes(-1, -2)  # [B, H, nb, C, X]
        rel = self.relative_k_proj(rel_pos).astype(f32).reshape(-1, heads, d)  # [P, H, D]
        bd = q.reshape(b, heads, blocks * chunk, d) @ rel.transpose(1, 2, 0)  # [B, H, nb*C, P]
        scores = scores + _rel_shift(bd.reshape(b, heads, blocks, chunk, -1), ctx)
        cap = a.attention_logit_cap
        scores = mx.tanh(scores / cap) * cap
        scores = mx.where(mask[:, None], scores, a.attention_invalid_logits_value)
        weights = mx.softmax(scores, axis=-1)
        out = (weights @ v).transpose(0, 2, 3, 1, 4).reshape(b, blocks * chunk, -1)[:, :t]
        return self.post(out.astype(x.dtype))


def _block_context(x: mx.array, a: AudioArgs, blocks: int) -> mx.array:
    """[B, T, H, D] -> [B, H, nb, context, D]: each block's window of keys (zeros off the ends)."""
    chunk = a.attention_chunk_size
    right = a.attention_context_right + chunk - 1
    x = mx.pad(x, [(0, 0), (a.past, right), (0, 0), (0, 0)])
    index = mx.arange(blocks)[:, None] * chunk + mx.arange(a.context)[None, :]
    return x[:, index].transpose(0, 3, 1, 2, 4)


def _rel_shift(x: mx.array, context: int) -> mx.array:
    """Transformer-XL's relative shift: [.., C, P] position scores -> [.., C, context] key scores."""
    b, h, n, c, p = x.shape
    x = mx.pad(x, [(0, 0)] * 4 + [(0, context + 1 - p)])
    x = x.reshape(b, h, n, c * (context + 1))[..., : c * context]
    return x.reshape(b, h, n, c, context)


def block_mask(valid: mx.array, a: AudioArgs) -> mx.array:
    """bool [B, nb, chunk, context]: query i may attend key j (j real audio, i - j within the
    window: up to `attention_context_left - 1` back, `attention_context_right` ahead)."""
    t = valid.shape[1]
    chunk = a.attention_chunk_size
    blocks = -(-t // chunk)
    i = np.arange(blocks)[:, None, None] * chunk + np.arange(chunk)[None, :, None]
    j = np.arange(blocks)[:, None, None] * chunk + np.arange(a.context)[None, None, :] - a.past
    dist = i - j
    near = ((dist >= 0) & (dist < a.past)) | ((dist < 0) & (-dist < a.attention_context_right))
    near &= (j >= 0) & (j < t)
    keys = mx.array(np.clip(j, 0, t - 1)[:, 0, :])  # [nb, context]: the same for every query
    return valid[:, keys][:, :, None, :] & mx.array(near)[None]


def relative_positions(a: AudioArgs) -> mx.array:
    """Sinusoidal embeddings [context // 2 + 1, hidden] for distances context//2 ... 0."""
    n = a.hidden_size // 2
    inv = np.exp(np.arange(n) * -(math.log(10000.0) / max(n - 1, 1)))
    pos = np.arange(a.context // 2, -1, -1)[:, None] * inv[None, :]
    return mx.array(np.concatenate([np.sin(pos), np.cos(pos)], axis=-1).astype(np.float32))


class ConformerLayer(nn.Module):
    def __init__(self, a: AudioArgs):
        super().__init__()
        self.feed_forward1 = FeedForward(a)
        self.feed_forward2 = FeedForward(a)
        self.self_attn = Attention(a)
        self.lconv1d = LightConv1d(a)
        self.norm_pre_attn = RMSNorm(a.hidden_size)
        self.norm_post_attn = RMSNorm(a.hidden_size)
        self.norm_out = RMSNorm(a.hidden_size)
        self.clip = a.gradient_clipping

    def __call__(self, x: mx.array, rel_pos: mx.array, mask: mx.array) -> mx.array:
        x = self.feed_forward1(x)
        h = self.self_attn(self.norm_pre_attn(_clamp(x, self.clip)), rel_pos, mask)
        x = x + self.norm_post_attn(_clamp(h, self.clip))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clamp(x, self.clip))


class AudioTower(nn.Module):
    """features float [B, T, mel] + valid bool [B, T] -> tokens [B, ceil(T/4), output_proj_dims]
    (those where valid[:, ::2][:, ::2] holds are real)."""

    def __init__(self, a: AudioArgs):
        super().__init__()
        self.args = a
        self.subsample_conv_projection = SubSampleConvProjection(a)
        self.layers = [ConformerLayer(a) for _ in range(a.num_hidden_layers)]
        self.output_proj = nn.Linear(a.hidden_size, a.output_proj_dims, bias=True)
        self._rel_pos = relative_positions(a)

    def __call__(self, features: mx.array, valid: mx.array) -> mx.array:
        x, valid = self.subsample_conv_projection(features, valid)
        mask = block_mask(valid, self.args)
        rel_pos = self._rel_pos.astype(x.dtype)
        for layer in self.layers:
            x = layer(x, rel_pos, mask)
        return self.output_proj(x)


def _clamp(x: mx.array, bound: float) -> mx.array:
    """transformers' guard against overflow: clip to the bound, or to the dtype's range."""
    bound = min(bound, float(mx.finfo(x.dtype).max))
    return mx.clip(x, -bound, bound)
