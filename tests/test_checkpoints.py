"""Checkpoints as they come in the wild, against transformers on CPU torch (fp32): configs that
transformers 5 saved (RoPE only under `rope_parameters`), our merged export of one, and Gemma 4
folders whose towers are absent or quantized."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from conftest import run_overrides  # noqa: E402
from mlx_lm.utils import load as mlx_lm_load  # noqa: E402
from PIL import Image  # noqa: E402

from mlxtune import model as model_lib  # noqa: E402
from mlxtune.cli import cli  # noqa: E402
from mlxtune.config import ModelConfig, load_config  # noqa: E402
from mlxtune.errors import ModelError  # noqa: E402
from mlxtune.models import hf_config  # noqa: E402
from mlxtune.progress import read_metrics  # noqa: E402
from mlxtune.trainer import train  # noqa: E402

IDS = np.array([[2, *range(40, 86)]])  # 47 positions: past the dynamic case's 16
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
LLAMA = "LlamaConfig", "LlamaForCausalLM", {}
CASES = {
    "theta": (*LLAMA, {"rope_type": "default", "rope_theta": 500_000.0}),
    "llama3": (*LLAMA, LLAMA3),
    "linear": (*LLAMA, {"rope_type": "linear", "rope_theta": 20_000.0, "factor": 4.0}),
    "yarn": (*LLAMA, {"rope_type": "yarn", "rope_theta": 50_000.0, "factor": 4.0,
                      "original_max_position_embeddings": 64}),  # fmt: skip
    "dynamic": (*LLAMA[:2], {"max_position_embeddings": 16},
                {"rope_type": "dynamic", "rope_theta": 50_000.0, "factor": 2.0}),  # fmt: skip
    "partial-rotary": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0},
                       {"rope_type": "default", "rope_theta": 30_000.0,
                        "partial_rotary_factor": 0.5}),  # fmt: skip
    # Gemma 3 (4B and up): linear scaling on the full-attention layers only
    "per-layer-type": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                       {"num_hidden_layers": 6, "head_dim": 16, "sliding_window": 8,
                        "layer_types": ["sliding_attention"] * 5 + ["full_attention"]},
                       {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                           "rope_theta": 1e6},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}  # fmt: skip


def saved_by_transformers(tiny, folder, case: tuple):
    """A random model of the case's family, saved by transformers 5 itself, with the tiny Llama's
    tokenizer; returns (folder, the transformers model)."""
    config_class, model_class, extra, rope = case
    config = getattr(transformers, config_class)(
        **{**SMALL, **extra}, vocab_size=600, rope_parameters=rope, tie_word_embeddings=False
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # the scale of trained weights: logits that tell positions apart
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    model.save_pretrained(folder)
    for f in tiny("llama").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder, model


def reference(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def ours(folder, ids=IDS) -> np.ndarray:
    loaded = model_lib.load(ModelConfig(path=str(folder), dtype="float32"))
    return np.array(loaded.model(mx.array(ids)))


@pytest.mark.parametrize("case", list(CASES))
def test_a_config_saved_by_transformers5_gives_its_logits(tiny, tmp_path, case):
    folder, model = saved_by_transformers(tiny, tmp_path / case, CASES[case])
    saved = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in saved and "rope_theta" not in saved  # transformers 5's layout
    theirs = reference(model)
    np.testing.assert_allclose(ours(folder), theirs, atol=1e-4 * np.abs(theirs).max())
    # What the merged export writes (both layouts): transformers and plain mlx-lm read it alike
    both = hf_config.normalize(saved, "x")
    assert hf_config.normalize(both, "x") == both
    (folder / "config.json").write_text(json.dumps(both))
    again = getattr(transformers, CASES[case][1]).from_pretrained(folder, dtype=torch.float32)
    np.testing.assert_allclose(reference(again.eval()), theirs, atol=1e-5 * np.abs(theirs).max())
    plain, _ = mlx_lm_load(str(folder))
    np.testing.assert_allclose(np.array(plain(mx.array(IDS))), theirs,
                               atol=1e-4 * np.abs(theirs).max())  # fmt: skip


def test_llama4_rope_scaling_saved_by_transformers5(tiny, tmp_path):
    """Llama 4 keeps its RoPE in text_config; mlx-lm's llama4 needs rope_theta there."""
    folder = tmp_path / "llama4"
    shutil.copytree(tiny("llama4"), folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    config.text_config.rope_parameters = {**LLAMA3, "original_max_position_embeddings": 16}
    config.save_pretrained(folder)
    assert "rope_theta" not in json.loads((folder / "config.json").read_text())["text_config"]
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    theirs = reference(model.eval())
    np.testing.assert_allclose(ours(folder), theirs, atol=1e-4 * np.abs(theirs).max())


def test_gemma4_as_transformers5_saves_it(tiny, tmp_path, capsys):
    """Gemma 4 keeps one RoPE per layer type (proportional, partial on full layers), which
    mlx-lm's gemma4 reads itself: nothing to map, and nothing skipped."""
    folder = tmp_path / "gemma4"
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        tiny("gemma4"), dtype=torch.float32
    ).eval()
    model.save_pretrained(folder)
    for f in tiny("gemma4").iterdir():
        if not (folder / f.name).exists():
            shutil.copy(f, folder / f.name)
    rope = json.loads((folder / "config.json").read_text())["text_config"]["rope_parameters"]
    assert rope["full_attention"]["rope_type"] == "proportional"
    theirs = reference(model)
    np.testing.assert_allclose(ours(folder), theirs, atol=1e-4 * np.abs(theirs).max())
    assert "skipped" not in capsys.readouterr().err


