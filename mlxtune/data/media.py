"""Images and audio for multimodal rows: read, check, and turn into model inputs. Framework-free
(numpy, pillow, soundfile, soxr).

Gemma 4's processing, as transformers does it (`image_processing_pil_gemma4.py`,
`feature_extraction_gemma4.py`, `processing_gemma4.py`), with the numbers from the checkpoint's
`processor_config.json`:

- Images: EXIF orientation applied, RGB, resized (bicubic, aspect ratio kept) to the largest size
  whose sides are multiples of pooling x patch (48 px) and whose 16 px patches fit
  `9 x max_soft_tokens`; cut into patches in row-major order. Each 3 x 3 block of patches becomes
  one soft token. Pixels stay uint8 here; the model rescales them.
- Audio: any rate and channel count to 16 kHz mono (averaged channels, soxr's HQ resampler, as
  transformers' `load_audio` and `librosa.load` do); log-mel features over 20 ms frames every 10 ms
  (periodic Hann, 512-point FFT, 128 HTK mel bins from 0 to 8 kHz, log(mel + 0.001)) with a
  semicausal left pad; a frame is valid while its whole window holds real audio. The placeholder
  count is that of the audio tower's output: the valid frames through two stride-2 convolutions.

Every problem raises `DataError` with the place it came from (`file:line: field: ...`), an image
past pillow's decompression-bomb limit included. Counting an image's soft tokens reads its
header only; `open_image` decodes it.
"""

from __future__ import annotations

import json
import math
import re
import struct
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import DataError
from .gemma3n_media import FixedImageSpec, USMAudioSpec
from .gemma3n_media import plan as gemma3n_plan

CACHE_ITEMS = 256  # decoded media kept between epochs (<= ~2 MB each at the default budget)
_CACHE: OrderedDict = OrderedDict()


@dataclass(frozen=True)
class ImageSpec:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    max_soft_tokens: int = 280

    @property
    def side(self) -> int:
        return self.patch_size * self.pooling_kernel_size

    def count(self, path: str | Path, where: str) -> tuple[int, int]:
        """(placeholders, tower rows) of the image at `path`, from its header."""
        tokens = image_tokens(*image_size(path, where), self)
        return tokens, tokens

    def arrays(self, path: str | Path, where: str) -> tuple[np.ndarray, np.ndarray]:
        return image_patches(open_image(path, where), self)


@dataclass(frozen=True)
class AudioSpec:
    sampling_rate: int = 16_000
    feature_size: int = 128
    frame_length: int = 320
    hop_length: int = 160
    fft_length: int = 512
    min_frequency: float = 0.0
    max_frequency: float = 8000.0
    mel_floor: float = 1e-3
    # The feature extractor's 480,000-sample cap: longer clips are refused, not truncated.
    max_seconds: float = 30.0
    max_tokens: int = 750  # the processor's audio_seq_length

    def count(self, path: str | Path, where: str) -> tuple[int, int]:
        """(placeholders, tower rows) of the clip at `path`."""
        samples = read_audio(path, where, self)
        tokens = audio_tokens(len(samples), self)
        if tokens == 0:
            raise DataError(
                f"{where}: {path}: the audio clip is too short ({len(samples)} samples)"
            )
        return tokens, tokens

    def arrays(self, path: str | Path, where: str) -> tuple[np.ndarray, np.ndarray]:
        return log_mel(read_audio(path, where, self), self)


@dataclass(frozen=True)
class MediaTokens:
    """The ids a multimodal model's config names (None where the model has no such input)."""

    pad: int = 0
    image: int | None = None  # the soft token, also the chat template's placeholder
    boi: int | None = None
    eoi: int | None = None
    audio: int | None = None
    boa: int | None = None
    eoa: int | None = None
    video: int | None = None

    @classmethod
    def from_config(cls, config: dict) -> MediaTokens:
        text = config.get("text_config") or {}
        pad = text.get("pad_token_id", config.get("pad_token_id"))
        return cls(
            pad=int(pad or 0),
            image=config.get("image_token_id"),
            boi=config.get("boi_token_id"),
            eoi=config.get("eoi_token_id"),
            audio=config.get("audio_token_id"),
            boa=config.get("boa_token_id"),
            eoa=config.get("eoa_token_id", config.get("eoa_token_index")),
            video=config.get("video_token_id"),
        )

    @property
    def soft(self) -> tuple[int, ...]:
        return tuple(i for i in (self.image, self.audio, self.video) if i is not None)


