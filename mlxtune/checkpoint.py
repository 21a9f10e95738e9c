"""Checkpoints: everything a resumed run needs to continue as if it had never stopped.

    checkpoints/step-0000040/
        trainable.safetensors   the trained parameters, under their MLX names (exact restore)
        optimizer.safetensors   AdamW moments, step count and learning rate
        state.json              step, data position (epoch, index), the MLX RNG key
        adapter_model.safetensors + adapter_config.json   the adapter as of this step (PEFT)

Each checkpoint is written into a temp folder and renamed, so a crash leaves the previous
one intact; only the newest `keep` are kept.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from .data.batching import Position
from .errors import ModelError
from .io import atomic_folder
from .runs import CHECKPOINTS, RunState, all_checkpoints


def save(
    run_dir: Path,
    state: RunState,
    model: nn.Module,
    optimizer: optim.Optimizer,
    write_adapter: Callable[[Path], None],
    keep: int,
) -> Path:
    target = Path(run_dir) / CHECKPOINTS / f"step-{state.step:07d}"
    with atomic_folder(target, replace=True) as tmp:
        mx.save_safetensors(str(tmp / "trainable.safetensors"), _flat(model.trainable_parameters()))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), _flat(optimizer.state))
        write_adapter(tmp)
        info = {
            "step": state.step,
            "epoch": state.position.epoch,
            "index": state.position.index,
            "rng": mx.random.state[0].tolist(),
            "window": state.window,
            "layout": state.layout,
        }
        (tmp / "state.json").write_text(json.dumps(info) + "\n", encoding="utf-8")
    if keep:
        for old in all_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def restore(ckpt: Path, model: nn.Module, optimizer: optim.Optimizer) -> RunState:
    """Load a checkpoint into an already adapted model and an initialised optimizer."""
    try:
        info = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        weights = mx.load(str(ckpt / "trainable.safetensors"))
        moments = mx.load(str(ckpt / "optimizer.safetensors"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{ckpt}: unreadable checkpoint ({e})") from None
    expected = {k: v.shape for k, v in tree_flatten(model.trainable_parameters())}
    got = {k: v.shape for k, v in weights.items()}
    if expected != got:
        diff = sorted(set(expected) ^ set(got)) or [k for k in got if got[k] != expected[k]]
        raise ModelError(f"{ckpt}: does not match this model and lora config (first: {diff[0]})")
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(moments.items()))
    hi, lo = info["rng"]  # the key is the 64-bit seed in two halves: seeding restores it exactly
    mx.random.seed((hi << 32) | lo)
    mx.eval(model.parameters(), optimizer.state)
    return RunState(
        info["step"],
        Position(info["epoch"], info["index"]),
        info.get("window", {}),
        info.get("layout", {}),
    )


def _flat(tree) -> dict[str, mx.array]:
    return dict(tree_flatten(tree))
