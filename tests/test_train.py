"""The MLX engine's behaviour on tiny models: packing, chunked loss, checkpointing, resume,
quantized bases, full fine-tuning, exports, and that a model actually learns."""

from __future__ import annotations

import json
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import DATA, run_overrides
from mlx.utils import tree_flatten

from mlxtune import trainer
from mlxtune.config import load_config
from mlxtune.data.batching import collate
from mlxtune.progress import read_metrics


def engine_for(tiny, tmp_path, arch="llama", *extra):
    cfg = load_config(None, run_overrides(tiny(arch), tmp_path / "run", *extra))
    engine = trainer.setup(cfg)
    return engine, engine.dataset(str(DATA / "chat_train.jsonl"))


def loss_and_grads(engine, batch, chunk):
    model = engine.model
    split = engine.split if chunk else None
    fn = nn.value_and_grad(model, partial(trainer.batch_loss, model, split, chunk))
    loss, grads = fn(*trainer.device_arrays(batch, 64))
    return loss.item(), {k: np.array(v) for k, v in tree_flatten(grads)}


@pytest.mark.parametrize("arch", ["llama", "gemma4"])
def test_packed_rows_give_the_loss_of_separate_rows(tiny, tmp_path, arch):
    engine, data = engine_for(tiny, tmp_path, arch)
    ex = data.examples
    packed = trainer.batch_loss(engine.model, engine.split, 16,
                                *trainer.device_arrays(collate(ex, [[0, 1], [2, 3]], 128), 64))  # fmt: skip
    alone = sum(
        trainer.batch_loss(engine.model, engine.split, 16,
                           *trainer.device_arrays(collate(ex, [[i]], 128), 64)).item()
        for i in range(4)
    )  # fmt: skip
    np.testing.assert_allclose(packed.item(), alone, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma4"])
def test_one_example_per_row_needs_no_mask_and_gives_the_loss_of_each_alone(tiny, tmp_path, arch):
    """Without packing, rows are right-padded to the batch's longest and the model gets no mask
    array (causal attention on its fused path): the loss still equals each example's alone."""
    engine, data = engine_for(tiny, tmp_path, arch, "data.packing=false")
    assert engine.masked is bool(getattr(engine.model, "bidirectional", False))  # image blocks
    ex = data.examples
    arrays = trainer.device_arrays(collate(ex, [[0], [1], [2], [3]], 128), 64)
    unmasked = trainer.batch_loss(engine.model, engine.split, 16, *arrays, masked=False).item()
    alone = sum(
        trainer.batch_loss(engine.model, engine.split, 16,
                           *trainer.device_arrays(collate(ex, [[i]], 128), 64)).item()
        for i in range(4)
    )  # fmt: skip
    assert len({len(e) for e in ex[:4]}) > 1  # the batch pads some rows
    np.testing.assert_allclose(unmasked, alone, rtol=1e-5)


def test_grad_checkpoint_auto_turns_on_when_the_plan_does_not_fit(tiny, tmp_path):
    """train.grad_checkpoint auto: the memory plan of a step without checkpointing against
    train.memory_gb decides; on, it says so, checkpoints every block, and the loss curve is the
    one of a run without it."""
    lines = {}
    runs = {"roomy": "train.memory_gb=64", "tight": "train.memory_gb=0.0001", "off": None}
    losses = {}
    for name, setting in runs.items():
        extra = [setting] if setting else ["train.grad_checkpoint=false"]
        cfg = load_config(None, run_overrides(tiny("llama"), tmp_path / name, "train.iters=3",
                                              "train.save_every=0", *extra))  # fmt: skip
        said = lines.setdefault(name, [])
        run_dir = trainer.train(cfg, echo=said.append)
        losses[name] = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")
                        if r["kind"] == "train"]  # fmt: skip
    note = [x for x in lines["tight"] if "grad_checkpoint auto: on" in x]
    assert len(note) == 1 and "of the 0.0001 GiB it may use" in note[0], lines["tight"]
    assert not any("grad_checkpoint auto" in x for x in lines["roomy"] + lines["off"]), lines
    cfg, why = trainer.settle_checkpointing(load_config(None, run_overrides(
        tiny("llama"), tmp_path / "x", "train.memory_gb=0.0001")))  # fmt: skip
    assert cfg.train.grad_checkpoint is True and why == note[0].removeprefix("note: ")
    np.testing.assert_allclose(losses["tight"], losses["off"], rtol=1e-5)
    np.testing.assert_allclose(losses["roomy"], losses["off"], rtol=1e-6)


def test_chunked_loss_equals_full_logits_in_value_and_gradient(tiny, tmp_path):
    engine, data = engine_for(tiny, tmp_path, "gemma4", "lora.method=dora")
    batch = collate(data.examples, [[0, 1], [2]], 128)
    full_loss, full = loss_and_grads(engine, batch, 0)
    for chunk in (7, 64):
        loss, grads = loss_and_grads(engine, batch, chunk)
        np.testing.assert_allclose(loss, full_loss, rtol=1e-5)
        for k in full:
            np.testing.assert_allclose(grads[k], full[k], atol=1e-5 * np.abs(full[k]).max())