@pytest.mark.parametrize("rope, refused", [
    ({"rope_type": "default", "rope_theta": 30_000.0, "partial_rotary_factor": 0.5},
     "mlx-lm's llama model ignores partial_rotary_factor 0.5"),
    ({"rope_type": "yarn", "rope_theta": 30_000.0, "factor": 4.0, "attention_factor": 1.5,
      "original_max_position_embeddings": 64},
     "rope_parameters.attention_factor 1.5: mlx-lm's yarn RoPE cannot apply it"),
], ids=["partial-rotary-llama", "yarn-attention-factor"])  # fmt: skip
def test_rope_mlx_lm_cannot_apply_is_refused_in_one_line(tiny, tmp_path, rope, refused):
    folder, _ = saved_by_transformers(tiny, tmp_path / "m", (*LLAMA, rope))
    with pytest.raises(ModelError) as e:
        model_lib.load(ModelConfig(path=str(folder)))
    assert str(e.value).startswith(f"model.path: {folder}: config.json: {refused}")
    assert "\n" not in str(e.value)


def test_merged_export_reads_alike_in_transformers_and_mlx_lm(tiny, tmp_path):
    """A LoRA run on a transformers-5 Llama with llama3 scaling, exported merged: transformers
    and plain mlx-lm (without mlxtune's normalisation) give the same logits."""
    from mlxtune.export import export

    base, _ = saved_by_transformers(tiny, tmp_path / "base", CASES["llama3"])
    cfg = load_config(None, run_overrides(base, tmp_path / "run", "train.iters=2",
                                          "train.save_every=2"))  # fmt: skip
    merged = export(train(cfg, echo=lambda line: None), tmp_path / "merged", "merged")
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    theirs = reference(model.eval())
    plain, _ = mlx_lm_load(str(merged))
    np.testing.assert_allclose(np.array(plain(mx.array(IDS))), theirs,
                               atol=1e-4 * np.abs(theirs).max())  # fmt: skip
    config = json.loads((merged / "config.json").read_text())  # both layouts, the same settings
    assert (
        config["rope_parameters"]
        == json.loads((base / "config.json").read_text())["rope_parameters"]
    )
    assert config["rope_theta"] == 500_000.0 and config["rope_scaling"]["rope_type"] == "llama3"
    read = {k: v for k, v in model.config.rope_parameters.items() if k != "type"}  # legacy alias
    assert read == config["rope_parameters"]


def test_gemma4_layers_mlx_lm_cannot_take_are_refused_in_one_line(tiny, tmp_path):
    """transformers 5 writes Gemma 4's full-attention head size per layer; mlx-lm takes one."""
    folder = tmp_path / "gemma4"
    shutil.copytree(tiny("gemma4"), folder)
    config = json.loads((folder / "config.json").read_text())
    text = config["text_config"]
    text["per_layer_config"] = {"1": {"head_dim": 32}, "3": {"head_dim": 64}}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as e:
        model_lib.load(ModelConfig(path=str(folder)))
    assert str(e.value).startswith(f"model.path: {folder}: config.json: text_config: "
                                   'per_layer_config {"1": {"head_dim": 32}, "3": {"head_dim": 64}}: '
                                   "mlx-lm's gemma4 takes one head_dim")  # fmt: skip
    assert "\n" not in str(e.value)


