"""NF4: 4-bit NormalFloat weights with double-quantized block scales, in plain torch.

The format of QLoRA and bitsandbytes: weights in blocks of 64 are scaled by the block's absmax
and rounded to the nearest of 16 NormalFloat levels (two per byte); the fp32 absmax values are
themselves stored in 8 bits, in blocks of 256, with an fp32 scale per block and one mean
("double quantization"). That is 4 + 8/64 + 32/(64 x 256) = 4.127 bits per weight, the figure
the planner uses.

On CUDA with bitsandbytes installed, `quantize_linear` uses its `Linear4bit` (the same format,
fused kernels); elsewhere `NF4Linear` dequantizes on the fly, which is what the CPU tests run.
"""

from __future__ import annotations

import torch
from torch import nn

# bitsandbytes' NF4 levels (quantiles of N(0, 1), scaled to [-1, 1], with an exact zero).
LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])  # fmt: skip
BLOCK = 64
SCALE_BLOCK = 256
BITS = 4 + 8 / BLOCK + 32 / (BLOCK * SCALE_BLOCK)


class Packed:
    """One tensor in NF4: packed codes, 8-bit block scales and their own scales."""

    def __init__(self, codes, scales8, scale_scales, scale_mean, shape, dtype):
        self.codes, self.scales8, self.scale_scales = codes, scales8, scale_scales
        self.scale_mean, self.shape, self.dtype = scale_mean, shape, dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.codes, self.scales8, self.scale_scales)) + 4  # fmt: skip

    def to(self, device, non_blocking: bool = False) -> Packed:
        move = [t.to(device, non_blocking=non_blocking) for t in
                (self.codes, self.scales8, self.scale_scales)]  # fmt: skip
        return Packed(*move, self.scale_mean, self.shape, self.dtype)

    def pin(self) -> Packed:
        if torch.cuda.is_available():
            self.codes, self.scales8 = self.codes.pin_memory(), self.scales8.pin_memory()
            self.scale_scales = self.scale_scales.pin_memory()
        return self


def quantize(w: torch.Tensor) -> Packed:
    flat = w.detach().float().reshape(-1)
    pad = (-len(flat)) % (BLOCK * SCALE_BLOCK)
    flat = torch.nn.functional.pad(flat, (0, pad))
    blocks = flat.view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)
    normed = blocks / absmax[:, None]
    levels = LEVELS.to(flat.device)
    idx = (normed[..., None] - levels).abs().argmin(dim=-1).to(torch.uint8).view(-1)
    codes = (idx[0::2] << 4) | idx[1::2]
    mean = float(absmax.mean())
    centred = (absmax - mean).view(-1, SCALE_BLOCK)
    scale_scales = centred.abs().amax(dim=1).clamp_min(1e-12) / 127
    scales8 = torch.round(centred / scale_scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Packed(codes, scales8.view(-1), scale_scales, mean, tuple(w.shape), w.dtype)


def dequantize(p: Packed, dtype: torch.dtype | None = None) -> torch.Tensor:
    absmax = (p.scales8.view(-1, SCALE_BLOCK).float() * p.scale_scales[:, None]).view(-1)
    absmax = absmax + p.scale_mean
    levels = LEVELS.to(p.codes.device)
    idx = torch.stack([p.codes >> 4, p.codes & 0xF], dim=1).view(-1).long()
    values = levels[idx].view(-1, BLOCK) * absmax[:, None]
    n = 1
    for s in p.shape:
        n *= s
    return values.view(-1)[:n].view(p.shape).to(dtype or p.dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4, dequantized for each matmul."""

    def __init__(self, packed: Packed, bias: torch.Tensor | None = None):
        super().__init__()
        self.packed = packed
        self.in_features, self.out_features = packed.shape[1], packed.shape[0]
        # An empty buffer: `.to(device)` moves it, and `_apply` then moves the packed weight.
        self.register_buffer("_anchor", torch.empty(0, dtype=packed.dtype), persistent=False)
        self.bias = bias

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> NF4Linear:
        return cls(quantize(layer.weight), layer.bias)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.packed = self.packed.to(self._anchor.device)
        return self

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantize().to(x.dtype), self.bias)

    @property
    def weight_nbytes(self) -> int:
        return self.packed.nbytes


def quantize_linear(layer: nn.Linear) -> nn.Module:
    """bitsandbytes' Linear4bit on CUDA when it is installed; our NF4Linear otherwise."""
    if layer.weight.is_cuda:
        try:
            import bitsandbytes as bnb
        except ImportError:
            return NF4Linear.from_linear(layer)
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              compute_dtype=layer.weight.dtype, compress_statistics=True,
                              quant_type="nf4")  # fmt: skip
        q.weight = bnb.nn.Params4bit(layer.weight.data.cpu(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)  # fmt: skip
        if layer.bias is not None:
            q.bias = layer.bias
        return q.to(layer.weight.device)
    return NF4Linear.from_linear(layer)
