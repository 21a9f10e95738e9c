"""The whole Gemma 3n against transformers' `Gemma3nForConditionalGeneration` (run in the torchvision
subprocess, since its vision tower is timm's): each tower alone and after its embedder, logits of
text + image + audio rows at batch size 2 (with hard multimodal tokens in the text), and the loss
of mixed batches, packed or padded, against transformers row by row."""

from __future__ import annotations

import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from _gemma3n import hf_forward
from PIL import Image

from mlxtune import trainer
from mlxtune.config import load_config
from mlxtune.data.batching import collate, pack_media
from mlxtune.data.encode import Encoded

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def engine(tiny):
    cfg = load_config(None, [f"model.path={tiny('gemma3n')}", "model.dtype=float32",
                             "data.max_seq_len=1024", "data.packing=true"])  # fmt: skip
    return trainer.setup(cfg)


def _noise(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def examples(engine, tmp_path_factory):
    """Rows with an image and a clip each (16,000 samples at 16 kHz; 0.6 s of stereo at
    22.05 kHz), an image only, and text only; the two media rows start with one hard vision and
    one hard audio token (ids the tokenizer never makes, embedded by embed_vision / embed_audio)."""
    folder = tmp_path_factory.mktemp("g3n_media")
    _noise(300, 500, 1).save(folder / "a.png")
    _noise(1000, 700, 2).save(folder / "b.jpg", quality=95)
    t = np.arange(16_000) / 16_000
    sf.write(folder / "c.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16_000)
    t = np.arange(13_230) / 22_050
    sf.write(folder / "d.flac", np.stack([0.2 * np.sin(2 * np.pi * 220 * t)] * 2, 1), 22_050)

    def row(parts, answer):
        content = [{"type": k, k: v} for k, v in parts]
        return {"messages": [{"role": "user", "content": content},
                             {"role": "assistant", "content": answer}]}  # fmt: skip

    rows = [row([("image", "a.png"), ("text", "and the tone"), ("audio", "c.wav")], "Red, low."),
            row([("audio", "d.flac"), ("text", "then"), ("image", "b.jpg")], "High, blue."),
            row([("image", "b.jpg"), ("text", "What colour?")], "Blue."),
            row([("text", "Thank you, that is all.")], "No.")]  # fmt: skip
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = engine.dataset(str(folder / "rows.jsonl"))
    config = engine.loaded.config
    hard = [config["vision_config"]["vocab_offset"] + 5, config["audio_config"]["vocab_offset"] + 7]
    out = []
    for i, ex in enumerate(data.examples):
        if i < 2:  # after <bos>: the two hard tokens
            ids = np.concatenate([ex.ids[:1], hard, ex.ids[1:]]).astype(np.int32)
            loss = np.concatenate([ex.loss[:1], [False, False], ex.loss[1:]])
            media = tuple(replace(m, start=m.start + 2) for m in ex.media)
            ex = Encoded(ids, loss, ex.where, media)
        out.append(ex)
    return out


@pytest.fixture(scope="module")
def reference(engine, examples, tmp_path_factory):
    """transformers on each row alone, from the same ids, pixels and features."""
    return hf_forward(engine.loaded.path, examples, tmp_path_factory.mktemp("g3n_ref"))


def test_towers_alone_and_embedded_match_transformers(engine, examples, reference):
    model = engine.model
    images = [m for ex in examples[:2] for m in ex.media if m.kind == "image"]
    clips = [m for ex in examples[:2] for m in ex.media if m.kind == "audio"]
    assert [m.tokens for m in images] == [256, 256]
    assert [(m.tokens, m.soft) for m in clips] == [(188, 7), (188, 4)]
    arrays, take = pack_media(images, round_up=False)
    media = {k: mx.array(v) for k, v in arrays.items()} | {"image_take": mx.array(take)}
    rows = model.tower_tokens("image", media)  # the two pictures in one batch
    want = np.concatenate([reference["tower0"], reference["tower1"]]).reshape(-1, 2048)
    np.testing.assert_allclose(np.array(rows), want, atol=1e-4)
    embedded = model.image_features({"image_soft": rows})
    want = np.concatenate([reference["image0"], reference["image1"]]).reshape(embedded.shape)
    np.testing.assert_allclose(np.array(embedded), want, atol=1e-4)
    arrays, take = pack_media(clips, round_up=False)  # two lengths, one batch
    media = {k: mx.array(v) for k, v in arrays.items()} | {"audio_take": mx.array(take)}
    want = np.concatenate([reference["audio0"], reference["audio1"]])
    np.testing.assert_allclose(np.array(model.audio_features(media)), want, atol=1e-4)


def test_logits_match_transformers_at_batch_two(engine, examples, reference):
    """Text + image + audio in both rows (in either order), plus hard vision / audio tokens."""
    arrays = trainer.device_arrays(collate(examples, [[0], [1]], 1024), 64, engine.soft)
    ours = np.array(engine.model(arrays[0], media=arrays[-1]))
    for r in range(2):
        n = len(examples[r]) - 1
        np.testing.assert_allclose(ours[r, :n], reference[f"logits{r}"][0], atol=1e-3)


@pytest.mark.parametrize("layout", [[[0, 3], [1, 2]], [[0], [1], [2], [3]]],
                         ids=["packed", "padded"])  # fmt: skip
def test_mixed_batch_loss_equals_transformers_row_by_row(engine, examples, reference, layout):
    assert engine.split is not None and engine.masked
    arrays = trainer.device_arrays(collate(examples, layout, 1024), 64, engine.soft)
    ours = trainer.batch_loss(engine.model, engine.split, 16, *arrays)
    total = 0.0
    for r, ex in enumerate(examples):
        logits = torch.from_numpy(reference[f"logits{r}"][0])
        ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(ex.ids[1:].astype(np.int64)),
                                               reduction="none")  # fmt: skip
        total += float((ce * torch.from_numpy(ex.loss[1:].astype(np.float32))).sum())
    np.testing.assert_allclose(ours.item(), total, rtol=1e-4)
