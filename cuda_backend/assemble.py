"""Build a model from the prepared cache, never holding the checkpoint whole.

The skeleton is built on the meta device (`prepare.skeleton`, the same one the cache was laid
out on); then every tensor goes straight to its place, read by byte ranges:

- linear weights stored in NF4 become `nf4.linear4bit` layers over the cached bytes
  (bitsandbytes' Linear4bit on CUDA): on the GPU already quantized, never in bf16;
- other tensors (norms, routers, the head) go to the device in the compute dtype, large ones
  through a fixed staging buffer; with streamed experts on CUDA the input embedding stays in
  host RAM (`HostEmbedding`, rows gathered there);
- each MoE layer's routed experts are read into one block of exactly their size: host RAM,
  page-locked with `cudaHostRegister` on CUDA (PyTorch's pinned allocator would round every
  block up to a power of two), when `model.offload_experts`; else one block on the device.

Non-persistent buffers (rotary frequencies) are made by transformers' own initializer. Peak
GPU memory while loading is the resident weights plus one staging buffer; peak host RAM is the
expert blocks, the embedding and one tensor in flight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from mlxtune.config import ModelConfig
from mlxtune.errors import ModelError

from . import moe, nf4, prepare

STAGING = 64 << 20  # bytes per host -> device copy of a large plain tensor


class Cache:
    """A finished prepared copy: its manifest, and reads of its byte ranges."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            self.manifest = json.loads((self.folder / prepare.MANIFEST).read_text("utf-8"))
        except (OSError, ValueError):
            raise ModelError(
                f"{folder}: not a finished prepared copy; run mlxtune prepare"
            ) from None

    def read(self, file: str, offset: int, out: torch.Tensor) -> None:
        """Fill the CPU tensor `out` with bytes from `file` at `offset`."""
        view = out.reshape(-1).view(torch.uint8).numpy()
        with open(self.folder / file, "rb", buffering=0) as f:
            done = 0
            while done < len(view):
                got = os.preadv(f.fileno(), [view[done : done + (1 << 30)]], offset + done)
                if got <= 0:
                    raise ModelError(f"{self.folder / file}: shorter than its manifest says")
                done += got

    def tensor(self, key: str, device: torch.device, staging: torch.Tensor | None) -> torch.Tensor:
        """A plain cached tensor on `device` (through `staging` when that is not the CPU)."""
        t = self.manifest["tensors"][key]
        dtype = moe.DTYPES[t["dtype"]]
        out = torch.empty(t["shape"], dtype=dtype, device=device)
        if device.type == "cpu":
            self.read(t["file"], t["offset"], out)
            return out
        flat, step = out.view(-1).view(torch.uint8), staging.numel()
        for a in range(0, flat.numel(), step):
            piece = staging[: min(step, flat.numel() - a)]
            self.read(t["file"], t["offset"] + a, piece)
            flat[a : a + piece.numel()].copy_(piece)
        return out

    def packed(self, key: str, device: torch.device) -> nf4.Packed:
        t = self.manifest["tensors"][key]
        buf = torch.empty(nf4.packed_nbytes(tuple(t["shape"])), dtype=torch.uint8)
        self.read(t["file"], t["offset"], buf)
        return nf4.Packed.view(buf.to(device), t["shape"], moe.DTYPES[t["dtype"]])

    def block(self, layer: str, device: torch.device, pin: bool) -> torch.Tensor:
        """One MoE layer's experts in one block: host RAM (page-locked when `pin`) or device."""
        e = self.manifest["experts"][layer]
        nbytes = e["n"] * e["stride"]
        host = torch.empty(nbytes, dtype=torch.uint8)
        self.read(e["file"], 0, host)
        if device.type == "cpu":
            return host
        if pin:
            return PinnedBlock(host).tensor
        return host.to(device)


class PinnedBlock:
    """Host memory page-locked in place, at its exact size; unregistered when dropped."""

    _alive: dict[int, PinnedBlock] = {}  # data_ptr -> block, for the process's lifetime

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        err = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel(), 0)
        if int(err) != 0:
            raise ModelError(f"could not page-lock {tensor.numel() / 2**30:.1f} GiB of host RAM "
                             f"for the experts (CUDA error {int(err)}); check `ulimit -l` and "
                             "that the RAM mlxtune plan asks for is free")  # fmt: skip
        PinnedBlock._alive[tensor.data_ptr()] = self

    def release(self) -> None:
        """Unlock the pages (the caller drops its last reference to the tensor next)."""
        if PinnedBlock._alive.pop(self.tensor.data_ptr(), None) is not None:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())


