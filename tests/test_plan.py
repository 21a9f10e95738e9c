"""`mlxtune plan`: the counts are transformers', the Maverick / Scout arithmetic is the
research's, and on runs small enough to make here, the planned peak is the measured one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlxtune import plan
from mlxtune.config import load_config

ROOT = Path(__file__).resolve().parents[1]
EXE = shutil.which("mlxtune", path=str(Path(sys.executable).parent)) or "mlxtune"
GIB = 2**30


def recipe(name: str, *overrides: str):
    return load_config(ROOT / "configs" / f"llama4-{name}-24gb.yaml", list(overrides))


@pytest.mark.parametrize("name, total", [("Maverick-17B-128E", 401_583_781_376),
                                         ("Scout-17B-16E", 108_641_793_536)])  # fmt: skip
def test_the_formula_counts_what_transformers_builds(name, total):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = json.loads((plan.KNOWN / f"meta-llama--Llama-4-{name}-Instruct.json").read_text())
    counts = plan.counts_from_config(config)
    with torch.device("meta"):
        model = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(**config))
    assert counts.total == total == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert counts.routed_experts == experts


def test_headers_and_formula_agree_on_a_local_checkpoint(tiny):
    folder = tiny("llama4")
    by_headers = plan.counts_from_headers(folder)
    by_formula = plan.counts_from_config(json.loads((folder / "config.json").read_text()))
    for field in ("routed_experts", "dense_ffn", "attention", "shared_expert", "router", "embed",
                  "head", "towers"):  # fmt: skip
        assert getattr(by_headers, field) == getattr(by_formula, field), field


def test_maverick_on_24_gb_matches_the_research_arithmetic():
    counts = plan.plan(recipe("maverick")).counts
    assert counts.routed_experts * plan.NF4_BITS / 8 / GIB == pytest.approx(185.71, abs=0.01)
    vram = []
    for tokens in (2048, 8192, 16384):
        p = plan.plan(recipe("maverick", f"data.max_seq_len={tokens}", "train.batch_size=1"),
                      24, 256)  # fmt: skip
        vram.append(p.gpu / GIB)
        assert p.fits and 198 <= p.host / GIB <= 211
        assert p.streamed_per_step / 1e9 == pytest.approx(398.8, abs=0.1)  # forward + backward
        assert p.step_seconds == pytest.approx(398.8 / 25, abs=0.05)  # at PCIe 4.0's 25 GB/s
    assert 13.5 <= vram[0] < vram[1] < vram[2] <= 19
    scout = plan.plan(recipe("scout"), 24, 96)
    assert scout.counts.routed_experts * plan.NF4_BITS / 8 / GIB == pytest.approx(46.43, abs=0.01)
    assert scout.fits and scout.streamed_per_step / 1e9 == pytest.approx(99.7, abs=0.1)
    small = plan.plan(recipe("maverick"), 24, 192)
    assert not small.fits and "does not fit: 209" in small.verdict()


def test_loading_and_preparing_are_planned_and_never_hold_the_model_whole():
    """The phases before training: the prepared copy's disk, the load (experts and embedding
    in host RAM, NF4 weights on the GPU: never the 748 GiB of bf16), and the one-time prepare
    (one source slice at a time)."""
    p = plan.plan(recipe("maverick"), 24, 256)
    load_gpu, load_host = p.phases["load"]
    prepare_gpu, prepare_host = p.phases["prepare"]
    assert load_gpu < p.gpu and load_host < p.host  # training is the peak
    assert 7 * GIB < load_gpu < 10 * GIB  # NF4 weights, bf16 head, context
    assert 185.7 * GIB < load_host < 200 * GIB  # experts, embedding, one slice in flight
    assert prepare_host < 11 * GIB and prepare_gpu == 0  # the base plus one expert's slice
    assert 200e9 < p.disk < 215e9  # ~186 GiB NF4 experts + NF4 linears + bf16 head/embedding
    table = p.table()
    assert "while loading" in table and "disk for the prepared copy" in table
    assert "vision tower not loaded" in table
    # quantize 4 without offloading: the experts are NF4 on the GPU (not bf16), and do not fit
    resident = plan.plan(recipe("maverick", "model.offload_experts=false"), 24, 256)
    row = next(r for r in resident.rows if r.name == "routed experts")
    assert row.gpu / GIB == pytest.approx(185.7, abs=0.5) and not row.host
    assert not resident.fits and "offload_experts" not in resident.verdict().split("to fit")[0]


def test_the_plan_counts_the_bytes_the_loaded_model_holds(tiny, tmp_path):
    """The planner's formula for the prepared copy against what `cuda_backend` actually
    allocates: each MoE layer's expert block, byte for byte, and the NF4 linear weights."""
    pytest.importorskip("torch")
    from cuda_backend import model as cuda_model
    from cuda_backend import nf4

    for offload in ("true", "false"):
        cfg = load_config(None, [f"model.path={tiny('llama4')}", "model.backend=cuda",
                                 "model.quantize=4", f"model.offload_experts={offload}",
                                 f"model.prepared_dir={tmp_path / 'prepared'}"])  # fmt: skip
        loaded = cuda_model.load(cfg.model)
        p = plan.plan(cfg, on_cpu=True)
        experts = next(r for r in p.rows if r.name == "routed experts")
        assert experts.host == sum(s.nbytes for s in loaded.stores)
        linear = next(r for r in p.rows if r.name == "frozen linear weights")
        packed = sum(m.packed.nbytes for m in loaded.model.modules()
                     if isinstance(m, nf4.NF4Linear))  # fmt: skip
        assert linear.host == pytest.approx(packed, rel=0.02)


