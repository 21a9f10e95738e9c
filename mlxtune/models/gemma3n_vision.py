"""Gemma 3n's vision encoder in MLX: timm's MobileNetV5 (`mobilenetv5_300m_enc`).

transformers wraps timm (`TimmWrapperModel`), so the checkpoint holds timm's own names under
`model.vision_tower.timm_model.`; the modules here carry the same names (`timm_model.conv_stem.conv
.weight`, `timm_model.blocks.2.9.attn.key.down_conv.weight`, ...) so loading is one strict
`load_weights`. Everything runs channels-last (NHWC), MLX's convention.

The network, as timm's `_gen_mobilenet_v5` builds it:

- stem: 3x3 stride-2 conv (with bias) + RmsNorm2d + GELU;
- four stages (`ARCHS`, timm's block notation), each opened by a stride-2 block:
  EdgeResidual (full 3x3 conv expansion, 1x1 projection), UniversalInvertedResidual (optional
  depthwise conv before the 1x1 expansion and/or after it, 1x1 projection, layer scale) and
  MobileAttention (RmsNorm2d, multi-query attention: many query heads, one key/value head, the
  K/V optionally downsampled by a strided depthwise conv; layer scale);
- the multi-scale fusion adapter (MSFA): the outputs of the last two stages (1/16 and 1/32 of the
  input) are brought to the larger grid by nearest-neighbour upsampling, concatenated over
  channels, pushed through a UIR-style 1x1 FFN to 2048 channels, pooled to 16 x 16 (average pool
  when the grid divides evenly, as at 768 px: 48 -> 16; bilinear resize otherwise) and RMS-normed.

Details timm fixes and the code below follows:
- every k > 1 conv uses TensorFlow "SAME" padding, computed from the input size: for stride 2 on
  an even size the extra row/column goes at the bottom/right only (768 -> 3x3 conv pads (0, 1));
- norms are RmsNorm2d (RMS over channels, times a weight, eps 1e-6; no mean, no bias); the
  config's `rms_norm_eps` belongs to the multimodal embedder, not to timm, which ignores it;
- GELU is the tanh approximation (timm's `_GELU = partial(nn.GELU, approximate='tanh')`);
- widths scale with `channel_multiplier` (rounded to multiples of 8 as timm's make_divisible
  does); attention heads and key dims do not; the MSFA output is always 2048 channels.

`VisionTower(args)(pixels)` takes [B, H, W, 3] floats in [0, 1] (768 x 768 for Gemma 3n) and
returns [B, 256, 2048]: the 16 x 16 grid flattened row-major, i.e. transformers'
`last_hidden_state.reshape(B, 2048, 256).transpose(0, 2, 1)`. The sqrt(hidden) scaling and the
embedder that `get_image_features` applies next are not part of the tower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ._layers import rms_norm

EPS = 1e-6  # timm's RmsNorm2d default; not configurable through the Gemma 3n config
MSFA_WIDTH = 2048  # timm's MobileNetV5Encoder hard-codes the adapter's output channels

# timm's block notation: er = EdgeResidual, uir = UniversalInvertedResidual, mqa = MobileAttention
# with multi-query attention; k = kernel (for uir the middle depthwise conv, 0 = none), a = uir's
# leading depthwise kernel (0 = none), s = stride, e = expansion ratio, c = output channels
# (before channel_multiplier), h = heads, d = key/value dim, v = K/V downsampling stride.
ARCHS = {
    "mobilenetv5_300m_enc": (
        ["er_k3_s2_e4_c128"] + ["er_k3_s1_e4_c128"] * 2,
        ["uir_a3_k5_s2_e6_c256"] + ["uir_a5_k0_s1_e4_c256", "uir_a3_k0_s1_e4_c256"] * 2,
        ["uir_a5_k5_s2_e6_c640"] + ["uir_a5_k0_s1_e4_c640"] * 7 + ["uir_a0_k0_s1_e1_c640"]
        + ["mqa_k3_h12_v2_s1_d64_c640", "uir_a0_k0_s1_e2_c640"] * 14,
        ["uir_a5_k5_s2_e6_c1280"] + ["mqa_k3_h16_s1_d96_c1280", "uir_a0_k0_s1_e2_c1280"] * 19,
    )
}  # fmt: skip

# `model_args` keys that only matter for training from scratch (init, dropout): accepted, ignored.
_TRAINING_ONLY = {"drop_rate", "drop_path_rate"}


@dataclass(frozen=True)
class VisionArgs:
    architecture: str = "mobilenetv5_300m_enc"
    hidden_size: int = MSFA_WIDTH
    channel_multiplier: float = 1.0
    stem_size: int = 64
    fix_stem: bool | None = None  # None: timm's default, fixed when channel_multiplier < 1
    pad_type: str = "same"  # mobilenetv5_300m_enc's default; "" is timm's symmetric padding
    msfa_indices: tuple[int, ...] = (-2, -1)  # feature levels fused: stem, then each stage
    msfa_output_resolution: int = 16

    @classmethod
    def from_config(cls, config: dict) -> VisionArgs:
        """From a Gemma 3n `vision_config`: `model_args` are the kwargs transformers hands to
        `timm.create_model`; keys that would change the network in ways not modelled here raise."""
        arch = config.get("architecture", cls.architecture)
        if arch not in ARCHS:
            raise ValueError(f"vision architecture {arch!r} is not supported (only {list(ARCHS)})")
        hidden = config.get("hidden_size", MSFA_WIDTH)
        if hidden != MSFA_WIDTH:
            raise ValueError(f"hidden_size {hidden}: timm's MobileNetV5 always emits {MSFA_WIDTH}")
        model_args = dict(config.get("model_args") or {})
        modelled = {f.name for f in fields(cls)} - {"architecture", "hidden_size"}
        unknown = set(model_args) - modelled - _TRAINING_ONLY
        if unknown:
            raise ValueError(f"vision model_args {sorted(unknown)} are not supported")
        if model_args.get("pad_type", "same") not in ("same", ""):
            raise ValueError(f"vision pad_type {model_args['pad_type']!r} is not supported")
        kw = {k: v for k, v in model_args.items() if k not in _TRAINING_ONLY}
        if "msfa_indices" in kw:
            kw["msfa_indices"] = tuple(kw["msfa_indices"])
        return cls(architecture=arch, hidden_size=hidden, **kw)


def make_divisible(v: float, divisor: int = 8) -> int:
    """timm's make_divisible: nearest multiple of `divisor` (at least it), never below 90% of v."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _same_padding(size: int, k: int, stride: int) -> tuple[int, int]:
    """TensorFlow SAME: output ceil(size / stride); an odd total pads one more at the end."""
    total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


