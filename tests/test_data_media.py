"""Hostile and unusual media files: images past pillow's decompression-bomb limit, broken files,
sizes read from headers alone (EXIF orientation included), and audio at other rates resampled
as transformers' own `load_audio` resamples it."""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from _cli import mlxtune
from PIL import Image, PngImagePlugin

from mlxtune.config import load_config
from mlxtune.data import check, media
from mlxtune.data.batching import prepare
from mlxtune.data.rows import read_rows
from mlxtune.errors import DataError

# ------------------------------------------------------------------------------------ images


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """[(type, data)] of a PNG file."""
    out, at = [], 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        out.append((kind, data[at + 8 : at + 8 + length]))
        at += 12 + length
    return out


def png_bytes(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))
                    for k, d in chunks)  # fmt: skip
    return b"\x89PNG\r\n\x1a\n" + body


def claimed_png(path: Path, width: int, height: int) -> Path:
    """A real 1 x 1 PNG whose header (IHDR, CRC fixed) claims width x height: pillow opens it
    and reports that size; decoding its pixels fails (a few bytes of data)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 30, 30)).save(buf, "PNG")
    chunks = png_chunks(buf.getvalue())
    assert chunks[0][0] == b"IHDR"
    chunks[0] = (b"IHDR", struct.pack(">II", width, height) + chunks[0][1][8:])
    path.write_bytes(png_bytes(chunks))
    return path


def chat(*images: str) -> str:
    pictures = [{"type": "image", "image": i} for i in images]
    user = {"role": "user", "content": [{"type": "text", "text": "What colour?"}, *pictures]}
    return json.dumps({"messages": [user, {"role": "assistant", "content": "Red."}]})


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> Path:
    """Rows 2 and 4 hold images past the limit (20,000 x 20,000: pillow's error; 10,000 x 10,000:
    its warning), between good rows."""
    folder = tmp_path_factory.mktemp("bombs")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "red.png")
    claimed_png(folder / "bomb.png", 20_000, 20_000)
    claimed_png(folder / "big.png", 10_000, 10_000)
    rows = [chat("red.png"), chat("red.png", "bomb.png"), chat("red.png"), chat("big.png"),
            chat("red.png")]  # fmt: skip
    (folder / "rows.jsonl").write_text("\n".join(rows) + "\n")
    return folder / "rows.jsonl"


@pytest.mark.parametrize("arch", ["gemma4", "gemma3n", None])
def test_a_decompression_bomb_is_one_line_and_validation_goes_on(tiny, bombs, arch):
    model = ["--model", tiny(arch)] if arch else []
    r = mlxtune("data", "validate", bombs, *model)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    out = [line for line in r.stdout.splitlines() if not line.startswith("token lengths")]
    assert out[0] == f"{bombs}: 5 rows, 3 ok, 2 with errors"
    limit = f"over pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,}"
    assert out[1:] == [
        f"{bombs}:2: messages[0].content[2].image: {bombs.parent / 'bomb.png'}: "
        f"400,000,000 pixels, {limit} (PIL.Image.MAX_IMAGE_PIXELS)",
        f"{bombs}:4: messages[0].content[1].image: {bombs.parent / 'big.png'}: "
        f"100,000,000 pixels, {limit} (PIL.Image.MAX_IMAGE_PIXELS)",
    ]


def test_counting_tokens_reads_the_header_only(tiny, tmp_path):
    """A 9,000 x 6,000 header (under the limit) over one pixel of data: its soft tokens are
    counted from the header; decoding fails, which validation reports and counting need not."""
    claimed_png(tmp_path / "huge.png", 9_000, 6_000)
    assert media.image_size(tmp_path / "huge.png", "x") == (6_000, 9_000)
    assert media.ImageSpec().count(tmp_path / "huge.png", "x") == (260, 260)  # 624 x 960 px
    with pytest.raises(DataError, match=r"^x: .*huge.png: cannot decode the image \("):
        media.open_image(tmp_path / "huge.png", "x")

    (tmp_path / "rows.jsonl").write_text(chat("huge.png") + "\n")
    cfg = load_config(None, [f"model.path={tiny('gemma4')}", "data.max_seq_len=1024"])
    model = check.tokenizing(cfg)
    counted = check.check(tmp_path / "rows.jsonl", cfg, model, decode=False)
    assert counted.problems == [] and counted.lengths[0] > 260
    checked = check.check(tmp_path / "rows.jsonl", cfg, model)
    assert checked.bad_rows == 1 and "cannot decode the image" in checked.problems[0]
    # Training decodes every picture before it starts, as counting no longer does.
    with pytest.raises(DataError, match=r"rows.jsonl:1: messages\[0\].content\[1\].image: .*"
                                        r"cannot decode the image"):  # fmt: skip
        prepare(read_rows(tmp_path / "rows.jsonl"), model.tokenizer, 1024, media=model.media)


def orientation_files(folder: Path) -> dict[str, Path]:
    """Pictures of 40 x 20 stored pixels, turned (or not) by EXIF or XMP metadata written in
    different places: before or after a PNG's pixel data, in JPEG, WebP and TIFF files."""
    Image.init()  # every format plugin, so Image.SAVE lists them all
    img = Image.new("RGB", (40, 20), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: shown 20 wide, 40 high
    files = {}
    for name, fmt, extra in [("plain.png", "PNG", {}), ("exif.png", "PNG", {"exif": exif}),
                             ("exif.jpg", "JPEG", {"exif": exif}),
                             ("exif.webp", "WEBP", {"exif": exif}),
                             ("exif.tiff", "TIFF", {"exif": exif}),
                             ("exif.avif", "AVIF", {"exif": exif})]:  # fmt: skip
        if fmt in Image.SAVE:  # AVIF where this pillow writes it
            img.save(folder / name, fmt, **extra)
            files[name] = folder / name
    xmp = PngImagePlugin.PngInfo()
    xmp.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="8"/>'
                                      "</x:xmpmeta>")  # fmt: skip
    img.save(folder / "xmp.png", "PNG", pnginfo=xmp)
    for name, kind in [("exif.png", b"eXIf"), ("xmp.png", b"iTXt")]:  # now after the pixels
        chunks = png_chunks((folder / name).read_bytes())
        meta = [c for c in chunks if c[0] == kind]
        rest = [c for c in chunks if c[0] != kind]
        late = folder / f"late-{name}"
        late.write_bytes(png_bytes(rest[:-1] + meta + rest[-1:]))
        files[late.name] = late
    return files


