"""NF4: 4-bit NormalFloat weights with double-quantized block scales, in bitsandbytes' layout.

The format of QLoRA and bitsandbytes: weights in blocks of 64 are scaled by the block's absmax
and rounded to the nearest of 16 NormalFloat levels, two per byte (the first in the high
nibble). The fp32 absmax values, less their mean, are stored in 8 bits, in blocks of 256, with
an fp32 scale per block ("double quantization"): 4 + 8/64 + 32/(64 x 256) = 4.127 bits per
weight, the figure the planner uses. The 8-bit scale codes are decoded through a 256-entry
table, as bitsandbytes decodes its nested state; ours is linear (code b means int8(b) / 127),
so `quant_state()` hands the same bytes to bitsandbytes' kernels unchanged.

One tensor's bytes, as they lie in the prepared cache and in the streamed expert buffers:

    codes   uint8 [n / 2]                 packed levels
    scales  uint8 [ceil(n / 64)]          8-bit block absmax, less the mean
    stats   fp32  [1 + ceil(n / 16384)]   the mean, then the absmax of each 256 scales

Quantizing and dequantizing in plain torch run in slices, so their temporaries stay a few
dozen MB whatever the tensor's size; on CUDA, `dequantize` uses bitsandbytes' kernel when it
is installed (straight into a caller's buffer, no temporaries).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from mlxtune.plan.cuda import ALIGN, nf4_nbytes, nf4_parts

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
SLICE = 1 << 22  # values quantized or dequantized at once in plain torch (16 MiB of fp32)


def _counts(n: int) -> tuple[int, int, int]:
    """Element counts of codes, 8-bit scales and fp32 stats for n values (bitsandbytes' sizes:
    the last block may be partial); the planner's formula."""
    if n % 2:
        raise ValueError(f"NF4 needs an even number of values, got {n}")
    codes, scales, stats = nf4_parts(n)
    return codes, scales, stats // 4


def _up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def parts(shape: tuple[int, ...]) -> list[tuple[str, torch.dtype, int, int]]:
    """(name, dtype, element count, byte offset) of each part of one packed tensor."""
    out, at = [], 0
    for name, dtype, count in zip(("codes", "scales", "stats"),
                                  (torch.uint8, torch.uint8, torch.float32),
                                  _counts(_numel(shape)), strict=True):  # fmt: skip
        out.append((name, dtype, count, at))
        at = _up(at + count * dtype.itemsize)
    return out


def packed_nbytes(shape: tuple[int, ...]) -> int:
    """Bytes of one packed tensor, parts aligned (what the cache and the stream buffers hold)."""
    return nf4_nbytes(_numel(shape))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class Packed:
    """One tensor in NF4: views of its codes, scales and stats (see the module docstring)."""

    def __init__(self, codes, scales, stats, shape, dtype):
        self.codes, self.scales, self.stats = codes, scales, stats
        self.shape, self.dtype = tuple(shape), dtype

    @classmethod
    def view(cls, buffer: torch.Tensor, shape, dtype) -> Packed:
        """The packed tensor lying at the start of a uint8 `buffer` (no copy)."""
        views = [buffer[at : at + count * dt.itemsize].view(dt)
                 for _, dt, count, at in parts(tuple(shape))]  # fmt: skip
        return cls(*views, shape, dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.stats))

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device, non_blocking: bool = False) -> Packed:
        move = [t.to(device, non_blocking=non_blocking) for t in
                (self.codes, self.scales, self.stats)]  # fmt: skip
        return Packed(*move, self.shape, self.dtype)

    def write_into(self, buffer: torch.Tensor) -> None:
        """Copy the parts into a uint8 `buffer` at the offsets `view` reads them from."""
        for t, (_, dt, count, at) in zip((self.codes, self.scales, self.stats),
                                         parts(self.shape), strict=True):  # fmt: skip
            buffer[at : at + count * dt.itemsize].copy_(t.reshape(-1).view(torch.uint8))


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per device, made once (a pageable copy per call would sync the stream): the midpoints
    between levels, the (high, low) level pair of every byte, the 8-bit scale code, the
    levels."""
    levels = LEVELS.to(device)
    byte = torch.arange(256, device=device)
    pairs = torch.stack([levels[byte >> 4], levels[byte & 0xF]], dim=1)
    code = byte.to(torch.uint8).view(torch.int8).float() / 127
    return (levels[:-1] + levels[1:]) / 2, pairs, code, levels


def scale_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry table that decodes the 8-bit scales (bitsandbytes' nested `code`)."""
    return _tables(torch.device(device))[2]


