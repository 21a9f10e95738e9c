"""Tiny Gemma 4: the processor configs load with the real defaults, and text + image + audio run
through transformers' Gemma4ForConditionalGeneration with the placeholders expanded as
processing_gemma4.py expands them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlxtune.tiny import make_tiny

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("gemma4") / "ckpt", "gemma4", seed=0)


def _processors(path):
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return (
        Gemma4ImageProcessorPil.from_pretrained(path),
        Gemma4AudioFeatureExtractor.from_pretrained(path),
    )


def test_processors_load_with_real_defaults(ckpt):
    images, audio = _processors(ckpt)
    assert (images.patch_size, images.pooling_kernel_size, images.max_soft_tokens) == (16, 3, 280)
    assert images.do_rescale and not images.do_normalize and images.rescale_factor == 1 / 255
    assert (audio.sampling_rate, audio.feature_size) == (16000, 128)
    assert (audio.frame_length, audio.hop_length, audio.fft_length) == (320, 160, 512)
    # The towers must agree with what the processors emit.
    config = json.loads((ckpt / "config.json").read_text())
    vision = config["vision_config"]
    assert (vision["patch_size"], vision["pooling_kernel_size"]) == (16, 3)
    assert config["audio_config"]["subsampling_conv_channels"][0] == audio.feature_size


def _audio_soft_tokens(mask: np.ndarray) -> int:
    # processing_gemma4.replace_audio_token: the mask through two stride-2 convs (kernel 3, pad 1).
    for _ in range(2):
        t_out = (len(mask) + 2 - 3) // 2 + 1
        mask = mask[::2][:t_out]
    return int(mask.sum())


def test_forward_with_text_image_and_audio(ckpt):
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, Gemma4ForConditionalGeneration

    images, audio = _processors(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = Gemma4ForConditionalGeneration.from_pretrained(ckpt).eval()

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    pix = images(images=[picture], max_soft_tokens=70, return_tensors="pt")
    clip = np.sin(2 * np.pi * 440 * np.arange(8000) / 16000).astype(np.float32)  # 0.5 s
    mel = audio([clip], return_tensors="pt")

    chat = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "What colour is this image? Is this tone high?"},
                {"type": "audio"},
            ],
        }
    ]
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    n_image = int(pix["num_soft_tokens_per_image"][0])
    n_audio = _audio_soft_tokens(mel["input_features_mask"][0].numpy())
    assert n_image > 0 and n_audio > 0
    prompt = prompt.replace(
        tok.image_token, tok.boi_token + tok.image_token * n_image + tok.eoi_token
    ).replace(tok.audio_token, tok.boa_token + tok.audio_token * n_audio + tok.eoa_token)
    enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
    ids = enc["input_ids"]
    assert (ids == model.config.image_token_id).sum() == n_image
    assert (ids == model.config.audio_token_id).sum() == n_audio

    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=enc["attention_mask"],
            pixel_values=pix["pixel_values"],
            image_position_ids=pix["image_position_ids"],
            input_features=mel["input_features"],
            input_features_mask=mel["input_features_mask"],
        )
    assert out.logits.shape == (1, ids.shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    assert out.image_hidden_states.shape[0] == n_image