class Conv2d(nn.Module):
    """A timm conv (create_conv2d) without dilation. Kernel [out, kh, kw, in / groups] (MLX).
    Padding is SAME or symmetric as in timm; only the k > 1 convs pad at all.

    `torch_layout` keeps the kernel as PyTorch's [out, in, kh, kw] instead: the loader tells the
    two layouts apart by shape (`_towers.to_mlx_layout`), which cannot work for the stem, whose
    [out, 3, 3, 3] kernel has the same shape either way, so it is loaded as stored and moved here.
    """

    def __init__(
        self, c_in, c_out, k, stride=1, groups=1, bias=False, same=True, torch_layout=False
    ):
        super().__init__()
        shape = (c_out, c_in // groups, k, k) if torch_layout else (c_out, k, k, c_in // groups)
        self.weight = mx.zeros(shape)  # always replaced by the checkpoint's
        if bias:
            self.bias = mx.zeros((c_out,))
        self._k, self._stride, self._groups = k, stride, groups
        self._same, self._torch_layout = same, torch_layout

    def __call__(self, x: mx.array) -> mx.array:
        k, s = self._k, self._stride
        if self._same:  # depends on the input size, so computed per call
            (top, bottom), (left, right) = (_same_padding(n, k, s) for n in x.shape[1:3])
        else:  # timm's "" padding: symmetric ((s - 1) + (k - 1)) // 2
            top = bottom = left = right = (s - 1 + k - 1) // 2
        w = mx.moveaxis(self.weight, 1, -1) if self._torch_layout else self.weight
        pad = ([top, left], [bottom, right])
        y = mx.conv_general(x, w, stride=s, padding=pad, groups=self._groups)
        return y + self.bias if "bias" in self else y


class RmsNorm2d(nn.Module):
    """timm's RmsNorm2d / RmsNormAct2d: x / rms(x over channels) * weight, then tanh-GELU if act.
    Computed in float32 whatever the model dtype."""

    def __init__(self, channels: int, act: bool = False):
        super().__init__()
        self.weight = mx.ones((channels,))
        self._act = act

    def __call__(self, x: mx.array) -> mx.array:
        x = rms_norm(x, self.weight.astype(mx.float32), EPS)
        return nn.gelu_approx(x) if self._act else x


class ConvNorm(nn.Module):
    """timm's ConvNormAct: conv (`.conv`), then RmsNorm2d with optional GELU (`.bn`, timm's name)."""

    def __init__(self, c_in, c_out, k, stride=1, depthwise=False, act=True, same=True, **conv):
        super().__init__()
        groups = c_in if depthwise else 1
        self.conv = Conv2d(c_in, c_out, k, stride, groups, same=same, **conv)
        self.bn = RmsNorm2d(c_out, act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.bn(self.conv(x))


class LayerScale2d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.gamma = mx.full((channels,), 1e-5)  # timm's layer_scale_init_value

    def __call__(self, x: mx.array) -> mx.array:
        return x * self.gamma


class EdgeResidual(nn.Module):
    """FusedMBConv: a full k x k conv expands (and strides), a 1x1 conv projects; no layer scale."""

    def __init__(self, c_in, c_out, k, stride, exp, same):
        super().__init__()
        mid = make_divisible(c_in * exp)
        self.conv_exp = Conv2d(c_in, mid, k, stride, same=same)
        self.bn1 = RmsNorm2d(mid, act=True)
        self.conv_pwl = Conv2d(mid, c_out, 1)
        self.bn2 = RmsNorm2d(c_out)
        self._skip = c_in == c_out and stride == 1

    def __call__(self, x: mx.array) -> mx.array:
        y = self.bn2(self.conv_pwl(self.bn1(self.conv_exp(x))))
        return x + y if self._skip else y


class UniversalInvertedResidual(nn.Module):
    """[depthwise k=a, no act] -> 1x1 expand -> [depthwise k, strided] -> 1x1 project -> scale.

    The stride sits on the middle depthwise conv, or on the leading one when there is no middle."""

    def __init__(self, c_in, c_out, a, k, stride, exp, same, layer_scale=True, skip=True):
        super().__init__()
        mid = make_divisible(c_in * exp)
        dw = {"depthwise": True, "same": same}
        self.dw_start = ConvNorm(c_in, c_in, a, 1 if k else stride, act=False, **dw) if a else None
        self.pw_exp = ConvNorm(c_in, mid, 1)
        self.dw_mid = ConvNorm(mid, mid, k, stride, **dw) if k else None
        self.pw_proj = ConvNorm(mid, c_out, 1, act=False)
        self.layer_scale = LayerScale2d(c_out) if layer_scale else None
        self._skip = skip and c_in == c_out and stride == 1

    def __call__(self, x: mx.array) -> mx.array:
        y = self.dw_start(x) if self.dw_start is not None else x
        y = self.pw_exp(y)
        y = self.dw_mid(y) if self.dw_mid is not None else y
        y = self.pw_proj(y)
        y = self.layer_scale(y) if self.layer_scale is not None else y
        return x + y if self._skip else y


class Projection(nn.Module):
    """One of timm's nn.Sequential branches of MultiQueryAttention2d: for key/value with
    kv_stride > 1 a strided depthwise conv + RmsNorm2d first, then the 1x1 `proj`."""

    def __init__(self, c_in, c_out, stride=1, k=3, same=True):
        super().__init__()
        if stride > 1:
            self.down_conv = Conv2d(c_in, c_in, k, stride, groups=c_in, same=same)
            self.norm = RmsNorm2d(c_in)
        self.proj = Conv2d(c_in, c_out, 1)

    def __call__(self, x: mx.array) -> mx.array:
        if "down_conv" in self:
            x = self.norm(self.down_conv(x))
        return self.proj(x)


class MultiQueryAttention2d(nn.Module):
    """`heads` query heads attend over every position of one shared key/value head.

    The query channels are head-major (channel = head * key_dim + i), as timm reshapes them."""

    def __init__(self, c_in, c_out, heads, key_dim, kv_stride, k, same):
        super().__init__()
        self.query = Projection(c_in, heads * key_dim)
        self.key = Projection(c_in, key_dim, kv_stride, k, same)
        self.value = Projection(c_in, key_dim, kv_stride, k, same)
        self.output = Projection(heads * key_dim, c_out)
        self._heads, self._key_dim = heads, key_dim

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, _ = x.shape
        q = self.query(x).reshape(b, h * w, self._heads, self._key_dim).transpose(0, 2, 1, 3)
        k = self.key(x).reshape(b, 1, -1, self._key_dim)
        v = self.value(x).reshape(b, 1, -1, self._key_dim)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self._key_dim**-0.5)
        return self.output(o.transpose(0, 2, 1, 3).reshape(b, h, w, -1))


class MobileAttention(nn.Module):
    def __init__(self, c_in, c_out, heads, key_dim, kv_stride, k, same):
        super().__init__()
        self.norm = RmsNorm2d(c_in)
        self.attn = MultiQueryAttention2d(c_in, c_out, heads, key_dim, kv_stride, k, same)
        self.layer_scale = LayerScale2d(c_out)
        self._skip = c_in == c_out

    def __call__(self, x: mx.array) -> mx.array:
        y = self.layer_scale(self.attn(self.norm(x)))
        return x + y if self._skip else y


def _resize_nearest(x: mx.array, size: tuple[int, int]) -> mx.array:
    """F.interpolate(mode="nearest"): output i reads input floor(i * in / out) (float32 math)."""
    for axis, n in zip((1, 2), size, strict=True):
        m = x.shape[axis]
        src = np.floor(np.arange(n, dtype=np.float32) * np.float32(m / n))
        x = mx.take(x, mx.array(np.minimum(src, m - 1).astype(np.int32)), axis=axis)
    return x


def _resize_bilinear(x: mx.array, size: tuple[int, int]) -> mx.array:
    """F.interpolate(mode="bilinear", align_corners=False, no antialias), one axis at a time."""
    for axis, n in zip((1, 2), size, strict=True):
        m = x.shape[axis]
        src = np.maximum((np.arange(n) + 0.5) * (m / n) - 0.5, 0.0)
        lo = np.floor(src).astype(np.int32)
        hi = np.minimum(lo + 1, m - 1)
        shape = [1] * x.ndim
        shape[axis] = n
        frac = mx.array((src - lo).reshape(shape), dtype=x.dtype)
        lo_x, hi_x = mx.take(x, mx.array(lo), axis=axis), mx.take(x, mx.array(hi), axis=axis)
        x = lo_x + (hi_x - lo_x) * frac
    return x


class MultiScaleFusionAdapter(nn.Module):
    """timm's MobileNetV5MultiScaleFusionAdapter: fuse feature maps (largest first) to a fixed
    resolution x resolution grid of `c_out` channels."""

    def __init__(self, c_in: int, c_out: int, resolution: int):
        super().__init__()
        # A UIR without depthwise convs, skip or layer scale: a 1x1 FFN with 2x expansion.
        self.ffn = UniversalInvertedResidual(
            c_in, c_out, 0, 0, 1, 2.0, same=True, layer_scale=False, skip=False
        )
        self.norm = RmsNorm2d(c_out)
        self._resolution = resolution

    def __call__(self, feats: list[mx.array]) -> mx.array:
        size = feats[0].shape[1:3]
        feats = [
            _resize_nearest(f, size) if f.shape[1] < size[0] or f.shape[2] < size[1] else f
            for f in feats
        ]
        x = self.ffn(mx.concatenate(feats, axis=-1))
        r = self._resolution
        if size != (r, r):
            if size[0] % r or size[1] % r:
                x = _resize_bilinear(x, (r, r))
            else:  # avg_pool2d with kernel = stride = size / r
                b, c = x.shape[0], x.shape[-1]
                x = x.reshape(b, r, size[0] // r, r, size[1] // r, c).mean(axis=(2, 4))
        return self.norm(x)


class MobileNetV5Encoder(nn.Module):
    """timm's MobileNetV5Encoder: NHWC pixels -> [B, r, r, 2048] MSFA output."""

    def __init__(self, a: VisionArgs):
        super().__init__()
        same = a.pad_type == "same"
        mult = a.channel_multiplier
        fix_stem = mult < 1.0 if a.fix_stem is None else a.fix_stem
        stem = a.stem_size if fix_stem else make_divisible(a.stem_size * mult)
        self.conv_stem = ConvNorm(3, stem, 3, 2, same=same, bias=True, torch_layout=True)
        c_in, widths, self.blocks = stem, [stem], []
        for stage in ARCHS[a.architecture]:
            blocks = []
            for code in stage:
                kind, *opts = code.split("_")
                o = {x[0]: float(x[1:]) if x[0] == "e" else int(x[1:]) for x in opts}
                c = make_divisible(o["c"] * mult) if mult else o["c"]  # timm's round_channels
                if kind == "er":
                    blocks.append(EdgeResidual(c_in, c, o["k"], o["s"], o["e"], same))
                elif kind == "uir":
                    blocks.append(
                        UniversalInvertedResidual(c_in, c, o["a"], o["k"], o["s"], o["e"], same)
                    )
                else:  # mqa (always stride 1 here)
                    kv = o.get("v", 1)
                    blocks.append(MobileAttention(c_in, c, o["h"], o["d"], kv, o["k"], same))
                c_in = c
            self.blocks.append(blocks)
            widths.append(c_in)
        # Feature levels are the stem and each stage's output (every stage starts with a stride).
        self._taps = [i % len(widths) for i in a.msfa_indices]
        c_fused = sum(widths[i] for i in self._taps)
        self.msfa = MultiScaleFusionAdapter(c_fused, a.hidden_size, a.msfa_output_resolution)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_stem(x)
        feats = [x]
        for stage in self.blocks:
            for block in stage:
                x = block(x)
            feats.append(x)
        return self.msfa([feats[i] for i in self._taps])


class VisionTower(nn.Module):
    """pixels [B, H, W, 3] in [0, 1] -> soft tokens [B, r * r, 2048] (r = 16), before the
    sqrt(hidden) scaling and the embedder."""

    def __init__(self, a: VisionArgs):
        super().__init__()
        self.args = a
        self.timm_model = MobileNetV5Encoder(a)

    def __call__(self, pixels: mx.array) -> mx.array:
        # TimmWrapperModel casts the pixels to the model's dtype first.
        x = self.timm_model(pixels.astype(self.timm_model.conv_stem.conv.weight.dtype))
        b, h, w, c = x.shape
        return x.reshape(b, h * w, c)
