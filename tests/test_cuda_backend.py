"""The PyTorch twin: same functions, same LoRA formula and adapter files as the MLX engine and
PEFT, the sparse (and streamed) Llama 4 MoE equal to transformers', NF4, and a short run equal
to a transformers + PEFT run. On the CPU here; the same code runs on CUDA."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import DATA, run_overrides  # noqa: E402

from cuda_backend import lora as tlora  # noqa: E402
from cuda_backend import moe, nf4  # noqa: E402
from cuda_backend import trainer as ttrainer  # noqa: E402
from mlxtune.config import load_config  # noqa: E402
from mlxtune.data.batching import collate  # noqa: E402

# What each twin module must offer, with the same meaning on both sides.
CONTRACT = {
    "trainer": ["Engine", "setup", "attach", "batch_loss", "device_arrays", "schedule",
                "evaluate", "train"],
    "lora": ["apply", "swap", "linear_paths", "trainable", "count", "fuse"],
    "model": ["Loaded", "Split", "load", "split_head"],
    "loss": ["chunked_loss", "full_logits_loss"],
    "checkpoint": ["RunState", "save", "restore"],
    "preference": ["forward_ce", "per_side", "pair_arrays", "pair_loss", "scores",
                   "evaluate_pairs", "evaluate_file", "train_pairs"],
    "grpo": ["sample", "train_grpo"],
}  # fmt: skip


def public(module) -> set[str]:
    return {n for n, v in vars(module).items() if not n.startswith("_") and callable(v)}


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_the_twins_expose_the_same_functions(name):
    ours = public(importlib.import_module(f"mlxtune.{name}"))
    theirs = public(importlib.import_module(f"cuda_backend.{name}"))
    assert set(CONTRACT[name]) <= ours, set(CONTRACT[name]) - ours
    assert set(CONTRACT[name]) <= theirs, set(CONTRACT[name]) - theirs
    for fn in ("setup", "attach", "train", "evaluate", "chunked_loss", "apply"):
        if fn in CONTRACT[name]:
            mlx_params = list(inspect.signature(getattr(
                importlib.import_module(f"mlxtune.{name}"), fn)).parameters)  # fmt: skip
            torch_params = list(inspect.signature(getattr(
                importlib.import_module(f"cuda_backend.{name}"), fn)).parameters)  # fmt: skip
            assert mlx_params == torch_params, fn


# ------------------------------------------------------------------------------- LoRA layer


@pytest.mark.parametrize("dora", [False, True])
def test_lora_layer_is_peft_s_formula(dora):
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16, bias=False)
    ours = tlora.LoRALinear.from_base(base, r=4, scale=2.0, dora=dora)
    with torch.no_grad():
        ours.lora_B.normal_()
    reference = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(24, 16, bias=False)),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                    use_dora=dora))  # fmt: skip
    layer = reference.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(base.weight)
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
        if dora:
            layer.lora_magnitude_vector["default"].weight.copy_(ours.m)
    x = torch.randn(5, 24)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-6, rtol=1e-5)
    ours(x).square().sum().backward()
    reference(x).square().sum().backward()
    torch.testing.assert_close(ours.lora_A.grad, layer.lora_A["default"].weight.grad, atol=1e-5,
                               rtol=1e-4)  # fmt: skip
    fused = ours.fuse()
    torch.testing.assert_close(fused(x), ours(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- adapters across backends


def _logits_torch(engine, ids):
    with torch.no_grad():
        return engine.model(input_ids=torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("arch", ["llama", "gemma4"])
def test_an_mlx_adapter_gives_the_same_logits_in_the_twin_and_in_peft(trained, tiny, arch):
    from mlxtune import trainer as mtrainer

    run_dir = trained(arch)
    cfg = load_config(run_dir / "config.yaml", ["model.backend=cuda"])
    twin = ttrainer.setup(cfg, adapter=run_dir)
    ids = [[2, 40, 50, 60, 70, 80, 90]]
    mlx_engine = mtrainer.setup(load_config(run_dir / "config.yaml"), adapter=run_dir)
    import mlx.core as mx

    ours = np.array(mlx_engine.model(mx.array(ids)))
    np.testing.assert_allclose(_logits_torch(twin, ids), ours, atol=1e-4)
    auto = transformers.AutoModelForImageTextToText if arch == "gemma4" else \
        transformers.AutoModelForCausalLM  # fmt: skip
    reference = peft.PeftModel.from_pretrained(auto.from_pretrained(tiny(arch)), run_dir).eval()
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_logits_torch(twin, ids), theirs, atol=1e-4)


@pytest.fixture(scope="module")
def twin_run(tiny, tmp_path_factory):
    """trained(arch, *overrides) on the PyTorch twin, cached."""
    runs = {}

    def get(arch, *extra):
        key = (arch, *extra)
        if key not in runs:
            out = tmp_path_factory.mktemp("twin") / "run"
            cfg = load_config(None, run_overrides(tiny(arch), out, "model.backend=cuda", *extra))
            runs[key] = ttrainer.train(cfg, echo=lambda line: None)
        return runs[key]

    return get


@pytest.mark.parametrize("arch, method", [("llama", "lora"), ("llama", "dora"), ("gemma4", "lora")])
def test_a_twin_adapter_gives_the_same_logits_in_mlx_and_peft(twin_run, tiny, arch, method):
    import mlx.core as mx

    from mlxtune import trainer as mtrainer

    run_dir = twin_run(arch, f"lora.method={method}")
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert config["use_dora"] == (method == "dora") and config["target_modules"]
    ids = [[2, 40, 50, 60, 70, 80, 90]]
    twin = ttrainer.setup(load_config(run_dir / "config.yaml"), adapter=run_dir)
    mlx_engine = mtrainer.setup(load_config(run_dir / "config.yaml", ["model.backend=mlx"]),
                                adapter=run_dir)  # fmt: skip
    np.testing.assert_allclose(np.array(mlx_engine.model(mx.array(ids))), _logits_torch(twin, ids),
                               atol=1e-4)  # fmt: skip
    auto = transformers.AutoModelForImageTextToText if arch == "gemma4" else \
        transformers.AutoModelForCausalLM  # fmt: skip
    reference = peft.PeftModel.from_pretrained(auto.from_pretrained(tiny(arch)), run_dir).eval()
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_logits_torch(twin, ids), theirs, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma4"])
def test_packed_batch_loss_equals_the_mlx_engine(trained, arch):
    """Same adapter, same packed batch: the twin's loss (transformers' packed masks from restarted
    positions, torch chunked loss) equals the MLX engine's."""
    from mlxtune import trainer as mtrainer

    run_dir = trained(arch)
    cfg = load_config(run_dir / "config.yaml", ["train.ce_chunk_tokens=16"])
    mlx_engine = mtrainer.setup(cfg, adapter=run_dir)
    twin = ttrainer.setup(load_config(run_dir / "config.yaml", ["model.backend=cuda",
                                                                "train.ce_chunk_tokens=16"]),
                          adapter=run_dir)  # fmt: skip
    data = twin.dataset(str(DATA / "chat_train.jsonl"))
    batch = collate(data.examples[:5], [[0, 1], [2, 3], [4]], cfg.data.max_seq_len)
    ours = mtrainer.batch_loss(mlx_engine.model, mlx_engine.split, 16,
                               *mtrainer.device_arrays(batch, 64)).item()  # fmt: skip
    with torch.no_grad():
        theirs = float(ttrainer.batch_loss(twin, *ttrainer.device_arrays(twin, batch, 64)))
    assert twin.split is not None
    np.testing.assert_allclose(theirs, ours, rtol=1e-4)


