"""Audio to 16 kHz: mlxtune's former FFT resampler vs scipy's resample_poly and soxr (HQ, what
transformers' `load_audio` and `librosa.load` use), on signals whose ideal 16 kHz version is known.

    python benchmarks/bench_resample.py [--seconds 2.0173] [--rates 8000,22050,44100,48000]

(scipy and soxr must be installed; the clips' lengths are not whole multiples of the rates'
ratios, as real clips' are not.) The test signals are sums of sinusoids, so they can be written
at any rate: a voice (110 Hz glottal harmonics through five formant resonances, a syllable
envelope, a fricative band up to the source's Nyquist), white and pink multisines, and tones
near both Nyquists. Every method has a transition band at the lower Nyquist, so the signals
have no component between 90% of it and 110% of 8 kHz: the ideal output is then exact, the
parts below, written at 16 kHz. Methods: `fft (old)`, `poly` (scipy.signal.resample_poly, its
default Kaiser window), `soxr` (soxr.resample, quality HQ) and `mlxtune` (what
mlxtune.data.media.resample does now). Printed per source rate and method, in dB:

- `ideal`: SNR against the ideal output, 50 ms from either end (higher is better);
- `edges`: the same over the first and last 20 ms (a signal that starts and stops abruptly);
- `alias`: output energy from the parts above 8.8 kHz alone, 50 ms from either end, relative
  to their input energy;
- `vs poly`, `vs soxr`: SNR of the method against that library (how closely it matches it);
  `noise vs ...` the same on white Gaussian samples (energy up to the source's Nyquist);
- tones: gain at 7.8 kHz, leak of 8.2 kHz, of a tone at 95% of the source's Nyquist, and for
  upsampling the image energy above the source's Nyquist; clicks: energy more than 5 ms
  before a click (pre-echo); ms per second of audio (30 s of white noise, best of 3).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

TARGET = 16_000
FORMANTS = [(700, 80), (1_220, 90), (2_600, 120), (3_500, 180), (4_500, 250)]


def fft_resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """mlxtune's resampler up to this benchmark (a brick-wall cut of the zero-padded clip's
    spectrum), kept here as the baseline it was measured as."""
    if rate == target:
        return x.astype(np.float32, copy=False)
    n = len(x)
    out_len = max(int(round(n * target / rate)), 1)
    pad = int(math.ceil(0.05 * rate))
    padded = np.pad(x.astype(np.float64), (pad, pad))
    total = len(padded)
    total_out = int(round(total * target / rate))
    spectrum = np.fft.rfft(padded)
    keep = min(len(spectrum), total_out // 2 + 1)
    resized = np.zeros(total_out // 2 + 1, dtype=np.complex128)
    resized[:keep] = spectrum[:keep]
    if total_out % 2 == 0 and keep == total_out // 2 + 1 and total_out < total:
        resized[-1] = resized[-1].real
    y = np.fft.irfft(resized, n=total_out) * (total_out / total)
    start = int(round(pad * target / rate))
    return y[start : start + out_len].astype(np.float32)


def poly(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    from scipy.signal import resample_poly

    g = math.gcd(rate, target)
    return resample_poly(x.astype(np.float64), target // g, rate // g).astype(np.float32)


def soxr_hq(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    import soxr

    return soxr.resample(x.astype(np.float32), rate, target, quality="HQ")


def pipeline(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    from mlxtune.data.media import resample

    return resample(x.astype(np.float32), rate, target)


METHODS = {"fft (old)": fft_resample, "poly": poly, "soxr": soxr_hq, "mlxtune": pipeline}


# ------------------------------------------------------------------------------- signals


def multisine(freqs, amps, phases, rate: int, seconds: float, envelope=None) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    out = np.zeros(len(t))
    for i in range(0, len(freqs), 64):  # in blocks: [64, n] at a time
        f, a, p = freqs[i : i + 64, None], amps[i : i + 64, None], phases[i : i + 64, None]
        out += (a * np.sin(2 * np.pi * f * t[None] + p)).sum(0)
    return out * (envelope(t) if envelope else 1.0)


def guard(rate: int) -> tuple[float, float]:
    """The band left empty: the methods' transitions, where the ideal output is a matter of
    choice (tested with tones instead)."""
    return 0.45 * min(rate, TARGET), 0.55 * TARGET


def components(kind: str, rate: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies, amplitudes) of one test signal at a source rate, none in the guard band."""
    top = 0.98 * rate / 2
    if kind == "voice":
        f = np.arange(110.0, top, 110.0)
        amp = 1.0 / (f / 110.0)  # glottal tilt with lip radiation: -6 dB per octave
        amp = amp * sum(
            1.0 / np.abs(1 - (f / fc) ** 2 + 1j * f * bw / fc**2) for fc, bw in FORMANTS
        )
        hiss = np.sort(rng.uniform(4_000.0, top, 200)) if top > 4_000 else np.zeros(0)
        f, amp = np.concatenate([f, hiss]), np.concatenate([amp, np.full(len(hiss), 0.02)])
    else:
        f = np.sort(rng.uniform(20.0, top, 600))
        amp = np.ones_like(f) if kind == "white" else 1.0 / np.sqrt(f / 20.0)
    low, high = guard(rate)
    keep = (f < low) | (f > high)
    return f[keep], amp[keep]


def test_signal(kind: str, rate: int, seconds: float):
    """(input at `rate`, ideal output at 16 kHz, input's part above GUARD)."""
    rng = np.random.default_rng(0)
    f, amp = components(kind, rate, rng)
    phases = rng.uniform(0, 2 * np.pi, len(f))

    def syllables(t):  # a 4 Hz syllable rhythm for the voice; flat otherwise
        return 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) if kind == "voice" else 1.0

    low = f < guard(rate)[0]
    x = multisine(f, amp, phases, rate, seconds, syllables)
    ideal = multisine(f[low], amp[low], phases[low], TARGET, seconds, syllables)
    high = multisine(f[~low], amp[~low], phases[~low], rate, seconds, syllables)
    scale = 0.5 / np.abs(x).max()
    return x * scale, ideal * scale, high * scale