@dataclass(frozen=True)
class MediaItem:
    """One image or audio clip of an example: where it came from and how many soft tokens."""

    kind: Literal["image", "audio"]
    path: str
    where: str  # "file:line: messages[i].content[j].image", for errors
    spec: ImageSpec | AudioSpec | FixedImageSpec | USMAudioSpec
    tokens: int  # placeholders in the text
    start: int = 0  # index of its begin token in the example's ids (its soft tokens follow)
    rows: int | None = None  # of them, those the tower fills (None: all); the model pads the rest

    @property
    def soft(self) -> int:
        return self.tokens if self.rows is None else self.rows

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The tower's inputs for this item (`spec.arrays`); the newest few hundred are cached,
        so epochs after the first decode little."""
        key = (self.kind, self.path, self.spec)
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        value = self.spec.arrays(self.path, self.where)
        _CACHE[key] = value
        if len(_CACHE) > CACHE_ITEMS:
            _CACHE.popitem(last=False)
        return value


# Model types whose pictures and audio each backend feeds through its own towers.
MEDIA_FAMILIES = {"mlx": ("gemma4", "gemma3n"), "cuda": ("gemma4",)}


@dataclass(frozen=True)
class MediaPlan:
    """How a model takes media: its token ids and its image / audio settings (None: no tower)."""

    tokens: MediaTokens
    image: ImageSpec | FixedImageSpec | None
    audio: AudioSpec | USMAudioSpec | None
    around: str = ""  # text the processor writes before and after each image and clip

    @classmethod
    def for_model(cls, backend: str, folder: Path, config: dict,
                  image_budget: int | None = None) -> MediaPlan | None:  # fmt: skip
        """The plan of a checkpoint whose media `backend` takes; None for any other."""
        if config.get("model_type") not in MEDIA_FAMILIES[backend] or not (
            config.get("vision_config") or config.get("audio_config")
        ):
            return None
        return cls.from_checkpoint(folder, config, image_budget)

    @classmethod
    def from_checkpoint(cls, folder: Path, config: dict, image_budget: int | None = None):
        if config.get("model_type") == "gemma3n":
            return gemma3n_plan(Path(folder), config, image_budget)
        path = Path(folder) / "processor_config.json"
        proc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        image = audio = None
        if config.get("vision_config"):
            image = ImageSpec(**_known(ImageSpec, proc.get("image_processor", {})))
            if image_budget is not None:
                image = ImageSpec(image.patch_size, image.pooling_kernel_size, image_budget)
        if config.get("audio_config"):
            values = _known(AudioSpec, proc.get("feature_extractor", {}))
            if "audio_seq_length" in proc:
                values["max_tokens"] = proc["audio_seq_length"]
            audio = AudioSpec(**values)
        return cls(MediaTokens.from_config(config), image, audio)

    def item(self, kind: str, path: str, where: str) -> MediaItem:
        """Open and check the file; count its soft tokens."""
        spec = self.image if kind == "image" else self.audio
        if spec is None:
            raise DataError(f"{where}: this model has no {kind} input")
        tokens, rows = spec.count(path, where)
        return MediaItem(kind, path, where, spec, tokens, rows=None if rows == tokens else rows)

    def span(self, kind: str) -> tuple[int, int, int]:
        """(begin, soft, end) token ids of a media span."""
        t = self.tokens
        return (t.boi, t.image, t.eoi) if kind == "image" else (t.boa, t.audio, t.eoa)


def _known(cls, values: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names and v is not None}


# ------------------------------------------------------------------------------------ images


def open_image(path: str | Path, where: str):
    """A fully decoded RGB PIL image, upright per its EXIF orientation."""
    from PIL import ImageOps

    with _pillow(path, where) as img:
        img.load()  # decode everything now: a truncated file fails here, not mid-training
        return ImageOps.exif_transpose(img).convert("RGB")


def image_size(path: str | Path, where: str) -> tuple[int, int]:
    """(height, width) of the image as `open_image` gives it (EXIF orientation applied), from the
    file's header: no pixel is decoded."""
    from PIL import ExifTags, Image

    with _pillow(path, where) as img:
        if img.format == "PNG" and _png_text_after_pixels(Path(path)):
            img.load()  # pillow reads those chunks (which may hold the orientation) only then
        # Image's own getexif: a PNG's would decode the pixels when it has no EXIF up front.
        turned = Image.Image.getexif(img).get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
        # A TIFF's stored size: newer pillows report it turned already (and turn it on load).
        width, height = (img.tag_v2[256], img.tag_v2[257]) if img.format == "TIFF" else img.size
        return (width, height) if turned else (height, width)