def test_a_multimodal_batch_through_transformers_gemma4_equals_the_mlx_engine(tiny, tmp_path):
    """Pictures and a clip, collated by our code, through transformers' own Gemma 4."""
    from mlxtune import demo
    from mlxtune import trainer as mtrainer

    train_file, _ = demo.write_media_task(tmp_path / "task", n_train=6, n_valid=3)
    sets = [f"model.path={tiny('gemma4')}", "model.dtype=float32", "data.image_soft_tokens=70",
            "data.max_seq_len=512"]  # fmt: skip
    mlx_engine = mtrainer.setup(load_config(None, sets))
    twin = ttrainer.setup(load_config(None, [*sets, "model.backend=cuda"]))
    data = twin.dataset(str(train_file))
    batch = collate(data.examples, [[0, 1, 2], [3, 4, 5]], 512)
    assert {m.kind for _, m in batch.placed} == {"image", "audio"}
    ours = mtrainer.batch_loss(mlx_engine.model, mlx_engine.split, 128,
                               *mtrainer.device_arrays(batch, 64)).item()  # fmt: skip
    with torch.no_grad():
        theirs = float(ttrainer.batch_loss(twin, *ttrainer.device_arrays(twin, batch, 64)))
    np.testing.assert_allclose(theirs, ours, rtol=1e-4)


