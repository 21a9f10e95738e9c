"""llama.cpp's Q4_K and Q6_K block formats, written in numpy (the `gguf` package reads them
but only writes the simpler types). Rows are cut into super-blocks of 256 values.

Q4_K: 8 sub-blocks of 32, each x ~ d * sc * q - dmin * m with q in 0..15, its scale sc and
min m in 6 bits, d and dmin float16 per super-block:
    d (f16) | dmin (f16) | 12 bytes of packed (sc, m) | 128 bytes of 4-bit q
Q6_K: 16 sub-blocks of 16, each x ~ d * s * (q - 32) with q in 0..63, s an int8, d float16:
    128 bytes of q's low 4 bits | 64 bytes of its high 2 bits | 16 int8 s | d (f16)

The scales are fitted more simply than llama.cpp's search (each sub-block's range, no
iterative refinement), so the error is a little larger than llama-quantize's; the bytes are
the same format, and tests read them back with the `gguf` package's dequantizer.
"""

from __future__ import annotations

import numpy as np

QK = 256


def quantize(t: np.ndarray, kind) -> np.ndarray:
    """`t` (rows a multiple of 256 long) as Q4_K or Q6_K bytes, shaped [rows, bytes per row]."""
    from gguf import GGMLQuantizationType as Q

    rows = t.reshape(-1, t.shape[-1]).astype(np.float32)
    if rows.shape[-1] % QK:
        raise ValueError(f"rows of {rows.shape[-1]} values: not a multiple of {QK}")
    blocks = rows.reshape(-1, QK)
    packed = _q4_k(blocks) if kind == Q.Q4_K else _q6_k(blocks)
    return packed.reshape(*t.shape[:-1], -1)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _q4_k(x: np.ndarray) -> np.ndarray:
    n = len(x)
    sub = x.reshape(n, 8, 32)
    low = np.minimum(sub.min(axis=2), 0.0)
    scale = (sub.max(axis=2) - low) / 15.0
    mins = -low
    d = scale.max(axis=1) / 63.0
    dmin = mins.max(axis=1) / 63.0
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    d, dmin = d16.astype(np.float32), dmin16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(scale / d[:, None]), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dmin[:, None] > 0, np.rint(mins / dmin[:, None]), 0).clip(0, 63)
        m = m.astype(np.uint8)
        step = d[:, None] * sc
        offset = dmin[:, None] * m
        q = np.where(step[..., None] > 0,
                     np.rint((sub + offset[..., None]) / step[..., None]), 0)  # fmt: skip
    q = q.clip(0, 15).astype(np.uint8).reshape(n, QK)
    scales = np.zeros((n, 12), np.uint8)
    scales[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    pairs = q.reshape(n, 4, 2, 32)  # each 64 values: low nibbles, then high nibbles
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([_f16(d16), _f16(dmin16), scales, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    n = len(x)
    sub = x.reshape(n, 16, 16)
    at = np.abs(sub).argmax(axis=2)
    peak = np.take_along_axis(sub, at[..., None], axis=2)[..., 0]  # signed, largest magnitude
    scale = peak / -32.0  # the peak maps to -32, the far end of the range
    big = np.take_along_axis(scale, np.abs(scale).argmax(axis=1)[:, None], axis=1)[:, 0]
    d16 = (big / -128.0).astype(np.float16)
    d = d16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(d[:, None] != 0, np.rint(scale / d[:, None]), 0).clip(-128, 127)
        s = s.astype(np.int8)
        step = d[:, None] * s
        q = np.where(step[..., None] != 0, np.rint(sub / step[..., None]), 0)
    q = (q.clip(-32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # halves of 128, 4 x 32
    low = q & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4),
                         low[:, :, 1] | (low[:, :, 3] << 4)], axis=2).reshape(n, 128)  # fmt: skip
    high = q >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate([ql.astype(np.uint8), qh.reshape(n, 64).astype(np.uint8),
                           s.view(np.uint8), _f16(d16)], axis=1)  # fmt: skip