# ------------------------------------------------------------- Gemma 4 with towers left out

TOWERS = ("vision_tower", "embed_vision", "audio_tower", "embed_audio")


def _edit_weights(folder, edit) -> None:
    path = folder / "model.safetensors"
    tensors = edit(dict(mx.load(str(path))))
    mx.save_safetensors(str(path), tensors, metadata={"format": "pt"})


def _no_towers(tensors):
    return {k: v for k, v in tensors.items() if not k.removeprefix("model.").startswith(TOWERS)}


def _quantized(prefix):
    """The tower's linear weights as mlx quantization writes them: uint32, .scales, .biases."""

    def edit(tensors):
        for k in [k for k in tensors if k.startswith(prefix) and k.endswith(".linear.weight")]:
            w, scales, biases = mx.quantize(tensors[k], group_size=32, bits=4)
            stem = k.removesuffix(".weight")
            tensors |= {k: w, f"{stem}.scales": scales, f"{stem}.biases": biases}
        return tensors

    return edit


def _one_missing(tensors):
    name = next(k for k in sorted(tensors) if k.startswith("model.audio_tower."))
    return {k: v for k, v in tensors.items() if k != name}


VARIANTS = {  # (config sections to drop, weights edit, what the line says)
    "text-only": (("vision_config", "audio_config"), _no_towers,
                  "vision tower skipped: config.json has no vision_config; audio tower skipped: "
                  "config.json has no audio_config; training on text only"),
    "tower-weights-missing": ((), _no_towers,
                              "vision tower skipped: the checkpoint has no vision_tower weights; "
                              "audio tower skipped: the checkpoint has no audio_tower weights; "
                              "training on text only"),
    "vision-quantized": ((), _quantized("model.vision_tower."),
                         "vision tower skipped: its weights are quantized (vision_tower.encoder."
                         "layers.0.mlp.down_proj.linear.scales), which the towers do not load; "
                         "training on text and audio"),
    "audio-tensor-missing": ((), _one_missing,
                             "audio tower skipped: audio_tower weights do not fit: Missing 1 "
                             "parameters: "),
}  # fmt: skip


@pytest.fixture(scope="module")
def variant(tiny, tmp_path_factory):
    made = {}

    def get(name: str):
        if name not in made:
            drop, edit, _ = VARIANTS[name]
            folder = tmp_path_factory.mktemp("gemma4_variant") / name
            shutil.copytree(tiny("gemma4"), folder)
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(
                json.dumps({k: v for k, v in config.items() if k not in drop})
            )
            _edit_weights(folder, edit)
            made[name] = folder
        return made[name]

    return get


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gemma4_without_usable_towers_trains_on_text(variant, tmp_path, capsys, name):
    folder = variant(name)
    capsys.readouterr()
    cfg = load_config(None, run_overrides(folder, tmp_path / "run", "train.iters=2",
                                          "train.save_every=2"))  # fmt: skip
    run_dir = train(cfg, echo=lambda line: None)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    said = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert len(said) == 1 and said[0].startswith(f"model: Gemma 4 {VARIANTS[name][2]}"), said


@pytest.mark.parametrize("name, kind", [("text-only", "image"), ("vision-quantized", "image"),
                                        ("audio-tensor-missing", "audio")])  # fmt: skip
def test_a_media_row_for_a_skipped_tower_is_a_one_line_data_error(variant, tmp_path, name, kind):
    Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "red.png")
    data = tmp_path / "d.jsonl"
    text = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}]}  # fmt: skip
    media = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Colour?"},
                                                       {"type": kind, kind: "red.png"}]},
                          {"role": "assistant", "content": "red"}]}  # fmt: skip
    data.write_text(json.dumps(text) + "\n" + json.dumps(media) + "\n")
    (tmp_path / "c.yaml").write_text("train:\n  iters: 1\n")
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "c.yaml"), "--set",
                                      f"model.path={variant(name)}", "--set", f"data.train={data}",
                                      "--set", f"output.dir={tmp_path / 'run'}"])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    note, error = result.stderr.strip().splitlines()
    tower = "audio" if kind == "audio" else "vision"
    assert note.startswith("model: Gemma 4 ") and f"{tower} tower skipped: " in note
    prefix = f"mlxtune: error: {data}:2: messages[0].content[1].{kind}: "
    assert error == prefix + f"this model has no {kind} input"
    assert not (tmp_path / "run").exists()
