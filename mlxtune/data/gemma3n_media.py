"""Gemma 3n's image and audio processing, as transformers does it. Framework-free.

References: `SiglipImageProcessorPil` / `SiglipImageProcessorFast` with the checkpoint's
`preprocessor_config.json`, `feature_extraction_gemma3n.py` and `processing_gemma3n.py`:

- Images: EXIF orientation applied, RGB, resized to 768 x 768 (bilinear, aspect ratio not kept);
  the pixels stay uint8 here and the model rescales them by 1/255 (no normalisation). Every image
  is 256 soft tokens.
- Audio: 16 kHz mono, padded with zeros to a multiple of 128 samples (what the feature extractor
  does to a batch of one); frames of 513 samples every 160, HTK pre-emphasis (0.97) turning each
  into 512, periodic Hann window, 1024-point FFT ("overdrive"), magnitude, 128 HTK mel bins over
  125-7,600 Hz, log(max(mel, 1e-5)). Every clip is 188 placeholder tokens; the audio tower fills
  the first ceil(frames / 16) of them and the model pads the rest with one learned embedding.
- The processor writes a blank line before and after each image and clip (`around`).

A clip is processed as if alone: in a batch, the tower sees zero features past its end, which
is what its own convolution padding gives a clip alone (transformers' batched processor pads the
waveform instead, so its outputs for a short clip depend on the longest clip in the batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class FixedImageSpec:
    """Every image resized to one size; a fixed number of soft tokens each."""

    height: int = 768
    width: int = 768
    resample: int = 2  # PIL's code: 2 = bilinear
    tokens: int = 256

    def count(self, path: str | Path, where: str) -> tuple[int, int]:
        """(placeholders, tower rows) of the image at `path`, after reading its header."""
        from .media import image_size

        image_size(path, where)
        return self.tokens, self.tokens

    def arrays(self, path: str | Path, where: str) -> tuple[np.ndarray]:
        """(pixels uint8 [height, width, 3],)."""
        from .media import open_image

        return (resize(open_image(path, where), self),)


def resize(img, spec: FixedImageSpec) -> np.ndarray:
    from PIL import Image

    if (img.height, img.width) != (spec.height, spec.width):
        img = img.resize((spec.width, spec.height), resample=Image.Resampling(spec.resample))
    return np.asarray(img, dtype=np.uint8)


@dataclass(frozen=True)
class USMAudioSpec:
    """Gemma 3n's log-mel features (the feature extractor's settings) and token counts."""

    sampling_rate: int = 16_000
    feature_size: int = 128
    frame_length_ms: float = 32.0
    hop_length_ms: float = 10.0
    min_frequency: float = 125.0
    max_frequency: float = 7600.0
    preemphasis: float = 0.97
    preemphasis_htk_flavor: bool = True
    fft_overdrive: bool = True
    input_scale_factor: float = 1.0
    mel_floor: float = 1e-5
    max_seconds: float = 30.0  # the extractor truncates at 480,000 samples; we refuse longer
    tokens: int = 188  # placeholders per clip (audio_soft_tokens_per_image)
    frames_per_token: int = 16  # the tower's time strides times its reduction factor

    @property
    def frame_length(self) -> int:
        return int(round(self.sampling_rate * self.frame_length_ms / 1000.0))

    @property
    def hop_length(self) -> int:
        return int(round(self.sampling_rate * self.hop_length_ms / 1000.0))

    @property
    def fft_length(self) -> int:
        n = 2 ** math.ceil(math.log2(self.frame_length))
        return 2 * n if self.fft_overdrive else n

    def frames(self, n_samples: int) -> int:
        padded = -(-n_samples // 128) * 128
        return max((padded - self.frame_length - 1) // self.hop_length + 1, 0)

    def count(self, path: str | Path, where: str) -> tuple[int, int]:
        from .media import read_audio

        samples = read_audio(path, where, self)
        frames = self.frames(len(samples))
        if frames == 0:
            raise DataError(f"{where}: {path}: the audio clip is too short ({len(samples)} "
                            f"samples; at least {self.frame_length + 1} at {self.sampling_rate} Hz)")  # fmt: skip
        return self.tokens, min(-(-frames // self.frames_per_token), self.tokens)

    def arrays(self, path: str | Path, where: str) -> tuple[np.ndarray, np.ndarray]:
        """(features float32 [frames, feature_size], valid bool [frames], all True)."""
        from .media import read_audio

        features = log_mel(read_audio(path, where, self), self)
        return features, np.ones(len(features), bool)


@lru_cache(maxsize=4)
def _mel_filters(spec: USMAudioSpec) -> np.ndarray:
    """HTK triangles [fft_length // 2 + 1, feature_size], as the extractor's create_fb_matrix
    (bin frequencies in float32, like it)."""

    def to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    freqs = np.arange(spec.fft_length // 2 + 1, dtype=np.float32) * (
        spec.sampling_rate / spec.fft_length
    )
    mels = np.linspace(to_mel(spec.min_frequency), to_mel(spec.max_frequency),
                       spec.feature_size + 2)  # fmt: skip
    centres = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    gaps = centres[1:] - centres[:-1]
    slopes = centres[None, :] - freqs[:, None]
    down = -slopes[:, :-2] / gaps[:-1]
    up = slopes[:, 2:] / gaps[1:]
    return np.maximum(np.zeros(1, np.float32), np.minimum(down, up))


def log_mel(samples: np.ndarray, spec: USMAudioSpec) -> np.ndarray:
    """float32 [frames, feature_size] for one clip (padded to a multiple of 128 samples)."""
    n = len(samples)
    wave = np.zeros(-(-n // 128) * 128, dtype=np.float32)
    wave[:n] = samples
    if spec.input_scale_factor != 1.0:
        wave = wave * spec.input_scale_factor
    size, hop = spec.frame_length + 1, spec.hop_length
    count = spec.frames(n)
    frames = wave[(np.arange(count) * hop)[:, None] + np.arange(size)[None, :]]
    a = spec.preemphasis
    if a > 0 and spec.preemphasis_htk_flavor:
        frames = np.concatenate(
            [frames[:, :1] * (1.0 - a), frames[:, 1:-1] - a * frames[:, :-2]], -1
        )
    elif a > 0:
        frames = frames[:, 1:] - a * frames[:, :-1]
    else:
        frames = frames[:, :-1]
    m = spec.frame_length
    window = (0.5 * (1 - np.cos(2 * np.pi * np.arange(m, dtype=np.float32) / m))).astype(np.float32)
    magnitude = np.abs(np.fft.rfft(frames * window, n=spec.fft_length, axis=-1))
    mel = magnitude @ _mel_filters(spec)
    return np.log(np.maximum(mel, spec.mel_floor)).astype(np.float32)


def plan(folder: Path, config: dict, image_budget: int | None = None):
    """The MediaPlan of a Gemma 3n checkpoint, from its config.json and preprocessor_config.json
    (one file for both processors, as the released folders have)."""
    import json

    from ..errors import ConfigError, ModelError
    from .media import MediaPlan, MediaTokens, _known

    if image_budget is not None:
        raise ConfigError("data.image_soft_tokens: Gemma 3n takes a fixed 256 soft tokens per "
                          "image (768 x 768); remove the key")  # fmt: skip
    path = Path(folder) / "preprocessor_config.json"
    pre = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    image = audio = None
    if config.get("vision_config"):
        if pre.get("do_normalize") or pre.get("do_rescale") is False:
            raise ModelError(f"{path}: only do_rescale: true, do_normalize: false is supported "
                             "(the released Gemma 3n preprocessing)")  # fmt: skip
        size = pre.get("size") or {}
        image = FixedImageSpec(height=int(size.get("height", 768)), width=int(size.get("width", 768)),
                               resample=int(pre.get("resample", 2)),
                               tokens=int(config.get("vision_soft_tokens_per_image", 256)))  # fmt: skip
    if config.get("audio_config"):
        tower = config["audio_config"]
        strides = tower.get("sscp_conv_stride_size", [[2, 2], [2, 2]])
        per_token = math.prod(s[0] for s in strides) * int(tower.get("conf_reduction_factor", 4))
        values = _known(USMAudioSpec, pre)
        values |= {"tokens": int(config.get("audio_soft_tokens_per_image", 188)),
                   "frames_per_token": per_token}  # fmt: skip
        audio = USMAudioSpec(**values)
    return MediaPlan(MediaTokens.from_config(config), image, audio, around="\n\n")