# --------------------------------------------------------------------------- the chunked loss


@pytest.mark.parametrize("arch, extra", [("llama", ()), ("gemma4", ()), ("gemma3n", ()),
                                         ("llama4", ()), ("llama4", ("model.quantize=4",))])  # fmt: skip
def test_every_family_the_twin_trains_gets_the_chunked_loss(tiny, tmp_path, arch, extra):
    """No family falls back to full logits: Llama 4's wrapper (whose decoder sits in
    `language_model.model`) and the text-only Llama 4 of the prepared copy included."""
    if arch == "gemma3n":  # transformers' Gemma 3n needs timm: the torchvision subprocess
        import _vision

        result = _vision.run("twin_splits", tiny("gemma3n"))
        assert result["split"] and result["chunked"] == pytest.approx(result["full"], rel=1e-5)
        return
    cfg = load_config(None, [f"model.path={tiny(arch)}", "model.backend=cuda",
                             f"model.prepared_dir={tmp_path / 'prepared'}", *extra])  # fmt: skip
    assert ttrainer.setup(cfg).split is not None


PEAK_OF_THE_LOSS = """
import json, torch
from cuda_backend import trainer
from cuda_backend.loss import chunked_loss, full_logits_loss
vocab, n, chunk = 202_048, 1024, 32
torch.manual_seed(0)
head = torch.nn.Linear(64, vocab, bias=False).requires_grad_(False)
hidden = torch.randn(n, 64)
targets, weights = torch.randint(0, vocab, (n,)), torch.ones(n)
out = {}
for name in ("chunked", "full"):
    h = hidden.clone().requires_grad_(True)
    trainer.reset_peak_rss()
    floor = trainer.peak_rss()
    if name == "chunked":
        loss = chunked_loss(head, chunk)(h, targets, weights)
    else:
        loss = full_logits_loss(head(h), targets, weights)
    loss.backward()
    out[name] = [float(loss), h.grad.abs().sum().item(), trainer.peak_rss() - floor]
    del loss, h
print(json.dumps(out))
"""


def test_the_chunked_loss_at_llama4s_vocabulary_holds_one_chunk_of_logits():
    """At the real 202,048-token vocabulary, the loss and its gradient cost about one chunk of
    logits over the inputs, not [tokens x vocab]: the peak resident set around each, in a
    process whose allocator hands freed blocks back (so the resident set is what is alive)."""
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", PEAK_OF_THE_LOSS], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    one_chunk, everything = 32 * 202_048 * 4, 1024 * 202_048 * 4  # fp32 logits
    assert out["chunked"][2] < 4 * one_chunk  # = everything / 8
    assert out["full"][2] > everything
    assert out["chunked"][0] == pytest.approx(out["full"][0], rel=1e-5)
    assert out["chunked"][1] == pytest.approx(out["full"][1], rel=1e-4)


# ---------------------------------------------------------------------------------- Llama 4


@pytest.fixture(scope="module")
def hf_moe(tiny):
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny("llama4"),
                                                                      dtype=torch.float32)  # fmt: skip
    return next(m for m in model.modules() if m.__class__.__name__ == "Llama4TextMoe")