def test_gradient_checkpointing_changes_no_gradient(tiny, tmp_path):
    plain, data = engine_for(tiny, tmp_path, "gemma4")
    batch = collate(data.examples, [[0, 1], [2]], 128)
    want = loss_and_grads(plain, batch, 16)
    ckpt, _ = engine_for(tiny, tmp_path, "gemma4", "train.grad_checkpoint=true")
    got = loss_and_grads(ckpt, batch, 16)
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    for k in want[1]:
        np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("report_every", [1, 3])
def test_resume_continues_the_same_loss_curve(tiny, tmp_path, report_every):
    """Stop a run after step 6 (checkpoint at 4), resume it, and compare with a straight run.
    Dropout is on, so the RNG state has to come back too. Reporting every 3 steps, the report
    at step 6 averages steps 4 to 6 in both runs (the checkpoint keeps the running sums). What
    the killed run left half-written (a checkpoint's and the final adapter's temp folders) is
    removed when it resumes."""
    settings = ("lora.dropout=0.1", "train.iters=8", "train.save_every=4", "train.grad_accum=2",
                f"train.report_every={report_every}")  # fmt: skip
    straight = trainer.train(
        load_config(None, run_overrides(tiny("llama"), tmp_path / "a", *settings)),
        echo=lambda line: None,
    )
    cfg = load_config(None, run_overrides(tiny("llama"), tmp_path / "b", *settings))

    def stop_after_step_6(line):
        if line.startswith("step 6/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg, echo=stop_after_step_6)
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert steps == list(range(report_every, 7, report_every))
    leftovers = [
        tmp_path / "b" / "..final.x1y2",
        tmp_path / "b" / "checkpoints" / ".step-0000008.z",
    ]
    for folder in leftovers:  # as a kill during atomic_folder leaves them
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"half")
    lines = []
    resumed = trainer.train(cfg, resume=True, echo=lines.append)
    assert not any(f.exists() for f in leftovers)
    assert any(line.startswith("removed ..final.x1y2") for line in lines)

    def curve(run):
        return [
            (r["step"], r["loss"])
            for r in read_metrics(run / "metrics.jsonl")
            if r["kind"] == "train"
        ]

    assert [s for s, _ in curve(resumed)] == [*range(report_every, 8, report_every), 8]
    np.testing.assert_allclose(
        [x for _, x in curve(resumed)], [x for _, x in curve(straight)], rtol=1e-6
    )
    a = mx.load(str(straight / "adapter_model.safetensors"))
    b = mx.load(str(resumed / "adapter_model.safetensors"))
    assert all(mx.allclose(a[k], b[k], rtol=1e-5, atol=1e-7).item() for k in a)


def test_metrics_and_run_folder(trained):
    run_dir = trained("llama")
    rows = read_metrics(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    first = train_rows[0]
    for key in (
        "loss",
        "learning_rate",
        "tokens_per_s",
        "real_token_share",
        "peak_memory_gb",
        "eta_s",
    ):
        assert key in first
    assert [r["step"] for r in rows if r["kind"] == "valid"] == [8]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    names = {p.name for p in run_dir.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "config.yaml",
        "metrics.jsonl",
    } <= names
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-0000004",
        "step-0000008",
    ]
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]


def test_quantized_base_trains_and_reloads(trained):
    run_dir = trained("llama", "model.quantize=4")
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    engine = trainer.setup(load_config(run_dir / "config.yaml"), adapter=run_dir)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in engine.model.named_modules())
    out = engine.model(mx.array([[1, 2, 3]]))
    assert bool(mx.isfinite(out).all())


def test_full_finetune_trains_blocks_and_merges(trained, tiny, tmp_path):
    from mlxtune.export import export

    run_dir = trained("llama", "lora.method=full", "lora.num_layers=1", "train.learning_rate=1e-3")
    engine = trainer.setup(load_config(run_dir / "config.yaml"), adapter=run_dir)
    merged = export(run_dir, tmp_path / "merged", "merged")
    ids = mx.array([[2, 40, 50, 60, 70]])
    from mlx_lm import load

    reloaded, _ = load(str(merged))
    np.testing.assert_allclose(np.array(reloaded(ids)), np.array(engine.model(ids)), atol=1e-5)
    base, _ = load(str(tiny("llama")))
    assert np.abs(np.array(base(ids)) - np.array(engine.model(ids))).max() > 1e-3


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_mlx_lm_export_loads_in_mlx_lm(trained, tiny, tmp_path, method):
    from mlx_lm import load

    from mlxtune.export import export

    run_dir = trained("gemma4", f"lora.method={method}")
    out = export(run_dir, tmp_path / "mlx", "mlx-lm")
    theirs, _ = load(str(tiny("gemma4")), adapter_path=str(out))
    ours = trainer.setup(load_config(run_dir / "config.yaml"), adapter=run_dir)
    ids = mx.array([[2, 40, 50, 60, 70, 80]])
    np.testing.assert_allclose(np.array(theirs(ids)), np.array(ours.model(ids)), atol=1e-5)


