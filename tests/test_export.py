"""Exports people run: a merged model from a quantized base (QLoRA), rounded back to floats
first, so it answers as the adapter did on the quantized weights."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import DATA
from mlx_lm import convert
from mlx_lm.utils import load as mlx_lm_load

import mlxtune as mt
from mlxtune.adapters import tensor_shapes
from mlxtune.export import export

IDS = mx.array([[1, 5, 9, 33, 70, 2, 14, 3, 8]])
QLORA = {"lora": {"rank": 4},
         "train": {"iters": 6, "learning_rate": 5e-3, "report_every": 3, "eval_every": 0,
                   "save_every": 0}}  # fmt: skip


@pytest.mark.parametrize("base", ["model.quantize 4", "a 4-bit checkpoint"])
def test_a_quantized_base_exports_merged_by_rounding_it_back_first(tiny, tmp_path, base):
    """QLoRA on a float base (`model.quantize: 4`) and LoRA on a checkpoint mlx-lm quantized
    (which mlx-lm's own fuse refuses to de-quantize and merge): the merged folder has plain
    weights and no quantization, and plain mlx-lm gives the logits of the quantized base with
    the adapter. Merging into the original float weights instead would be off by far more."""
    source = tiny("llama")
    model: dict = {"path": str(source), "quantize": 4}
    if base == "a 4-bit checkpoint":
        convert(str(source), mlx_path=str(tmp_path / "q4"), quantize=True, q_group_size=64,
                q_bits=4)  # fmt: skip
        model = {"path": str(tmp_path / "q4")}
    rows = [json.loads(x) for x in (DATA / "chat_train.jsonl").read_text().splitlines()]
    run = mt.train(model=model, data={"train": rows, "max_seq_len": 128},
                   output={"dir": str(tmp_path / "run")}, echo=None, **QLORA)  # fmt: skip
    merged = export(run.dir, tmp_path / "merged", "merged")
    config = json.loads((merged / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert not [n for n in tensor_shapes(merged) if n.endswith((".scales", ".biases"))]
    want = np.array(run.load().loaded.model(IDS))  # the quantized base with the adapter
    plain, _ = mlx_lm_load(str(merged))
    got = np.array(plain(IDS))
    err = np.abs(got - want).max()
    assert err <= 1e-4 * np.abs(want).max(), err
    # the same adapter merged into the float weights it was not trained on
    saved = mt.make_config(run.config, model={"path": str(source), "quantize": None})
    (run.dir / "config.yaml").write_text(saved.to_yaml())
    naive, _ = mlx_lm_load(str(export(run.dir, tmp_path / "naive", "merged")))
    assert np.abs(np.array(naive(IDS)) - want).max() > 100 * err


# ------------------------------------------------------------------------------------ GGUF


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """A LoRA run on a Llama whose rows are 256 wide, so the K-quants' 256-blocks cut them."""
    from mlxtune.tiny import Sizes, make_tiny

    root = tmp_path_factory.mktemp("gguf")
    model = make_tiny(root / "llama", "llama", sizes=Sizes(hidden_size=256, num_layers=4))
    rows = [json.loads(x) for x in (DATA / "chat_train.jsonl").read_text().splitlines()]
    run = mt.train(model=str(model), data={"train": rows, "max_seq_len": 128},
                   output={"dir": str(root / "run")}, echo=None, **QLORA)  # fmt: skip
    merged = export(run.dir, root / "merged", "merged")
    return run, merged


def _logits(folder, gguf_file=None):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, dtype=torch.float32).eval()  # fmt: skip
    with torch.no_grad():
        return model(torch.tensor(np.array(IDS))).logits.numpy()


@pytest.mark.parametrize("quant, bound", [("f16", 2e-3), ("q8_0", 2e-2), ("q4_k_m", 0.2)])
def test_transformers_reads_our_gguf_with_the_merged_models_logits(wide_run, tmp_path, quant,
                                                                   bound):  # fmt: skip
    """transformers' GGUF loader (not ours) de-quantizes the file and un-permutes q and k; its
    logits are the merged Hugging Face export's within what the quantization loses."""
    from gguf import GGUFReader

    run, merged = wide_run
    out = run.export(tmp_path / quant, format="gguf", quant=quant)
    name = f"{run.dir.name}-{quant}.gguf"
    assert sorted(p.name for p in out.iterdir()) == sorted([name, "Modelfile"])
    want, got = _logits(merged), _logits(out, name)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= bound, (quant, err)
    types = {t.name: t.tensor_type.name for t in GGUFReader(out / name).tensors}
    expect = {"f16": {"F16", "F32"}, "q8_0": {"Q8_0", "F32"},
              "q4_k_m": {"Q4_K", "Q6_K", "Q5_0", "F32"}}[quant]  # fmt: skip
    assert set(types.values()) <= expect and "F32" in types.values(), types
    if quant == "q4_k_m":  # llama.cpp's mix: the head and some attn_v / ffn_down in Q6_K
        assert types["output.weight"] == "Q6_K" and types["blk.3.attn_v.weight"] == "Q6_K"
        assert types["blk.2.ffn_down.weight"] == "Q6_K" and types["blk.0.attn_v.weight"] == "Q4_K"
        assert types["blk.1.ffn_gate.weight"] == "Q4_K"


