"""What the multimodal wrappers (Gemma 4, Gemma 3n) share: loading tower weights, and the cache
of frozen towers' soft tokens. A wrapper provides `tower_tokens(kind, media)`,
`tower_frozen(kind)` and `decoder.norm.weight` (the compute dtype)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..data.batching import pack_media
from ..errors import ModelError

TOWERS = ("vision_tower", "embed_vision", "audio_tower", "embed_audio")


def frozen_or_not(tower: nn.Module, out: mx.array) -> mx.array:
    """A frozen tower's output needs no gradient: autodiff keeps none of its activations."""
    return out if tree_flatten(tower.trainable_parameters()) else mx.stop_gradient(out)


def checkpoint_tensors(folder: Path, keep=lambda name: True) -> dict[str, mx.array]:
    """The checkpoint's tensors whose name (without a leading `model.`) `keep` accepts."""
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        for key, value in mx.load(str(path)).items():
            name = key.removeprefix("model.")
            if keep(name):
                out[name] = value
    return out


def tower_weights(folder: Path) -> dict[str, mx.array]:
    """Tensors of the towers and embedders, names without the leading `model.`."""
    return checkpoint_tensors(folder, lambda name: name.split(".", 1)[0] in TOWERS)


def load_towers(model: nn.Module, weights: dict[str, mx.array], folder: Path, dtype,
                names: tuple[str, ...] = TOWERS) -> None:  # fmt: skip
    """Each tower / embedder of `model` in `names` from `weights` (strictly), cast to `dtype`."""
    for name in names:
        if name not in model:
            continue
        items = [(k[len(name) + 1 :], v) for k, v in weights.items() if k.startswith(name + ".")]
        module = model[name]
        try:
            module.load_weights(to_mlx_layout(module, items), strict=True)
        except ValueError as e:
            raise ModelError(f"{folder}: {name} weights do not fit: {_one_line(e)}") from None
        module.apply(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a)


def _one_line(e: Exception) -> str:
    """MLX lists every missing or extra parameter, one a line: the count and the first."""
    lines = [line.strip().rstrip(",") for line in str(e).splitlines() if line.strip()]
    if len(lines) < 2:
        return str(e)
    return f"{lines[0]} {lines[1]}" + (", ..." if len(lines) > 2 else "")


def to_mlx_layout(module: nn.Module, items: list[tuple[str, mx.array]]):
    """PyTorch conv kernels ([out, in, *k]) to MLX's ([out, *k, in]); already-MLX ones stay."""
    want = dict(tree_flatten(module.parameters()))
    out = []
    for key, value in items:
        shape = want.get(key, value).shape
        if value.ndim >= 3 and value.shape != shape:
            moved = mx.moveaxis(value, 1, -1)
            if moved.shape == shape:
                value = moved
        out.append((key, value))
    return out


class SoftTokenCache:
    """Soft tokens of frozen towers, computed outside the training step and kept per file.

    A frozen tower's output for a picture or a clip never changes, so it is computed once, in a
    forward pass of its own (nothing kept for autodiff), and reused by later epochs and by
    validation; the step only looks the rows up. Past `limit_bytes`, the least recently used
    entries go first (0 keeps nothing: every step computes its own, still outside the step)."""

    CHUNK = 8  # pictures or clips per tower pass

    def __init__(self, model: nn.Module, limit_bytes: int):
        self.model, self.limit = model, limit_bytes
        self.kinds = tuple(k for k in ("image", "audio") if model.tower_frozen(k))
        self.store: OrderedDict[tuple, mx.array] = OrderedDict()
        self.bytes = 0

    def rows(self, items: list) -> mx.array:
        """[sum of tokens, tower width]: the items' soft tokens, in order."""
        found = {}
        for m in items:
            key = (m.kind, m.path, m.spec)
            if key in self.store:
                self.store.move_to_end(key)
                found[key] = self.store[key]
        missing = list({(m.kind, m.path, m.spec): m for m in items if
                        (m.kind, m.path, m.spec) not in found}.values())  # fmt: skip
        for i in range(0, len(missing), self.CHUNK):
            chunk = missing[i : i + self.CHUNK]
            arrays, take = pack_media(chunk, round_up=False)
            media = {k: mx.array(v) for k, v in arrays.items()}
            media[f"{chunk[0].kind}_take"] = mx.array(take)
            out = self.model.tower_tokens(chunk[0].kind, media)
            out = out.astype(self.model.decoder.norm.weight.dtype)
            mx.eval(out)
            ends = np.cumsum([m.soft for m in chunk])
            for m, part in zip(chunk, mx.split(out, ends[:-1].tolist()), strict=True):
                found[(m.kind, m.path, m.spec)] = part
                self._keep((m.kind, m.path, m.spec), part)
        return mx.concatenate([found[(m.kind, m.path, m.spec)] for m in items], axis=0)

    def _keep(self, key: tuple, value: mx.array) -> None:
        if value.nbytes > self.limit:
            return
        self.store[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.limit:
            _, old = self.store.popitem(last=False)
            self.bytes -= old.nbytes
