"""Fine-tuning Gemma 3n on images and audio: LoRA in the decoder and the audio tower with trained
embedders loads in PEFT with the same logits and merges, `mlxtune generate` takes a picture and a
clip, gradient checkpointing changes no gradient, and the Gemma 4 learn test passes (slow).

The tiny model here resizes pictures to 256 px (still 256 soft tokens): MobileNetV5's attention
at the real 768 px takes ~9 s per picture on a 2-core CPU. test_gemma3n_model.py covers 768."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlxtune import demo, trainer
from mlxtune.config import load_config
from mlxtune.data.batching import collate
from mlxtune.data.rows import read_rows
from mlxtune.generate import exact_match
from mlxtune.tiny import Sizes, make_tiny

EXE = shutil.which("mlxtune", path=str(Path(sys.executable).parent)) or "mlxtune"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    arch, sizes, _, _ = demo.TASKS["media-3n"]
    return make_tiny(tmp_path_factory.mktemp("g3n") / "model", arch, 0, Sizes(**sizes))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A short version of the demo task (rows of every kind) for the quick checks."""
    write = demo.TASKS["media-3n"][2]
    return write(tmp_path_factory.mktemp("media_task_3n"), n_train=12, n_valid=6)


@pytest.fixture(scope="module")
def full_task(tmp_path_factory):
    return demo.TASKS["media-3n"][2](tmp_path_factory.mktemp("media_task_3n_full"))


@pytest.fixture(scope="module")
def learned(model_dir, full_task, tmp_path_factory):
    """The demo's settings on the demo's task: (config, run folder)."""
    _, _, _, settings = demo.TASKS["media-3n"]
    out = tmp_path_factory.mktemp("learned_3n") / "run"
    cfg = load_config(None, [f"model.path={model_dir}", f"data.train={full_task[0]}",
                             f"output.dir={out}", "train.eval_every=0", "train.save_every=0",
                             *settings])  # fmt: skip
    return cfg, trainer.train(cfg, echo=lambda line: None)


@pytest.mark.slow
def test_a_tiny_gemma3n_learns_to_look_and_listen(full_task, learned):
    """Colours of pictures, pitches of tones, and both at once, on files never trained on."""
    cfg, run_dir = learned
    rows = read_rows(full_task[1])
    after = trainer.setup(cfg, adapter=run_dir)
    result = exact_match(after.model, after.loaded.wrapper, rows, plan=after.media)
    assert result["exact_match_rows"] == 60 and result["exact_match"] >= 0.9, result


# ----------------------------------------- LoRA in the decoder and the audio tower, embedders


@pytest.fixture(scope="module")
def tower_run(model_dir, task, tmp_path_factory):
    """4 steps with LoRA in the decoder and the audio tower, both embedders trained in full."""
    out = tmp_path_factory.mktemp("tower_run_3n") / "run"
    cfg = load_config(None, [f"model.path={model_dir}", f"data.train={task[0]}",
                             f"output.dir={out}", "model.dtype=float32", "lora.audio=true",
                             "lora.train_embedders=true", "train.iters=4", "train.batch_size=2",
                             "train.learning_rate=1e-2", "train.eval_every=0",
                             "train.grad_checkpoint=true", "data.max_seq_len=512"])  # fmt: skip
    return trainer.train(cfg, echo=lambda line: None)


def test_adapter_loads_in_peft_with_the_same_logits_and_merges(model_dir, task, tower_run,
                                                              tmp_path):  # fmt: skip
    from _gemma3n import hf_forward

    from mlxtune.export import export

    config = json.loads((tower_run / "adapter_config.json").read_text())
    # every weight of both embedders: the hard-token table, the two norms and the projection
    assert config["modules_to_save"] == [f"model.embed_{kind}.{m}" for kind in ("audio", "vision")
                                         for m in ("embedding", "embedding_projection",
                                                   "hard_embedding_norm", "soft_embedding_norm")]  # fmt: skip
    targets = config["target_modules"]
    assert any(".audio_tower." in t for t in targets)
    assert any(".language_model.layers.3.self_attn.q_proj" in t for t in targets)
    # the last layers share K/V: they have no k_proj / v_proj to adapt
    assert not any(".layers.3.self_attn.k_proj" in t for t in targets)
    engine = trainer.setup(load_config(tower_run / "config.yaml"), adapter=tower_run)
    data = engine.dataset(str(task[0]))
    examples = data.examples[:3]  # a picture, a clip, both
    theirs = hf_forward(model_dir, examples, tmp_path, adapter=tower_run)
    ours = []
    for i, ex in enumerate(examples):
        arrays = trainer.device_arrays(collate(data.examples, [[i]], 512), 64)
        ours.append(np.array(engine.model(arrays[0], media=arrays[-1]))[0, : len(ex) - 1])
        np.testing.assert_allclose(ours[-1], theirs[f"logits{i}"][0], atol=1e-3)

    merged = export(tower_run, tmp_path / "merged", "merged")
    base = trainer.setup(load_config(None, [f"model.path={merged}", "model.dtype=float32",
                                            "data.max_seq_len=512"]))  # fmt: skip
    arrays = trainer.device_arrays(collate(data.examples, [[2]], 512), 64)
    got = np.array(base.model(arrays[0], media=arrays[-1]))[0, : len(examples[2]) - 1]
    np.testing.assert_allclose(got, ours[2], atol=1e-3)


def test_generate_takes_a_picture_and_a_clip(model_dir, task, tower_run):
    """`mlxtune generate --image --audio` with an adapter (LoRA in the audio tower, embedders)
    prints what the engine generates in-process from the same files."""
    from mlxtune.generate import complete, media_prompt

    row = json.loads(task[1].read_text().splitlines()[2])  # a clip and a picture
    parts = row["messages"][0]["content"]
    files = {p["type"]: task[1].parent / p[p["type"]] for p in parts if p["type"] != "text"}
    args = [
        EXE,
        "generate",
        "--model",
        model_dir,
        "--adapter",
        tower_run,
        "--max-tokens",
        "8",
        "--image",
        files["image"],
        "--audio",
        files["audio"],
        "--prompt",
        demo.ASK_BOTH,
    ]
    r = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=300,
                       env=dict(os.environ))  # fmt: skip
    assert r.returncode == 0, r.stderr
    engine = trainer.setup(load_config(tower_run / "config.yaml"), adapter=tower_run)
    loaded = engine.loaded
    prompt = media_prompt(loaded, demo.ASK_BOTH, [files["image"]], [files["audio"]])
    want = complete(engine.model, loaded.wrapper, prompt, 8)
    assert want.strip() and r.stdout.strip() == want.strip()


def test_vision_lora_is_refused_in_one_line(model_dir):
    from mlxtune.errors import ConfigError

    cfg = load_config(None, [f"model.path={model_dir}", "lora.vision=true"])
    with pytest.raises(ConfigError) as e:
        trainer.setup(cfg)
    assert str(e.value).startswith("lora.vision: this model's vision_tower has no linear layers")


def test_gradient_checkpointing_changes_no_gradient(model_dir, task):
    from _grads import checkpointed_and_not

    grads = checkpointed_and_not([f"model.path={model_dir}", "model.dtype=float32",
                                  "lora.audio=true", "data.max_seq_len=512"], task[0], 512)  # fmt: skip
    assert any(k.startswith("audio_tower") for k in grads[0])
    assert all(np.abs(v).max() > 0 for v in grads[0].values())
    for k in grads[0]:
        np.testing.assert_allclose(grads[1][k], grads[0][k], atol=1e-6)
