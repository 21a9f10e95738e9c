"""mlxtune against the reference implementation, transformers + PEFT on CPU torch (fp32):
same weights in, same loss, gradients and logits out."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from conftest import DATA  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlxtune import trainer  # noqa: E402
from mlxtune.config import load_config  # noqa: E402
from mlxtune.data.batching import collate  # noqa: E402

AUTO = {"llama": "AutoModelForCausalLM", "gemma4": "AutoModelForImageTextToText"}
CASES = [("llama", "lora"), ("gemma4", "lora"), ("gemma4", "dora")]


def hf_model(arch: str, path, adapter=None, trainable=False):
    model = getattr(transformers, AUTO[arch]).from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    return model.eval()


def hf_loss_sum(model, examples) -> torch.Tensor:
    """Sum of token losses, each example run alone (no packing on the reference side)."""
    total = torch.zeros(())
    for ex in examples:
        ids = torch.tensor(ex.ids[None].astype(np.int64))
        logits = model(input_ids=ids).logits[0, :-1]
        ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        total = total + (ce * torch.tensor(ex.loss[1:].astype(np.float32))).sum()
    return total


def engine_and_batch(run_dir, chunk: int):
    cfg = load_config(run_dir / "config.yaml", [f"train.ce_chunk_tokens={chunk}"])
    engine = trainer.setup(cfg, adapter=run_dir)
    data = engine.dataset(str(DATA / "chat_train.jsonl"))
    examples = data.examples[:5]
    # Packed rows: the reference runs the same five examples one by one.
    batch = collate(examples, [[0, 1], [2, 3], [4]], cfg.data.max_seq_len)
    return engine, examples, batch


@pytest.mark.parametrize("chunk", [0, 16])
@pytest.mark.parametrize("arch", ["llama", "gemma4"])
def test_packed_batch_loss_equals_transformers(trained, tiny, arch, chunk):
    run_dir = trained(arch)
    engine, examples, batch = engine_and_batch(run_dir, chunk)
    ours = trainer.batch_loss(engine.model, engine.split, chunk, *trainer.device_arrays(batch, 64))
    theirs = hf_loss_sum(hf_model(arch, tiny(arch), run_dir), examples)
    assert (engine.split is None) == (chunk == 0)
    np.testing.assert_allclose(
        ours.item() / batch.loss_tokens, theirs.item() / batch.loss_tokens, rtol=1e-4
    )


@pytest.mark.parametrize("arch, method", CASES)
def test_gradients_equal_peft_autograd(trained, tiny, arch, method):
    run_dir = trained(arch, f"lora.method={method}")
    engine, examples, batch = engine_and_batch(run_dir, 16)
    model = engine.model
    model.unfreeze(keys=["lora_a", "lora_b", "m"], strict=False)
    fn = nn.value_and_grad(model, partial(trainer.batch_loss, model, engine.split, 16))
    _, grads = fn(*trainer.device_arrays(batch, 64))
    ours = dict(tree_flatten(grads))
    reference = hf_model(arch, tiny(arch), run_dir, trainable=True)
    hf_loss_sum(reference, examples).backward()
    to_mlx = {hf: path for path, hf in engine.hf_names.items()}
    leaves = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "m"}
    compared = 0
    for name, p in reference.named_parameters():
        if p.grad is None:
            continue
        module, rest = name.removeprefix("base_model.model.").split(".lora_", 1)
        leaf = leaves["lora_" + rest.split(".")[0]]
        theirs = p.grad.numpy().T if leaf != "m" else p.grad.numpy()
        got = np.array(ours[f"{to_mlx[module]}.{leaf}"])
        np.testing.assert_allclose(got, theirs, rtol=2e-3, atol=2e-4 * np.abs(theirs).max())
        compared += 1
    assert compared == len(ours) == len(engine.adapted) * (3 if method == "dora" else 2)


@pytest.mark.parametrize("arch, method", CASES)
def test_trained_adapter_gives_peft_the_same_logits(trained, tiny, arch, method):
    run_dir = trained(arch, f"lora.method={method}")
    engine = trainer.setup(load_config(run_dir / "config.yaml"), adapter=run_dir)
    ids = np.array([[2, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140]])
    ours = np.array(engine.model(mx.array(ids)))
    theirs = hf_model(arch, tiny(arch), run_dir)(torch.tensor(ids)).logits.detach().numpy()
    base = hf_model(arch, tiny(arch))(torch.tensor(ids)).logits.detach().numpy()
    assert np.abs(theirs - base).max() > 0.05  # the adapter does something
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max() + 1e-5)


@pytest.mark.parametrize("arch, method", CASES)
def test_merged_export_loads_in_transformers(trained, tiny, arch, method, tmp_path):
    from mlxtune.export import export

    run_dir = trained(arch, f"lora.method={method}")
    merged = export(run_dir, tmp_path / "merged", "merged")
    ids = torch.tensor([[2, 40, 50, 60, 70, 80, 90, 100]])
    theirs = hf_model(arch, merged)(ids).logits.detach().numpy()
    with_adapter = hf_model(arch, tiny(arch), run_dir)(ids).logits.detach().numpy()
    np.testing.assert_allclose(theirs, with_adapter, atol=1e-4 * np.abs(with_adapter).max())
