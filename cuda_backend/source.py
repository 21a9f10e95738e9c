"""A Hugging Face checkpoint on disk, read by byte ranges: never a whole shard, never mmap.

Follows `model.safetensors.index.json` when there is one (else every `*.safetensors` in the
folder), parses each shard's header once, and reads any tensor, or rows [start, stop) of its
first dimension, with positioned reads into a fresh buffer. Nothing stays mapped, so the
resident set holds only what the caller keeps (a memory map would count every page touched so
far). A fused expert tensor [E, ...] is read one expert at a time this way.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from mlxtune.errors import ModelError

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in its file

    @property
    def row_bytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape[1:]:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.row_bytes * (self.shape[0] if self.shape else 1)


class Source:
    """Tensor name -> where its bytes lie, for a checkpoint folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as e:
                raise ModelError(f"{index}: not a safetensors index ({e})") from None
            files = sorted({self.folder / f for f in weight_map.values()})
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"model.path: {self.folder}: no *.safetensors files")
        self.entries: dict[str, Entry] = {}
        for path in files:
            self.entries |= _header(path)

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor, or rows [start, stop) of its first dimension, as a new CPU tensor."""
        e = self.entries[name]
        rows = e.shape[0] if e.shape else 1
        stop = rows if stop is None else min(stop, rows)
        out = torch.empty((stop - start, *e.shape[1:]) if e.shape else (), dtype=e.dtype)
        view = out.view(-1).view(torch.uint8).numpy() if out.numel() else memoryview(b"")
        with open(e.file, "rb", buffering=0) as f:
            _pread_into(f, view, e.offset + start * e.row_bytes)
        return out

    def fingerprint(self) -> str:
        """Names, shapes, dtypes and shard sizes: changes when the checkpoint does."""
        h = hashlib.sha256()
        for name in sorted(self.entries):
            e = self.entries[name]
            h.update(f"{name}|{e.file.name}|{e.dtype}|{e.shape}|{e.offset}\n".encode())
        for path in sorted({e.file for e in self.entries.values()}):
            h.update(f"{path.name}:{path.stat().st_size}\n".encode())
        return h.hexdigest()


def _header(path: Path) -> dict[str, Entry]:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ModelError(f"{path}: {name}: dtype {info['dtype']} is not supported "
                             "(use the bf16/fp16/fp32 checkpoint, not an FP8 or quantized one)")  # fmt: skip
        out[name] = Entry(path, DTYPES[info["dtype"]], tuple(info["shape"]),
                          8 + n + info["data_offsets"][0])  # fmt: skip
    return out


def _pread_into(f, view, offset: int) -> None:
    """Fill `view` from the file at `offset` (large reads in pieces: os.preadv caps each)."""
    done, total = 0, len(view)
    mv = memoryview(view).cast("B") if total else view
    while done < total:
        got = os.preadv(f.fileno(), [mv[done : done + (1 << 30)]], offset + done)
        if got <= 0:
            raise ModelError(f"{f.name}: file ends early at byte {offset + done}")
        done += got
