"""Checkpoints of the torch twin: the same folder layout as mlxtune/checkpoint.py.

    checkpoints/step-0000040/
        trainable.safetensors   the trained parameters, under the model's module names
        optimizer.safetensors   AdamW moments and step counts, flattened
        state.json              step, data position (epoch, index), the CPU and CUDA RNG states
        adapter_model.safetensors + adapter_config.json   the adapter as of this step (PEFT)

Written into a temp folder and renamed; only the newest `keep` are kept.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mlxtune.data.batching import Position
from mlxtune.errors import ModelError
from mlxtune.io import atomic_folder
from mlxtune.runs import CHECKPOINTS, RunState, all_checkpoints

__all__ = ["RunState", "save", "restore", "all_checkpoints"]


def tensors(model: torch.nn.Module, optimizer=None) -> tuple[dict, dict]:
    """The trained parameters and AdamW's state (none without `optimizer`), whole and on the
    CPU, under the names a checkpoint gives them. With sharded parameters
    (cuda_backend/shard.py) every rank calls this: each tensor is gathered from the ranks'
    shards in turn."""
    from .shard import full

    weights, moments = {}, {}
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    for k, p in named:
        weights[k] = full(p.detach()).cpu().contiguous()
    names = {id(p): k for k, p in named}
    for group in optimizer.param_groups if optimizer is not None else ():
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                value = value if torch.is_tensor(value) else torch.tensor(float(value))
                moments[f"{names[id(p)]}::{key}"] = full(value.detach()).cpu().contiguous()
    return weights, moments


def save(run_dir: Path, state: RunState, weights: dict, moments: dict, write_adapter:
         Callable[[Path], None], keep: int) -> Path:  # fmt: skip
    """Write a checkpoint of `tensors(...)` and the run state."""
    target = Path(run_dir) / CHECKPOINTS / f"step-{state.step:07d}"
    with atomic_folder(target, replace=True) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        save_file(moments, str(tmp / "optimizer.safetensors"))
        write_adapter(tmp)
        info = {"step": state.step, "epoch": state.position.epoch,
                "index": state.position.index, "rng": torch.get_rng_state().tolist(),
                "window": state.window, "layout": state.layout}  # fmt: skip
        if torch.cuda.is_available():  # dropout on a GPU draws from the GPU's generators
            info["cuda_rng"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
        (tmp / "state.json").write_text(json.dumps(info) + "\n", encoding="utf-8")
    if keep:
        for old in all_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def restore(ckpt: Path, model: torch.nn.Module, optimizer) -> RunState:
    try:
        info = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        weights = load_file(str(ckpt / "trainable.safetensors"))
        moments = load_file(str(ckpt / "optimizer.safetensors"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{ckpt}: unreadable checkpoint ({e})") from None
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if {k: tuple(v.shape) for k, v in weights.items()} != {k: tuple(p.shape)
                                                            for k, p in params.items()}:  # fmt: skip
        raise ModelError(f"{ckpt}: does not match this model and lora config")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(weights[k].to(p.device, p.dtype))
    for key, value in moments.items():
        name, _, slot = key.partition("::")
        p = params[name]
        optimizer.state.setdefault(p, {})[slot] = (
            value.to(p.device) if slot != "step" else value)  # fmt: skip
    torch.set_rng_state(torch.tensor(info["rng"], dtype=torch.uint8))
    cuda = info.get("cuda_rng")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])
    return RunState(
        info["step"],
        Position(info["epoch"], info["index"]),
        info.get("window", {}),
        info.get("layout", {}),
    )