def quantize(w: torch.Tensor) -> Packed:
    """NF4 of `w`, on w's device, in slices of SLICE values."""
    shape, device = tuple(w.shape), w.device
    flat = w.detach().reshape(-1)
    n = flat.numel()
    n_codes, n_blocks, _ = _counts(n)
    mids = _tables(device)[0]
    codes = torch.empty(n_codes, dtype=torch.uint8, device=device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=device)
    for s in range(0, n, SLICE):
        piece = flat[s : s + SLICE].float()
        short = (-piece.numel()) % BLOCK  # a partial last block: zeros, then trimmed
        blocks = nn.functional.pad(piece, (0, short)).view(-1, BLOCK)
        peak = blocks.abs().amax(dim=1)
        absmax[s // BLOCK : s // BLOCK + len(peak)] = peak
        idx = torch.bucketize(blocks / peak.clamp_min(1e-12)[:, None], mids).to(torch.uint8)
        idx = idx.view(-1)[: piece.numel()]
        codes[s // 2 : s // 2 + len(idx) // 2] = (idx[0::2] << 4) | idx[1::2]
    mean = absmax.mean()
    centred = nn.functional.pad(absmax - mean, (0, (-n_blocks) % SCALE_BLOCK)).view(-1, SCALE_BLOCK)
    peak = centred.abs().amax(dim=1).clamp_min(1e-12)  # decoded as code[b] * peak, code in [-1, 1]
    scales = torch.round(centred / peak[:, None] * 127).clamp(-127, 127).to(torch.int8)
    stats = torch.cat([mean.reshape(1), peak])
    return Packed(codes, scales.view(torch.uint8).view(-1)[:n_blocks], stats, shape, w.dtype)


def _absmax(p: Packed) -> torch.Tensor:
    code, n = _tables(p.device)[2], p.scales.numel()
    scales = nn.functional.pad(code[p.scales.long()], (0, (-n) % SCALE_BLOCK))
    return (scales.view(-1, SCALE_BLOCK) * p.stats[1:, None]).view(-1)[:n] + p.stats[0]


def dequantize(p: Packed, dtype: torch.dtype | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The dense tensor (into `out` when given): bitsandbytes' kernel on CUDA when installed,
    else plain torch in slices."""
    dtype = dtype or p.dtype
    if out is None:
        out = torch.empty(p.shape, dtype=dtype, device=p.device)
    if p.device.type == "cuda" and _bnb() is not None:
        _bnb().functional.dequantize_4bit(p.codes, quant_state(p, dtype), out=out)
        return out
    pairs = _tables(p.device)[1]
    absmax, flat, n = _absmax(p), out.view(-1), out.numel()
    for s in range(0, n, SLICE):
        e = min(s + SLICE, n)
        values = pairs[p.codes[s // 2 : e // 2].long()].view(-1)  # SLICE: a multiple of BLOCK
        values = nn.functional.pad(values, (0, (-values.numel()) % BLOCK)).view(-1, BLOCK)
        values *= absmax[s // BLOCK : s // BLOCK + len(values), None]
        flat[s:e] = values.view(-1)[: e - s]
    return out


@functools.cache
def _bnb():
    try:
        import bitsandbytes

        return bitsandbytes
    except ImportError:
        return None


def quant_state(p: Packed, dtype: torch.dtype | None = None):
    """bitsandbytes' QuantState over the same bytes (nested: our scales, scale code, stats)."""
    functional = _bnb().functional
    nested = functional.QuantState(absmax=p.stats[1:], code=scale_code(p.device),
                                   blocksize=SCALE_BLOCK, dtype=torch.float32)  # fmt: skip
    return functional.QuantState(absmax=p.scales, shape=torch.Size(p.shape),
                                 code=_tables(p.device)[3], blocksize=BLOCK, quant_type="nf4",
                                 dtype=dtype or p.dtype, offset=p.stats[0], state2=nested)  # fmt: skip


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4, dequantized for each matmul."""

    def __init__(self, packed: Packed, bias: torch.Tensor | None = None):
        super().__init__()
        self.packed = packed
        self.in_features, self.out_features = packed.shape[1], packed.shape[0]
        # An empty buffer: `.to(device)` moves it, and `_apply` then moves the packed weight.
        self.register_buffer("_anchor", torch.empty(0, dtype=packed.dtype,
                                                    device=packed.device), persistent=False)  # fmt: skip
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
        return nn.functional.linear(x, dequantize(self.packed, x.dtype), self.bias)

    @property
    def weight_nbytes(self) -> int:
        return self.packed.nbytes


def linear4bit(packed: Packed, bias: torch.Tensor | None = None, use_bnb: bool | None = None):
    """A frozen linear layer over an already quantized weight: bitsandbytes' Linear4bit (its
    fused kernels) on CUDA when installed, our NF4Linear otherwise. Nothing is re-quantized."""
    bnb = _bnb()
    if use_bnb is None:
        use_bnb = packed.device.type == "cuda" and bnb is not None
    if not use_bnb:
        return NF4Linear(packed, bias)
    out_features, in_features = packed.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None,
                              compute_dtype=packed.dtype, compress_statistics=True,
                              quant_type="nf4", device="meta")  # fmt: skip
    layer.weight = bnb.nn.Params4bit(packed.codes.view(-1, 1), requires_grad=False,
                                     quant_state=quant_state(packed), quant_type="nf4",
                                     compress_statistics=True, bnb_quantized=True,
                                     module=layer)  # fmt: skip
    layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return layer


def quantize_linear(layer: nn.Linear) -> nn.Module:
    """A dense linear layer to NF4 (bitsandbytes' Linear4bit on CUDA when installed)."""
    return linear4bit(quantize(layer.weight), layer.bias)
