"""LoRA / DoRA by reversible module surgery on mlx-lm models.

`apply()` swaps the targeted Linear (or QuantizedLinear) layers of the last `num_layers` blocks
for mlx-lm's `LoRALinear` / `DoRALinear` (`from_base`), whose math is PEFT's: y = W x +
(alpha / rank) * B A x, with A uniform(+-1/sqrt(in)) and B = 0 at the start; DoRA rescales by a
learned magnitude over a detached weight norm. `fuse()` turns every adapted layer back into a
plain layer with the update folded in. `method: full` unfreezes the same blocks instead.

Targets are matched as `targets.hits` says. An empty `lora.targets` takes the family's row of
`targets.DEFAULT_TARGETS`, or every linear layer of the block for a family not in the table.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import LoRAConfig
from .errors import ConfigError
from .targets import DEFAULT_TARGETS, EMBEDDERS, TOWER_TARGETS, hits

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)


def blocks(model: nn.Module, num_layers: int | None) -> list[tuple[int, nn.Module]]:
    """(index, block) of the last `num_layers` decoder blocks, or all of them."""
    layers = list(model.layers)
    first = 0 if num_layers is None else max(len(layers) - num_layers, 0)
    return list(enumerate(layers))[first:]


def apply(model: nn.Module, cfg: LoRAConfig, model_type: str) -> list[str]:
    """Freeze the model, then adapt the targets; returns the adapted module paths (model-wide)."""
    model.freeze()
    chosen = blocks(model, cfg.num_layers)
    prefix = _layers_prefix(model)
    if cfg.method == "full":
        for _, block in chosen:
            block.unfreeze()
        return [f"{prefix}.{i}" for i, _ in chosen]
    targets = cfg.targets or DEFAULT_TARGETS.get(model_type, ())
    paths = [
        f"{prefix}.{i}.{path}"
        for i, block in chosen
        for path, m in block.named_modules()
        if isinstance(m, LINEAR_TYPES) and (not targets or hits(path, targets))
    ]
    if not paths:
        wanted = ", ".join(targets) or "any linear layer"
        raise ConfigError(f"lora.targets: no module matches ({wanted}) in the model's blocks")
    for tower in ("vision", "audio"):
        if getattr(cfg, tower):
            paths += _tower_paths(model, f"{tower}_tower")
    swap(model, paths, cfg)
    if cfg.train_embedders:
        found = [name for name in EMBEDDERS if name in model]
        if not found:
            raise ConfigError("lora.train_embedders: this model has no multimodal embedders")
        for name in found:
            model[name].unfreeze()
    return paths


def _tower_paths(model: nn.Module, name: str) -> list[str]:
    if name not in model:
        key = name.removesuffix("_tower")
        raise ConfigError(f"lora.{key}: this model has no {name}")
    paths = [
        f"{name}.{path}"
        for path, m in model[name].named_modules()
        if isinstance(m, LINEAR_TYPES) and hits(path, TOWER_TARGETS)
    ]
    if not paths:  # Gemma 3n's MobileNetV5 is convolutions only
        key = name.removesuffix("_tower")
        raise ConfigError(f"lora.{key}: this model's {name} has no linear layers to adapt; "
                          "lora.train_embedders trains what maps its output into the text model")  # fmt: skip
    return paths


def linear_paths(model: nn.Module) -> list[str]:
    """Every Linear / QuantizedLinear in the model: where an adapter file's modules can go."""
    return [p for p, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]


def swap(model: nn.Module, paths: list[str], cfg: LoRAConfig) -> None:
    """Replace the layers at `paths` by LoRA (or DoRA) layers wrapping them."""
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    layer_cls = DoRALinear if cfg.method == "dora" else LoRALinear
    modules = dict(model.named_modules())
    pairs = [
        (p, layer_cls.from_base(modules[p], r=cfg.rank, dropout=cfg.dropout, scale=cfg.scale))
        for p in paths
    ]
    model.update_modules(tree_unflatten(pairs))


def _layers_prefix(model: nn.Module) -> str:
    """Where `model.layers` lives in the parameter tree ("model.layers", ...)."""
    first = model.layers[0]
    for path, module in model.named_modules():
        if module is first:
            return path.rsplit(".", 1)[0]
    raise ValueError("model.layers[0] is not a submodule of the model")


def trainable(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def count(params: dict[str, mx.array]) -> int:
    return sum(int(v.size) for v in params.values())


def fuse(model: nn.Module) -> None:
    """Fold every LoRA/DoRA update into its base layer (dequantizing a quantized base)."""
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    adapted = (LoRALinear, DoRALinear)
    fused = [
        (p, m.fuse(dequantize=True)) for p, m in model.named_modules() if isinstance(m, adapted)
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