def test_a_tiny_model_learns_a_held_out_task(tiny, tmp_path):
    """The demo task: the group of the words in the prompt, on rows never trained on."""
    from mlxtune import demo
    from mlxtune.data.rows import read_rows
    from mlxtune.generate import exact_match

    train_file, valid_file = demo.write_task(tmp_path / "data")
    overrides = [f"model.path={tiny('llama')}", f"output.dir={tmp_path / 'run'}",
                 f"data.train={train_file}", f"data.valid={valid_file}", "train.iters=60",
                 "train.batch_size=8", "train.learning_rate=3e-3", "train.warmup_steps=10",
                 "train.eval_every=0", "train.save_every=0", "data.max_seq_len=128"]  # fmt: skip
    cfg = load_config(None, overrides)
    before = trainer.setup(cfg)
    rows = read_rows(valid_file)
    assert exact_match(before.model, before.loaded.wrapper, rows)["exact_match"] < 0.3
    run_dir = trainer.train(cfg, echo=lambda line: None)
    after = trainer.setup(cfg, adapter=run_dir)
    result = exact_match(after.model, after.loaded.wrapper, rows)
    assert result["exact_match_rows"] == 48 and result["exact_match"] >= 0.85, result
    # `mlxtune eval` reports the same metrics on the PyTorch twin, from the same adapter
    from click.testing import CliRunner

    from mlxtune.cli import cli

    config = tmp_path / "config.yaml"
    config.write_text(cfg.to_yaml())
    reports = {}
    for backend in ("mlx", "cuda"):
        out = CliRunner().invoke(cli, ["eval", str(config), "--adapter", str(run_dir), "--set",
                                       f"model.backend={backend}"])  # fmt: skip
        assert out.exit_code == 0, out.output
        reports[backend] = json.loads(out.stdout)
    assert reports["cuda"]["exact_match"] == reports["mlx"]["exact_match"] == result["exact_match"]
    assert reports["cuda"]["exact_match_rows"] == 48
    assert reports["cuda"]["loss"] == pytest.approx(reports["mlx"]["loss"], rel=1e-4)


def test_epochs_set_the_number_of_steps(tiny, tmp_path):
    """train.epochs: every example once per epoch; steps = ceil(epochs * micro-batches / accum)."""
    from mlxtune.data.batching import Batching, Stream

    cfg = load_config(None, run_overrides(tiny("llama"), tmp_path / "run", "train.iters=null",
                                          "train.epochs=1.5", "train.grad_accum=2"))  # fmt: skip
    engine = trainer.setup(cfg)
    data = engine.dataset(cfg.data.train)
    micro = len(Stream(data, Batching.of(cfg), 0).plan(0))
    expected = -(-3 * micro // 4)  # ceil(1.5 * micro / 2)
    assert trainer.total_steps(cfg.train, micro) == expected
    seen = [i for batch in Stream(data, Batching.of(cfg), 0).plan(0) for row in batch for i in row]
    assert sorted(seen) == list(range(len(data.examples)))
    run_dir = trainer.train(cfg, echo=lambda line: None)
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert steps[-1] == expected


def test_absolute_positions_turn_packing_off_and_still_train(tiny, tmp_path):
    """GPT-2 learns absolute position embeddings: examples packed into one row would see
    shifted positions. The load-time probe notices, packing goes off, training still works."""
    import shutil

    torch = pytest.importorskip("torch")
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    config = GPT2Config(vocab_size=640, n_positions=256, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    # As the released gpt2 files are: "n_ctx" in the config, no "transformer." prefix on the
    # tensor names, the tied head not stored (mlx-lm's loader expects exactly that).
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, "n_ctx": 256}))
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in weights.items() if "lm_head" not in k},
              str(folder / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    for f in tiny("llama").iterdir():  # the tiny Llama's tokenizer and chat template
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    llama = run_overrides(tiny("llama"), tmp_path / "r", "data.packing=true")
    assert trainer.setup(load_config(None, llama)).masked
    cfg = load_config(None, run_overrides(folder, tmp_path / "run", "lora.targets=c_attn,c_fc",
                                          "data.packing=true"))  # fmt: skip
    engine = trainer.setup(cfg)
    assert not engine.masked and not engine.cfg.data.packing
    assert any("packing off" in note for note in engine.notes)
    lines: list[str] = []
    run_dir = trainer.train(cfg, echo=lines.append)
    assert any(line.startswith("note: packing off") for line in lines)
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    assert "packing: false" in (run_dir / "config.yaml").read_text()
    from mlxtune.errors import ModelError
    from mlxtune.export import export

    with pytest.raises(ModelError, match=r"gpt2 stores Conv1D \(in, out\) weights"):
        export(run_dir, tmp_path / "merged", "merged")
    assert not (tmp_path / "merged").exists()
