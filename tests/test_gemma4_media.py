"""Gemma 4 with images and audio, against transformers on CPU torch (fp32): the processors'
numbers, each tower alone, and the logits and loss of whole multimodal batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import _vision  # noqa: E402
import soundfile as sf  # noqa: E402
from _gemma4 import feature_extractor, hf_inputs, image_processor  # noqa: E402
from PIL import Image  # noqa: E402

from mlxtune import trainer  # noqa: E402
from mlxtune.config import load_config  # noqa: E402
from mlxtune.data import media  # noqa: E402
from mlxtune.data.batching import collate  # noqa: E402

SIZES = [(48, 48), (31, 517), (1000, 7), (333, 777), (768, 1024), (17, 17), (500, 499)]


def noise_image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("budget", [70, 280, 1120])
def test_image_patches_match_transformers(budget):
    spec = media.ImageSpec(max_soft_tokens=budget)
    for h, w in SIZES:
        img = noise_image(h, w)
        ref = image_processor()(images=[img], max_soft_tokens=budget, return_tensors="np")
        patches, positions = media.image_patches(img, spec)
        n = len(patches)
        assert (
            n == 9 * int(ref["num_soft_tokens_per_image"][0]) == 9 * media.image_tokens(h, w, spec)
        )
        np.testing.assert_array_equal(ref["image_position_ids"][0][:n], positions)
        assert (ref["image_position_ids"][0][n:] == -1).all()
        np.testing.assert_array_equal(ref["pixel_values"][0][:n], patches.astype(np.float32) / 255)


def test_exif_orientation_and_mode_are_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("L", (40, 20), 128).save(tmp_path / "turned.jpg", exif=exif)
    img = media.open_image(tmp_path / "turned.jpg", "x")
    assert (img.width, img.height, img.mode) == (20, 40, "RGB")


def _placeholders_by_processor(features_mask: np.ndarray) -> int:
    # processing_gemma4.Gemma4Processor.replace_audio_token: the mask through two stride-2 convs
    mask, t = features_mask, len(features_mask)
    for _ in range(2):
        t_out = (t + 2 - 3) // 2 + 1
        mask = mask[::2][:t_out]
        t = len(mask)
    return int(mask.sum())


def test_audio_features_and_placeholder_counts_match_transformers():
    rng = np.random.default_rng(0)
    lengths = [16_160, 162, 400, 16_000, 16_001, 31_999, 480_000]
    lengths += rng.integers(200, 100_000, 25).tolist()
    spec, extractor = media.AudioSpec(), feature_extractor()
    for n in lengths:
        clip = (0.1 * rng.standard_normal(n)).astype(np.float32)
        ref = extractor([clip], return_tensors="np")
        features, valid = media.log_mel(clip, spec)
        np.testing.assert_array_equal(valid, ref["input_features_mask"][0])
        np.testing.assert_allclose(features, ref["input_features"][0], atol=1e-5)
        count = _placeholders_by_processor(ref["input_features_mask"][0])
        assert media.audio_tokens(n, spec) == count, n
        assert media.audio_tokens_from_valid(int(valid.sum())) == count
    assert media.audio_tokens(16_160, spec) == 25  # mlx-vlm's ceil(ms / 40) says 26


def test_any_rate_and_channels_become_16k_mono(tmp_path):
    t = np.arange(44_100) / 44_100
    stereo = np.stack([0.2 * np.sin(2 * np.pi * 440 * t), 0.4 * np.sin(2 * np.pi * 440 * t)], 1)
    sf.write(tmp_path / "a.wav", stereo.astype(np.float32), 44_100, subtype="FLOAT")
    got = media.read_audio(tmp_path / "a.wav", "x", media.AudioSpec())
    want = 0.3 * np.sin(2 * np.pi * 440 * np.arange(16_000) / 16_000)
    assert len(got) == 16_000
    np.testing.assert_allclose(got[800:-800], want[800:-800], atol=2e-3)


# ------------------------------------------------------------------ towers and whole batches


@pytest.fixture(scope="module")
def hf(tiny):
    from transformers import Gemma4ForConditionalGeneration

    return Gemma4ForConditionalGeneration.from_pretrained(
        tiny("gemma4"), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def engine(tiny):
    cfg = load_config(None, [f"model.path={tiny('gemma4')}", "model.dtype=float32",
                             "data.image_soft_tokens=70", "data.max_seq_len=1024"])  # fmt: skip
    return trainer.setup(cfg)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two images of odd sizes, two clips (16,160 samples at 16 kHz; 1.7 s of stereo at 22.05
    kHz), and rows mixing them with text: one row of every kind."""
    folder = tmp_path_factory.mktemp("media")
    noise_image(100, 150, 1).save(folder / "a.png")
    noise_image(230, 90, 2).save(folder / "b.jpg", quality=95)
    t = np.arange(16_160) / 16_000
    sf.write(folder / "c.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16_000)
    t = np.arange(37_485) / 22_050
    tone = 0.2 * np.sin(2 * np.pi * 220 * t)
    sf.write(folder / "d.flac", np.stack([tone, -tone], 1), 22_050)

    def user(*parts):
        return {"role": "user", "content": list(parts)}

    def text(s):
        return {"type": "text", "text": s}

    rows = {
        "mixed": [user(text("Compare"), {"type": "image", "image": "a.png"}, text("and"),
                       {"type": "image", "image": "b.jpg"}, text("with the tone"),
                       {"type": "audio", "audio": "c.wav"})],
        "image": [user({"type": "image", "image": "b.jpg"}, text("What colour is this image?"))],
        "audio": [user(text("Is this tone high, mid or low?"), {"type": "audio", "audio": "d.flac"})],
        "text": [user(text("Thank you, that is all."))],
    }  # fmt: skip
    lines = []
    for i, messages in enumerate(rows.values()):
        answer = ["The image is red.", "The tone is low.", "Yes.", "No."][i]
        lines.append(
            json.dumps({"messages": [*messages, {"role": "assistant", "content": answer}]})
        )
    (folder / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_towers_alone_match_transformers(engine, hf, files):
    """Each tower's own output, and after its embedder, for three pictures of odd sizes and two
    clips of other lengths and rates, batched together as training batches them."""
    model = engine.model
    data = engine.dataset(str(files / "rows.jsonl"))
    m = trainer.device_arrays(collate(data.examples, [[0], [1], [2]], 1024), 64)[-1]
    rows = [json.loads(line) for line in (files / "rows.jsonl").read_text().splitlines()]
    tower, embedded = [], []
    with torch.no_grad():
        for x in (hf_inputs(files, rows[0]), hf_inputs(files, rows[1])):
            out = hf.model.get_image_features(x["pixel_values"], x["image_position_ids"])
            tower.append(out.last_hidden_state)
            embedded += list(out.pooler_output)
        np.testing.assert_allclose(np.array(model.tower_tokens("image", m)),
                                   torch.cat(tower).numpy(), atol=1e-4)  # fmt: skip
        np.testing.assert_allclose(np.array(model.image_features(m)),
                                   torch.cat(embedded).numpy(), atol=1e-4)  # fmt: skip
        tower, embedded = [], []
        for x in (hf_inputs(files, rows[0]), hf_inputs(files, rows[2])):
            out = hf.model.audio_tower(x["input_features"], x["input_features_mask"])
            tower.append(out.last_hidden_state[out.attention_mask])
            embedded.append(hf.model.embed_audio(tower[-1]))
        np.testing.assert_allclose(np.array(model.tower_tokens("audio", m)),
                                   torch.cat(tower).numpy(), atol=1e-4)  # fmt: skip
        np.testing.assert_allclose(np.array(model.audio_features(m)),
                                   torch.cat(embedded).numpy(), atol=1e-4)  # fmt: skip


def test_logits_match_transformers_for_text_two_images_and_audio(engine, hf, files):
    data = engine.dataset(str(files / "rows.jsonl"))
    ex = data.examples[0]
    assert [(m.kind, m.tokens) for m in ex.media] == [("image", 60), ("image", 65), ("audio", 25)]
    arrays = trainer.device_arrays(collate(data.examples, [[0]], 1024), 64)
    ours = np.array(engine.model(arrays[0], media=arrays[-1]))[0, : len(ex) - 1]
    row = json.loads((files / "rows.jsonl").read_text().splitlines()[0])
    with torch.no_grad():
        ids = torch.tensor(ex.ids[None, :-1].astype(np.int64))
        theirs = hf(input_ids=ids, **hf_inputs(files, row)).logits[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-3)


@pytest.mark.parametrize(
    "layout", [[[0, 3], [1, 2]], [[0], [1], [2], [3]]], ids=["packed", "padded"]
)
@pytest.mark.parametrize("cached", [False, True], ids=["towers-in-step", "soft-token-cache"])
def test_mixed_batch_loss_equals_transformers_one_by_one(engine, hf, files, layout, cached):
    """Text-only, image, audio and image+audio rows in one batch, packed or padded, the towers
    run in the step or their soft tokens taken from the cache: the chunked loss over the batch
    equals the sum of transformers' losses on each row alone."""
    data = engine.dataset(str(files / "rows.jsonl"))
    batch = collate(data.examples, layout, 1024)
    arrays = trainer.device_arrays(batch, 64, engine.soft if cached else None)
    assert ("image_soft" in arrays[-1]) == cached
    ours = trainer.batch_loss(engine.model, engine.split, 16, *arrays)
    rows = [json.loads(line) for line in (files / "rows.jsonl").read_text().splitlines()]
    total = 0.0
    for ex, row in zip(data.examples, rows, strict=True):
        ids = torch.tensor(ex.ids[None].astype(np.int64))
        with torch.no_grad():
            logits = hf(input_ids=ids[:, :-1], **hf_inputs(files, row)).logits[0]
        ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        total += float((ce * torch.tensor(ex.loss[1:].astype(np.float32))).sum())
    assert engine.split is not None
    np.testing.assert_allclose(ours.item(), total, rtol=1e-4)


def test_soft_tokens_and_prompts_carry_no_loss(engine, files):
    data = engine.dataset(str(files / "rows.jsonl"))
    soft = {engine.media.tokens.image, engine.media.tokens.audio}
    for ex in data.examples:
        assert not any(ex.loss[np.isin(ex.ids, list(soft))])
        for item in ex.media:
            assert not ex.loss[item.start : item.start + item.tokens + 2].any()
        answer = engine.loaded.tokenizer.decode(ex.ids[ex.loss].tolist())
        assert answer.strip().startswith(("The", "Yes", "No")), answer


def test_placeholders_expand_as_gemma4_processor_does(tiny, engine, files):
    """Our token ids for each row equal those of transformers' Gemma4Processor (AutoProcessor,
    which needs torchvision: run in the vision subprocess)."""
    data = engine.dataset(str(files / "rows.jsonl"))
    got = _vision.run("processor_ids", tiny("gemma4"), files / "rows.jsonl", 70)
    assert got["ids"] == [ex.ids.tolist() for ex in data.examples]


def test_truncation_never_cuts_through_media(engine, files):
    data = engine.dataset(str(files / "rows.jsonl"))
    ex = data.examples[0]  # image at 12 (62 tokens), image at 76 (67), audio at 147 (27)
    cut = ex.truncate(100)
    assert len(cut) == 76 and [m.kind for m in cut.media] == ["image"]
    assert len(ex.truncate(180)) == 180 and len(ex.truncate(180).media) == 3


@pytest.fixture(scope="module")
def bidirectional(tiny, tmp_path_factory):
    """The tiny Gemma 4 as the larger models are: image tokens attend both ways in sliding
    layers (text_config.use_bidirectional_attention: vision)."""
    import shutil

    folder = tmp_path_factory.mktemp("bidir") / "ckpt"
    shutil.copytree(tiny("gemma4"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["use_bidirectional_attention"] = "vision"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_bidirectional_vision_attention_matches_transformers(bidirectional, files):
    from mlx_lm.models.cache import make_prompt_cache
    from transformers import Gemma4ForConditionalGeneration

    cfg = load_config(None, [f"model.path={bidirectional}", "model.dtype=float32",
                             "data.image_soft_tokens=70", "data.max_seq_len=1024"])  # fmt: skip
    engine = trainer.setup(cfg)
    assert engine.model.bidirectional
    data = engine.dataset(str(files / "rows.jsonl"))
    ex = data.examples[0]  # two images and a clip
    row = json.loads((files / "rows.jsonl").read_text().splitlines()[0])
    hf = Gemma4ForConditionalGeneration.from_pretrained(bidirectional, dtype=torch.float32).eval()
    ids = torch.tensor(ex.ids[None, :-1].astype(np.int64))
    types = torch.where(ids == hf.config.image_token_id, 1, 0)
    types = torch.where(ids == hf.config.audio_token_id, 3, types)
    with torch.no_grad():
        theirs = hf(input_ids=ids, mm_token_type_ids=types, **hf_inputs(files, row)).logits[0]
        causal = hf(input_ids=ids, **hf_inputs(files, row)).logits[0]
    assert (theirs - causal).abs().max() > 1e-2  # the blocks do change the answer
    inputs, segments, *_, m = trainer.device_arrays(collate(data.examples, [[0, 3]], 1024), 64)
    from mlxtune.model import packed_cache

    ours = np.array(engine.model(inputs, cache=packed_cache(engine.model, segments), media=m))
    np.testing.assert_allclose(ours[0, : len(ex) - 1], theirs.numpy(), atol=1e-3)
    # Generation's prefill goes through mlx-lm's KV caches: the same blocks open there.
    alone, *_, m = trainer.device_arrays(collate(data.examples, [[0]], 1024), 64)
    prefill = engine.model(alone, cache=make_prompt_cache(engine.model), media=m)
    np.testing.assert_allclose(np.array(prefill)[0, : len(ex) - 1], theirs.numpy(), atol=1e-3)