@pytest.mark.parametrize("streamed", [False, True], ids=["in-model", "streamed"])
def test_sparse_moe_equals_transformers_forward_and_input_gradient(hf_moe, streamed):
    store = None
    if streamed:
        store = moe.ExpertStore.from_tensors(hf_moe.experts.gate_up_proj,
                                             hf_moe.experts.down_proj, chunk=3, quantize=False)  # fmt: skip
    sparse = moe.SparseMoe(hf_moe, store)
    torch.manual_seed(0)
    x = torch.randn(3, 41, hf_moe.hidden_dim, requires_grad=True)
    want, want_logits = hf_moe(x)
    grad = torch.randn_like(want)
    (want_dx,) = torch.autograd.grad(want, x, grad)
    got, got_logits = sparse(x)
    (got_dx,) = torch.autograd.grad(got, x, grad.reshape(got.shape))
    torch.testing.assert_close(got, want.reshape(got.shape), atol=1e-5, rtol=0)
    torch.testing.assert_close(got_dx, want_dx, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-6, rtol=0)


def test_nf4_packs_4_127_bits_per_weight_within_a_quantization_step():
    torch.manual_seed(0)
    w = torch.randn(256, 1024)
    packed = nf4.quantize(w)
    assert packed.nbytes * 8 / w.numel() == pytest.approx(nf4.BITS, abs=1e-3)
    back = nf4.dequantize(packed)
    step = nf4.LEVELS.diff().max() / 2  # half the widest gap between levels
    blocks = w.view(-1, nf4.BLOCK).abs().amax(1, keepdim=True)
    err = ((back - w).view(-1, nf4.BLOCK) / blocks).abs().max()
    assert err <= step + 1e-2
    layer = torch.nn.Linear(1024, 256, bias=False)
    layer.weight.data.copy_(w)
    q = nf4.NF4Linear.from_linear(layer)
    x = torch.randn(3, 1024)
    torch.testing.assert_close(q(x), x @ back.T, atol=1e-4, rtol=1e-4)


def _llama4_run_losses(tiny, tmp_path, extra=()):
    cfg = load_config(None, run_overrides(tiny("llama4"), tmp_path / "run", "model.backend=cuda",
                                          "train.report_every=1", "train.iters=6",
                                          "train.lr_schedule=constant", *extra))  # fmt: skip
    run_dir = ttrainer.train(cfg, echo=lambda line: None)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return cfg, [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.mark.parametrize("extra", [(), ("model.offload_experts=true",)], ids=["whole", "prepared"])
def test_a_llama4_lora_run_equals_transformers_plus_peft(tiny, tmp_path, extra):
    """Six steps of our twin (sparse MoE, packed rows, chunked loss; loaded whole, or from the
    prepared copy with experts streamed) against transformers' dense Llama 4 with PEFT LoRA on
    the same targets, the same initial adapter, the same examples run one by one, the same
    AdamW: the same loss at every step."""
    cfg, ours = _llama4_run_losses(tiny, tmp_path, (*extra, f"model.prepared_dir={tmp_path / 'p'}"))
    engine = ttrainer.setup(cfg)  # the same seed draws the same initial LoRA A matrices
    targets = sorted({engine.hf_names[p] for p in engine.adapted})
    assert not any("router" in t or "experts" in t for t in targets)
    assert any("shared_expert" in t for t in targets)
    base = transformers.AutoModelForImageTextToText.from_pretrained(tiny("llama4"),
                                                                     dtype=torch.float32)  # fmt: skip
    reference = peft.get_peft_model(base, peft.LoraConfig(r=cfg.lora.rank,
                                                          lora_alpha=cfg.lora.alpha,
                                                          target_modules=targets))  # fmt: skip
    with torch.no_grad():
        for path in engine.adapted:
            layer = reference.base_model.model.get_submodule(engine.hf_names[path])
            ours_layer = engine.model.get_submodule(path)
            layer.lora_A["default"].weight.copy_(ours_layer.lora_A)
            layer.lora_B["default"].weight.copy_(ours_layer.lora_B)
    params = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=0.0)
    from mlxtune.data.batching import Batching, Position, Stream

    data = engine.dataset(cfg.data.train)
    stream = Stream(data, Batching.of(cfg), cfg.train.seed)
    position, theirs = Position(), []
    for _ in range(len(ours)):
        batch, position = stream.take(position)
        total = torch.zeros(())
        for r, row in enumerate(batch.segments):
            for s in set(row.tolist()) - {0}:
                cols = np.flatnonzero(row == s)
                ids = torch.tensor(
                    np.append(batch.inputs[r, cols], batch.targets[r, cols[-1]])
                ).long()
                w = torch.tensor(batch.weights[r, cols])
                logits = reference(input_ids=ids[None]).logits[0, :-1]
                ce = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
                total = total + (ce * w).sum()
        (total / batch.loss_tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        theirs.append(float(total) / batch.loss_tokens)
    np.testing.assert_allclose(ours, theirs, rtol=2e-4)


@pytest.mark.parametrize("report_every", [1, 2])
def test_streamed_nf4_experts_train_and_checkpoints_resume(tiny, tmp_path, report_every):
    """offload_experts + quantize 4 (the 24 GB recipe's shape, on the CPU): the loss falls, and a
    run killed after its checkpoint at step 3 and resumed gives the same curve as a straight
    run (reporting every 2 steps too: the report at step 4 averages steps 3 and 4 in both)."""
    extra = ("model.offload_experts=true", "model.expert_chunk=2", "model.quantize=4",
             "train.grad_checkpoint=true", "train.save_every=3", "lora.dropout=0.1",
             "data.packing=true",
             f"train.report_every={report_every}")  # fmt: skip
    cfg, straight = _llama4_run_losses(tiny, tmp_path / "a", extra)
    assert straight[-1] < straight[0]
    stopped = load_config(None, run_overrides(tiny("llama4"), tmp_path / "b" / "run",
                                              "model.backend=cuda", "train.iters=6",
                                              "train.lr_schedule=constant", *extra))  # fmt: skip

    def kill_at_step_4(line):
        if line.startswith("step 4/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ttrainer.train(stopped, echo=kill_at_step_4)
    run_dir = tmp_path / "b" / "run"
    ttrainer.train(load_config(run_dir / "config.yaml", [f"output.dir={run_dir}"]), resume=True,
                   echo=lambda line: None)  # fmt: skip
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in rows if r["kind"] == "train"], straight,
                               rtol=1e-5)  # fmt: skip


