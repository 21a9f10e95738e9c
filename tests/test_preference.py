"""Preference training (`train.method: dpo | orpo`): TRL's losses and gradients on the same
pairs, a learn test, exact resume and one-line errors for bad rows."""

from __future__ import annotations

import json
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlxtune as mt
from mlxtune import demo, preference, trainer
from mlxtune.config import load_config
from mlxtune.data.pairs import nll_tokens, prepare_pairs, read_pairs
from mlxtune.errors import DataError

BATCH = [0, 1, 2]  # the pairs of the compared micro-batch


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    return demo.write_preference_task(tmp_path_factory.mktemp("pairs"), 200, 40)


def _ours(run_dir, pair_files, overrides, backend="mlx"):
    """Our loss, metric sums and LoRA gradients on BATCH (by MLX path, or the twin's module
    path), with fixed reference log-probs."""
    cfg = load_config(run_dir / "config.yaml", ["train.ce_chunk_tokens=16", *overrides])
    engine = trainer.setup(cfg, adapter=run_dir)
    pairs = prepare_pairs(read_pairs(pair_files[0]), engine.loaded.tokenizer, 128)
    now = preference.scores(engine, pairs)["logps"]
    reference = now + np.random.default_rng(0).normal(0, 1.0, now.shape).astype(np.float32)
    orpo = cfg.train.method == "orpo"
    scales = [1 / len(BATCH), 1 / nll_tokens(pairs, BATCH)]
    if backend == "cuda":
        from cuda_backend import preference as twin
        from cuda_backend import trainer as twin_trainer

        engine = twin_trainer.setup(replace_backend(cfg), adapter=run_dir)
        for name, param in engine.model.named_parameters():
            param.requires_grad_(".lora_" in name)
        arrays, media, _ = twin.pair_arrays(engine, pairs, BATCH, reference, orpo)
        loss, sums = twin.pair_loss(engine, arrays, scales, media)
        loss.backward()
        grads = {
            k: p.grad.numpy() for k, p in engine.model.named_parameters() if p.grad is not None
        }
        return engine, pairs, reference, loss.item(), sums, grads
    model = engine.model
    model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    arrays, media, _ = preference.pair_arrays(pairs, BATCH, 128, 64, reference, orpo)
    fn = partial(preference.pair_loss, model, engine.split, cfg.train, masked=engine.masked)
    (loss, sums), grads = nn.value_and_grad(model, fn)(*arrays, mx.array(scales), media)
    return engine, pairs, reference, loss.item(), sums, dict(tree_flatten(grads))


def replace_backend(cfg):
    from dataclasses import replace

    return replace(cfg, model=replace(cfg.model, backend="cuda", dtype="float32"))


def _trl_dpo(model, tokenizer, pairs, reference, tmp_path, **config):
    """TRL's DPOTrainer._compute_loss on the same token ids, masks and reference log-probs."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = demo.preference_rows(0, 2)
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, **config)
    dpo = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                     processing_class=tokenizer)  # fmt: skip
    sides = [pairs.examples[2 * p + s] for s in (0, 1) for p in BATCH]  # chosen..., rejected...
    length = max(map(len, sides))
    ids = torch.zeros((len(sides), length), dtype=torch.long)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, ex in enumerate(sides):
        ids[i, : len(ex)] = torch.tensor(ex.ids.astype(np.int64))
        attention[i, : len(ex)] = 1
        completion[i, : len(ex)] = torch.tensor(ex.loss.astype(np.int64))
    dpo.precompute_ref_logps = True
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion,
              "ref_chosen_logps": torch.tensor(reference[BATCH, 0]),
              "ref_rejected_logps": torch.tensor(reference[BATCH, 1])}  # fmt: skip
    dpo.model.train()
    loss = dpo._compute_loss(dpo.model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in dpo._metrics["train"].items()}


def _trl_orpo(model, tokenizer, pairs, tmp_path, **config):
    """TRL's ORPOTrainer.get_batch_loss_metrics on the same chosen / rejected ids."""
    import torch
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    rows = demo.preference_rows(0, 2, conversational=False)
    args = ORPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, **config)
    orpo = ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                       processing_class=tokenizer)  # fmt: skip
    batch = {}
    for s, side in enumerate(("chosen", "rejected")):
        sides = [pairs.examples[2 * p + s] for p in BATCH]
        length = max(map(len, sides))
        ids = torch.zeros((len(sides), length), dtype=torch.long)
        attention, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for i, ex in enumerate(sides):
            ids[i, : len(ex)] = torch.tensor(ex.ids.astype(np.int64))
            attention[i, : len(ex)] = 1
            labels[i, : len(ex)] = torch.where(torch.tensor(ex.loss), ids[i, : len(ex)], -100)
        batch |= {f"{side}_input_ids": ids, f"{side}_attention_mask": attention,
                  f"{side}_labels": labels}  # fmt: skip
    orpo.model.train()
    loss, metrics = orpo.get_batch_loss_metrics(orpo.model, batch)
    return loss, metrics


