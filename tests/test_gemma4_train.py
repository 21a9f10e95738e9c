"""Fine-tuning Gemma 4 on images and audio: the synthetic task is learned, tower LoRA and trained
embedders round-trip through PEFT, generation takes media, and bad media give one clean line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from PIL import Image

from mlxtune import demo, trainer
from mlxtune.cli import cli
from mlxtune.config import load_config
from mlxtune.data.rows import read_rows
from mlxtune.generate import exact_match


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return demo.write_media_task(tmp_path_factory.mktemp("media_task"))


def test_a_tiny_gemma4_learns_to_look_and_listen(tiny, task, tmp_path):
    """Colours of pictures, pitches of tones, and both at once, on files never trained on."""
    train_file, valid_file = task
    _, _, settings = demo.TASKS["media"]
    cfg = load_config(None, [f"model.path={tiny('gemma4')}", f"data.train={train_file}",
                             f"output.dir={tmp_path / 'run'}", "train.eval_every=0",
                             "train.save_every=0", *settings])  # fmt: skip
    rows = read_rows(valid_file)
    before = trainer.setup(cfg)
    assert (
        exact_match(before.model, before.loaded.wrapper, rows, plan=before.media)["exact_match"]
        < 0.2
    )
    run_dir = trainer.train(cfg, echo=lambda line: None)
    after = trainer.setup(cfg, adapter=run_dir)
    result = exact_match(after.model, after.loaded.wrapper, rows, plan=after.media)
    assert result["exact_match_rows"] == 60 and result["exact_match"] >= 0.9, result


# ----------------------------------------------------------------------------- bad input


def _config(folder):
    path = folder / "config.yaml"
    path.write_text("train:\n  iters: 1\n")
    return path


def _bad_files(folder):
    """One bad file of each kind; returns {case: (part, file name)}."""
    Image.new("RGB", (64, 64), (200, 0, 0)).save(folder / "ok.png")
    png = (folder / "ok.png").read_bytes()
    (folder / "cut.png").write_bytes(png[: len(png) // 2])
    (folder / "notes.png").write_text("not a picture\n")
    sf.write(folder / "empty.wav", np.zeros((0,), np.float32), 16_000)
    (folder / "noise.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    with sf.SoundFile(folder / "hour.flac", "w", 8000, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(60):
            f.write(np.zeros(8000 * 60, np.int16))
    return {
        "missing image": ("image", "nowhere.png", "file not found: {path}"),
        "truncated image": ("image", "cut.png", "{path}: cannot decode the image ("),
        "not an image": ("image", "notes.png", "{path}: not an image file"),
        "empty audio": ("audio", "empty.wav", "{path}: the audio clip is empty"),
        "corrupt audio": ("audio", "noise.wav", "{path}: not an audio file soundfile can read ("),
        "hour-long audio": ("audio", "hour.flac", "{path}: audio is 3600.0 s long; at most 30 s"),
        "unsupported format": ("audio", "ok.png", "{path}: not an audio file soundfile can read ("),
    }


def test_bad_media_is_one_line_with_file_line_and_part(tiny, tmp_path):
    cases = _bad_files(tmp_path)
    runner = CliRunner()
    for case, (kind, name, expected) in cases.items():
        data = tmp_path / f"{case.replace(' ', '_')}.jsonl"
        good = {"messages": [{"role": "user", "content": [{"type": "image", "image": "ok.png"}]},
                             {"role": "assistant", "content": "red"}]}  # fmt: skip
        bad = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hear?"},
                                                         {"type": kind, kind: name}]},
                            {"role": "assistant", "content": "low"}]}  # fmt: skip
        data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        out = tmp_path / f"run_{case.replace(' ', '_')}"
        result = runner.invoke(cli, ["train", str(_config(tmp_path)), "--set",
                                     f"model.path={tiny('gemma4')}", "--set", f"data.train={data}",
                                     "--set", f"output.dir={out}"])  # fmt: skip
        assert result.exit_code == 2, (case, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.output, (case, result.output)
        prefix = f"mlxtune: error: {data}:2: messages[0].content[1].{kind}: "
        assert lines[0].startswith(prefix), (case, lines[0])
        assert expected.format(path=tmp_path / name) in lines[0], (case, lines[0])
        assert not out.exists(), case  # nothing half-written


def test_unknown_part_type_and_text_model_errors(tiny, tmp_path):
    runner = CliRunner()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "video", "video": "v.mp4"}]},
        {"role": "assistant", "content": "ok"}]}) + "\n")  # fmt: skip
    result = runner.invoke(cli, ["train", str(_config(tmp_path)), "--set",
                                 f"model.path={tiny('gemma4')}", "--set", f"data.train={data}",
                                 "--set", f"output.dir={tmp_path / 'run'}"])  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"mlxtune: error: {data}:1: messages[0].content[0].type: expected one of text, image, audio"
    )


# ------------------------------------------------- LoRA in the towers, embedders trained in full


@pytest.fixture(scope="module")
def tower_run(tiny, task, tmp_path_factory):
    """4 steps with LoRA in the decoder and both towers, embedders trained in full."""
    train_file, _ = task
    out = tmp_path_factory.mktemp("tower_run") / "run"
    cfg = load_config(None, [f"model.path={tiny('gemma4')}", f"data.train={train_file}",
                             f"output.dir={out}", "model.dtype=float32", "lora.vision=true",
                             "lora.audio=true", "lora.train_embedders=true", "train.iters=4",
                             "train.batch_size=2", "train.learning_rate=1e-2", "train.eval_every=0",
                             "train.grad_checkpoint=true", "data.image_soft_tokens=70",
                             "data.max_seq_len=256"])  # fmt: skip
    return trainer.train(cfg, echo=lambda line: None)


def test_tower_lora_and_embedders_load_in_peft_with_the_same_logits(tiny, task, tower_run):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from _gemma4 import hf_inputs
    from transformers import Gemma4ForConditionalGeneration

    from mlxtune.data.batching import collate

    config = json.loads((tower_run / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.embed_audio.embedding_projection",
                                         "model.embed_vision.embedding_projection"]  # fmt: skip
    targets = config["target_modules"]
    assert any(".vision_tower." in t and t.endswith(".linear") for t in targets)
    assert any(".audio_tower." in t and t.endswith(".linear") for t in targets)
    engine = trainer.setup(load_config(tower_run / "config.yaml"), adapter=tower_run)
    train_file, _ = task
    data = engine.dataset(str(train_file))
    base = Gemma4ForConditionalGeneration.from_pretrained(tiny("gemma4"), dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(base, tower_run).eval()
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    for i in (0, 1, 2):  # a picture, a clip, both
        ex = data.examples[i]
        arrays = trainer.device_arrays(collate(data.examples, [[i]], 256), 64)
        ours = np.array(engine.model(arrays[0], media=arrays[-1]))[0, : len(ex) - 1]
        with torch.no_grad():
            ids = torch.tensor(ex.ids[None, :-1].astype(np.int64))
            theirs = reference(input_ids=ids, **hf_inputs(train_file.parent, rows[i])).logits
        np.testing.assert_allclose(ours, theirs[0].numpy(), atol=1e-3)
