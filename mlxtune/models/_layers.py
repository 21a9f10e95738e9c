"""Small layers the Gemma towers share."""

from __future__ import annotations

import math
from dataclasses import fields

import mlx.core as mx
import mlx.nn as nn


def args_from(cls, config: dict):
    """A dataclass from the keys of a config dict it declares (the rest are ignored)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names and v is not None})


class ClippableLinear(nn.Module):
    """Gemma 4's linear layer with optional input/output clamping (bounds are checkpoint buffers).

    The matrix sits in `.linear`, as in transformers, so LoRA wraps the inner layer and the adapter's
    module names (`...q_proj.linear`) are the ones PEFT uses."""

    def __init__(self, dims_in: int, dims_out: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(dims_in, dims_out, bias=False)
        self.clipped = clipped
        if clipped:
            self.input_min = mx.array(-math.inf)
            self.input_max = mx.array(math.inf)
            self.output_min = mx.array(-math.inf)
            self.output_max = mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if self.clipped:
            x = mx.clip(x, self.input_min, self.input_max)
        x = self.linear(x)
        if self.clipped:
            x = mx.clip(x, self.output_min, self.output_max)
        return x


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """Gemma 4's RMSNorm: x / rms(x) * w (no `1 +`), computed in float32."""
    out = mx.fast.rms_norm(x.astype(mx.float32), weight, eps)
    return out.astype(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight.astype(mx.float32), self.eps)


class Embedder(nn.Module):
    """Soft tokens into the text model's width: a scale-free RMSNorm, then a projection."""

    def __init__(self, dims_in: int, dims_out: int, eps: float):
        super().__init__()
        self.embedding_projection = nn.Linear(dims_in, dims_out, bias=False)
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(rms_norm(x, None, self.eps))
