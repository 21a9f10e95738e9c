"""Gemma 3n's USM audio tower in MLX against transformers' `Gemma3nAudioEncoder` (no timm needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlxtune.models._towers import to_mlx_layout  # noqa: E402
from mlxtune.models.gemma3n_audio import AudioArgs, AudioTower  # noqa: E402
from mlxtune.tiny import make_tiny  # noqa: E402

PREFIX = "model.audio_tower."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("gemma3n_audio") / "ckpt", "gemma3n", seed=0)


@pytest.fixture(scope="module")
def weights(ckpt):
    """The tower's tensors (prefix removed) as numpy, norms jittered away from their all-ones
    init so a swapped or unused norm weight shows up in the parity checks."""
    from safetensors.numpy import load_file

    rng = np.random.default_rng(1)
    out = {}
    for key, value in load_file(str(ckpt / "model.safetensors")).items():
        if key.startswith(PREFIX):
            value = value.astype(np.float32)
            if key.endswith("norm.weight"):
                value = value + rng.uniform(-0.3, 0.3, value.shape).astype(np.float32)
            out[key.removeprefix(PREFIX)] = value
    return out


@pytest.fixture(scope="module")
def towers(ckpt, weights):
    """(transformers encoder, MLX tower) holding the same weights."""
    from transformers import Gemma3nConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder

    ref = Gemma3nAudioEncoder(Gemma3nConfig.from_pretrained(ckpt).audio_config).eval()
    missing, unexpected = ref.load_state_dict(
        {k: torch.from_numpy(v) for k, v in weights.items()}, strict=False
    )
    assert not missing and not unexpected, (missing, unexpected)

    config = json.loads((ckpt / "config.json").read_text())["audio_config"]
    tower = AudioTower(AudioArgs.from_config(config))
    items = [(k, mx.array(v)) for k, v in weights.items()]
    tower.load_weights(to_mlx_layout(tower, items), strict=True)
    mx.eval(tower.parameters())
    return ref, tower


def _batch(lengths: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random features [B, max(lengths), 128] and the padding mask (True = padding frame)."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    features = rng.standard_normal((len(lengths), t, 128)).astype(np.float32)
    padding = np.arange(t)[None, :] >= np.array(lengths)[:, None]
    return features, padding


def _compare(towers, lengths: list[int], seed: int) -> np.ndarray:
    """Run both on the same batch: padding masks equal, real tokens within 1e-4, padding
    tokens zero. Returns the MLX padding mask."""
    ref, tower = towers
    features, padding = _batch(lengths, seed)
    with torch.no_grad():
        want = ref(torch.from_numpy(features), torch.from_numpy(padding))
    got, got_padding = tower(mx.array(features), mx.array(padding))
    got, got_padding = np.array(got), np.array(got_padding)
    want, want_padding = want.last_hidden_state.numpy(), want.audio_mel_mask.numpy()
    np.testing.assert_array_equal(got_padding, want_padding)
    assert got.shape == want.shape and np.isfinite(got).all()
    real = ~want_padding
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)
    assert (got[~real] == 0).all()  # as in transformers
    return got_padding


def test_parity_two_clips_of_different_lengths(towers):
    padding = _compare(towers, [200, 137], seed=0)
    assert padding.shape == (2, 13) and padding.sum(axis=1).tolist() == [0, 4]


def test_parity_padded_clip_first_and_batch_of_one(towers):
    padding = _compare(towers, [61, 200], seed=1)
    assert padding[0].any() and not padding[1].any()
    _compare(towers, [93], seed=2)  # 93 frames: a partial attention chunk


def test_parity_thirty_seconds_many_chunks(towers):
    """3000 mel frames (30 s) -> 750 conformer frames (63 attention chunks) -> 188 tokens."""
    padding = _compare(towers, [3000, 2100], seed=3)
    assert padding.shape == (2, 188) and padding.sum(axis=1).tolist() == [0, 56]


def test_alone_gives_each_clip_its_output_as_if_run_alone(towers):
    """In a batch, `alone=True` makes every real token of a clip equal to transformers' output
    for that clip on its own, whatever its padding holds (here random, and lengths where a
    plain batched run lets the padding reach the last token)."""
    ref, tower = towers
    lengths = [129, 133, 200, 61, 16]
    features, padding = _batch(lengths, seed=4)
    got, got_padding = tower(mx.array(features), mx.array(padding), alone=True)
    got, got_padding = np.array(got), np.array(got_padding)
    for i, n in enumerate(lengths):
        with torch.no_grad():
            want = ref(torch.from_numpy(features[i : i + 1, :n]), torch.zeros(1, n, dtype=bool))
        want = want.last_hidden_state.numpy()[0]
        assert (~got_padding[i]).sum() == len(want), n
        np.testing.assert_allclose(got[i, : len(want)], want, atol=1e-4, rtol=0)


def test_strict_load_covers_the_checkpoint_exactly(ckpt, towers):
    from safetensors.numpy import load_file

    _, tower = towers
    tensors = load_file(str(ckpt / "model.safetensors"))
    names = {k.removeprefix(PREFIX) for k in tensors if k.startswith(PREFIX)}
    ours = dict(tree_flatten(tower.parameters()))
    assert set(ours) == names  # no missing, no extra (buffers are not parameters)
    assert not any("timing" in k or "q_scale" in k for k in ours)


def test_real_size_config_matches_transformers_shapes():
    """The released config (hidden 1536, 12 layers, 8 heads): same names and shapes (in MLX's
    conv layout) as transformers, counted from shapes on torch's meta device."""
    from transformers import Gemma3nAudioConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder

    config = Gemma3nAudioConfig()
    with torch.device("meta"):
        ref = Gemma3nAudioEncoder(config)
    want = {k: tuple(p.shape) for k, p in ref.named_parameters()}
    for k, shape in want.items():
        if len(shape) >= 3:  # PyTorch conv kernels [out, in, *k] -> MLX [out, *k, in]
            want[k] = (shape[0], *shape[2:], shape[1])

    tower = AudioTower(AudioArgs.from_config(config.to_dict()))  # lazy: nothing is computed
    got = {k: tuple(v.shape) for k, v in tree_flatten(tower.parameters())}
    assert got == want
    count = sum(int(np.prod(s)) for s in got.values())
    assert count == sum(p.numel() for p in ref.parameters())
    assert 600e6 < count < 800e6


