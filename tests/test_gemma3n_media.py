"""Gemma 3n's processing against transformers' own processors: pixels, mel features, how many
placeholders a clip gets and how many of them the audio tower fills, and the token ids of whole
rows (Gemma3nProcessor, in the torchvision subprocess)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mlxtune.data import gemma3n_media as g3
from mlxtune.data.media import MediaPlan
from mlxtune.errors import ConfigError, DataError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def plan(tiny):
    folder = tiny("gemma3n")
    return MediaPlan.from_checkpoint(folder, json.loads((folder / "config.json").read_text()))


def test_plan_reads_the_checkpoint(plan):
    assert plan.image == g3.FixedImageSpec(768, 768, 2, 256)
    assert (plan.audio.tokens, plan.audio.frames_per_token) == (188, 16)
    assert (plan.audio.frame_length, plan.audio.hop_length, plan.audio.fft_length) == (
        512,
        160,
        1024,
    )
    assert plan.around == "\n\n"


@pytest.mark.parametrize("size", [(768, 768), (300, 500), (1000, 700), (17, 2000)])
def test_pixels_equal_siglip_pil_processor(tiny, size):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    pre = json.loads((tiny("gemma3n") / "preprocessor_config.json").read_text())
    keys = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize")
    ref = SiglipImageProcessorPil(**{k: pre[k] for k in keys})
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    want = ref(images=img, return_tensors="np")["pixel_values"][0]
    got = g3.resize(img, g3.FixedImageSpec()).astype(np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(got, want, atol=1e-7)


def test_features_equal_the_feature_extractor_and_rows_the_tower_fills(tiny, tmp_path):
    """Features of lone clips of many lengths; the placeholders each gets (188, always) and how
    many of them hold tower output: the rows transformers' audio tower leaves unmasked."""
    from safetensors.torch import load_file
    from transformers import Gemma3nAudioEncoder, Gemma3nAudioFeatureExtractor, Gemma3nConfig

    folder = tiny("gemma3n")
    fe = Gemma3nAudioFeatureExtractor.from_pretrained(folder)
    tower = Gemma3nAudioEncoder(Gemma3nConfig.from_pretrained(folder).audio_config).eval()
    prefix = "model.audio_tower."
    state = {k[len(prefix) :]: v for k, v in load_file(str(folder / "model.safetensors")).items()
             if k.startswith(prefix)}  # fmt: skip
    tower.load_state_dict(state)
    spec = g3.USMAudioSpec()
    rng = np.random.default_rng(0)
    for n in [513, 700, 2_560, 16_000, 16_001, 33_333, 480_000]:
        clip = (0.1 * rng.standard_normal(n)).astype(np.float32)
        ref = fe(clip, return_tensors="np")
        features, mask = ref["input_features"][0], ref["input_features_mask"][0]
        np.testing.assert_allclose(g3.log_mel(clip, spec), features, atol=1e-6)
        with torch.no_grad():
            out = tower(torch.from_numpy(features)[None], torch.from_numpy(~mask)[None])
        filled = int((~out.audio_mel_mask).sum())
        path = tmp_path / f"{n}.wav"
        sf.write(path, clip, 16_000, subtype="FLOAT")
        assert spec.count(path, "x") == (188, filled), n


def test_too_short_clip_and_image_budget_are_clear_errors(tiny, tmp_path):
    path = tmp_path / "click.wav"
    sf.write(path, np.zeros(400, np.float32), 16_000)
    with pytest.raises(DataError) as e:
        g3.USMAudioSpec().count(path, "data.jsonl:3: messages[0].content[1].audio")
    assert str(e.value) == (
        f"data.jsonl:3: messages[0].content[1].audio: {path}: the audio clip is too short "
        "(400 samples; at least 513 at 16000 Hz)"
    )
    folder = tiny("gemma3n")
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"^data.image_soft_tokens: Gemma 3n takes a fixed 256"):
        MediaPlan.from_checkpoint(folder, config, image_budget=280)


def test_row_ids_equal_gemma3n_processor(tiny, tmp_path):
    """Our token ids for rows mixing text, pictures and clips equal those of transformers'
    Gemma3nProcessor (AutoProcessor, torchvision-based: run in the vision subprocess), with the
    blank lines it puts around each picture's and clip's tokens."""
    import _vision

    from mlxtune import trainer
    from mlxtune.config import load_config

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    t = np.arange(12_000) / 16_000
    sf.write(tmp_path / "c.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16_000)

    def row(parts, answer):
        content = [{"type": k, k: v} for k, v in parts]
        return {"messages": [{"role": "user", "content": content},
                             {"role": "assistant", "content": answer}]}  # fmt: skip

    rows = [row([("text", "Compare"), ("image", "a.png"), ("text", "with"), ("audio", "c.wav")],
                "Red, low."),
            row([("audio", "c.wav"), ("text", "Pitch?")], "Low."),
            row([("image", "a.png")], "Red."),
            row([("text", "Thank you.")], "No.")]  # fmt: skip
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"model.path={tiny('gemma3n')}", "data.max_seq_len=2048"])
    data = trainer.setup(cfg).dataset(str(tmp_path / "rows.jsonl"))
    got = _vision.run("processor_ids", tiny("gemma3n"), tmp_path / "rows.jsonl")
    assert got["ids"] == [ex.ids.tolist() for ex in data.examples]