def test_the_router_is_never_adapted(tiny):
    cfg = load_config(None, [f"model.path={tiny('llama4')}", "model.backend=cuda",
                             "lora.targets=[router, q_proj]"])  # fmt: skip
    engine = ttrainer.setup(cfg)
    assert engine.adapted and all("router" not in p for p in engine.adapted)
    assert tlora.count(tlora.trainable(engine.model)) > 0


def test_checkpointed_streaming_visits_each_expert_twice_per_step(tiny):
    """Forward and backward stream every expert once each; the checkpointed layer's recompute
    reuses the routed output, and gives the same gradients as a run without checkpoints."""
    grads = []
    for checkpointed in (False, True):
        cfg = load_config(None, [f"model.path={tiny('llama4')}", "model.backend=cuda",
                                 "model.offload_experts=true", "model.expert_chunk=3",
                                 f"train.grad_checkpoint={str(checkpointed).lower()}"])  # fmt: skip
        engine = ttrainer.setup(cfg)
        engine.model.train()
        data = engine.dataset(str(DATA / "chat_train.jsonl"))
        batch = collate(data.examples[:4], [[0, 1], [2, 3]], 128)
        before = [s.passes for s in engine.loaded.stores]
        ttrainer.batch_loss(engine, *ttrainer.device_arrays(engine, batch, 64)).backward()
        assert [s.passes - b for s, b in zip(engine.loaded.stores, before, strict=True)] == [2, 2]
        grads.append({k: p.grad.clone() for k, p in tlora.trainable(engine.model).items()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)


def test_offloading_moves_only_layer_inputs_and_changes_no_gradient(tiny):
    """With offload_checkpoints, what goes to the host is each checkpointed layer's input and
    the final norm's (exactly the bytes the planner counts), never a weight or a loss chunk;
    the gradients are the same as without it."""
    from cuda_backend import assemble
    from mlxtune import plan

    cfg = load_config(None, [f"model.path={tiny('llama4')}", "model.backend=cuda",
                             "model.dtype=bfloat16", "train.grad_checkpoint=true",
                             "train.offload_checkpoints=true", "train.ce_chunk_tokens=16"])  # fmt: skip
    engine = ttrainer.setup(cfg)
    engine.model.train()
    data = engine.dataset(str(DATA / "chat_train.jsonl"))
    batch = collate(data.examples[:4], [[0, 1], [2, 3]], 128)
    text = engine.model.config.get_text_config()
    grads, seen, arena = [], [], assemble.HostArena(pin=False)
    for hooks in (None, ttrainer.layer_inputs_on_host(arena, text.hidden_size, "cpu", seen)):
        with hooks or contextlib.nullcontext():
            loss = ttrainer.batch_loss(engine, *ttrainer.device_arrays(engine, batch, 64))
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in tlora.trainable(engine.model).items()})
        engine.model.zero_grad(set_to_none=True)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=0, rtol=0)
    rows, cols = batch.inputs.shape
    assert seen == [(rows, cols, text.hidden_size)] * (text.num_hidden_layers + 2)
    p = plan.plan(cfg, on_cpu=True)
    planned = next(r for r in p.rows if r.name == "layer checkpoints")
    assert sum(t.numel() for t in arena.spill) == planned.host * rows * cols / p.tokens


