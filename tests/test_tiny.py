"""Tiny checkpoints: deterministic, real special tokens and template, load in transformers with
exactly the tensor names and shapes that transformers itself writes."""

from __future__ import annotations

import json
import subprocess
import sys

import _vision
import numpy as np
import pytest
from safetensors.numpy import load_file

from mlxtune.tiny import ARCHS, Sizes, make_tiny

# The Auto class a user would load each family with.
AUTO_CLASS = {
    "llama": "AutoModelForCausalLM",
    "gemma4": "AutoModelForImageTextToText",
    "gemma3n": "AutoModelForImageTextToText",
    "llama4": "AutoModelForImageTextToText",
}
ARCH_CLASS = {
    "llama": "LlamaForCausalLM",
    "gemma4": "Gemma4ForConditionalGeneration",
    "gemma3n": "Gemma3nForConditionalGeneration",
    "llama4": "Llama4ForConditionalGeneration",
}


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    return arch, make_tiny(tmp_path_factory.mktemp(arch) / "ckpt", arch, seed=0)


def test_every_arch_has_a_loader():
    assert (
        set(ARCHS) == set(AUTO_CLASS) == set(ARCH_CLASS) == {"gemma4", "gemma3n", "llama4", "llama"}
    )


def test_deterministic_for_a_seed(tiny, tmp_path):
    arch, path = tiny
    again = make_tiny(tmp_path / "again", arch, seed=0)
    other = make_tiny(tmp_path / "other", arch, seed=1)
    a, b, c = (load_file(str(p / "model.safetensors")) for p in (path, again, other))
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    for name in ("tokenizer.json", "config.json", "chat_template.jinja"):
        assert (path / name).read_bytes() == (again / name).read_bytes()


def test_refuses_to_overwrite(tiny):
    arch, path = tiny
    with pytest.raises(FileExistsError):
        make_tiny(path, arch)


def test_tokenizer_keeps_special_tokens_whole(tiny):
    from transformers import AutoTokenizer

    arch, path = tiny
    tok = AutoTokenizer.from_pretrained(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    specials = [v["content"] for v in cfg["added_tokens_decoder"].values()]
    assert specials, "no special tokens"
    for s in specials:
        ids = tok.encode(s, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == s, s
    text = "héllo wörld 😀 The image is red."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    chat = [
        {"role": "user", "content": "What colour is this image?"},
        {"role": "assistant", "content": "The image is red."},
    ]
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert "What colour is this image?" in rendered and "The image is red." in rendered
    assert rendered.startswith(tok.bos_token)


def test_loads_in_transformers_with_its_own_names(tiny):
    """No missing/unexpected keys, and the same names and shapes save_pretrained writes.

    In the torchvision subprocess: Gemma 3n's vision tower is a timm model."""
    arch, path = tiny
    report = _vision.run("load_and_resave", path, AUTO_CLASS[arch])
    assert report.pop("class") == ARCH_CLASS[arch]
    assert all(not v for v in report.values()), report


def test_cli_writes_a_checkpoint(tmp_path):
    out = tmp_path / "llama"
    r = subprocess.run(
        [sys.executable, "-m", "mlxtune.tiny", str(out), "--arch", "llama", "--vocab-size", "1000"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 1000
    bad = subprocess.run(
        [sys.executable, "-m", "mlxtune.tiny", str(out), "--arch", "llama"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not empty" in bad.stderr and "Traceback" not in bad.stderr


def test_vocab_padding_and_sizes(tmp_path):
    path = make_tiny(
        tmp_path / "big", "llama", sizes=Sizes(hidden_size=32, num_layers=1, vocab_size=4096)
    )
    w = load_file(str(path / "model.safetensors"))
    assert w["model.embed_tokens.weight"].shape == (4096, 32)
    assert not any(k.startswith("model.layers.1.") for k in w)


# A 768 x 1024 image and (Gemma) 1 s of audio through each family's own AutoProcessor, with the
# counts the released processors produce: Gemma 4 resizes to 672 x 912 at the 280 budget
# (14 x 19 pooled patches) and spends 40 ms per audio token; Gemma 3n is fixed at 256 + 188;
# Llama 4 cuts a 3 x 4 grid of 336 px tiles plus a global tile, 144 tokens each.
PROCESSED = {
    "gemma4": {"image_tokens": 266, "audio_tokens": 25},
    "gemma3n": {"image_tokens": 256, "audio_tokens": 188},
    "llama4": {
        "image_tokens": 13 * 144,
        "audio_tokens": 0,
        "pixel_values_shape": [13, 3, 336, 336],
    },
}


@pytest.mark.parametrize("arch", sorted(PROCESSED))
def test_auto_processor_feeds_the_model(arch, tmp_path):
    path = make_tiny(tmp_path / arch, arch)
    report = _vision.run("processor_forward", path, arch)
    assert report["class"] == ARCH_CLASS[arch] and report["finite"]
    assert {k: report[k] for k in PROCESSED[arch]} == PROCESSED[arch]
    assert report["logits_shape"][2] == report["vocab_size"]
