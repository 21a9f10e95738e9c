"""Scaled real-width Llama 4 checkpoints (Maverick or Scout), written tensor by tensor.

Every width is the released model's (hidden 5120, experts 8192 wide, vocab 202,048, the real
vision tower); only the number of layers and of routed experts shrinks. That is what tests and
benchmarks need to prove memory and loading behaviour at real sizes on a 24 GB machine: the
model is never built in memory, each tensor is drawn and streamed to its shard in slices, and
the shards plus `model.safetensors.index.json` are laid out as Hugging Face writes them.

    python -m cuda_backend.scaled OUT_DIR --model maverick|scout --layers 2 --experts 16
"""

from __future__ import annotations

import copy
import json
import math
import struct
import sys
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import torch

from mlxtune.io import atomic_folder
from mlxtune.tiny import _common
from mlxtune.tiny import llama4 as tiny

KNOWN = Path(__file__).resolve().parent.parent / "mlxtune" / "known"
MODELS = {
    "maverick": "meta-llama--Llama-4-Maverick-17B-128E-Instruct.json",
    "scout": "meta-llama--Llama-4-Scout-17B-16E-Instruct.json",
}
SLICE = 1 << 24  # values drawn at once: 64 MiB as float32, whatever the tensor's size
INDEX = "model.safetensors.index.json"


def scaled_config(model: str, layers: int, experts: int, vision_layers: int, ids: dict) -> dict:
    """The released config with fewer layers and experts, and our tokenizer's special ids."""
    config = json.loads((KNOWN / MODELS[model]).read_text())
    text, vision = config["text_config"], config["vision_config"]
    # Per-layer lists would describe the released depth: transformers derives them again.
    for key in ("moe_layers", "no_rope_layers", "layer_types"):
        text.pop(key, None)
    text |= {"num_hidden_layers": layers, "num_local_experts": experts}
    vision["num_hidden_layers"] = vision_layers
    text |= {
        "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]],
        "pad_token_id": ids["<|finetune_right_pad|>"],
    }
    config |= {
        "boi_token_index": ids["<|image_start|>"],
        "eoi_token_index": ids["<|image_end|>"],
        "image_token_index": ids["<|patch|>"],  # the model fills <|patch|> positions
        "torch_dtype": "bfloat16",
    }
    return config


