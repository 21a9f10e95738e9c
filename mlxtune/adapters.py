"""The adapter file contract, shared by both backends: PEFT's layout on disk. Framework-free.

    adapter_model.safetensors   base_model.model.<hf module>.lora_A.weight   (r, in)    float32
                                base_model.model.<hf module>.lora_B.weight   (out, r)
                                base_model.model.<hf module>.lora_magnitude_vector (out,)  DoRA
                                base_model.model.<hf tensor>   a module trained in full (PEFT's
                                modules_to_save, e.g. Gemma 4's embed_vision)
    adapter_config.json         PEFT's LoraConfig keys only (r, lora_alpha, lora_dropout, use_dora,
                                target_modules = the full module names, modules_to_save): PEFT
                                warns about any other key. The run folder's config.yaml holds the
                                rest.

Module names are the base checkpoint's (Hugging Face) names, so `peft.PeftModel.from_pretrained`
loads the adapter onto the transformers model. A backend maps its own module paths onto them
with `match_names()`, against the tensor names in the checkpoint's safetensors headers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import LoRAConfig
from .errors import ModelError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraTensors:
    """One adapted module, in PEFT's orientation."""

    a: np.ndarray  # (r, in)
    b: np.ndarray  # (out, r)
    magnitude: np.ndarray | None = None  # (out,), DoRA only


@dataclass(frozen=True)
class Adapter:
    lora: LoRAConfig
    modules: dict[str, LoraTensors]  # Hugging Face module name -> tensors
    base_model: str = ""
    full: dict[str, np.ndarray] = field(default_factory=dict)  # HF tensor name -> trained tensor

    @property
    def saved_modules(self) -> list[str]:
        """The modules trained in full (PEFT's modules_to_save)."""
        return sorted({name.rsplit(".", 1)[0] for name in self.full})


def tensor_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of every *.safetensors file in `folder`, from the headers alone."""
    shapes = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        shapes |= tensor_shapes_of(path)
    return shapes


def tensor_shapes_of(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape in one safetensors file, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def match_names(ours: list[str], theirs: list[str]) -> dict[str, str]:
    """Map each of our dotted names onto the one of `theirs` sharing the longest dotted tail.

    The shared tail must reach back over the block index ("3.self_attn.q_proj"), and the best
    match must be unique; otherwise the name is reported as unmatched.
    """
    tails: dict[str, list[str]] = {}
    for name in theirs:
        tails.setdefault(name.split(".")[-1], []).append(name)
    out, missing = {}, []
    for name in ours:
        parts = name.split(".")
        need = next((len(parts) - i for i, p in enumerate(parts) if p.isdigit()), 2)
        scored = [(_shared_tail(parts, t.split(".")), t) for t in tails.get(parts[-1], [])]
        best = max((s for s, _ in scored), default=0)
        winners = [t for s, t in scored if s == best]
        if best < need or len(winners) != 1:
            missing.append(name)
        else:
            out[name] = winners[0]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelError(f"no unique checkpoint tensor for module {missing[0]}{more}")
    return out


def _shared_tail(a: list[str], b: list[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def save(folder: Path, adapter: Adapter) -> None:
    """Write adapter_model.safetensors and adapter_config.json into an existing folder."""
    from safetensors.numpy import save_file

    tensors = {}
    for module, t in adapter.modules.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(t.a, dtype=np.float32)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(t.b, dtype=np.float32)
        if t.magnitude is not None:
            tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = t.magnitude.astype(np.float32)
    for name, value in adapter.full.items():
        tensors[f"{PREFIX}{name}"] = np.ascontiguousarray(value, dtype=np.float32)
    save_file(tensors, str(Path(folder) / WEIGHTS), metadata={"format": "pt"})
    lora = adapter.lora
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": adapter.base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(adapter.modules),
        "use_dora": lora.method == "dora",
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": adapter.saved_modules or None,
    }
    (Path(folder) / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load(folder: str | Path) -> Adapter:
    from safetensors.numpy import load_file

    folder = Path(folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise ModelError(f"{folder}: no {name}: not an adapter folder")
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        lora = LoRAConfig(
            method="dora" if config.get("use_dora") else "lora",
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout") or 0.0),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{folder / CONFIG}: not a readable LoRA config ({e})") from None
    tensors = load_file(str(folder / WEIGHTS))
    full = {k[len(PREFIX) :]: v for k, v in tensors.items() if ".lora_" not in k}
    modules = {}
    for module in {k[len(PREFIX) :].rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}:
        key = f"{PREFIX}{module}"
        try:
            modules[module] = LoraTensors(
                tensors[f"{key}.lora_A.weight"],
                tensors[f"{key}.lora_B.weight"],
                tensors.get(f"{key}.lora_magnitude_vector"),
            )
        except KeyError as e:
            raise ModelError(f"{folder / WEIGHTS}: {module}: missing {e.args[0]}") from None
    return Adapter(lora, modules, config.get("base_model_name_or_path") or "", full)
