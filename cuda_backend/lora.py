"""LoRA / DoRA by reversible module surgery on transformers models: the MLX twin's formula.

`apply()` swaps the targeted linear layers of the last `num_layers` blocks for `LoRALinear`
(`from_base`): y = W x + (alpha / rank) * B A dropout(x), A uniform(+-1/sqrt(in)) and B = 0 at
the start, as PEFT and mlx-lm do. With `method: dora`, the output is also rescaled per row to a
learned magnitude over the (detached) norm of W + scale * B A, as PEFT's DoRA. `fuse()` turns every
adapted layer back into a plain `nn.Linear` with the update folded in. `method: full` unfreezes
the same blocks instead. The base layer may be an `nn.Linear`, our `NF4Linear`, or bitsandbytes'
`Linear4bit`: anything with a weight that `dense_weight()` can give back.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mlxtune.config import LoRAConfig
from mlxtune.errors import ConfigError
from mlxtune.targets import DEFAULT_TARGETS, EMBEDDERS, TOWER_TARGETS, hits


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a linear layer, dequantized if it is stored in 4 bits."""
    if hasattr(layer, "dequantize"):
        return layer.dequantize()
    weight = layer.weight
    if weight.__class__.__name__ == "Params4bit":  # bitsandbytes
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    return weight


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or m.__class__.__name__ in ("NF4Linear", "Linear4bit")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, scale: float, dropout: float, dora: bool):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        out_features, in_features = base.out_features, base.in_features
        device = next(t.device for t in [*base.parameters(), *base.buffers()])  # no dequantizing
        bound = 1 / math.sqrt(in_features)
        self.lora_A = nn.Parameter(
            torch.empty(r, in_features, device=device).uniform_(-bound, bound)
        )
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.m = None
        if dora:
            self.m = nn.Parameter(dense_weight(base).detach().float().norm(dim=1))

    @classmethod
    def from_base(cls, base: nn.Module, r: int, scale: float, dropout: float = 0.0,
                  dora: bool = False) -> LoRALinear:  # fmt: skip
        return cls(base, r, scale, dropout, dora)

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        dropped = self.dropout(x)
        update = (dropped @ a.T) @ b.T * self.scale
        if self.m is None:
            return y + update
        w = dense_weight(self.base)
        norm = (w.float() + self.delta().float()).norm(dim=1).detach()  # a constant, as PEFT
        factor = (self.m / norm).to(x.dtype)
        plain = isinstance(self.dropout, nn.Identity) or not self.training
        bias = getattr(self.base, "bias", None)
        # the magnitude rescales W x, never the bias (PEFT subtracts it before scaling)
        base = (y - bias if bias is not None else y) if plain else \
            nn.functional.linear(dropped, w.to(x.dtype))  # fmt: skip
        return y + (factor - 1) * base + factor * update

    def fuse(self) -> nn.Linear:
        """A plain linear layer with the update folded into its weight; its bias is kept."""
        w = dense_weight(self.base).detach().float() + self.delta().detach().float()
        if self.m is not None:
            w = w * (self.m.detach() / w.norm(dim=1))[:, None]
        dtype = dense_weight(self.base).dtype
        bias = getattr(self.base, "bias", None)
        fused = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device,
                          dtype=dtype)  # fmt: skip
        fused.weight.data.copy_(w.to(dtype))
        if bias is not None:
            fused.bias.data.copy_(bias.detach().to(dtype))
        return fused


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, the decoder's block list) of a transformers model."""
    best = None
    for path, m in model.named_modules():
        decoder = isinstance(m, nn.ModuleList) and path.endswith("layers") and len(m) > 0
        if (
            decoder
            and "vision" not in path
            and "audio" not in path
            and (best is None or len(path) < len(best[0]))
        ):
            best = (path, m)
    if best is None:
        raise ConfigError("lora: this model has no decoder layers to adapt")
    return best


def apply(model: nn.Module, cfg: LoRAConfig, model_type: str) -> list[str]:
    """Freeze the model, then adapt the targets; returns the adapted module paths."""
    model.requires_grad_(False)
    prefix, layers = _decoder_layers(model)
    first = 0 if cfg.num_layers is None else max(len(layers) - cfg.num_layers, 0)
    chosen = list(enumerate(layers))[first:]
    if cfg.method == "full":
        for _, block in chosen:
            block.requires_grad_(True)
        return [f"{prefix}.{i}" for i, _ in chosen]
    targets = cfg.targets or DEFAULT_TARGETS.get(model_type, ())
    paths = [
        f"{prefix}.{i}.{path}"
        for i, block in chosen
        for path, m in block.named_modules()
        if is_linear(m) and (not targets or hits(path, targets)) and not hits(path, ("router",))
    ]
    if not paths:
        wanted = ", ".join(targets) or "any linear layer"
        raise ConfigError(f"lora.targets: no module matches ({wanted}) in the model's blocks")
    for tower in ("vision", "audio"):
        if getattr(cfg, tower):
            paths += _tower_paths(model, tower)
    swap(model, paths, cfg)
    if cfg.train_embedders:
        found = [p for p, _ in model.named_modules() if p.rsplit(".", 1)[-1] in EMBEDDERS]
        if not found:
            raise ConfigError("lora.train_embedders: this model has no multimodal embedders")
        for path in found:
            model.get_submodule(path).requires_grad_(True)
    return paths


def _tower_paths(model: nn.Module, kind: str) -> list[str]:
    """The attention and feed-forward linears of Gemma's vision or audio tower (lora.vision /
    lora.audio), by the same names as the MLX engine's towers (Hugging Face's)."""
    towers = [p for p, _ in model.named_modules() if p.endswith(f"{kind}_tower")]
    if not towers:
        raise ConfigError(f"lora.{kind}: this model has no {kind}_tower")
    root = min(towers, key=len)
    paths = [f"{root}.{p}" for p, m in model.get_submodule(root).named_modules()
             if is_linear(m) and hits(p, TOWER_TARGETS)]  # fmt: skip
    if not paths:
        raise ConfigError(f"lora.{kind}: this model's {kind}_tower has no linear layers to adapt; "
                          "lora.train_embedders trains what maps its output into the text model")  # fmt: skip
    return paths


def linear_paths(model: nn.Module) -> list[str]:
    """Every linear layer in the model: where an adapter file's modules can go."""
    return [p for p, m in model.named_modules() if is_linear(m)]


def swap(model: nn.Module, paths: list[str], cfg: LoRAConfig) -> None:
    """Replace the layers at `paths` by LoRA (or DoRA) layers wrapping them."""
    for path in paths:
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = LoRALinear.from_base(getattr(owner, name), cfg.rank, cfg.scale, cfg.dropout,
                                     cfg.method == "dora")  # fmt: skip
        setattr(owner, name, layer)


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def count(params: dict[str, torch.Tensor]) -> int:
    return sum(int(v.numel()) for v in params.values())


def fuse(model: nn.Module) -> None:
    """Fold every LoRA/DoRA update into its base layer (dequantizing a 4-bit base)."""
    for path, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent, _, name = path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, name, m.fuse())
