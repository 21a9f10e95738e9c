"""`mlxtune prepare CONFIG`: a one-time copy of the checkpoint laid out for streaming loads.

Reads the Hugging Face safetensors shard by shard (`source.Source`: positioned reads, a fused
expert tensor one expert at a time) and writes a cache folder:

    manifest.json       what lies where; written last, so its presence means complete
    progress.json       the units done so far (a killed run resumes after the last one)
    dense-00003.bin     the non-expert tensors of source shard 3: linear weights in NF4 with
                        `model.quantize: 4` (not the head, not the routers), the rest in the
                        compute dtype
    experts-0001.bin    one MoE layer's routed experts, expert after expert, each [gate_up,
                        down] in NF4 (or the compute dtype), so a chunk of experts is one
                        contiguous byte range and the layer reads into one block

Every part starts on a 64-byte boundary. Each file is written as `.partial`, fsynced, hashed
(SHA-256, kept in the manifest; `--verify` checks them) and renamed. Host RAM stays near one
expert's slice plus the quantizer's fixed-size temporaries, whatever the model's size. On a
GPU the quantizing runs there.

Which tensors become what is decided here, once, on the model's skeleton (built on the meta
device): `assemble` builds the same skeleton and fills it from the manifest. Llama 4 is built
text-only (`Llama4ForCausalLM`): the twin does not train it on pictures, so the vision tower
is not copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mlxtune.config import ModelConfig
from mlxtune.errors import ModelError
from mlxtune.io import write_json
from mlxtune.progress import bar, clock

from . import moe, nf4
from .source import Source

FORMAT = 1
MANIFEST, PROGRESS = "manifest.json", "progress.json"
RAW_SLICE = 64 << 20  # bytes of a plain tensor read at once
ALIGN = nf4.ALIGN
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPERT_PARTS = moe.PARTS


def _up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# ----------------------------------------------------------------------------- the skeleton


@dataclass
class Skeleton:
    model: nn.Module  # on the meta device
    prefix: str  # what checkpoint names carry in front of the model's keys
    dtype: torch.dtype
    text_only: bool
    moe: list[str] = field(default_factory=list)  # module paths of the MoE layers
    quantized: set[str] = field(default_factory=set)  # module paths of linears stored in NF4


def compute_dtype(cfg: ModelConfig, config: dict) -> torch.dtype:
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    text = config.get("text_config") or {}
    name = config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype")
    return DTYPES.get(str(name), torch.bfloat16)


def skeleton(path: Path, config: dict, cfg: ModelConfig) -> Skeleton:
    """The model on the meta device, and which of its linears go to NF4."""
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(str(path))
    dtype = compute_dtype(cfg, config)
    prefix, text_only = "", False
    if config.get("model_type") == "llama4":
        cls, hf_config, prefix, text_only = (transformers.Llama4ForCausalLM,
                                             hf_config.get_text_config(), "language_model.", True)  # fmt: skip
    elif config.get("vision_config") or config.get("audio_config"):
        cls = transformers.AutoModelForImageTextToText
    else:
        cls = transformers.AutoModelForCausalLM
    with torch.device("meta"):
        make = getattr(cls, "_from_config", None) or cls.from_config
        model = make(hf_config, dtype=dtype)
    moe = [p for p, m in model.named_modules() if m.__class__.__name__ == "Llama4TextMoe"]
    sk = Skeleton(model, prefix, dtype, text_only, moe)
    if cfg.quantize == 4:
        head = model.get_output_embeddings()
        sk.quantized = {p for p, m in model.named_modules() if isinstance(m, nn.Linear)
                        and m is not head and not p.endswith("router")}  # fmt: skip
    return sk


# ---------------------------------------------------------------------------------- the units


@dataclass
class Unit:
    """One output file: a shard's non-expert tensors, or one MoE layer's experts."""

    name: str
    file: str
    tensors: list[tuple[str, str, str]] = field(default_factory=list)  # (key, source name, kind)
    experts: str | None = None  # the MoE layer's module path
    sources: dict[str, str] = field(default_factory=dict)  # gate_up_proj / down_proj -> name

    def source_bytes(self, src: Source) -> int:
        names = [s for _, s, _ in self.tensors] + list(self.sources.values())
        return sum(src.entries[n].nbytes for n in names)


def units(sk: Skeleton, src: Source) -> tuple[list[Unit], list[str]]:
    """The cache's units, and the checkpoint tensors left out (e.g. Llama 4's vision tower)."""
    keys = set(sk.model.state_dict())
    expert_keys = {f"{m}.experts.{part}": (m, part) for m in sk.moe for part in EXPERT_PARTS}
    by_layer: dict[str, Unit] = {}
    dense: dict[str, Unit] = {}
    skipped, covered = [], set()
    for name in src.names:
        key = name if name in keys else name.removeprefix(sk.prefix)
        if key not in keys:
            skipped.append(name)
            continue
        covered.add(key)
        if key in expert_keys:
            layer, part = expert_keys[key]
            n = len(by_layer) + 1
            unit = by_layer.setdefault(layer, Unit(f"experts {layer}", f"experts-{n:04d}.bin",
                                                   experts=layer))  # fmt: skip
            unit.sources[part] = name
            continue
        module = key.rsplit(".", 1)[0]
        kind = "nf4" if module in sk.quantized and key.endswith(".weight") else "raw"
        shard = src.entries[name].file.name
        n = re.findall(r"\d+", shard)
        tag = n[0] if n else str(len(dense) + 1)
        dense.setdefault(shard, Unit(f"dense {shard}", f"dense-{tag}.bin")).tensors.append(
            (key, name, kind)
        )
    missing = sorted(keys - covered - _tied(sk.model))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelError(f"model.path: the checkpoint has no tensor for {missing[0]}{more}")
    for unit in by_layer.values():
        if set(unit.sources) != set(EXPERT_PARTS):
            raise ModelError(
                f"model.path: {unit.experts}: the checkpoint lacks part of its experts"
            )
    return list(dense.values()) + list(by_layer.values()), skipped


def _tied(model: nn.Module) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied)


def expert_layout(sk: Skeleton, src: Source, unit: Unit, quantize: bool) -> dict:
    """Offsets of gate_up and down inside one expert's stride, and the stride."""
    gate_up, down = (src.entries[unit.sources[p]].shape for p in EXPERT_PARTS)
    return moe.layout(gate_up[0], gate_up[1:], down[1:], sk.dtype, quantize)