class HostArena:
    """Host memory handed out in order and taken back all at once, for what one micro-batch
    parks on the host until its backward: the checkpointed layers' inputs and the routed
    outputs a recompute reuses. Page-locked at its exact size (`PinnedBlock`) on CUDA, where the
    pinned allocator would round each of those tensors up to a power of two (160 MiB -> 256 MiB
    per layer at 16k tokens). It grows to the first micro-batch's need, then is reused."""

    def __init__(self, pin: bool):
        self.pin, self.at = pin, 0
        self.block = torch.empty(0, dtype=torch.uint8)
        self.locked: PinnedBlock | None = None
        self.spill: list[torch.Tensor] = []  # what did not fit, until the next reset

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        n = dtype.itemsize
        for s in shape:
            n *= s
        if self.at + n <= self.block.numel():
            out = self.block[self.at : self.at + n]
            self.at += -(-n // nf4.ALIGN) * nf4.ALIGN
        else:
            out = torch.empty(n, dtype=torch.uint8, pin_memory=self.pin)
            self.spill.append(out)
        return out.view(dtype).view(shape)

    def reset(self) -> None:
        """Everything handed out is free again (the micro-batch's backward is done)."""
        if self.spill:  # one block for the whole need from now on
            need = self.at + sum(-(-t.numel() // nf4.ALIGN) * nf4.ALIGN for t in self.spill)
            if self.locked is not None:  # rare (the need grew): let pending copies finish first
                torch.cuda.synchronize()
                self.locked.release()
            self.block = torch.empty(need, dtype=torch.uint8)
            self.locked = PinnedBlock(self.block) if self.pin else None
            self.spill = []
        self.at = 0

    @property
    def nbytes(self) -> int:
        return self.block.numel()


class HostEmbedding(nn.Module):
    """An input embedding whose table stays in host RAM: rows are gathered there, then sent."""

    def __init__(self, table: torch.Tensor, where: torch.device):
        super().__init__()
        self.table = table  # not a parameter: .to() leaves it here
        self.where = where
        self.num_embeddings, self.embedding_dim = table.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids.cpu(), self.table)
        return rows.pin_memory().to(self.where, non_blocking=True)


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, name = key.rpartition(".")
    return (model.get_submodule(path) if path else model), name


def _put(model: nn.Module, key: str, value: torch.Tensor) -> None:
    owner, name = _owner(model, key)
    if name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, nn.Parameter(value, requires_grad=False))


def assemble(cfg: ModelConfig, path: Path, config: dict, folder: Path,
             where: torch.device) -> tuple[nn.Module, list[moe.ExpertStore], str]:  # fmt: skip
    """The model on `where` from the prepared copy in `folder`, its expert stores, and the
    prefix of the checkpoint's names over the model's."""
    cache = Cache(folder)
    sk = prepare.skeleton(path, config, cfg)
    model, m = sk.model, cache.manifest
    streamed = cfg.offload_experts and where.type == "cuda"
    stores = _stores(cache, cfg, where, streamed)
    moe.sparsify(model, stores)
    staging = None if where.type == "cpu" else torch.empty(STAGING, dtype=torch.uint8,
                                                           pin_memory=True)  # fmt: skip
    embed = model.get_input_embeddings()
    embed_key = next(f"{p}.weight" for p, mod in model.named_modules() if mod is embed)
    for key, t in m["tensors"].items():
        if t["kind"] == "nf4":
            owner, name = _owner(model, key.removesuffix(".weight"))
            setattr(owner, name, nf4.linear4bit(cache.packed(key, where)))  # a bias comes below
    for key, t in m["tensors"].items():
        if t["kind"] == "nf4":
            continue
        if key == embed_key and stores and streamed:
            table = cache.tensor(key, torch.device("cpu"), None)
            model.set_input_embeddings(HostEmbedding(table, where))
            continue
        _put(model, key, cache.tensor(key, where, staging))
    _finish(model, where)
    return model, list(stores.values()), sk.prefix


def _stores(cache: Cache, cfg: ModelConfig, where: torch.device,
            streamed: bool) -> dict[str, moe.ExpertStore]:  # fmt: skip
    experts = cache.manifest["experts"]
    if not experts:
        return {}
    streamer, scratch = None, {}
    if streamed:
        chunk = min(cfg.expert_chunk, max(e["n"] for e in experts.values()))
        streamer = moe.Streamer(where, chunk * max(e["stride"] for e in experts.values()))
    return {layer: moe.ExpertStore(cache.block(layer, where, pin=streamed), lay,
                                   cfg.expert_chunk, streamer, scratch)
            for layer, lay in experts.items()}  # fmt: skip


def _finish(model: nn.Module, where: torch.device) -> None:
    """Non-persistent buffers from transformers' initializer, tied weights, then a check that
    nothing is left on the meta device."""
    for module in model.modules():
        metas = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if metas:
            for n in metas:
                module._buffers[n] = torch.empty_like(module._buffers[n], device=where)
            model._init_weights(module)
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings():
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if head.weight.is_meta:
            head.weight = embed.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        raise ModelError(f"prepared copy: nothing was loaded for {left[0]}{more}")
    model.eval()