def test_header_size_is_the_decoded_upright_size(tmp_path):
    files = orientation_files(tmp_path)
    turned = set()
    for name, path in files.items():
        img = media.open_image(path, "x")
        assert media.image_size(path, "x") == (img.height, img.width), name
        if img.size == (20, 40):
            turned.add(name)
    assert turned == set(files) - {"plain.png"}
    assert len(files) >= 8


@pytest.mark.filterwarnings("ignore::UserWarning")  # pillow on corrupt TIFF tags
def test_broken_images_are_data_errors_never_tracebacks(tmp_path):
    """Cuts and corrupted header bytes of PNG, JPEG, WebP, BMP, TIFF and AVIF files: each file
    opens or raises DataError. Pillow fails in many ways: OSError, EOFError, struct.error,
    RuntimeError (AVIF), DecompressionBombError (a BMP's size field hit)..."""
    Image.init()
    rng = np.random.default_rng(0)
    pixels = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    variants = []
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "AVIF"):
        if fmt not in Image.SAVE:
            continue
        buf = io.BytesIO()
        pixels.save(buf, fmt)
        good = buf.getvalue()
        variants += [good[:n] for n in range(0, len(good), max(1, len(good) // 60))]
        for _ in range(150):
            bad = bytearray(good)
            for at in rng.integers(0, min(len(good), 200), int(rng.integers(1, 4))):
                bad[at] = int(rng.integers(0, 256))
            variants.append(bytes(bad))
    path = tmp_path / "broken"
    for read in (media.open_image, media.image_size):
        for data in variants:
            path.write_bytes(data)
            try:
                read(path, "x")
            except DataError as e:
                assert str(e).startswith(f"x: {path}: "), e


# ------------------------------------------------------------------------------------- audio


def voice(rate: int, seconds: float) -> np.ndarray:
    """A speech-like clip: 110 Hz glottal harmonics up to the Nyquist through formants, a
    syllable rhythm and a little hiss."""
    t = np.arange(int(round(seconds * rate))) / rate
    f = np.arange(110.0, rate / 2, 110.0)
    amp = sum(1 / np.abs(1 - (f / fc) ** 2 + 1j * f * bw / fc**2)
              for fc, bw in [(700, 80), (1_220, 90), (2_600, 120)]) * 110 / f  # fmt: skip
    x = (amp[:, None] * np.sin(2 * np.pi * f[:, None] * t[None])).sum(0)
    x *= 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)
    x += 0.01 * np.random.default_rng(rate).standard_normal(len(t))
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


@pytest.mark.parametrize("rate, channels", [(44_100, 2), (8_000, 1), (22_050, 1), (48_000, 2)])
def test_other_rates_resample_exactly_as_transformers_load_audio(tmp_path, rate, channels):
    """transformers' `load_audio` (soundfile + soxr, as librosa.load) is what its processors are
    fed: our 16 kHz samples equal it, at lengths that are no whole multiple of the ratio."""
    from transformers.audio_utils import load_audio

    clip = voice(rate, 1.2345)
    clip = np.stack([clip, -0.5 * clip], 1) if channels == 2 else clip
    path = tmp_path / f"v{rate}.wav"
    sf.write(path, clip, rate, subtype="FLOAT")
    ours = media.read_audio(path, "x", media.AudioSpec())
    theirs = load_audio(str(path), 16_000, backend="soundfile")
    assert len(ours) == math.ceil(len(clip) * 16_000 / rate) == len(theirs)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_tones_past_the_new_nyquist_are_suppressed_and_16k_is_untouched(tmp_path):
    """At 44.1 kHz, 8.2 and 12 kHz tones (which would alias to 7.8 and 4 kHz) come out over
    120 dB below a 1 kHz tone kept at its level; a 16 kHz file's samples come back as written."""
    rate = 44_100
    t = np.arange(2 * rate) / rate
    low = 0.3 * np.sin(2 * np.pi * 1_000 * t)
    high = 0.3 * np.sin(2 * np.pi * 8_200 * t) + 0.3 * np.sin(2 * np.pi * 12_000 * t)
    sf.write(tmp_path / "tones.wav", (low + high).astype(np.float32), rate, subtype="FLOAT")
    sf.write(tmp_path / "high.wav", high.astype(np.float32), rate, subtype="FLOAT")
    spec = media.AudioSpec()
    middle = slice(1_600, -1_600)  # 0.1 s from either end
    kept = media.read_audio(tmp_path / "tones.wav", "x", spec)[middle]
    want = 0.3 * np.sin(2 * np.pi * 1_000 * np.arange(32_000) / 16_000)[middle]
    np.testing.assert_allclose(kept, want, atol=1e-4)
    left = media.read_audio(tmp_path / "high.wav", "x", spec)[middle]
    assert 10 * np.log10(np.mean(left.astype(np.float64) ** 2) / np.mean(want**2)) < -120

    same = voice(16_000, 0.77)
    sf.write(tmp_path / "same.wav", same, 16_000, subtype="FLOAT")
    np.testing.assert_array_equal(media.read_audio(tmp_path / "same.wav", "x", spec), same)