def test_bfloat16_and_gradients(towers):
    ref, tower = towers
    features, padding = _batch([160, 96], seed=4)
    x, pad = mx.array(features), mx.array(padding)
    want, want_padding = tower(x, pad)

    half = AudioTower(tower.args)
    half.load_weights([(k, v.astype(mx.bfloat16)) for k, v in tree_flatten(tower.parameters())])
    got, got_padding = half(x, pad)
    assert got.dtype == mx.bfloat16 and (np.array(got_padding) == np.array(want_padding)).all()
    got = np.array(got.astype(mx.float32))
    assert np.isfinite(got).all()
    real = ~np.array(got_padding)
    scale = np.abs(np.array(want)[real]).max()
    assert np.abs(got[real] - np.array(want)[real]).max() < 0.1 * scale

    def loss(params):
        tower.update(params)
        out, out_padding = tower(x, pad)
        return (out * mx.logical_not(out_padding)[..., None]).square().mean()

    params = tower.trainable_parameters()
    grads = dict(tree_flatten(mx.grad(loss)(params)))
    tower.update(params)
    assert set(grads) == {k for k, _ in tree_flatten(params)}
    assert all(np.isfinite(np.array(g)).all() for g in grads.values())
    assert np.abs(np.array(grads["conformer.0.attention.attn.per_dim_scale"])).max() > 0
    assert np.abs(np.array(grads["subsample_conv_projection.conv_0.conv.weight"])).max() > 0