def test_a_run_the_plan_says_cannot_fit_is_refused_before_anything_loads(tiny, tmp_path):
    from cuda_backend import trainer as cuda_trainer
    from mlxtune.errors import ConfigError

    cfg = load_config(None, [f"model.path={tiny('llama4')}", "model.backend=cuda",
                             f"data.train={ROOT / 'tests' / 'data' / 'chat_train.jsonl'}",
                             "model.offload_experts=true", "data.max_seq_len=4000000",
                             "train.batch_size=64", f"model.prepared_dir={tmp_path / 'p'}",
                             f"output.dir={tmp_path / 'run'}"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"^plan: does not fit: .* GiB of .* (RAM|GPU)"):
        cuda_trainer.train(cfg, echo=lambda line: None)
    assert not (tmp_path / "p").exists() and not (tmp_path / "run").exists()


def test_the_planned_peak_is_the_measured_one_on_small_runs(tmp_path):
    """Three small MLX runs (a Llama and a Gemma 4 shape with real-sized vocabularies, with and
    without gradient checkpointing): MLX's measured peak within 20% of the plan. The plan's
    constants were fitted by benchmarks/fit_plan.py on six other runs (other widths, depths,
    vocabularies and row lengths), never on these."""
    from mlxtune.measure import chats, mlx_peak
    from mlxtune.tiny import Sizes, make_tiny

    data = chats(tmp_path / "data.jsonl", 32, 150)
    cases = [("llama", Sizes(512, 4, 32000), ["data.max_seq_len=256", "train.batch_size=4"]),
             ("llama", Sizes(512, 4, 32000), ["data.max_seq_len=256", "train.batch_size=4",
                                              "train.grad_checkpoint=true"]),
             ("gemma4", Sizes(256, 4, 65536), ["data.max_seq_len=256", "train.batch_size=4"])]  # fmt: skip
    for i, (arch, sizes, extra) in enumerate(cases):
        model = tmp_path / f"{arch}-{i}"
        make_tiny(model, arch, sizes=sizes)
        cfg, measured = mlx_peak(model, data, tmp_path / f"run{i}", *extra)
        planned = plan.plan(cfg).gpu
        assert 0.8 <= planned / measured <= 1.2, (arch, extra, planned / GIB, measured / GIB)


def test_the_command_prints_the_table_and_exits_1_when_it_does_not_fit():
    config = ROOT / "configs" / "llama4-maverick-24gb.yaml"
    ok = subprocess.run([EXE, "plan", str(config), "--vram-gb", "24", "--ram-gb", "256"],
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "401,583,781,376 parameters" in ok.stdout and "routed experts" in ok.stdout
    assert "streamed host -> GPU per optimizer step: 398.8 GB" in ok.stdout
    short = subprocess.run([EXE, "plan", str(config), "--vram-gb", "12", "--ram-gb", "256",
                            "--json"], capture_output=True, text=True)  # fmt: skip
    assert short.returncode == 1
    result = json.loads(short.stdout)
    assert result["params"]["routed_experts"] == 386_547_056_640
    assert result["verdict"].startswith("does not fit")
    mac = subprocess.run([EXE, "plan", str(config), "--set", "model.backend=mlx", "--set",
                          "model.offload_experts=false", "--set", "train.grad_checkpoint=true",
                          "--vram-gb", "512"], capture_output=True, text=True)  # fmt: skip
    assert mac.returncode == 0 and "fits:" in mac.stdout and "unified memory" in mac.stdout


LLAMA_8B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 14336, "vocab_size": 128256, "torch_dtype": "bfloat16",
            "tie_word_embeddings": False}  # fmt: skip


def _headers_only(folder: Path, config: dict) -> Path:
    """A checkpoint folder whose safetensors file has the Llama tensors' header and no data:
    what the planner reads (shapes), without 16 GB of weights."""
    import struct

    d, n, v = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    kv = d // config["num_attention_heads"] * config["num_key_value_heads"]
    f = config["intermediate_size"]
    shapes = {"model.embed_tokens.weight": [v, d], "lm_head.weight": [v, d],
              "model.norm.weight": [d]}  # fmt: skip
    for i in range(n):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": [d, d], p + "self_attn.k_proj.weight": [kv, d],
                   p + "self_attn.v_proj.weight": [kv, d], p + "self_attn.o_proj.weight": [d, d],
                   p + "mlp.gate_proj.weight": [f, d], p + "mlp.up_proj.weight": [f, d],
                   p + "mlp.down_proj.weight": [d, f], p + "input_layernorm.weight": [d],
                   p + "post_attention_layernorm.weight": [d]}  # fmt: skip
    header, at = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [at, at + size]}
        at += size
    folder.mkdir(parents=True)
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_sharded_ranks_plan_their_share_of_a_full_fine_tune_and_load_it_whole(tmp_path):
    """A full fine-tune of a Llama 3.1 8B shape in bf16: 16 GB of weights and 3 x 14 GB of
    gradients and AdamW moments do not fit one 24 GB GPU; sharded over 4 (FSDP2) each rank keeps
    a quarter of them plus the layers it gathers, and still loads the whole model first."""
    folder = _headers_only(tmp_path / "llama-8b", LLAMA_8B)
    cfg = load_config(None, [f"model.path={folder}", "model.backend=cuda", "lora.method=full",
                             "train.batch_tokens=2048", "train.grad_checkpoint=true"])  # fmt: skip
    one, four = plan.plan(cfg, 24, 256), plan.plan(cfg, 24, 256, ranks=4)
    rows = [{r.name: r.gpu for r in p.rows} for p in (one, four)]
    assert rows[0]["grads + AdamW (full)"] / GIB == pytest.approx(3 * 2 * 6.98e9 / GIB, rel=0.01)
    for name in ("grads + AdamW (full)", "frozen linear weights", "input embedding"):
        assert rows[1][name] == pytest.approx(rows[0][name] / 4), name
    layer = 3 * 2 * 218e6  # two layers' bf16 weights in flight and one layer's gradients
    assert rows[1]["gathered layers"] == pytest.approx(layer, rel=0.01)
    assert not one.fits and four.fits, (one.verdict(), four.verdict())
    load = four.phases["load"][0]
    assert 15 * GIB < load < four.gpu  # the whole bf16 model and the context, then sharded
    assert "sharded over 4 ranks" in four.table()
    assert "gathers of" in four.table() and "reduce-scatter" in four.table()