def test_the_twin_trains_gemma4_on_pictures_and_audio(tiny, tmp_path):
    from mlxtune import demo

    train_file, valid_file = demo.write_media_task(tmp_path / "task", n_train=8, n_valid=3)
    cfg = load_config(None, [f"model.path={tiny('gemma4')}", "model.backend=cuda",
                             f"data.train={train_file}", f"data.valid={valid_file}",
                             f"output.dir={tmp_path / 'run'}", "data.image_soft_tokens=70",
                             "data.max_seq_len=512", "train.iters=3", "train.batch_size=2",
                             "train.report_every=1", "train.learning_rate=1e-2"])  # fmt: skip
    run_dir = ttrainer.train(cfg, echo=lambda line: None)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["train", "train", "train", "valid"]
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_llama4_default_targets_are_attention_shared_expert_and_dense_ffn(tiny):
    engine = ttrainer.setup(load_config(None, [f"model.path={tiny('llama4')}",
                                               "model.backend=cuda"]))  # fmt: skip
    names = set(engine.hf_names.values())
    assert any(".self_attn.q_proj" in n for n in names)
    assert any(".feed_forward.shared_expert.down_proj" in n for n in names)
    assert any(n.endswith("layers.0.feed_forward.gate_proj") for n in names)  # a dense layer
    assert not any("router" in n or "experts." in n for n in names)


# ------------------------------------------------------------------- biased projections


@pytest.fixture(scope="module")
def biased(tiny, tmp_path_factory):
    """A tiny Llama whose attention projections carry biases, as Qwen2's q/k/v do: the tiny
    Llama's config with attention_bias, weights drawn by transformers, biases made non-zero."""
    import shutil

    from safetensors.torch import save_file

    src, out = tiny("llama"), tmp_path_factory.mktemp("biased") / "model"
    out.mkdir()
    config = json.loads((src / "config.json").read_text()) | {"attention_bias": True}
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name, value in state.items():
        if name.endswith(".bias"):
            value.normal_(0.0, 0.5)
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_biased_projections_train_merge_and_export_as_peft_does(biased, tmp_path, method):
    """LoRA and DoRA on layers with biases: the twin's adapter gives PEFT's logits (DoRA's
    magnitude rescales W x, never the bias), the MLX engine's too; the twin's fused layers and
    the merged export keep the biases."""
    import mlx.core as mx

    from mlxtune import trainer as mtrainer
    from mlxtune.export import export

    run_dir = ttrainer.train(load_config(None, run_overrides(biased, tmp_path / "run",
                                                             "model.backend=cuda",
                                                             f"lora.method={method}",
                                                             "train.iters=4")),
                             echo=lambda line: None)  # fmt: skip
    ids = [[2, 40, 50, 60, 70, 80, 90]]
    twin = ttrainer.setup(load_config(run_dir / "config.yaml"), adapter=run_dir)
    ours = _logits_torch(twin, ids)
    reference = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(biased), run_dir).eval()  # fmt: skip
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids)).logits.numpy()
    untouched = _logits_torch(ttrainer.setup(load_config(run_dir / "config.yaml")), ids)
    assert np.abs(theirs - untouched).max() > 1e-3  # the adapter matters
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    mlx_engine = mtrainer.setup(load_config(run_dir / "config.yaml", ["model.backend=mlx"]),
                                adapter=run_dir)  # fmt: skip
    np.testing.assert_allclose(np.array(mlx_engine.model(mx.array(ids))), theirs, atol=1e-4)
    tlora.fuse(twin.model)
    assert all(m.bias is not None for n, m in twin.model.named_modules() if n.endswith("q_proj"))
    np.testing.assert_allclose(_logits_torch(twin, ids), theirs, atol=1e-4)
    merged = export(run_dir, tmp_path / "merged", "merged")
    with torch.no_grad():
        folded = transformers.AutoModelForCausalLM.from_pretrained(merged)(
            input_ids=torch.tensor(ids)).logits.numpy()  # fmt: skip
    np.testing.assert_allclose(folded, theirs, atol=1e-4)