def _raw_nbytes(shape, dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def output_bytes(sk: Skeleton, src: Source, all_units: list[Unit], quantize: bool) -> int:
    """Bytes the cache will take on disk."""
    total = 0
    for unit in all_units:
        for _, name, kind in unit.tensors:
            shape = src.entries[name].shape
            total += _up(
                nf4.packed_nbytes(shape) if kind == "nf4" else _raw_nbytes(shape, sk.dtype)
            )
        if unit.experts:
            lay = expert_layout(sk, src, unit, quantize)
            total += lay["n"] * lay["stride"]
    return total


# ------------------------------------------------------------------------------- the writer


PROGRESS_EVERY_S = 3.0


class _Progress:
    """GB done of the source, GB/s, ETA: a line every few seconds and at each unit's end."""

    def __init__(self, total: int, echo: Callable[[str], None]):
        self.total, self.echo, self.every = total, echo, PROGRESS_EVERY_S
        self.done = self.fresh = 0
        self.t0 = self.last = time.perf_counter()

    def skip(self, nbytes: int) -> None:  # a unit finished by an earlier run
        self.done += nbytes

    def add(self, nbytes: int, what: str, force: bool = False) -> None:
        self.done += nbytes
        self.fresh += nbytes
        now = time.perf_counter()
        if force or now - self.last >= self.every:
            self.last = now
            rate = self.fresh / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1)
            self.echo(f"prepare {self.done / 1e9:7.1f}/{self.total / 1e9:.1f} GB "
                      f"{bar(self.done, self.total)}  {rate / 1e9:.2f} GB/s  eta {clock(eta)}"
                      f"  {what}")  # fmt: skip


