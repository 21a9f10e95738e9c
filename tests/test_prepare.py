"""The prepared copy (`mlxtune prepare`) and the streaming loader of the cuda backend: what is
loaded equals what transformers loads (exactly, unquantized; equal to quantizing in place with
NF4), a killed conversion resumes to the same bytes, checksums catch a damaged file, and the
NF4 bytes are bitsandbytes' own format."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cuda_backend import model as cuda_model  # noqa: E402
from cuda_backend import moe, nf4, prepare  # noqa: E402
from cuda_backend.source import Source  # noqa: E402
from mlxtune.config import load_config  # noqa: E402
from mlxtune.errors import ModelError  # noqa: E402

IDS = torch.tensor([[2, 40, 50, 60, 70, 80, 90, 100, 110]])
ROOT = Path(__file__).resolve().parents[1]


def model_cfg(path, folder, *extra):
    return load_config(None, [f"model.path={path}", "model.backend=cuda",
                              f"model.prepared_dir={folder}", *extra]).model  # fmt: skip


def logits(loaded) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=IDS).logits.float()


@pytest.fixture(scope="module")
def reference(tiny):
    """transformers' own Llama 4 (the whole checkpoint, experts made sparse in place)."""
    return logits(cuda_model.load(model_cfg(tiny("llama4"), "unused")))


def test_streamed_experts_from_the_prepared_copy_give_transformers_logits(tiny, tmp_path,
                                                                           reference):  # fmt: skip
    loaded = cuda_model.load(
        model_cfg(tiny("llama4"), tmp_path / "p", "model.offload_experts=true")
    )
    assert type(loaded.model).__name__ == "Llama4ForCausalLM"  # text only: no vision tower
    assert not any("vision" in n for n, _ in loaded.model.named_parameters())
    assert len(loaded.stores) == 2 and all(not s.quantized for s in loaded.stores)
    torch.testing.assert_close(logits(loaded), reference, atol=0, rtol=0)


def test_nf4_from_the_prepared_copy_equals_quantizing_in_place(tiny, tmp_path):
    """The copy holds exactly the NF4 of each weight: the same logits as transformers' model
    with every frozen linear and every expert quantized in memory by the same code."""
    loaded = cuda_model.load(model_cfg(tiny("llama4"), tmp_path / "p", "model.quantize=4"))
    whole = transformers.AutoModelForImageTextToText.from_pretrained(tiny("llama4")).eval()
    head = whole.get_output_embeddings()
    for path, m in list(whole.named_modules()):
        if isinstance(m, torch.nn.Linear) and m is not head and not path.endswith("router"):
            parent, _, name = path.rpartition(".")
            setattr(whole.get_submodule(parent), name, nf4.NF4Linear.from_linear(m))
    stores = {}
    for path, m in whole.named_modules():
        if m.__class__.__name__ == "Llama4TextMoe":
            stores[path] = moe.ExpertStore.from_tensors(m.experts.gate_up_proj,
                                                        m.experts.down_proj, 16, quantize=True)  # fmt: skip
    moe.sparsify(whole, stores)
    with torch.no_grad():
        want = whole(input_ids=IDS).logits.float()
    torch.testing.assert_close(logits(loaded), want, atol=1e-5, rtol=0)
    blocks = sorted(s.block.numel() for s in loaded.stores)
    assert blocks == sorted(s.block.numel() for s in stores.values())


KILL_MID_RUN = """
import os, signal, sys
from cuda_backend import prepare
from mlxtune.config import load_config
prepare.PROGRESS_EVERY_S = 0.0
lines = []
def echo(line):  # the first progress line after the first part is done: inside the second
    lines.append(line)
    if sum("done" in x for x in lines) == 1 and "done" not in line:
        os.kill(os.getpid(), signal.SIGKILL)
cfg = load_config(None, [f"model.path={sys.argv[1]}", "model.backend=cuda", "model.quantize=4",
                         "model.offload_experts=true", f"model.prepared_dir={sys.argv[3]}"])
prepare.prepare(cfg.model, echo)
"""