def snr(ref: np.ndarray, got: np.ndarray, part: slice | np.ndarray = slice(None)) -> float:
    n = min(len(ref), len(got))
    ref, got = ref[:n][part], got[:n][part]
    return 10 * np.log10(np.sum(ref**2) / max(np.sum((got - ref) ** 2), 1e-30))


def db(a: np.ndarray, b: np.ndarray) -> float:
    """Energy of a relative to b, per sample, in dB."""
    return 10 * np.log10(max(np.mean(a**2), 1e-30) / np.mean(b**2))


# ------------------------------------------------------------------------------- metrics


def signal_rows(rate: int, seconds: float) -> list[tuple[str, dict[str, float]]]:
    rows = []
    interior = slice(int(0.05 * TARGET), -int(0.05 * TARGET))
    edge = np.r_[0 : int(0.02 * TARGET), -int(0.02 * TARGET) : 0]
    for kind in ("voice", "white", "pink"):
        x, ideal, high = test_signal(kind, rate, seconds)
        out = {m: fn(x, rate, TARGET) for m, fn in METHODS.items()}
        rows.append((f"{kind}: ideal", {m: snr(ideal, y, interior) for m, y in out.items()}))
        rows.append((f"{kind}: edges", {m: snr(ideal, y, edge) for m, y in out.items()}))
        rows.append(
            (f"{kind}: vs poly", {m: snr(out["poly"], y, interior) for m, y in out.items()})
        )
        rows.append(
            (f"{kind}: vs soxr", {m: snr(out["soxr"], y, interior) for m, y in out.items()})
        )
        if rate > TARGET and np.any(high):
            leak = {m: db(fn(high, rate, TARGET)[interior], high) for m, fn in METHODS.items()}
            rows.append((f"{kind}: alias", leak))
    return rows


def tone_rows(rate: int, seconds: float) -> list[tuple[str, dict[str, float]]]:
    t = np.arange(int(seconds * rate)) / rate
    middle = slice(int(0.05 * TARGET), -int(0.05 * TARGET))
    rows = []
    if rate > TARGET:
        for f, label in ((7_800.0, "tone 7.8k gain"), (8_200.0, "tone 8.2k leak"),
                         (0.95 * rate / 2, f"tone {0.95 * rate / 2000:.1f}k leak")):  # fmt: skip
            x = 0.5 * np.sin(2 * np.pi * f * t)
            rows.append(
                (label, {m: db(fn(x, rate, TARGET)[middle], x) for m, fn in METHODS.items()})
            )
    else:
        x = 0.5 * np.sin(2 * np.pi * 0.95 * rate / 2 * t)
        images = {}
        for m, fn in METHODS.items():
            y = fn(x, rate, TARGET)[middle]
            spectrum = np.fft.rfft(y * np.hanning(len(y)))
            above = np.fft.rfftfreq(len(y), 1 / TARGET) > rate / 2 * 1.01
            images[m] = 10 * np.log10(np.sum(np.abs(spectrum[above]) ** 2)
                                      / np.sum(np.abs(spectrum) ** 2))  # fmt: skip
        rows.append((f"tone {0.95 * rate / 2000:.2f}k image", images))
    click = np.zeros(len(t))
    click[len(t) // 2 + 1] = 1.0  # between two output samples, except from 8 kHz
    at = int((len(t) // 2 + 1) * TARGET / rate)
    pre = {}
    for m, fn in METHODS.items():
        y = fn(click, rate, TARGET).astype(np.float64)
        pre[m] = 10 * np.log10(
            max(np.sum(y[: at - int(0.005 * TARGET)] ** 2), 1e-30) / np.sum(y**2)
        )
    rows.append(("click pre-echo", pre))
    noise = np.random.default_rng(1).standard_normal(len(t)) * 0.1
    out = {m: fn(noise, rate, TARGET) for m, fn in METHODS.items()}
    rows.append(("noise vs poly", {m: snr(out["poly"], y, middle) for m, y in out.items()}))
    rows.append(("noise vs soxr", {m: snr(out["soxr"], y, middle) for m, y in out.items()}))
    return rows


def timing(rate: int) -> dict[str, float]:
    x = np.random.default_rng(2).standard_normal(30 * rate).astype(np.float32) * 0.1
    out = {}
    for m, fn in METHODS.items():
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            fn(x, rate, TARGET)
            best = min(best, time.perf_counter() - start)
        out[m] = best / 30 * 1000
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0173)
    p.add_argument("--rates", default="8000,22050,44100,48000")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        import scipy  # noqa: F401
        import soxr  # noqa: F401
    except ImportError as e:
        sys.exit(f"bench_resample needs scipy and soxr ({e}): pip install scipy soxr")
    names = list(METHODS)
    print(f"to {TARGET} Hz, {args.seconds:g} s signals; dB (see the docstring for each row)")
    for rate in map(int, args.rates.split(",")):
        print(f"\nfrom {rate} Hz" + "".join(f"{n:>11}" for n in names))
        for label, values in signal_rows(rate, args.seconds) + tone_rows(rate, args.seconds):
            print(f"  {label:20}" + "".join(f"{values[n]:11.1f}" for n in names))
        ms = timing(rate)
        print(f"  {'ms per s of audio':20}" + "".join(f"{ms[n]:11.3f}" for n in names))


if __name__ == "__main__":
    main()