def test_the_twin_trains_tower_lora_and_embedders_as_the_mlx_engine_reads_them(tiny, tmp_path):
    """lora.vision, lora.audio and lora.train_embedders on the twin (transformers' Gemma 4):
    its adapter names the towers' linears and saves the embedders in full (PEFT's
    modules_to_save), and the MLX engine with that adapter gives the twin's loss on a batch of
    pictures and clips."""
    from mlxtune import demo
    from mlxtune import trainer as mtrainer

    train_file, _ = demo.write_media_task(tmp_path / "task", n_train=6, n_valid=3)
    sets = [f"model.path={tiny('gemma4')}", "model.dtype=float32", "data.image_soft_tokens=70",
            "data.max_seq_len=512", f"data.train={train_file}", "lora.vision=true",
            "lora.audio=true", "lora.train_embedders=true", "train.iters=3",
            "train.batch_size=2", "train.learning_rate=1e-2", "train.eval_every=0",
            f"output.dir={tmp_path / 'run'}"]  # fmt: skip
    run_dir = ttrainer.train(load_config(None, [*sets, "model.backend=cuda"]),
                             echo=lambda line: None)  # fmt: skip
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.embed_audio.embedding_projection",
                                         "model.embed_vision.embedding_projection"]  # fmt: skip
    assert any(".vision_tower." in t for t in config["target_modules"])
    assert any(".audio_tower." in t for t in config["target_modules"])
    twin = ttrainer.setup(load_config(run_dir / "config.yaml"), adapter=run_dir)
    mlx_engine = mtrainer.setup(load_config(run_dir / "config.yaml", ["model.backend=mlx"]),
                                adapter=run_dir)  # fmt: skip
    data = twin.dataset(str(train_file))
    batch = collate(data.examples, [[0, 1, 2], [3, 4, 5]], 512)
    ours = mtrainer.batch_loss(mlx_engine.model, mlx_engine.split, 128,
                               *mtrainer.device_arrays(batch, 64)).item()  # fmt: skip
    with torch.no_grad():
        theirs = float(ttrainer.batch_loss(twin, *ttrainer.device_arrays(twin, batch, 64)))
        untouched = ttrainer.setup(load_config(run_dir / "config.yaml"))
        before = float(
            ttrainer.batch_loss(untouched, *ttrainer.device_arrays(untouched, batch, 64))
        )
    np.testing.assert_allclose(theirs, ours, rtol=1e-4)
    assert abs(theirs - before) > 1e-3  # the adapter (towers and embedders too) did something


def test_an_8_bit_base_on_the_twin_is_refused_in_one_line_naming_the_key(tiny, tmp_path):
    from _cli import mlxtune

    config = tmp_path / "c.yaml"
    config.write_text("model:\n  backend: cuda\n")
    out = mlxtune("train", config, "--set", f"model.path={tiny('llama')}",
                  "--set", "model.quantize=8", "--set", f"data.train={DATA / 'chat_train.jsonl'}",
                  "--set", f"output.dir={tmp_path / 'run'}")  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "mlxtune: error: model.quantize: 8 is the MLX backend's 8-bit format; the cuda backend "
        "quantizes to 4-bit NF4 (QLoRA's, read by bitsandbytes): use 4, or null"
    ]
    assert not (tmp_path / "run").exists()