def test_the_gguf_carries_the_tokenizer_and_chat_template(wide_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    run, merged = wide_run
    out = run.export(tmp_path / "f16", format="gguf")
    name = next(out.glob("*.gguf")).name
    ours = transformers.AutoTokenizer.from_pretrained(out, gguf_file=name)
    theirs = transformers.AutoTokenizer.from_pretrained(merged)
    text = "What colour is the sky? 12345 naïve <|im_end|>"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert ours.chat_template == theirs.chat_template and ours.chat_template
    assert ours.eos_token_id == theirs.eos_token_id
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{name}\n") and "PARAMETER num_ctx" in modelfile


def test_k_quant_bytes_read_back_through_the_gguf_package():
    """Our Q4_K and Q6_K writers against the gguf package's dequantizer (llama.cpp's format)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    from mlxtune import kquants

    x = np.random.default_rng(0).standard_normal((32, 512)).astype(np.float32)
    x[0, :256] = 0.0  # an all-zero block
    for kind, bound in ((Q.Q4_K, 0.1), (Q.Q6_K, 0.025)):
        back = quants.dequantize(kquants.quantize(x, kind), kind)
        rel = np.sqrt(((back - x) ** 2).mean() / (x**2).mean())
        assert rel <= bound and np.all(back[0, :256] == 0), (kind.name, rel)


def test_a_family_llama_cpp_would_need_another_writer_for_is_refused_in_one_line(tiny, trained,
                                                                                 tmp_path):  # fmt: skip
    from mlxtune.errors import ModelError

    run_dir = trained("gemma3n")
    with pytest.raises(ModelError) as e:
        export(run_dir, tmp_path / "g", "gguf")
    assert "model_type gemma3n: GGUF export supports the llama architecture" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "g").exists()


@pytest.fixture(scope="module")
def gemma4_run(tmp_path_factory):
    """A LoRA run on the tiny Gemma 4 (per-layer inputs, KV-shared double-wide tail,
    proportional rope) with a sliding window of 6, shorter than the prompts, so llama.cpp's
    sliding layers are checked too."""
    from mlxtune.tiny import make_tiny

    root = tmp_path_factory.mktemp("gemma4")
    model = make_tiny(root / "gemma4", "gemma4")
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["sliding_window"] = 6
    (model / "config.json").write_text(json.dumps(config))
    rows = [json.loads(x) for x in (DATA / "chat_train.jsonl").read_text().splitlines()]
    run = mt.train(model=str(model), data={"train": rows, "max_seq_len": 128},
                   output={"dir": str(root / "run")}, echo=None, **QLORA)  # fmt: skip
    return run, export(run.dir, root / "merged", "merged")


@pytest.mark.parametrize("quant, bound", [("f32", 2e-3), ("q8_0", 0.15)])
def test_llama_cpp_runs_our_gemma4_gguf_with_the_merged_models_logits(gemma4_run, tmp_path,
                                                                      quant, bound):  # fmt: skip
    """llama.cpp (llama-cpp-python, `make llama-cpp`) loads the Gemma 4 text decoder we wrote:
    its tokenizer gives the Hugging Face tokenizer's ids and its logits at every position are
    transformers' on the merged export (f32: within llama.cpp's float16 KV cache; q8_0:
    within what 8-bit weights and llama.cpp's 8-bit rounding of the activations lose on a
    random 64-wide model, ~0.1 of the largest logit; a wrongly packed block is off by order
    1). Break-check: rope_freqs without the 1e30 factors on the unrotated dimensions is off
    by 7e-2 in f32."""
    llama_cpp = pytest.importorskip("llama_cpp")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    run, merged = gemma4_run
    out = run.export(tmp_path / quant, format="gguf", quant=quant)
    text = "<bos><|turn>user\nThe quick brown fox jumps over the lazy dog; add(2, 3)?<turn|>\n"
    ids = transformers.AutoTokenizer.from_pretrained(merged)(text, add_special_tokens=False)[
        "input_ids"]  # fmt: skip
    llm = llama_cpp.Llama(model_path=str(next(out.glob("*.gguf"))), n_ctx=128, logits_all=True,
                          verbose=False)  # fmt: skip
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    assert len(ids) > 3 * 6  # past the sliding window
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    model = transformers.AutoModelForImageTextToText.from_pretrained(merged,
                                                                     dtype=torch.float32)  # fmt: skip
    with torch.no_grad():
        want = model.eval()(torch.tensor([ids])).logits[0].numpy()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= bound, (quant, err)
    modelfile = (out / "Modelfile").read_text()
    assert "<|turn>{{ if eq .Role" in modelfile and 'PARAMETER stop "<turn|>"' in modelfile
    assert "# Text only" in modelfile


@pytest.mark.parametrize("which", ["wide_run", "gemma4_run"])
def test_the_lora_gguf_on_the_base_gguf_is_the_merged_gguf(which, request, tmp_path):
    """llama.cpp adds (alpha / rank) B A to each named base weight: done here on our base and
    adapter files (read with the gguf package), it gives the merged file's weights, which
    transformers and llama.cpp read as the merged model (the tests above). So names, shapes,
    the permuted rows of q and k (llama), and alpha agree with the merged export."""
    from gguf import GGUFReader

    run, _ = request.getfixturevalue(which)
    parts = run.export(tmp_path / "lora", format="gguf-lora", quant="f32")
    merged = run.export(tmp_path / "merged", format="gguf", quant="f32")
    base = GGUFReader(parts / "base-f32.gguf")
    lora = GGUFReader(parts / f"{run.dir.name}-lora.gguf")
    whole = {t.name: np.array(t.data) for t in GGUFReader(next(merged.glob("*.gguf"))).tensors}
    adapter = {t.name: np.array(t.data) for t in lora.tensors}
    assert lora.fields["general.type"].contents() == "adapter"
    assert lora.fields["adapter.type"].contents() == "lora"
    alpha = lora.fields["adapter.lora.alpha"].contents()
    changed = 0
    for t in base.tensors:
        w = np.array(t.data)
        if f"{t.name}.lora_a" in adapter:
            a, b = adapter[f"{t.name}.lora_a"], adapter[f"{t.name}.lora_b"]
            w = w + alpha / a.shape[0] * (b @ a)
            changed += 1
        np.testing.assert_allclose(w, whole[t.name], rtol=1e-5, atol=1e-6, err_msg=t.name)
    # every adapted projection of the 4 blocks (Gemma 4's KV-shared ones have no k and v)
    assert changed == len(adapter) // 2 and changed >= 4 * 7 - 2 * 2 * (which == "gemma4_run")
    modelfile = (parts / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./base-f32.gguf\nADAPTER ./{run.dir.name}-lora.gguf\n")


# ------------------------------------------------------------------------------- the Hub


def test_push_to_hub_uploads_the_export_and_a_model_card_in_one_commit(wide_run, tmp_path):
    """`mlxtune export RUN OUT --format merged --push-to-hub user/name --private` through
    huggingface-hub against a loopback stand-in for the Hub's upload API (never the network)."""
    import os
    import subprocess
    import sys

    from _hub import TOKEN, HubStandIn

    from mlxtune.publish import read_card_meta

    run, _ = wide_run
    with HubStandIn() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1"}
        cmd = [sys.executable, "-m", "mlxtune", "export", str(run.dir), str(tmp_path / "out"),
               "--format", "merged", "--push-to-hub", "user/tuned", "--private"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "pushed to user/tuned" in r.stdout
        bad = subprocess.run([*cmd[:5], str(tmp_path / "out2"), *cmd[6:]], capture_output=True,
                             text=True, env={**env, "HF_TOKEN": "wrong"}, timeout=300)  # fmt: skip
    repo = hub.repos["user/tuned"]
    assert repo["private"] and len(repo["commits"]) == 1
    local = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert repo["files"] == local  # the folder as written, card and plot included
    assert {"model.safetensors", "config.json", "README.md", "loss.png"} <= set(local)
    card = local["README.md"].decode()
    meta = read_card_meta(card)
    assert meta["library_name"] == "transformers" and "mlxtune" in meta["tags"]
    final = [r for r in run.metrics if r["kind"] == "train"][-1]
    assert f"final training loss {final['loss']:.4f} (step {final['step']})" in card
    assert "LORA rank 4" in card and "```yaml" in card and "![loss](loss.png)" in card
    # a refused token: one line naming the repo, non-zero, nothing left behind
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("mlxtune: error: --push-to-hub user/tuned: ")
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "out2").exists()