@contextmanager
def _pillow(path: str | Path, where: str) -> Iterator:
    """The image at `path` opened by pillow (header read, pixels not yet); a file that is not an
    image, too large, or broken anywhere (here or while the block decodes it) is a DataError."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{where}: file not found: {path}")
    try:
        with warnings.catch_warnings():
            # pillow only warns from MAX_IMAGE_PIXELS to twice that; such a picture is refused too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                yield img
    except UnidentifiedImageError:
        raise DataError(
            f"{where}: {path}: not an image file (or not a format pillow reads)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        size = re.search(r"\((\d+) pixels\)", str(e))  # the size is only in pillow's message
        size = f"{int(size[1]):,} pixels" if size else _first_line(e)
        limit = f"{Image.MAX_IMAGE_PIXELS:,} (PIL.Image.MAX_IMAGE_PIXELS)"
        raise DataError(
            f"{where}: {path}: {size}, over pillow's decompression-bomb limit of {limit}"
        ) from None
    except DataError:
        raise
    except Exception as e:  # a broken file fails in many ways: OSError, EOFError, struct.error...
        raise DataError(f"{where}: {path}: cannot decode the image ({_first_line(e)})") from None


def _png_text_after_pixels(path: Path) -> bool:
    """Whether a PNG has metadata chunks (EXIF, text, XMP) after its pixel data, by walking the
    chunk headers without reading the data."""
    with path.open("rb") as f:
        f.seek(8)  # the signature
        pixels = False
        while len(head := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                break
            if kind in (b"IDAT", b"fdAT"):
                pixels = True
            elif pixels and kind in (b"eXIf", b"tEXt", b"zTXt", b"iTXt"):
                return True
            f.seek(length + 4, 1)  # the data and its CRC
    return False


def target_size(height: int, width: int, spec: ImageSpec) -> tuple[int, int]:
    """transformers' get_aspect_ratio_preserving_size: the resized (height, width)."""
    budget = spec.max_soft_tokens * spec.pooling_kernel_size**2 * spec.patch_size**2
    factor = math.sqrt(budget / (height * width))
    side = spec.side
    h = int(math.floor(factor * height / side)) * side
    w = int(math.floor(factor * width / side)) * side
    longest = spec.max_soft_tokens * side  # (max_patches // pool**2) * side
    if h == 0 and w == 0:
        raise ValueError(f"{height}x{width} resizes to nothing")
    if h == 0:
        h, w = side, min(int(math.floor(width / height)) * side, longest)
    elif w == 0:
        w, h = side, min(int(math.floor(height / width)) * side, longest)
    return h, w


def image_tokens(height: int, width: int, spec: ImageSpec) -> int:
    h, w = target_size(height, width, spec)
    return (h // spec.patch_size) * (w // spec.patch_size) // spec.pooling_kernel_size**2


def image_patches(img, spec: ImageSpec) -> tuple[np.ndarray, np.ndarray]:
    """(patches uint8 [n, patch*patch*3], positions int32 [n, 2] as (x, y)) in row-major order."""
    from PIL import Image

    h, w = target_size(img.height, img.width, spec)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(img, dtype=np.uint8)  # [h, w, 3]
    p = spec.patch_size
    ph, pw = h // p, w // p
    # Each patch flattened as (row, column, channel), as transformers' convert_image_to_patches.
    patches = pixels.reshape(ph, p, pw, p, 3).transpose(0, 2, 1, 3, 4).reshape(ph * pw, -1)
    xs, ys = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
    positions = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.int32)
    return np.ascontiguousarray(patches), positions


# ------------------------------------------------------------------------------------- audio


