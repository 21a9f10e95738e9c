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

FORMATS = ("peft", "mlx-lm", "merged", "gguf", "gguf-lora")
CONV1D_FAMILIES = ("gpt2", "gpt_bigcode")  # weights stored transposed on disk


def run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ModelError(f"{run_dir}: no config.yaml: not an mlxtune run folder")
    return load_config(path)


def export(run_dir: str | Path, out: str | Path, fmt: str, quant: str = "f16",
           push_to_hub: str | None = None, private: bool = False) -> Path:  # fmt: skip
    """Write RUN_DIR's model as `fmt` into the folder `out`; `quant`: the GGUF file's types;
    `push_to_hub`: a repo id to upload the folder to, with a model card (`publish.push`)."""
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise ModelError(f"--format {fmt}: not one of {', '.join(FORMATS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out}: exists and is not empty")
    cfg = run_config(run_dir)
    full = cfg.lora.method == "full"
    if fmt == "peft" and full:
        raise ModelError(f"{run_dir}: a full fine-tune has no adapter; use --format merged")
    if fmt in ("gguf", "gguf-lora"):
        _gguf_supported(cfg, quant)
    if fmt == "gguf-lora" and full:
        raise ModelError(f"{run_dir}: a full fine-tune has no adapter; use --format gguf")
    with atomic_folder(out) as tmp:
        if fmt == "peft":
            for name in (adapters.WEIGHTS, adapters.CONFIG):
                shutil.copy2(run_dir / name, tmp / name)
        elif fmt == "mlx-lm":
            _mlx_lm(run_dir, cfg, tmp)
        elif fmt == "merged":
            _merged(run_dir, cfg, tmp)
        else:
            _gguf(run_dir, cfg, tmp, quant, lora=fmt == "gguf-lora")
        if push_to_hub:  # the card goes into the folder too; nothing is left on failure
            from .publish import push

            push(tmp, run_dir, cfg, push_to_hub, fmt, private)
    return out


def _gguf_supported(cfg: Config, quant: str) -> None:
    """Refuse, before any work, what the GGUF writer cannot write."""
    from . import to_gguf

    if quant not in to_gguf.QUANTS:
        raise ModelError(f"--quant {quant}: not one of {', '.join(to_gguf.QUANTS)}")
    src = resolve_path(cfg.model.path)
    why = to_gguf.supported(json.loads((src / "config.json").read_text(encoding="utf-8")))
    if why:
        raise ModelError(f"{src}: {why}")


def _gguf(run_dir: Path, cfg: Config, tmp: Path, quant: str, lora: bool = False) -> None:
    """The merged model as one GGUF file, and an Ollama Modelfile beside it; `lora`: the
    base model's GGUF (rounded back to floats if it was quantized) and the adapter's."""
    from . import to_gguf

    folder = tmp / ".hf"
    folder.mkdir()
    _merged(run_dir, cfg, folder, fold=not lora)
    run = run_dir.resolve().name
    name = f"{'base' if lora else run}-{quant}.gguf"
    to_gguf.write(folder, tmp / name, quant, name=run)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    adapter = None
    if lora:
        adapter = f"{run}-lora.gguf"
        to_gguf.write_lora(adapters.load(run_dir), config, tmp / adapter)
    context = min(cfg.data.max_seq_len * 4, config.get("max_position_embeddings", 4096))
    text = to_gguf.modelfile(name, folder, context, adapter)
    (tmp / "Modelfile").write_text(text, encoding="utf-8")
    shutil.rmtree(folder)


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


def _merged(run_dir: Path, cfg: Config, tmp: Path, fold: bool = True) -> None:
    """The base checkpoint with the run's update folded in (`fold` False: the base alone, as
    the run trained on it)."""
    import mlx.core as mx

    src = resolve_path(cfg.model.path)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") in CONV1D_FAMILIES:  # square layers would merge silently wrong
        raise ModelError(f"{src}: {config['model_type']} stores Conv1D (in, out) weights; "
                         "merged export supports Linear (out, in) layouts only")  # fmt: skip
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, tmp / f.name)
    names = list(adapters.tensor_shapes(src))
    base = _dequantized(cfg, names) if cfg.model.quantize or "quantization" in config else {}
    if base:  # the merged folder holds plain weights: no quantization left in its config
        config = {k: v for k, v in config.items() if k not in ("quantization",
                                                               "quantization_config")}  # fmt: skip
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _write_config(config, src, tmp)
    updates = _updates(run_dir, cfg, names) if fold else {}
    left = set(updates)
    for shard in sorted(src.glob("*.safetensors")):
        tensors = mx.load(str(shard))
        for name in set(tensors) & set(base):
            tensors[name] = base[name]
            for part in ("scales", "biases"):  # a quantized checkpoint's other halves
                tensors.pop(name.removesuffix("weight") + part, None)
        for name in left & set(tensors):
            tensors[name] = updates[name](tensors[name])
        left -= set(tensors)
        mx.save_safetensors(str(tmp / shard.name), tensors, metadata={"format": "pt"})
    if left:
        raise ModelError(f"{src}: no tensor {sorted(left)[0]} to merge into")
    if (tmp / "model.safetensors.index.json").is_file() and base:
        _reindex(tmp)


def _dequantized(cfg: Config, names: list[str]) -> dict:
    """A quantized base (`model.quantize` 4 or 8, or a quantized checkpoint), loaded as the run
    trained on it, each quantized weight rounded back to floats: checkpoint name -> weight in
    the scales' dtype. The adapter learned against these weights, so the merged model answers
    as the adapter did on the quantized base."""
    import mlx.core as mx
    import mlx.nn as nn

    from . import model as model_lib

    loaded = model_lib.load(cfg.model)
    found = {}
    for path, m in loaded.model.named_modules():
        if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding):
            w = mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=m.group_size,
                              bits=m.bits, mode=getattr(m, "mode", "affine"))  # fmt: skip
            found[f"{path}.weight"] = w.astype(m.scales.dtype)
    if not found:
        return {}
    to_hf = adapters.match_names(list(found), [n for n in names if n.endswith(".weight")])
    out = {to_hf[k]: v for k, v in found.items()}
    mx.eval(list(out.values()))
    return out


def _reindex(folder: Path) -> None:
    """model.safetensors.index.json for the shards as written (the quantized halves gone)."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    weight_map, total = {}, 0
    for shard in sorted(folder.glob("*.safetensors")):
        for name in adapters.tensor_shapes_of(shard):
            weight_map[name] = shard.name
        total += shard.stat().st_size
    index["weight_map"] = weight_map
    index.setdefault("metadata", {})["total_size"] = total
    index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


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
