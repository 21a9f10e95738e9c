"""Tiny Gemma 3n: real feature-extractor settings, and the text decoder and audio tower run
in-process at batch 2. The full model (timm vision tower) is checked by test_tiny.py through
the torchvision subprocess (tests/_vision.py)."""

from __future__ import annotations

import numpy as np
import pytest

from mlxtune.tiny import make_tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SR = 16_000


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("gemma3n") / "ckpt", "gemma3n", seed=0)


def _audio(seconds: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(t.size) * 0.01
    return (0.3 * np.sin(2 * np.pi * 440 * t) + noise).astype(np.float32)


def test_feature_extractor_has_the_real_settings(ckpt):
    from transformers import Gemma3nAudioFeatureExtractor

    fe = Gemma3nAudioFeatureExtractor.from_pretrained(ckpt)
    assert (fe.sampling_rate, fe.feature_size) == (16_000, 128)
    assert (fe.frame_length, fe.hop_length, fe.fft_length) == (512, 160, 1024)
    assert (fe.min_frequency, fe.max_frequency) == (125.0, 7600.0)
    assert fe.preemphasis == 0.97 and fe.preemphasis_htk_flavor and fe.fft_overdrive
    assert float(fe.mel_floor) == 1e-5 and fe.per_bin_mean is None and fe.dither == 0.0
    out = fe([_audio(1.0, 0), _audio(0.5, 1)], return_tensors="np")
    assert out["input_features"].shape[0] == 2 and out["input_features"].shape[2] == 128
    assert out["input_features_mask"][1].sum() < out["input_features_mask"][0].sum()


def test_text_decoder_and_audio_tower_alone(ckpt):
    """What runs without timm: Gemma3nForCausalLM and Gemma3nAudioEncoder on our tensors."""
    from safetensors.torch import load_file
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        Gemma3nAudioEncoder,
        Gemma3nAudioFeatureExtractor,
        Gemma3nForCausalLM,
    )

    lm, info = Gemma3nForCausalLM.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert not [k for k in info["unexpected_keys"] if "language_model" in k]
    shared = [i for i, layer in enumerate(lm.model.layers) if layer.self_attn.is_kv_shared_layer]
    assert shared == [2, 3] and not hasattr(lm.model.layers[2].self_attn, "k_proj")
    tok = AutoTokenizer.from_pretrained(ckpt)
    batch = tok(["The quick brown fox " * 12, "Hello!"], return_tensors="pt", padding=True)
    assert batch["input_ids"].shape[1] > lm.config.sliding_window  # crosses the window
    with torch.no_grad():
        logits = lm(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()

    cfg = AutoConfig.from_pretrained(ckpt)
    tower = Gemma3nAudioEncoder(cfg.audio_config).eval()
    prefix = "model.audio_tower."
    weights = load_file(str(ckpt / "model.safetensors"))
    tower.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    feats = Gemma3nAudioFeatureExtractor.from_pretrained(ckpt)(
        [_audio(1.0, 0), _audio(0.6, 1)], return_tensors="pt"
    )
    with torch.no_grad():
        out = tower(feats["input_features"], ~feats["input_features_mask"])
    assert out.last_hidden_state.shape[0] == 2 and torch.isfinite(out.last_hidden_state).all()
