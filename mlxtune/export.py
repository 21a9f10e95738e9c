"""`mlxtune export RUN_DIR OUT --format peft|mlx-lm|merged`.

- peft: the run's adapter files, loadable with `peft.PeftModel.from_pretrained`.
- mlx-lm: `adapters.safetensors` + `adapter_config.json` as `mlx_lm lora` writes them, for
  `mlx_lm.generate --adapter-path OUT`.
- merged: the base checkpoint folder with the adapter folded into its weights: same tensor
  names, same shards, every other file copied, so it loads wherever the base model did
  (towers of a multimodal checkpoint included). The update is added in float32 and cast back.
  config.json carries RoPE in both layouts (`models.hf_config`), so transformers 4 and 5 and
  mlx-lm all read the same positions from it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import adapters
from .config import Config, load_config
from .errors import ModelError
from .hub import resolve_path
from .io import atomic_folder
from .runs import all_checkpoints

FORMATS = ("peft", "mlx-lm", "merged")
CONV1D_FAMILIES = ("gpt2", "gpt_bigcode")  # weights stored transposed on disk


def run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ModelError(f"{run_dir}: no config.yaml: not an mlxtune run folder")
    return load_config(path)


def export(run_dir: str | Path, out: str | Path, fmt: str) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out}: exists and is not empty")
    cfg = run_config(run_dir)
    full = cfg.lora.method == "full"
    if fmt == "peft" and full:
        raise ModelError(f"{run_dir}: a full fine-tune has no adapter; use --format merged")
    with atomic_folder(out) as tmp:
        if fmt == "peft":
            for name in (adapters.WEIGHTS, adapters.CONFIG):
                shutil.copy2(run_dir / name, tmp / name)
        elif fmt == "mlx-lm":
            _mlx_lm(run_dir, cfg, tmp)
        else:
            _merged(run_dir, cfg, tmp)
    return out


def _trained(run_dir: Path) -> dict:
    """The trained parameters under their MLX names, from the newest checkpoint."""
    import mlx.core as mx

    found = all_checkpoints(run_dir)
    if not found:
        raise ModelError(f"{run_dir}: no checkpoint with trained weights")
    return mx.load(str(found[-1] / "trainable.safetensors"))


def _num_layers(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return int(config.get("text_config", config)["num_hidden_layers"])


def _mlx_lm(run_dir: Path, cfg: Config, tmp: Path) -> None:
    import mlx.core as mx

    from .models._towers import TOWERS

    weights = _trained(run_dir)
    towers = sorted({k.split(".", 1)[0] for k in weights} & set(TOWERS))
    if towers:
        raise ModelError(f"{run_dir}: trained {', '.join(towers)} as well, which mlx-lm does not "
                         "load (it keeps only the text decoder); use --format peft or merged")  # fmt: skip
    blocks, keys = set(), set()
    for name in weights:
        head, index, rest = _split_block(name)
        blocks.add(index)
        keys.add(rest.rsplit(".", 1)[0])  # "self_attn.q_proj" from "self_attn.q_proj.lora_a"
    total = _num_layers(resolve_path(cfg.model.path))
    lora = cfg.lora
    config = {
        "fine_tune_type": lora.method,
        "num_layers": total - min(blocks),
        "lora_parameters": {
            "rank": lora.rank,
            "scale": lora.scale,
            "dropout": lora.dropout,
            **({"keys": sorted(keys)} if lora.method != "full" else {}),
        },
    }
    mx.save_safetensors(str(tmp / "adapters.safetensors"), dict(weights))
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _split_block(name: str) -> tuple[str, int, str]:
    """ "language_model.model.layers.3.self_attn.q_proj.lora_a" -> (prefix, 3, rest)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit() and i and parts[i - 1] == "layers":
            return ".".join(parts[:i]), int(p), ".".join(parts[i + 1 :])
    raise ModelError(f"{name}: not inside a decoder block")


def _merged(run_dir: Path, cfg: Config, tmp: Path) -> None:
    import mlx.core as mx

    src = resolve_path(cfg.model.path)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if "quantization" in config:
        raise ModelError(f"{src}: a quantized checkpoint cannot take a merged update")
    if config.get("model_type") in CONV1D_FAMILIES:  # square layers would merge silently wrong
        raise ModelError(f"{src}: {config['model_type']} stores Conv1D (in, out) weights; "
                         "merged export supports Linear (out, in) layouts only")  # fmt: skip
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, tmp / f.name)
    _write_config(config, src, tmp)
    updates = _updates(run_dir, cfg, list(adapters.tensor_shapes(src)))
    left = set(updates)
    for shard in sorted(src.glob("*.safetensors")):
        tensors = mx.load(str(shard))
        for name in left & set(tensors):
            tensors[name] = updates[name](tensors[name])
        left -= set(tensors)
        mx.save_safetensors(str(tmp / shard.name), tensors, metadata={"format": "pt"})
    if left:
        raise ModelError(f"{src}: no tensor {sorted(left)[0]} to merge into")


def _write_config(config: dict, src: Path, tmp: Path) -> None:
    """config.json with RoPE both as transformers 5 writes it (`rope_parameters`) and as
    transformers 4 and mlx-lm read it (`rope_theta`, `rope_scaling`, ...), the same settings."""
    from .models import hf_config

    both = hf_config.normalize(config, str(src), strict=False)
    if both != config:
        text = json.dumps(both, indent=2, ensure_ascii=False) + "\n"
        (tmp / "config.json").write_text(text, encoding="utf-8")


def _updates(run_dir: Path, cfg: Config, names: list[str]) -> dict:
    """Checkpoint tensor name -> function(old tensor) -> new tensor."""
    import mlx.core as mx

    if cfg.lora.method == "full":
        trained = _trained(run_dir)
        to_hf = adapters.match_names(list(trained), names)
        return {to_hf[k]: (lambda old, new=v: new.astype(old.dtype)) for k, v in trained.items()}
    saved = adapters.load(run_dir)
    scale = saved.lora.scale

    def fold(old, t: adapters.LoraTensors):
        if old.shape != (t.b.shape[0], t.a.shape[1]):
            raise ModelError(f"cannot merge a ({t.b.shape[0]}, {t.a.shape[1]}) update into a "
                             f"{tuple(old.shape)} weight")  # fmt: skip
        w = old.astype(mx.float32) + scale * (mx.array(t.b) @ mx.array(t.a))
        if t.magnitude is not None:  # DoRA: rescale each output row to the learned magnitude
            w = w * (mx.array(t.magnitude) / mx.linalg.norm(w, axis=1))[:, None]
        return w.astype(old.dtype)

    updates = {f"{m}.weight": (lambda old, t=t: fold(old, t)) for m, t in saved.modules.items()}
    for name, value in saved.full.items():  # modules trained in full replace the base tensor
        updates[name] = lambda old, new=value: mx.array(new).astype(old.dtype)
    return updates
