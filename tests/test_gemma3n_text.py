"""Gemma 3n's text decoder against transformers' `Gemma3nTextModel`: the training (cache-free)
forward pass at batch 2 past the sliding window, which is where the two known MLX bugs live
(AltUp coefficients broadcast across the batch; KV-shared layers using their own K/V without a
cache), and generation with a cache equal to the full forward pass."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlxtune.models._towers import checkpoint_tensors
from mlxtune.models.gemma3n_text import TextArgs, TextModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tiny):
    """(ours, transformers') decoders on the tiny checkpoint's weights."""
    from safetensors.torch import load_file
    from transformers import Gemma3nConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextModel

    folder = tiny("gemma3n")
    prefix = "language_model."
    ref = Gemma3nTextModel(Gemma3nConfig.from_pretrained(folder).text_config).eval()
    state = {k.removeprefix("model." + prefix): v
             for k, v in load_file(str(folder / "model.safetensors")).items()
             if k.startswith("model." + prefix)}  # fmt: skip
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    config = json.loads((folder / "config.json").read_text())["text_config"]
    ours = TextModel(TextArgs.from_config(config))
    weights = checkpoint_tensors(folder, lambda name: name.startswith(prefix))
    ours.load_weights([(k[len(prefix) :], v) for k, v in weights.items()], strict=True)
    return ours, ref, config


def test_tiny_has_every_feature_the_bugs_need(pair):
    _, _, config = pair
    assert config["num_kv_shared_layers"] == 2 and config["altup_num_inputs"] == 4
    assert {"sliding_attention", "full_attention"} <= set(config["layer_types"][2:])
    assert max(config["activation_sparsity_pattern"]) > 0


def test_hidden_states_match_transformers_at_batch_two(pair):
    ours, ref, config = pair
    ids = np.random.default_rng(0).integers(0, config["vocab_size"], (2, 50))  # window is 32
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    got = np.array(ours(mx.array(ids)))
    np.testing.assert_allclose(got, want, atol=1e-4)
    # Rows differ, so a coefficient broadcast across the batch would show.
    alone = np.array(ours(mx.array(ids[1:])))
    np.testing.assert_allclose(alone[0], got[1], atol=1e-5)


def test_generation_with_a_cache_equals_the_full_pass(pair):
    ours, _, _ = pair
    ids = mx.array(np.random.default_rng(1).integers(0, 700, (1, 70)))
    full = ours(ids)
    cache = ours.make_cache()
    steps = [ours(ids[:, :40], cache)] + [ours(ids[:, t : t + 1], cache) for t in range(40, 70)]
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(full), atol=1e-4)


def test_gradients_of_every_weight_equal_torch_autograd(pair):
    """Backward through AltUp, LAuReL, per-layer inputs, the Gaussian top-k and shared K/V: the
    gradient of every decoder weight equals torch's autograd at batch 2 past the window."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    ours, ref, config = pair
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 700, (2, 50))
    probe = rng.standard_normal((2, 50, config["hidden_size"])).astype(np.float32)
    ref.zero_grad()
    out = ref(input_ids=torch.from_numpy(ids)).last_hidden_state
    (out * torch.from_numpy(probe)).sum().backward()
    theirs = {name: p.grad.numpy() for name, p in ref.named_parameters() if p.grad is not None}
    _, grads = nn.value_and_grad(ours, lambda m: (m(mx.array(ids)) * mx.array(probe)).sum())(ours)
    grads = {k: np.array(v) for k, v in tree_flatten(grads)}
    assert set(grads) == set(theirs)
    for name, want in theirs.items():
        scale = np.abs(want).max()
        assert scale > 0, name
        np.testing.assert_allclose(grads[name] / scale, want / scale, atol=1e-4, err_msg=name)