class _Writer:
    """Appends aligned parts to a `.partial` file, hashing what it writes."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self.hash, self.at = hashlib.sha256(), 0

    def write(self, data: torch.Tensor) -> int:
        """Write a CPU tensor's bytes at the next aligned offset; returns that offset."""
        pad = _up(self.at) - self.at
        if pad:
            self._put(bytes(pad))
        start = self.at
        self._put(data.contiguous().view(-1).view(torch.uint8).numpy().data)
        return start

    def _put(self, b) -> None:
        self.f.write(b)
        self.hash.update(b)
        self.at += len(b)

    def finish(self) -> tuple[int, str]:
        pad = _up(self.at) - self.at
        if pad:
            self._put(bytes(pad))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.at, self.hash.hexdigest()


def _packed_bytes(w: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The NF4 bytes of `w` as they lie in the cache (quantized on `device`)."""
    packed = nf4.quantize(w.to(device))
    out = torch.zeros(nf4.packed_nbytes(packed.shape), dtype=torch.uint8, device=device)
    packed.write_into(out)
    return out.cpu()


def _write_unit(sk: Skeleton, src: Source, unit: Unit, folder: Path, quantize: bool,
                device: torch.device, progress: _Progress) -> dict:  # fmt: skip
    partial = folder / (unit.file + ".partial")
    w = _Writer(partial)
    record: dict = {"file": unit.file, "tensors": {}}
    try:
        for key, name, kind in unit.tensors:
            e = src.entries[name]
            if kind == "nf4":
                offset = w.write(_packed_bytes(src.read(name), device))
            else:
                step = max(1, RAW_SLICE // max(e.row_bytes, 1))
                rows = e.shape[0] if e.shape else 1
                offset = None
                for a in range(0, rows, step):
                    at = w.write(src.read(name, a, a + step).to(sk.dtype))
                    offset = at if offset is None else offset
            record["tensors"][key] = {"kind": kind, "shape": list(e.shape), "offset": offset,
                                      "dtype": str(sk.dtype).removeprefix("torch.")}  # fmt: skip
            progress.add(e.nbytes, unit.name)
        if unit.experts:
            lay = expert_layout(sk, src, unit, quantize)
            for x in range(lay["n"]):
                base = w.at
                for part in EXPERT_PARTS:
                    piece = src.read(unit.sources[part], x, x + 1)[0]
                    data = _packed_bytes(piece, device) if quantize else piece.to(sk.dtype)
                    at = w.write(data)  # parts are aligned, so they land where the layout says
                    assert at == base + lay["parts"][part]["offset"], (at, base, part)
                    progress.add(piece.numel() * piece.element_size(),
                                 f"{unit.name} {x + 1}/{lay['n']}")  # fmt: skip
                end = base + lay["stride"]
                if end > w.at:
                    w._put(bytes(end - w.at))
            record["experts"] = {"layer": unit.experts, **lay}
    except BaseException:
        w.f.close()
        partial.unlink(missing_ok=True)
        raise
    record["nbytes"], record["sha256"] = w.finish()
    os.replace(partial, folder / unit.file)
    return record


def cache_key(cfg: ModelConfig, src: Source, sk: Skeleton) -> str:
    h = hashlib.sha256(f"{FORMAT}|{cfg.quantize}|{sk.dtype}|{sk.text_only}|".encode())
    h.update(src.fingerprint().encode())
    return h.hexdigest()[:16]


def default_dir(cfg: ModelConfig, path: Path, key: str) -> Path:
    if cfg.prepared_dir:
        return Path(cfg.prepared_dir).expanduser()
    root = Path(os.environ.get("MLXTUNE_CACHE", "~/.cache/mlxtune")).expanduser()
    slug = re.sub(r"[^\w.-]+", "-", str(cfg.path)).strip("-")[-80:]
    return root / "prepared" / f"{slug}-{key}"


def prepare(cfg: ModelConfig, echo: Callable[[str], None] | None = None,
            verify_files: bool = False) -> Path:  # fmt: skip
    """The cache folder for `cfg`, written now unless complete (resuming a killed run)."""
    from mlxtune.hub import resolve_path

    say = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    path = resolve_path(cfg.path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    src = Source(path)
    sk = skeleton(path, config, cfg)
    key = cache_key(cfg, src, sk)
    folder = default_dir(cfg, path, key)
    done = _complete(folder, key)
    if done is not None:
        if verify_files:
            verify(folder)
        return folder
    all_units, skipped = units(sk, src)
    folder.mkdir(parents=True, exist_ok=True)
    need = output_bytes(sk, src, all_units, cfg.quantize == 4)
    state = _read_json(folder / PROGRESS) or {}
    records = state.get("units", {}) if state.get("key") == key else {}
    have = sum(r["nbytes"] for r in records.values())
    free = shutil.disk_usage(folder).free
    if need - have > free:
        raise ModelError(f"model.prepared_dir: {folder}: the prepared copy needs "
                         f"{(need - have) / 1e9:.1f} GB more disk, {free / 1e9:.1f} GB are free")  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    todo = sum(u.source_bytes(src) for u in all_units)
    resumed = f"; resuming: {len(records)} of {len(all_units)} parts done" if records else ""
    unused = f"; {len(skipped)} tensors not used (vision tower)" if skipped else ""
    say(f"preparing {path} -> {folder}: {todo / 1e9:.1f} GB to read, {need / 1e9:.1f} GB to "
        f"write{unused}{resumed}")  # fmt: skip
    progress = _Progress(todo, say)
    for unit in all_units:
        r = records.get(unit.name)
        target = folder / unit.file
        if r and target.is_file() and target.stat().st_size == r["nbytes"]:
            progress.skip(unit.source_bytes(src))
            continue
        records[unit.name] = _write_unit(sk, src, unit, folder, cfg.quantize == 4, device,
                                         progress)  # fmt: skip
        write_json(folder / PROGRESS, {"key": key, "units": records})
        progress.add(0, f"{unit.name} done", force=True)
    manifest = {"format": FORMAT, "key": key, "source": str(path), "model_type":
                config.get("model_type"), "prefix": sk.prefix, "text_only": sk.text_only,
                "quantize": cfg.quantize, "dtype": str(sk.dtype).removeprefix("torch."),
                "skipped": skipped, "tensors": {}, "experts": {}, "files": {}}  # fmt: skip
    for r in records.values():
        manifest["files"][r["file"]] = {"nbytes": r["nbytes"], "sha256": r["sha256"]}
        for k, t in r["tensors"].items():
            manifest["tensors"][k] = {"file": r["file"], **t}
        if "experts" in r:
            manifest["experts"][r["experts"]["layer"]] = {"file": r["file"], **r["experts"]}
    write_json(folder / MANIFEST, manifest)
    (folder / PROGRESS).unlink(missing_ok=True)
    say(f"prepared {folder}: {need / 1e9:.2f} GB")
    if verify_files:
        verify(folder)
    return folder


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _complete(folder: Path, key: str) -> dict | None:
    """The manifest of a finished cache with this key whose files have their sizes."""
    m = _read_json(folder / MANIFEST)
    if not m or m.get("key") != key or m.get("format") != FORMAT:
        return None
    for name, f in m["files"].items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != f["nbytes"]:
            return None
    return m


def verify(folder: Path) -> None:
    """Re-hash every file of a cache against its manifest; one line naming a bad file."""
    m = _read_json(folder / MANIFEST)
    if not m:
        raise ModelError(f"{folder}: no {MANIFEST}: not a finished prepared copy")
    for name, f in m["files"].items():
        h = hashlib.sha256()
        with open(folder / name, "rb") as fh:
            while block := fh.read(64 << 20):
                h.update(block)
        if h.hexdigest() != f["sha256"]:
            raise ModelError(f"{folder / name}: checksum mismatch; delete the folder and "
                             "run mlxtune prepare again")  # fmt: skip
