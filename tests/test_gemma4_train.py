"""Fine-tuning Gemma 4 on images and audio: the synthetic task is learned, tower LoRA and trained
embedders round-trip through PEFT, generation takes media, and bad media (for Gemma 3n too) give
one clean line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from _cli import mlxtune
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


@pytest.fixture(scope="module")
def learned(tiny, task, tmp_path_factory):
    """The demo's settings on the demo's task: (config, run folder)."""
    train_file, _ = task
    _, _, _, settings = demo.TASKS["media"]
    out = tmp_path_factory.mktemp("learned") / "run"
    cfg = load_config(None, [f"model.path={tiny('gemma4')}", f"data.train={train_file}",
                             f"output.dir={out}", "train.eval_every=0", "train.save_every=0",
                             *settings])  # fmt: skip
    return cfg, trainer.train(cfg, echo=lambda line: None)


def test_a_tiny_gemma4_learns_to_look_and_listen(task, learned):
    """Colours of pictures, pitches of tones, and both at once, on files never trained on."""
    cfg, run_dir = learned
    rows = read_rows(task[1])
    before = trainer.setup(cfg)
    score = exact_match(before.model, before.loaded.wrapper, rows, plan=before.media)
    assert score["exact_match"] < 0.2, score
    after = trainer.setup(cfg, adapter=run_dir)
    result = exact_match(after.model, after.loaded.wrapper, rows, plan=after.media)
    assert result["exact_match_rows"] == 60 and result["exact_match"] >= 0.9, result


def test_generate_answers_from_an_image_and_a_clip(tiny, task, learned):
    """`mlxtune generate --image / --audio` with the learned adapter, as a user runs it."""
    _, run_dir = learned
    rows = [json.loads(line) for line in task[1].read_text().splitlines()]
    right = 0
    for row in rows[0:2]:  # a picture, a clip
        parts = row["messages"][0]["content"]
        args = ["generate", "--model", tiny("gemma4"), "--adapter", run_dir, "--max-tokens", "6"]
        for p in parts:
            if p["type"] == "text":
                args += ["--prompt", p["text"]]
            else:
                args += [f"--{p['type']}", task[1].parent / p[p["type"]]]
        r = mlxtune(*args)
        assert r.returncode == 0, r.stderr
        right += r.stdout.strip() == row["messages"][1]["content"]
    assert right == 2, right
    r = mlxtune("generate", "--model", tiny("gemma4"), "--image", task[1].parent / "nope.png",
                "--prompt", "Colour?")  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        f"mlxtune: error: --image: file not found: {task[1].parent / 'nope.png'}"
    )


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


@pytest.mark.parametrize("arch", ["gemma4", "gemma3n"])
def test_bad_media_is_one_line_with_file_line_and_part(tiny, tmp_path, arch):
    cases = _bad_files(tmp_path)
    if arch == "gemma3n":  # its mel frames are 32 ms: a clip needs 513 samples at 16 kHz
        sf.write(tmp_path / "click.wav", np.zeros(200, np.float32), 8000)
        cases["too-short audio"] = ("audio", "click.wav",
                                    "{path}: the audio clip is too short (400 samples; at least "
                                    "513 at 16000 Hz)")  # fmt: skip
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
                                     f"model.path={tiny(arch)}", "--set", f"data.train={data}",
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


def test_merged_export_carries_tower_lora_and_embedders(tiny, task, tower_run, tmp_path):
    torch = pytest.importorskip("torch")
    from _gemma4 import hf_inputs
    from transformers import Gemma4ForConditionalGeneration

    from mlxtune.data.batching import collate
    from mlxtune.errors import ModelError
    from mlxtune.export import export

    merged = export(tower_run, tmp_path / "merged", "merged")
    with pytest.raises(ModelError, match="which mlx-lm does not load"):
        export(tower_run, tmp_path / "mlx", "mlx-lm")
    engine = trainer.setup(load_config(tower_run / "config.yaml"), adapter=tower_run)
    data = engine.dataset(str(task[0]))
    reference = Gemma4ForConditionalGeneration.from_pretrained(merged, dtype=torch.float32).eval()
    row = json.loads(task[0].read_text().splitlines()[2])  # a clip and a picture
    ex = data.examples[2]
    arrays = trainer.device_arrays(collate(data.examples, [[2]], 256), 64)
    ours = np.array(engine.model(arrays[0], media=arrays[-1]))[0, : len(ex) - 1]
    with torch.no_grad():
        ids = torch.tensor(ex.ids[None, :-1].astype(np.int64))
        theirs = reference(input_ids=ids, **hf_inputs(task[0].parent, row)).logits[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-3)


def test_gradient_checkpointing_changes_no_tower_gradient(tiny, task):
    from _grads import checkpointed_and_not

    grads = checkpointed_and_not([f"model.path={tiny('gemma4')}", "model.dtype=float32",
                                  "lora.vision=true", "lora.audio=true",
                                  "data.image_soft_tokens=70"], task[0], 256)  # fmt: skip
    towers = [k for k in grads[0] if k.startswith(("vision_tower", "audio_tower"))]
    assert towers and all(np.abs(grads[0][k]).max() > 0 for k in towers)
    for k in grads[0]:
        np.testing.assert_allclose(grads[1][k], grads[0][k], atol=1e-6)
