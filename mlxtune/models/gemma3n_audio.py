"""Gemma 3n's audio encoder in MLX (`Gemma3nAudioEncoder` in transformers' modeling_gemma3n.py).

A USM (Universal Speech Model) conformer over 128-bin log-mel frames (10 ms hop):

1. Sub-sample conv projection: two stride-2 3x3 convolutions over (time, mel), each followed by a
   *cumulative* group norm (running statistics over time, so a frame only sees the past) and a
   ReLU, then a linear projection: time / 4 (40 ms per frame).
2. Conformer blocks: half-step feed-forward, chunked local self-attention (relative positions,
   a learned per-dimension query scale, a tanh logit cap), a causal depthwise "light"
   convolution, half-step feed-forward, RMSNorm.
3. Reduction: every `conf_reduction_factor`-th frame is kept (160 ms per output token; 30 s of
   audio = 3000 mel frames -> 750 -> 188 tokens). Padding frames come out as zeros.

Attention works in blocks of `conf_attention_chunk_size` queries. Each block gathers a context
of keys from `conf_attention_context_left - 1` frames back to `conf_attention_context_right`
ahead; a query attends to the keys at distance 0 .. left - 1 behind it (and up to `right` ahead)
that are real audio.

Padding is given as a mask, True = padding frame (what transformers passes the tower:
`~input_features_mask`). As in the reference, the mask only gates attention keys, the light
convolution's input and the output; the padded mel frames themselves are not zeroed. The
sub-sampling convolutions look ahead (a sub-sampled frame covers mel frames 4t .. 4t + 6) and
take the mask of mel frame 4t, so a clip's last token can depend on what its padding frames
hold, exactly as it does in transformers. After the convolutions nothing looks ahead (with the
released right context of 0), so later padding never reaches earlier tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ._layers import RMSNorm, args_from
from .gemma4_audio import _clamp, _rel_shift


@dataclass(frozen=True)
class AudioArgs:
    """`Gemma3nAudioConfig`'s fields the encoder uses, under the same names (defaults as there)."""

    input_feat_size: int = 128
    hidden_size: int = 1536
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    conf_attention_chunk_size: int = 12
    conf_attention_context_left: int = 13
    conf_attention_context_right: int = 0
    conf_attention_logit_cap: float = 50.0
    conf_num_attention_heads: int = 8
    conf_num_hidden_layers: int = 12
    conf_conv_kernel_size: int = 5
    conf_reduction_factor: int = 4
    conf_residual_weight: float = 0.5
    sscp_conv_channel_size: tuple[int, ...] = (128, 32)
    sscp_conv_group_norm_eps: float = 1e-3
    sscp_conv_kernel_size: tuple[tuple[int, int], ...] = ((3, 3), (3, 3))
    sscp_conv_stride_size: tuple[tuple[int, int], ...] = ((2, 2), (2, 2))

    @classmethod
    def from_config(cls, config: dict) -> AudioArgs:
        a = args_from(cls, config)
        # config.json holds lists; tuples keep the frozen dataclass hashable.
        return cls(
            **{
                **a.__dict__,
                "sscp_conv_channel_size": tuple(a.sscp_conv_channel_size),
                "sscp_conv_kernel_size": tuple(map(tuple, a.sscp_conv_kernel_size)),
                "sscp_conv_stride_size": tuple(map(tuple, a.sscp_conv_stride_size)),
            }
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.conf_num_attention_heads

    @property
    def past(self) -> int:  # keys a query sees behind it ("context left" counts the query itself)
        return max(0, self.conf_attention_context_left - 1)

    @property
    def context(self) -> int:  # keys gathered per block of queries
        return self.conf_attention_chunk_size + self.past + self.conf_attention_context_right


class CumulativeGroupNorm(nn.Module):
    """Group norm (one group) whose statistics at frame t cover frames 0..t, on [B, T, F, C].

    As in transformers (and the JAX original), the squared deviations are taken from each
    frame's own running mean before being summed over time, and no mask is applied."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.weight = mx.ones((channels,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        dtype, x = x.dtype, x.astype(mx.float32)
        per_frame = x.shape[2] * x.shape[3]
        count = mx.arange(1, x.shape[1] + 1, dtype=mx.float32)[:, None, None] * per_frame
        mean = mx.cumsum(x.sum(axis=(2, 3), keepdims=True), axis=1) / count
        sq = mx.square(x - mean).sum(axis=(2, 3), keepdims=True)
        var = mx.cumsum(sq, axis=1) / count
        out = (x - mean) * mx.rsqrt(var + self.eps) * self.weight.astype(mx.float32)
        return out.astype(dtype)


class SSCPConvBlock(nn.Module):
    """Conv2d over [B, T, F, C] (time is the height), padded (0, kh - 1) in time (the JAX
    "reverse causal": a frame sees itself and the frames after it) and (1, 1) in frequency."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple, stride: tuple, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, tuple(kernel), stride=tuple(stride), bias=False)
        self.norm = CumulativeGroupNorm(c_out, eps)
        self.kernel_h, self.stride = kernel[0], stride[0]

    def __call__(self, x: mx.array) -> mx.array:
        x = mx.pad(x, [(0, 0), (0, self.kernel_h - 1), (1, 1), (0, 0)])
        return nn.relu(self.norm(self.conv(x)))


class SubSampleConvProjection(nn.Module):
    def __init__(self, a: AudioArgs):
        super().__init__()
        blocks, c_in, f = [], 1, a.input_feat_size
        for c_out, kernel, stride in zip(
            a.sscp_conv_channel_size, a.sscp_conv_kernel_size, a.sscp_conv_stride_size, strict=True
        ):
            blocks.append(SSCPConvBlock(c_in, c_out, kernel, stride, a.sscp_conv_group_norm_eps))
            c_in, f = c_out, (f + 2 - kernel[1]) // stride[1] + 1
        self.conv_0, self.conv_1 = blocks  # transformers' names; its encoder has exactly two
        self.input_proj_linear = nn.Linear(c_in * f, a.hidden_size, bias=False)

    def __call__(self, features: mx.array, lengths: mx.array | None = None) -> mx.array:
        """`lengths` [B] (real frames per clip): zero what each convolution sees past a clip's
        end, which is what its own padding gives the clip alone (see AudioTower)."""
        # The reference runs the convs in the weights' dtype, whatever the features come in.
        x = features[..., None].astype(self.conv_0.conv.weight.dtype)  # [B, T, F, 1]
        for block in (self.conv_0, self.conv_1):
            if lengths is not None:
                x = x * (mx.arange(x.shape[1])[None] < lengths[:, None])[..., None, None]
                lengths = -(-lengths // block.stride)  # what a clip alone keeps of its frames
            x = block(x)
        b, t = x.shape[:2]
        return self.input_proj_linear(x.reshape(b, t, -1))  # frequency-major, as in torch


class FeedForward(nn.Module):
    def __init__(self, a: AudioArgs):
        super().__init__()
        self.pre_layer_norm = RMSNorm(a.hidden_size)
        self.ffw_layer_1 = nn.Linear(a.hidden_size, 4 * a.hidden_size, bias=False)
        self.ffw_layer_2 = nn.Linear(4 * a.hidden_size, a.hidden_size, bias=False)
        self.post_layer_norm = RMSNorm(a.hidden_size)
        self.clip, self.scale = a.gradient_clipping, a.conf_residual_weight

    def __call__(self, x: mx.array) -> mx.array:
        h = self.pre_layer_norm(_clamp(x, self.clip))
        h = _clamp(self.ffw_layer_2(nn.silu(self.ffw_layer_1(h))), self.clip)
        return x + self.post_layer_norm(h) * self.scale


class LightConv1d(nn.Module):
    def __init__(self, a: AudioArgs):
        super().__init__()
        h, k = a.hidden_size, a.conf_conv_kernel_size
        self.pre_layer_norm = RMSNorm(h, a.rms_norm_eps)
        self.linear_start = nn.Linear(h, 2 * h, bias=False)
        self.depthwise_conv1d = nn.Conv1d(h, h, k, groups=h, bias=False)
        self.conv_norm = RMSNorm(h, a.rms_norm_eps)
        self.linear_end = nn.Linear(h, h, bias=False)
        self.kernel, self.clip = k, a.gradient_clipping

    def __call__(self, x: mx.array) -> mx.array:
        h = self.linear_start(self.pre_layer_norm(x))
        value, gate = mx.split(h, 2, axis=-1)  # GLU
        h = mx.pad(value * mx.sigmoid(gate), [(0, 0), (self.kernel - 1, 0), (0, 0)])  # causal
        h = self.conv_norm(_clamp(self.depthwise_conv1d(h), self.clip))
        return x + self.linear_end(nn.silu(h))


class RelativePositionEmbedding(nn.Module):
    """Transformer-XL style position logits: queries against projected sinusoids of the
    distances past .. -right, shifted onto the block's key context."""

    def __init__(self, a: AudioArgs):
        super().__init__()
        self.pos_proj = nn.Linear(a.hidden_size, a.hidden_size, bias=False)
        self.context = a.context
        n = a.hidden_size // 2
        inv = mx.exp(mx.arange(n, dtype=mx.float32) * -(math.log(1.0e4) / max(n - 1, 1)))
        pos = mx.arange(a.past, -a.conf_attention_context_right - 1, -1, dtype=mx.float32)
        angles = pos[:, None] * inv[None, :]
        # A constant, not a checkpoint tensor: the leading underscore keeps it out of parameters().
        self._timing = mx.concatenate([mx.sin(angles), mx.cos(angles)], axis=-1)  # [P, hidden]

    def __call__(self, q: mx.array, k: mx.array, dtype: mx.Dtype) -> mx.array:
        """q [B, N, U, W, D] and k [B, N, U, C, D] (float32) -> logits [B, N, U, W, C]."""
        b, n, u, w, d = q.shape
        rel = self.pos_proj(self._timing.astype(dtype)).astype(mx.float32)
        rel = rel.reshape(-1, n, d).transpose(1, 2, 0)  # [N, D, P]
        bd = (q.reshape(b, n, u * w, d) @ rel).reshape(b, n, u, w, -1)
        return q @ k.swapaxes(-1, -2) + _rel_shift(bd, self.context)


class Attention(nn.Module):
    def __init__(self, a: AudioArgs):
        super().__init__()
        self.a = a
        h = a.hidden_size
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.per_dim_scale = mx.zeros((a.head_dim,))
        self.relative_position_embedding = RelativePositionEmbedding(a)
        # softplus(0) = ln 2: dividing by it makes the learned scale exactly 1 at init (zeros).
        self.q_scale = a.head_dim**-0.5 / math.log(2.0)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        """x [B, T, hidden], mask bool [B, 1, U, W, C] (see `attention_mask`) -> [B, T, hidden]."""
        a, f32 = self.a, mx.float32
        b, t, _ = x.shape
        n, d, chunk = a.conf_num_attention_heads, a.head_dim, a.conf_attention_chunk_size
        blocks = -(-t // chunk)
        q = self.q_proj(x).reshape(b, t, n, d).astype(f32)
        q = q * (self.q_scale * nn.softplus(self.per_dim_scale.astype(f32)))
        q = mx.pad(q, [(0, 0), (0, blocks * chunk - t), (0, 0), (0, 0)])
        q = q.reshape(b, blocks, chunk, n, d).transpose(0, 3, 1, 2, 4)  # [B, N, U, W, D]
        k = _blocks(self.k_proj(x).reshape(b, t, n, d).astype(f32), a).transpose(0, 3, 1, 2, 4)
        v = _blocks(self.v_proj(x).reshape(b, t, n, d).astype(f32), a).transpose(0, 3, 1, 2, 4)
        logits = self.relative_position_embedding(q, k, x.dtype)
        cap = a.conf_attention_logit_cap
        logits = mx.tanh(logits / cap) * cap
        # A finite floor (as transformers): a query with no real key gets uniform weights, not NaN.
        logits = mx.where(mask, logits, mx.finfo(f32).min)
        out = mx.softmax(logits, axis=-1) @ v  # [B, N, U, W, D]
        out = out.transpose(0, 2, 3, 1, 4).reshape(b, blocks * chunk, n * d)[:, :t]
        return out.astype(x.dtype)


def _blocks(x: mx.array, a: AudioArgs) -> mx.array:
    """[B, T, ...] -> [B, U, C, ...]: block u's context, frames u * chunk - past onwards (zeros,
    or False, beyond the ends)."""
    chunk, t = a.conf_attention_chunk_size, x.shape[1]
    blocks = -(-t // chunk)
    right = a.conf_attention_context_right + chunk - 1
    x = mx.pad(x, [(0, 0), (a.past, right)] + [(0, 0)] * (x.ndim - 2))
    index = mx.arange(blocks)[:, None] * chunk + mx.arange(a.context)[None, :]
    return x[:, index]


def attention_mask(valid: mx.array, a: AudioArgs) -> mx.array:
    """bool [B, 1, U, W, C]: query w of block u may attend context key c. Key c sits at frame
    u * chunk - past + c, so its distance behind the query is w + past - c; allowed are
    -right .. past, and only keys that are real audio."""
    w = mx.arange(a.conf_attention_chunk_size)[:, None]
    c = mx.arange(a.context)[None, :]
    near = (c >= w) & (c <= w + a.past + a.conf_attention_context_right)  # [W, C]
    return _blocks(valid, a)[:, None, :, None, :] & near


class ConformerAttention(nn.Module):
    def __init__(self, a: AudioArgs):
        super().__init__()
        self.pre_attn_norm = RMSNorm(a.hidden_size)
        self.attn = Attention(a)
        self.post = nn.Linear(a.hidden_size, a.hidden_size, bias=False)
        self.post_norm = RMSNorm(a.hidden_size)
        self.clip = a.gradient_clipping

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        h = self.attn(self.pre_attn_norm(_clamp(x, self.clip)), mask)
        return x + self.post_norm(_clamp(self.post(h), self.clip))


class ConformerBlock(nn.Module):
    def __init__(self, a: AudioArgs):
        super().__init__()
        self.ffw_layer_start = FeedForward(a)
        self.attention = ConformerAttention(a)
        self.lconv1d = LightConv1d(a)
        self.ffw_layer_end = FeedForward(a)
        self.norm = RMSNorm(a.hidden_size)
        self.clip = a.gradient_clipping

    def __call__(self, x: mx.array, valid: mx.array, mask: mx.array) -> mx.array:
        x = self.attention(self.ffw_layer_start(x), mask)
        # Zero the padding so the causal convolution carries none of it into later frames.
        x = self.lconv1d(x * valid[..., None].astype(x.dtype))
        return self.norm(_clamp(self.ffw_layer_end(x), self.clip))


class AudioTower(nn.Module):
    """features float [B, T, 128] + padding bool [B, T] (True = padding frame) ->
    (encodings [B, T', hidden], padding bool [B, T'], True = padding; those rows are zero)."""

    def __init__(self, a: AudioArgs):
        super().__init__()
        self.args = a
        self.subsample_conv_projection = SubSampleConvProjection(a)
        self.conformer = [ConformerBlock(a) for _ in range(a.conf_num_hidden_layers)]

    @property
    def layers(self) -> list:  # the blocks gradient checkpointing wraps
        return self.conformer

    def __call__(self, features: mx.array, padding: mx.array, alone: bool = False
                 ) -> tuple[mx.array, mx.array]:  # fmt: skip
        """`alone`: each clip's output as if it ran alone (its padding, a suffix, then matters
        to none of its tokens); transformers' batched output lets the padding reach the last."""
        a = self.args
        lengths = None
        if alone:
            lengths = mx.logical_not(padding).sum(axis=1)
        x = self.subsample_conv_projection(features, lengths)
        # A sub-sampled frame takes the mask of the mel frame its receptive field starts at.
        stride = math.prod(s[0] for s in a.sscp_conv_stride_size)
        index = mx.minimum(mx.arange(x.shape[1]) * stride, padding.shape[1] - 1)
        padding = padding[:, index]
        valid = mx.logical_not(padding)
        mask = attention_mask(valid, a)
        for block in self.conformer:
            x = block(x, valid, mask)
        r = a.conf_reduction_factor
        x, padding = x[:, ::r], padding[:, ::r]  # a plain stride: the first of every r frames
        return mx.where(padding[..., None], mx.zeros((), x.dtype), x), padding