def layout(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, in transformers' order, from a meta-device model."""
    import transformers

    # A copy: transformers rewrites rope_scaling in the dicts it is given.
    with torch.device("meta"):
        cfg = transformers.Llama4Config(**copy.deepcopy(config))
        model = transformers.Llama4ForConditionalGeneration(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    # Persistent buffers belong in the checkpoint too (Llama 4 has none, but stay exact).
    for name, t in model.state_dict().items():
        shapes.setdefault(name, tuple(t.shape))
    return list(shapes.items())


def init(name: str, shape: tuple[int, ...]) -> str | float:
    """'ones', 'zeros' or the std of a normal draw: 1/sqrt(fan_in), 0.02 for plain vectors."""
    if "norm" in name and name.endswith(".weight"):
        return "ones"
    if name.endswith(".bias"):
        return "zeros"
    if len(shape) < 2:
        return 0.02
    if len(shape) == 2:
        fan_in = shape[-1]
    elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        fan_in = shape[1]  # (E, in, out): each expert multiplies x @ w
    else:
        fan_in = math.prod(shape[1:])
    return fan_in**-0.5


def slices(name: str, shape: tuple[int, ...], seed: int, bufs: deque):
    """The tensor's bf16 values in row-major order, at most SLICE at a time.

    Values are i.i.d., so flat slices are row-major slices along dim 0 (and within one expert
    when a single expert is larger than SLICE). Each tensor has its own stream: (seed, crc32).
    Each slice is a view of the next (scratch, out) pair of `bufs`, taken in turn: reused
    buffers spare the page faults of fresh 64 MiB tensors.
    """
    kind, total = init(name, shape), math.prod(shape)
    gen = torch.Generator().manual_seed((seed << 32) | zlib.crc32(name.encode()))
    for start in range(0, total, SLICE):
        n = min(SLICE, total - start)
        scratch, out = bufs[0]
        bufs.rotate()
        if kind in ("ones", "zeros"):
            out[:n].fill_(kind == "ones")
        else:
            out[:n].copy_(torch.randn(n, generator=gen, out=scratch[:n]).mul_(kind))
        yield out[:n]


def plan_shards(tensors: list, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy in order: a shard takes tensors while it stays within shard_bytes."""
    shards, size = [[]], 0
    for name, shape in tensors:
        n = 2 * math.prod(shape)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """8-byte length + JSON header padded with spaces so the data starts 8-byte aligned."""
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        end = offset + 2 * math.prod(shape)
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_shard(path: Path, entries: list, seed: int) -> int:
    """Header first (offsets follow from shapes), then each tensor streamed slice by slice.

    A thread writes one slice while the next is drawn (both release the GIL): on two cores the
    page-cache copy costs about as much as drawing. Two buffer pairs, so a slice's buffer is
    only reused once its write has finished.
    """
    bufs = deque((torch.empty(SLICE), torch.empty(SLICE, dtype=torch.bfloat16)) for _ in "ab")
    written, pending = 0, None
    with open(path, "wb") as f, ThreadPoolExecutor(1) as pool:
        f.write(header(entries))
        for name, shape in entries:
            for part in slices(name, shape, seed, bufs):
                written += pending.result() if pending else 0
                # bf16 -> raw bytes without a copy; x86/ARM hosts are little-endian as required.
                pending = pool.submit(f.write, part.view(torch.uint8).numpy())
        written += pending.result() if pending else 0
    return written


def side_files(config: dict, spec, tok) -> dict[str, dict | str]:
    """config.json, the tokenizer and chat files, generation and processor configs."""
    text = config["text_config"]
    generation = {
        "bos_token_id": text["bos_token_id"],
        "eos_token_id": text["eos_token_id"],
        "pad_token_id": text["pad_token_id"],
        **{"do_sample": True, "temperature": 0.6, "top_p": 0.9},
    }
    return {
        "config.json": config,
        **_common.tokenizer_files(spec, tok),
        "generation_config.json": generation,
        "preprocessor_config.json": tiny.PREPROCESSOR,
        "processor_config.json": tiny.PROCESSOR,
    }


def make_scaled(out_dir, model="maverick", layers=2, experts=16, vision_layers=1, seed=0,
                shard_bytes=2_000_000_000, echo=None) -> Path:  # fmt: skip
    """Write a scaled real-width Llama 4 `model` checkpoint into `out_dir` (absent or empty)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    for what, n in (("layers", layers), ("experts", experts), ("vision_layers", vision_layers)):
        if n < 1:
            raise ValueError(f"{what} must be at least 1, got {n}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    if sys.byteorder != "little":
        raise ValueError("safetensors data is little-endian; this host is not")
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))

    spec = tiny.TOKENIZER
    tok = _common.build_tokenizer(spec)
    ids = {t: tok.token_to_id(t) for t in spec.special_tokens}
    config = scaled_config(model, layers, experts, vision_layers, ids)
    files = side_files(config, spec, tok)
    shards = plan_shards(layout(config), shard_bytes)
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    total = sum(2 * math.prod(s) for shard in shards for _, s in shard)
    files[INDEX] = {
        "metadata": {"total_size": total},
        "weight_map": {n: f for f, shard in zip(names, shards, strict=True) for n, _ in shard},
    }

    # A temp folder beside out_dir, renamed at the end: a killed run leaves nothing half-written.
    with atomic_folder(Path(out_dir)) as tmp:
        for name, content in files.items():
            body = content if isinstance(content, str) else json.dumps(content, indent=2) + "\n"
            (tmp / name).write_text(body, encoding="utf-8")
        done, t0 = 0, time.perf_counter()
        for file, shard in zip(names, shards, strict=True):
            t = time.perf_counter()
            n = write_shard(tmp / file, shard, seed)
            done += n
            dt = max(time.perf_counter() - t, 1e-9)
            echo(f"{file}: {n / 1e9:.2f} GB in {dt:.1f} s ({n / 1e9 / dt:.2f} GB/s), "
                 f"{done / 1e9:.2f} / {total / 1e9:.2f} GB")  # fmt: skip
        for f in tmp.iterdir():
            f.chmod(0o644)
    echo(f"wrote {total / 1e9:.2f} GB in {len(shards)} shards in {time.perf_counter() - t0:.1f} s")
    return Path(out_dir)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--model", type=click.Choice(sorted(MODELS)), default="maverick", show_default=True)
@click.option("--layers", type=int, default=2, show_default=True, help="Decoder layers.")
@click.option("--experts", type=int, default=16, show_default=True, help="Routed experts.")
@click.option("--vision-layers", type=int, default=1, show_default=True, help="Vision layers.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Weights are a function of it."
)
@click.option("--shard-gb", type=float, default=2.0, show_default=True, help="Max shard size (GB).")
def main(out_dir, model, layers, experts, vision_layers, seed, shard_gb):
    """Write a scaled real-width Llama 4 checkpoint into OUT_DIR (absent or empty)."""
    try:
        path = make_scaled(out_dir, model, layers=layers, experts=experts,
                           vision_layers=vision_layers, seed=seed,
                           shard_bytes=int(shard_gb * 1e9))  # fmt: skip
    except (ValueError, FileExistsError) as e:
        click.echo(f"cuda_backend.scaled: error: {e}", err=True)
        sys.exit(2)
    click.echo(f"wrote scaled {model} checkpoint to {path}")


if __name__ == "__main__":
    main()
