"""Gemma 4's vision encoder in MLX (`Gemma4VisionModel` in transformers' modeling_gemma4.py).

A ViT over 16 px patches: a linear patch embedding plus learned x and y position tables, encoder
layers with sandwich norms, q/k norms, a scale-free v norm, attention scale 1 and a 2-D RoPE
(the first half of each head rotates with the x position, the second with y), bidirectional
attention over the image's real patches. Each 3 x 3 block of patches is then averaged into one
soft token and scaled by sqrt(hidden). Images of different sizes share a batch: each is padded
to the batch's patch count, the padding masked out of attention and never pooled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from ._layers import ClippableLinear, RMSNorm, args_from, rms_norm


@dataclass(frozen=True)
class VisionArgs:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10240
    use_clipped_linears: bool = False
    standardize: bool = False
    rope_parameters: dict = field(default_factory=lambda: {"rope_theta": 100.0})

    @classmethod
    def from_config(cls, config: dict) -> VisionArgs:
        return args_from(cls, config)


class Attention(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            a.num_attention_heads,
            a.num_key_value_heads,
            a.head_dim,
        )
        clip = a.use_clipped_linears
        self.q_proj = ClippableLinear(a.hidden_size, self.heads * a.head_dim, clip)
        self.k_proj = ClippableLinear(a.hidden_size, self.kv_heads * a.head_dim, clip)
        self.v_proj = ClippableLinear(a.hidden_size, self.kv_heads * a.head_dim, clip)
        self.o_proj = ClippableLinear(self.heads * a.head_dim, a.hidden_size, clip)
        self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
        self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
        self.eps = a.rms_norm_eps

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array], mask: mx.array) -> mx.array:
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, n, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, n, self.kv_heads, self.head_dim))
        v = rms_norm(self.v_proj(x).reshape(b, n, self.kv_heads, self.head_dim), None, self.eps)
        q, k = apply_rope_2d(q, *rope), apply_rope_2d(k, *rope)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, n, -1))


def rope_2d(positions: mx.array, head_dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """cos and sin [B, N, head_dim]: x frequencies for the first half, y for the second."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (mx.arange(0, half, 2, dtype=mx.float32) / half))  # head_dim / 4
    angles = positions.astype(mx.float32)[..., None] * inv_freq  # [B, N, 2, quarter]
    ax, ay = angles[..., 0, :], angles[..., 1, :]
    full = mx.concatenate([ax, ax, ay, ay], axis=-1)
    return mx.cos(full), mx.sin(full)


def apply_rope_2d(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate-half RoPE applied separately to each half of the head ([B, N, H, D])."""
    half = x.shape[-1] // 2
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    parts = []
    for i in range(2):
        part = x[..., i * half : (i + 1) * half]
        c, s = cos[..., i * half : (i + 1) * half], sin[..., i * half : (i + 1) * half]
        a, b = part[..., : half // 2], part[..., half // 2 :]
        parts.append(part * c + mx.concatenate([-b, a], axis=-1) * s)
    return mx.concatenate(parts, axis=-1)


class MLP(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        clip = a.use_clipped_linears
        self.gate_proj = ClippableLinear(a.hidden_size, a.intermediate_size, clip)
        self.up_proj = ClippableLinear(a.hidden_size, a.intermediate_size, clip)
        self.down_proj = ClippableLinear(a.intermediate_size, a.hidden_size, clip)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.self_attn = Attention(a)
        self.mlp = MLP(a)
        eps = a.rms_norm_eps
        self.input_layernorm = RMSNorm(a.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(a.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(a.hidden_size, eps)

    def __call__(self, x: mx.array, rope, mask: mx.array) -> mx.array:
        h = self.self_attn(self.input_layernorm(x), rope, mask)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Encoder(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.layers = [EncoderLayer(a) for _ in range(a.num_hidden_layers)]


class PatchEmbedder(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.input_proj = nn.Linear(3 * a.patch_size**2, a.hidden_size, bias=False)
        self.position_embedding_table = mx.zeros((2, a.position_embedding_size, a.hidden_size))

    def __call__(self, patches: mx.array, positions: mx.array, padding: mx.array) -> mx.array:
        # uint8 pixels -> [0, 1] (the processor's rescale) -> [-1, 1] (the model's own scaling)
        pixels = patches.astype(mx.float32) * (1 / 255)
        h = self.input_proj((2 * (pixels - 0.5)).astype(self.input_proj.weight.dtype))
        where = mx.maximum(positions, 0)
        table = self.position_embedding_table
        pos = table[0][where[..., 0]] + table[1][where[..., 1]]
        return h + mx.where(padding[..., None], 0, pos).astype(h.dtype)


class VisionTower(nn.Module):
    """patches uint8 [B, N, 3*p*p], positions int [B, N, 2] ((-1, -1) = padding), pool int [B, T, k*k]
    (the patch indices of each soft token) -> soft tokens float32 [B, T, hidden] before the embedder."""

    def __init__(self, a: VisionArgs):
        super().__init__()
        self.args = a
        self.patch_embedder = PatchEmbedder(a)
        self.encoder = Encoder(a)
        if a.standardize:
            self.std_bias = mx.zeros((a.hidden_size,))
            self.std_scale = mx.ones((a.hidden_size,))

    @property
    def layers(self) -> list:
        return self.encoder.layers

    def __call__(self, patches: mx.array, positions: mx.array, pool: mx.array) -> mx.array:
        a = self.args
        padding = positions[..., 0] < 0
        x = self.patch_embedder(patches, positions, padding)
        rope = rope_2d(mx.maximum(positions, 0), a.head_dim, a.rope_parameters["rope_theta"])
        # Padding keys get a large finite penalty (not -inf): an all-padding image stays finite.
        mask = mx.where(padding, -1e9, 0.0)[:, None, None, :].astype(x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, rope, mask)
        x = mx.where(padding[..., None], 0, x).astype(mx.float32)
        b, t, k2 = pool.shape
        cells = mx.take_along_axis(x, pool.reshape(b, t * k2)[..., None], axis=1)
        pooled = cells.reshape(b, t, k2, -1).sum(axis=2) * (1 / k2)
        pooled = pooled * a.hidden_size**0.5
        if a.standardize:
            pooled = (pooled - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return pooled