CASES = [
    ("dpo", {"train.dpo_loss": "sigmoid"}, {"loss_type": ["sigmoid"]}),
    ("dpo", {"train.dpo_loss": "robust", "train.label_smoothing": 0.1},
     {"loss_type": ["robust"], "label_smoothing": 0.1}),
    ("dpo", {"train.dpo_loss": "ipo"}, {"loss_type": ["ipo"]}),
    ("dpo", {"train.dpo_loss": "hinge"}, {"loss_type": ["hinge"]}),
    ("orpo", {}, {}),
]  # fmt: skip


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
@pytest.mark.parametrize("method, ours, theirs", CASES,
                         ids=["sigmoid", "robust", "ipo", "hinge", "orpo"])  # fmt: skip
def test_loss_metrics_and_gradients_equal_trls(trained, tiny, pair_files, tmp_path, method,
                                               ours, theirs, backend):  # fmt: skip
    """On three pairs with a trained adapter (B off zero) and reference log-probs off the
    policy's, our loss, rewards and LoRA gradients are TRL's (DPOTrainer, ORPOTrainer on
    transformers + PEFT, fp32), on MLX and on the PyTorch twin."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    pytest.importorskip("trl")

    run_dir = trained("llama")
    overrides = [f"train.method={method}", "train.beta=0.5"]
    overrides += [f"{k}={v}" for k, v in ours.items()]
    engine, pairs, reference, loss, sums, grads = _ours(run_dir, pair_files, overrides, backend)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny("llama"), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, run_dir, is_trainable=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny("llama"))
    if method == "dpo":
        their_loss, metrics = _trl_dpo(model, tokenizer, pairs, reference, tmp_path, beta=0.5,
                                       **theirs)  # fmt: skip
        margin = metrics["rewards/margins"]
        chosen = metrics["logps/chosen"]
    else:
        their_loss, metrics = _trl_orpo(model, tokenizer, pairs, tmp_path, beta=0.5)
        margin = metrics["rewards/margins"]
        chosen = metrics["logps/chosen"]  # ORPO's: the mean log-prob per answer token
        nll = sums["nll"].item() / nll_tokens(pairs, BATCH)
        np.testing.assert_allclose(nll, metrics["nll_loss"], rtol=1e-4)
    np.testing.assert_allclose(loss, their_loss.item(), rtol=1e-4)
    n = len(BATCH)
    np.testing.assert_allclose(sums["margin"].item() / n, margin, rtol=1e-4, atol=1e-6)
    if method == "dpo":
        np.testing.assert_allclose(sums["chosen_logps"].item() / n, chosen, rtol=1e-4)
    else:  # our reward is beta x that mean, as TRL's rewards/chosen
        np.testing.assert_allclose(sums["chosen_reward"].item() / n, 0.5 * chosen, rtol=1e-4)
    their_loss.backward()
    to_mlx = {hf: path for path, hf in engine.hf_names.items()}
    compared = 0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        module, rest = name.removeprefix("base_model.model.").split(".lora_", 1)
        leaf = {"A": "lora_a", "B": "lora_b"}[rest[0]]
        theirs_g = p.grad.numpy().T
        if backend == "cuda":  # the twin's LoRA layer keeps PEFT's orientation
            got = grads[f"{to_mlx[module]}.lora_{rest[0]}"].T
        else:
            got = np.array(grads[f"{to_mlx[module]}.{leaf}"])
        np.testing.assert_allclose(got, theirs_g, rtol=1e-4, atol=1e-4 * np.abs(theirs_g).max())
        compared += 1
    assert compared == len(grads) == 2 * len(engine.adapted)


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_dpo_teaches_the_preferred_answers(tiny, pair_files, tmp_path, backend):
    """A tiny random Llama prefers the right group's name to a wrong one about half the time on
    held-out pairs; after DPO, at least 90% of the time, on either backend. The run writes the
    pair metrics, and `mt.evaluate` of the run agrees with its last validation."""
    train_file, valid_file = pair_files
    model = {"path": str(tiny("llama")), "backend": backend}
    before = mt.evaluate(model, str(valid_file))
    assert 0.3 <= before["choice_accuracy"] <= 0.7 and before["pairs"] == 40, before
    run = mt.train(model=model, data={"train": str(train_file),
                   "valid": str(valid_file), "max_seq_len": 64},
                   train={"method": "dpo", "iters": 60, "batch_size": 8, "learning_rate": 5e-3,
                          "report_every": 20, "eval_every": 0, "save_every": 0},
                   output={"dir": str(tmp_path / "run")}, echo=None)  # fmt: skip
    final = [r for r in run.metrics if r["kind"] == "valid"][-1]
    assert final["choice_accuracy"] >= 0.9, final
    assert final["accuracy"] >= 0.9 and final["margin"] > 0, final
    trains = [r for r in run.metrics if r["kind"] == "train"]
    assert trains[-1]["loss"] < trains[0]["loss"] and "margin" in trains[-1]
    after = mt.evaluate(run, str(valid_file))
    assert after["choice_accuracy"] == final["choice_accuracy"], (after, final)


def test_a_row_without_chosen_is_one_line(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps(demo.preference_rows(0, 1)[0]) + "\n"
                   + json.dumps({"prompt": "Group: cat", "rejected": "tool"}) + "\n")  # fmt: skip
    with pytest.raises(DataError) as e:
        read_pairs(bad)
    assert str(e.value).startswith(f"{bad}:2: chosen: missing")
    assert "\n" not in str(e.value)


def test_a_stopped_dpo_run_resumes_to_the_straight_runs_curve_and_adapter(tiny, pair_files,
                                                                          tmp_path):  # fmt: skip
    """Stopped after step 6 (checkpoint at 4), with dropout and accumulation: the resumed run
    reads its reference log-probs back and reports the straight run's losses and margins
    (the report at 6 averages steps 4 to 6 in both) and ends with its adapter."""
    from conftest import straight_and_resumed

    def config(out):
        return load_config(None, [
            f"model.path={tiny('llama')}", f"output.dir={out}", f"data.train={pair_files[0]}",
            "data.max_seq_len=64", "lora.dropout=0.1", "train.method=dpo", "train.iters=8",
            "train.save_every=4", "train.grad_accum=2", "train.batch_size=4",
            "train.report_every=3", "train.eval_every=0", "train.learning_rate=5e-3"])  # fmt: skip

    straight, resumed, lines, want, got = straight_and_resumed(config, tmp_path,
                                                              ("loss", "margin"))  # fmt: skip
    assert not any(line.startswith("reference:") for line in lines)  # read back, not recomputed
    assert [s for s, *_ in got] == [3, 6, 8]
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5)
    a = mx.load(str(straight / "adapter_model.safetensors"))
    b = mx.load(str(resumed / "adapter_model.safetensors"))
    assert all(mx.allclose(a[k], b[k], rtol=1e-5, atol=1e-7).item() for k in a)


def test_dpo_from_an_sft_adapter_takes_that_model_as_its_reference(trained, tiny, pair_files,
                                                                  tmp_path):  # fmt: skip
    """`model.adapter`: DPO trains on from an SFT run's adapter, and its reference
    log-probabilities are that model's (not the base's)."""
    sft = trained("llama")
    run = mt.train(model={"path": str(tiny("llama")), "adapter": str(sft)},
                   data={"train": str(pair_files[0]), "max_seq_len": 64},
                   train={"method": "dpo", "iters": 2, "batch_size": 8, "eval_every": 0,
                          "save_every": 0},
                   output={"dir": str(tmp_path / "dpo")}, echo=None)  # fmt: skip
    saved = np.load(run.dir / "reference.npz")["train"]
    cfg = load_config(sft / "config.yaml", ["data.max_seq_len=64"])
    for adapter, close in ((sft, True), (None, False)):
        engine = trainer.setup(cfg, adapter=adapter)
        pairs = prepare_pairs(read_pairs(pair_files[0]), engine.loaded.tokenizer, 64)
        got = preference.scores(engine, pairs)["logps"]
        assert np.allclose(got, saved, rtol=1e-4, atol=1e-4) == close
    adapter = mx.load(str(run.dir / "adapter_model.safetensors"))
    before = mx.load(str(sft / "adapter_model.safetensors"))
    assert adapter.keys() == before.keys()
    assert any(not mx.allclose(adapter[k], before[k]).item() for k in adapter)


def _media_pairs(folder):
    """Preference pairs whose prompts hold a picture or a clip (the demo's media task):
    chosen is the right answer, rejected another colour or pitch."""
    demo.write_media_task(folder, n_train=6, n_valid=3)
    rows = [json.loads(x) for x in (folder / "train.jsonl").read_text().splitlines()]
    wrong = {"red": "green", "green": "blue", "blue": "red", "high": "low", "mid": "high",
             "low": "mid"}  # fmt: skip
    pairs = []
    for r in rows:
        answer = r["messages"][1]["content"]
        other = ", ".join(wrong[x] for x in answer.split(", "))
        pairs.append({"prompt": r["messages"][:1],
                      "chosen": [{"role": "assistant", "content": answer}],
                      "rejected": [{"role": "assistant", "content": other}]})  # fmt: skip
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return folder / "pairs.jsonl"


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_pairs_with_pictures_and_clips_give_the_same_loss_and_gradients_on_both_backends(
        tiny, tmp_path, method):  # fmt: skip
    """Pairs whose prompts hold an image, a clip or both (tiny Gemma 4): each side's rows
    carry the prompt's soft tokens on MLX and on the twin (transformers' Gemma 4), and the
    loss and LoRA gradients agree."""
    from cuda_backend import preference as twin
    from cuda_backend import trainer as twin_trainer

    file = _media_pairs(tmp_path / "media")
    cfg = load_config(None, [f"model.path={tiny('gemma4')}", f"data.train={file}",
                             "data.max_seq_len=512", "data.image_soft_tokens=70",
                             f"train.method={method}", "lora.rank=4",
                             "train.ce_chunk_tokens=16"])  # fmt: skip
    engine = trainer.setup(cfg)
    model = engine.model
    for path, value in tree_flatten(model.trainable_parameters()):  # B off zero
        if path.endswith("lora_b"):
            model.load_weights([(path, value + 0.01)], strict=False)
    pairs = prepare_pairs(read_pairs(file), engine.loaded.tokenizer, 512,
                          media=engine.media)  # fmt: skip
    assert {m.kind for e in pairs.examples for m in e.media} == {"image", "audio"}
    batch = [0, 1, 2]
    reference = np.random.default_rng(0).normal(-30, 1, (len(pairs), 2)).astype(np.float32)
    scales = [1 / 3, 1 / nll_tokens(pairs, batch)]
    arrays, media, _ = preference.pair_arrays(pairs, batch, 512, 64, reference, method == "orpo")
    fn = partial(preference.pair_loss, model, engine.split, cfg.train, masked=engine.masked)
    (loss, _), grads = nn.value_and_grad(model, fn)(*arrays, mx.array(scales), media)
    ours = dict(tree_flatten(grads))
    engine.write_adapter(tmp_path)  # the nudged adapter, for the twin
    twin_engine = twin_trainer.setup(replace_backend(cfg), adapter=tmp_path, trainable=True)
    t_arrays, t_media, _ = twin.pair_arrays(twin_engine, pairs, batch, reference, method == "orpo")
    t_loss, _ = twin.pair_loss(twin_engine, t_arrays, scales, t_media)
    t_loss.backward()
    np.testing.assert_allclose(loss.item(), t_loss.item(), rtol=1e-4)
    to_twin = {hf: path for path, hf in twin_engine.hf_names.items()}
    compared = 0
    for path, hf in engine.hf_names.items():
        if f"{path}.lora_a" not in ours:
            continue
        layer = twin_engine.model.get_submodule(to_twin[hf])
        for leaf, param in (("lora_a", layer.lora_A), ("lora_b", layer.lora_B)):
            want = param.grad.numpy().T
            np.testing.assert_allclose(np.array(ours[f"{path}.{leaf}"]), want, rtol=2e-3,
                                       atol=2e-4 * np.abs(want).max())  # fmt: skip
            compared += 1
    assert compared == 2 * len(engine.adapted)