def test_a_killed_prepare_resumes_to_the_same_bytes(tiny, tmp_path):
    model = tiny("llama4")
    straight = prepare.prepare(model_cfg(model, tmp_path / "straight", "model.quantize=4",
                                         "model.offload_experts=true"), echo=lambda line: None)  # fmt: skip
    folder = tmp_path / "killed"
    # Killed (SIGKILL: no cleanup) in the middle of the second part, after the first is done.
    proc = subprocess.run([sys.executable, "-c", KILL_MID_RUN, str(model), "-", str(folder)],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (folder / prepare.MANIFEST).exists()
    done = json.loads((folder / prepare.PROGRESS).read_text())["units"]
    assert len(done) == 1 and list(folder.glob("*.partial"))  # the second part, half-written
    (first,) = [folder / u["file"] for u in done.values()]
    written = first.stat().st_mtime_ns
    lines = []
    resumed = prepare.prepare(model_cfg(model, folder, "model.quantize=4",
                                        "model.offload_experts=true"), echo=lines.append)  # fmt: skip
    assert "resuming: 1 of 3 parts done" in lines[0]
    ours = json.loads((resumed / prepare.MANIFEST).read_text())
    theirs = json.loads((straight / prepare.MANIFEST).read_text())
    assert ours["files"] == theirs["files"]  # sizes and SHA-256 of every file
    assert first.stat().st_mtime_ns == written  # the finished part was not written again
    assert not list(folder.glob("*.partial")) and not (folder / prepare.PROGRESS).exists()


def test_a_damaged_file_is_caught_by_its_checksum(tiny, tmp_path):
    cfg = model_cfg(tiny("llama4"), tmp_path / "p", "model.offload_experts=true")
    folder = prepare.prepare(cfg, echo=lambda line: None)
    prepare.verify(folder)
    victim = sorted(folder.glob("experts-*.bin"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=rf"{victim.name}: checksum mismatch"):
        prepare.verify(folder)
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  path: {tiny('llama4')}\n  backend: cuda\n"
                      f"  offload_experts: true\n  prepared_dir: {folder}\n")  # fmt: skip
    exe = Path(sys.executable).parent / "mlxtune"
    proc = subprocess.run([str(exe), "prepare", str(config), "--verify"], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("mlxtune: error: ")
    assert "checksum mismatch" in proc.stderr


def test_a_fused_expert_tensor_is_read_one_expert_at_a_time(tiny):
    """Rows of a fused [E, D, 2I] tensor, read by byte range, equal the tensor's rows."""
    from safetensors.torch import load_file

    folder = tiny("llama4")
    src = Source(folder)
    whole = load_file(str(folder / "model.safetensors"))
    name = next(n for n in src.names if n.endswith("experts.gate_up_proj"))
    for e in range(whole[name].shape[0]):
        torch.testing.assert_close(src.read(name, e, e + 1)[0], whole[name][e], atol=0, rtol=0)
    assert src.read(name).shape == whole[name].shape


def test_nf4_bytes_are_bitsandbytes_format():
    """Our packed bytes, handed to bitsandbytes' own dequantize (its CPU build here), give our
    values exactly; bitsandbytes' own quantizer picks the same 4-bit codes."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    for shape in [(640, 1000), (64, 100), (3, 50)]:  # whole blocks, and a partial last block
        w = (torch.randn(*shape) * 0.02).to(torch.bfloat16)
        packed = nf4.quantize(w)
        theirs = bnb.functional.dequantize_4bit(packed.codes, nf4.quant_state(packed))
        torch.testing.assert_close(nf4.dequantize(packed), theirs, atol=0, rtol=0)
        codes, _ = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        assert torch.equal(codes.view(-1), packed.codes)
    layer = nf4.linear4bit(packed, use_bnb=True)  # Linear4bit over our bytes, not re-quantized
    x = torch.randn(2, shape[1], dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), x @ nf4.dequantize(packed).T, atol=1e-2, rtol=1e-2)


def test_prepare_refuses_a_checkpoint_it_cannot_stream(tmp_path):
    """An FP8 shard: one line naming the file and tensor, nothing written."""
    import struct

    folder = tmp_path / "fp8"
    folder.mkdir()
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [0, 4]}})
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode()
                                               + bytes(4))  # fmt: skip
    with pytest.raises(ModelError, match=r"model.safetensors: w: dtype F8_E4M3 is not supported"):
        Source(folder)


def test_the_prepared_copy_is_keyed_by_the_checkpoint_and_settings(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MLXTUNE_CACHE", str(tmp_path / "cache"))
    model = tiny("llama4")
    base = load_config(None, [f"model.path={model}", "model.backend=cuda"]).model
    from dataclasses import replace

    a = prepare.prepare(replace(base, quantize=4), echo=lambda line: None)
    b = prepare.prepare(replace(base, offload_experts=True), echo=lambda line: None)
    again = prepare.prepare(replace(base, quantize=4, offload_experts=True), echo=lambda line: None)
    assert a != b and a == again  # streaming does not change what is stored; quantizing does
    assert a.parent == tmp_path / "cache" / "prepared"
    assert os.listdir(a) and (a / prepare.MANIFEST).is_file()