def audio_info(path: str | Path, where: str) -> tuple[int, int]:
    """(frames, sample rate) from the file's header; the file must be one soundfile can read."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{where}: file not found: {path}")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise DataError(
            f"{where}: {path}: not an audio file soundfile can read ({_first_line(e)})"
        ) from None
    return int(info.frames), int(info.samplerate)


def read_audio(path: str | Path, where: str, spec: AudioSpec) -> np.ndarray:
    """float32 mono samples at spec.sampling_rate; empty, over-long or corrupt clips are refused."""
    import soundfile as sf

    frames, rate = audio_info(path, where)
    seconds = frames / rate if rate else 0.0
    if seconds > spec.max_seconds:
        raise DataError(
            f"{where}: {path}: audio is {seconds:.1f} s long; at most {spec.max_seconds:g} s "
            "per clip (split it into several parts)"
        )
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise DataError(f"{where}: {path}: cannot decode the audio ({_first_line(e)})") from None
    if data.shape[0] == 0:
        raise DataError(f"{where}: {path}: the audio clip is empty")
    if not np.isfinite(data).all():
        raise DataError(f"{where}: {path}: the audio holds NaN or infinite samples")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return resample(mono, rate, spec.sampling_rate)


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """float32 samples at `target` Hz: soxr's HQ filter, trimmed or zero-padded to
    ceil(len * target / rate) samples, which is what transformers' `load_audio` (and
    `librosa.load`) give. benchmarks/bench_resample.py measures it."""
    if rate == target:
        return x.astype(np.float32, copy=False)
    import soxr

    n = math.ceil(len(x) * target / rate)
    y = soxr.resample(np.ascontiguousarray(x, dtype=np.float32), rate, target, quality="soxr_hq")
    return np.pad(y, (0, max(0, n - len(y))))[:n].astype(np.float32, copy=False)


@lru_cache(maxsize=4)
def _mel_filters(spec: AudioSpec) -> np.ndarray:
    """HTK-scale triangular filters [fft_length // 2 + 1, feature_size], no normalisation."""

    def to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)

    mels = np.linspace(
        to_mel(spec.min_frequency), to_mel(spec.max_frequency), spec.feature_size + 2
    )
    centres = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    bins = np.linspace(0, spec.sampling_rate // 2, spec.fft_length // 2 + 1)
    slopes = centres[None, :] - bins[:, None]
    gaps = np.diff(centres)
    down = -slopes[:, :-2] / gaps[:-1]
    up = slopes[:, 2:] / gaps[1:]
    return np.maximum(0.0, np.minimum(down, up))


def log_mel(samples: np.ndarray, spec: AudioSpec) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [frames, feature_size], valid bool [frames]); invalid frames are zero.

    The clip is first padded to a multiple of 128 samples, as the feature extractor pads a batch
    of one; frames reaching into that padding are invalid and zeroed."""
    n = len(samples)
    padded_len = -(-n // 128) * 128
    left = spec.frame_length // 2  # semicausal: the first frame is centred on t = 0
    wave = np.zeros(left + padded_len, dtype=np.float32)
    wave[left : left + n] = samples
    size = spec.frame_length + 1
    count = (len(wave) - size) // spec.hop_length + 1
    if count <= 0:
        return np.zeros((0, spec.feature_size), np.float32), np.zeros(0, bool)
    starts = np.arange(count) * spec.hop_length
    frames = wave[starts[:, None] + np.arange(spec.frame_length)[None, :]]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(spec.frame_length) / spec.frame_length)
    spectrum = np.abs(np.fft.rfft(frames * window.astype(np.float32), n=spec.fft_length, axis=-1))
    mel = np.log(spectrum @ _mel_filters(spec) + spec.mel_floor).astype(np.float32)
    valid = starts + size - 1 < left + n  # the window's last sample is real audio
    return mel * valid[:, None], valid


def audio_tokens_from_valid(valid_frames: int) -> int:
    """Soft tokens of a clip with this many valid mel frames: two stride-2 convolutions."""
    t = valid_frames
    for _ in range(2):
        t = (t + 1) // 2
    return t


def audio_tokens(n_samples: int, spec: AudioSpec) -> int:
    """Placeholders for a clip of n_samples at spec.sampling_rate (transformers' rule)."""
    size = spec.frame_length + 1
    valid = max((n_samples + spec.frame_length // 2 - size) // spec.hop_length + 1, 0)
    return min(audio_tokens_from_valid(valid), spec.max_tokens)


def pool_index(positions: np.ndarray, k: int) -> np.ndarray:
    """int32 [tokens, k*k]: the patch indices each soft token averages (row-major k x k blocks)."""
    width, height = int(positions[:, 0].max()) + 1, int(positions[:, 1].max()) + 1
    grid = np.arange(width * height).reshape(height, width)
    blocks = grid.reshape(height // k, k, width // k, k).transpose(0, 2, 1, 3)
    return blocks.reshape(-1, k * k).astype(np.int32)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
