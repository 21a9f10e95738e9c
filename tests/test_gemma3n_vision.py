"""Gemma 3n's MobileNetV5 vision tower in MLX against timm's (through transformers), which runs in
the torchvision subprocess of tests/_vision.py."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import _vision
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxtune.models._towers import to_mlx_layout as _to_mlx_layout
from mlxtune.models.gemma3n_vision import VisionArgs, VisionTower
from mlxtune.tiny import make_tiny

PREFIX = "model.vision_tower."
# google/gemma-3n-E2B's vision_config (timm's defaults: channel multiplier 1, stem 64).
REAL = {
    "architecture": "mobilenetv5_300m_enc", "do_pooling": False, "hidden_size": 2048,
    "model_args": None, "model_type": "gemma3n_vision", "num_classes": 2,
    "rms_norm_eps": 1e-6, "vocab_offset": 262144, "vocab_size": 128,
}  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("gemma3n_vision") / "ckpt", "gemma3n", seed=0)


def _items(ckpt):
    weights = mx.load(str(ckpt / "model.safetensors"))
    return [(k.removeprefix(PREFIX), v) for k, v in weights.items() if k.startswith(PREFIX)]


def _args(ckpt) -> VisionArgs:
    return VisionArgs.from_config(json.loads((ckpt / "config.json").read_text())["vision_config"])


def _tower(ckpt, dtype=mx.float32) -> VisionTower:
    tower = VisionTower(_args(ckpt))
    tower.load_weights(_to_mlx_layout(tower, _items(ckpt)), strict=True)
    tower.apply(lambda a: a.astype(dtype))
    return tower


def test_parameters_are_the_checkpoint_tensors(ckpt):
    tower = VisionTower(_args(ckpt))
    assert (_args(ckpt).channel_multiplier, _args(ckpt).stem_size) == (1 / 64, 8)
    ours = {k: v.shape for k, v in tree_flatten(tower.parameters())}
    items = _items(ckpt)
    assert sorted(ours) == sorted(k for k, _ in items)  # one for one, all under timm_model.
    assert all(k.startswith("timm_model.") for k in ours)
    assert {k: v.shape for k, v in _to_mlx_layout(tower, items)} == ours
    tower.load_weights(_to_mlx_layout(tower, items), strict=True)


def test_matches_timm(ckpt, tmp_path):
    """768 px (the real input: average pool 48 -> 16 in the MSFA; test_gemma3n_model.py runs
    two at once), and one odd, non-square image, which takes the other paths: uneven SAME
    padding, nearest upsampling 7 -> 13 and bilinear resizing 13 x 17 -> 16 x 16."""
    rng = np.random.default_rng(0)
    inputs = [rng.random((1, 3, 768, 768), dtype=np.float32),
              rng.random((1, 3, 200, 264), dtype=np.float32)]  # fmt: skip
    files = []
    for i, pixels in enumerate(inputs):
        np.save(tmp_path / f"pixels{i}.npy", pixels)
        files += [tmp_path / f"pixels{i}.npy", tmp_path / f"ref{i}.npy"]
    # The reference runs in its own process meanwhile (each side takes ~15 s on 2 CPU cores).
    with ThreadPoolExecutor(1) as pool:
        report = pool.submit(_vision.run, "gemma3n_vision_reference", ckpt, *files)
        tower = _tower(ckpt)
        outs = [np.array(tower(mx.array(x.transpose(0, 2, 3, 1)))) for x in inputs]
        assert report.result()["shapes"] == [[1, 2048, 16, 16], [1, 2048, 16, 16]]

    for i, (pixels, out) in enumerate(zip(inputs, outs, strict=True)):
        ref = np.load(tmp_path / f"ref{i}.npy")
        b = ref.shape[0]
        assert out.shape == (b, 256, 2048)
        ref = ref.reshape(b, 2048, 256).transpose(0, 2, 1)
        print(f"{pixels.shape}: max abs diff {np.abs(out - ref).max():.2e}")
        np.testing.assert_allclose(out, ref, atol=1e-4)


def test_bfloat16_and_gradients(ckpt):
    pixels = mx.array(np.random.default_rng(1).random((1, 96, 96, 3), dtype=np.float32))
    full = _tower(ckpt)(pixels)
    half = _tower(ckpt, mx.bfloat16)(pixels)
    assert half.dtype == mx.bfloat16 and half.shape == full.shape == (1, 256, 2048)
    err = mx.abs(half.astype(mx.float32) - full)
    assert err.mean().item() < 0.05, err.mean().item()

    tower = _tower(ckpt)
    probe = mx.array(np.random.default_rng(2).standard_normal((1, 256, 2048), dtype=np.float32))
    loss, grads = nn.value_and_grad(tower, lambda p: (tower(p) * probe).sum())(pixels)
    grads = dict(tree_flatten(grads))
    assert set(grads) == {k for k, _ in tree_flatten(tower.parameters())}
    for key in (
        "timm_model.conv_stem.conv.weight",
        "timm_model.blocks.2.9.attn.key.proj.weight",
        "timm_model.blocks.3.1.layer_scale.gamma",
        "timm_model.msfa.norm.weight",
    ):
        g = grads[key]
        assert mx.isfinite(g).all().item() and mx.abs(g).max().item() > 0, key
    assert np.isfinite(loss.item())


def test_real_size_matches_timm():
    args = VisionArgs.from_config(REAL)
    assert args == VisionArgs.from_config({**REAL, "model_args": {}})
    assert (args.channel_multiplier, args.stem_size) == (1.0, 64)
    ours = {k: list(v.shape) for k, v in tree_flatten(VisionTower(args).parameters())}  # lazy
    timm = _vision.run("timm_parameters", "mobilenetv5_300m_enc", "{}")
    theirs = {"timm_model." + k: s for k, s in timm["shapes"].items()}
    assert sorted(ours) == sorted(theirs) and timm["buffers"] == []
    for k, s in theirs.items():  # PyTorch conv kernels [out, in, kh, kw] -> MLX [out, kh, kw, in]
        assert ours[k] in (s, s[:1] + s[2:] + s[1:2]), (k, ours[k], s)
    count = sum(int(np.prod(s)) for s in ours.values())
    print(f"real-size parameters: {count:,}")
    assert count == sum(int(np.prod(s)) for s in theirs.values())


def test_config_errors():
    with pytest.raises(ValueError, match="architecture"):
        VisionArgs.from_config({"architecture": "mobilenetv5_base"})
    with pytest.raises(ValueError, match="group_size"):
        VisionArgs.from_config({"model_args": {"group_size": 4}})
    with pytest.raises(ValueError, match="pad_type"):
        VisionArgs.from_config({"model_args": {"pad_type": "valid"}})
    with pytest.raises(ValueError, match="2048"):
        VisionArgs.from_config({"hidden_size": 1024})
