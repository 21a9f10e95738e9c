"""Llama 4's MoE layer, computed sparsely, with the routed experts optionally streamed.

transformers' `Llama4TextMoe` feeds every token through all experts (non-chosen ones with a
zero score): for Maverick that is 24.8x the needed matmuls and ~21 GiB of activations per
layer at 2k tokens. `SparseMoe` computes the same function on the chosen expert only:

    logits = router(x); e = argmax(logits); s = sigmoid(max logit)   (top-1, as transformers)
    y = shared_expert(x) + expert_e(x * s)       (the score scales the expert's *input*)

Tokens are grouped by expert and each expert runs once on its group. The router is frozen; the
score still passes gradient to x, as in transformers. With per-layer gradient checkpointing the
layer's forward runs twice; `replay` keeps the routed output of the first run (in host memory,
the size of a checkpoint) for the second, so the experts still stream only twice per step.

With an `ExpertStore`, the routed experts live outside the model in one block of bytes per
layer (pinned host RAM when streamed, or on the GPU), optionally in NF4, and
`StreamedExperts` visits them chunk by chunk: on CUDA a `Streamer` copies the next chunk on a
side stream while the current one computes (double buffering, ordered by events), and each
expert is dequantized into a reused scratch buffer only when its turn comes (bitsandbytes'
kernel on CUDA). Grouping tokens by expert reads the group sizes on the host: one sync per MoE
layer pass, none per expert. Experts are frozen, so backward
needs only the input gradient: it streams the experts again, recomputes each group's
activations and back-propagates them right away; nothing but the layer input and the routing
is kept between forward and backward.
"""

from __future__ import annotations

import torch
from torch import nn

from . import nf4

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PARTS = ("gate_up_proj", "down_proj")


def _up(n: int) -> int:
    return -(-n // nf4.ALIGN) * nf4.ALIGN


def layout(n: int, gate_up: tuple, down: tuple, dtype: torch.dtype, quantize: bool) -> dict:
    """Where one expert's gate_up [D, 2I] and down [I, D] lie inside its stride of bytes (NF4
    or the compute dtype), the stride, and the count: the same in the prepared cache and in
    memory."""
    parts, at = {}, 0
    for part, shape in zip(PARTS, (gate_up, down), strict=True):
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = nf4.packed_nbytes(tuple(shape)) if quantize else numel * dtype.itemsize
        parts[part] = {"shape": [int(s) for s in shape], "offset": at,
                       "kind": "nf4" if quantize else "raw"}  # fmt: skip
        at = _up(at + nbytes)
    return {"n": int(n), "stride": at, "dtype": str(dtype).removeprefix("torch."), "parts": parts}


class ExpertStore:
    """One MoE layer's routed experts in one block of bytes (pinned host RAM when streamed, or
    on the device), expert after expert as `layout` says: a chunk of experts is one contiguous
    range, copied to the device in one transfer."""

    def __init__(self, block: torch.Tensor, lay: dict, chunk: int,
                 streamer: Streamer | None = None, scratch: dict | None = None):  # fmt: skip
        self.block, self.layout = block, lay
        self.n, self.stride = lay["n"], lay["stride"]
        self.dtype = DTYPES[lay["dtype"]]
        self.quantized = lay["parts"]["gate_up_proj"]["kind"] == "nf4"
        self.chunk = max(1, min(chunk, self.n))
        self.streamer = streamer
        self.scratch = {} if scratch is None else scratch  # (shape, device) -> dense buffer
        self.passes = 0  # full sweeps over the experts (each streams every expert once)
        self.replay = False  # keep the forward's output for a checkpointed layer's recompute
        self.arena = None  # host memory for that output (assemble.HostArena); else a new tensor
        self._kept: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, gate_up: torch.Tensor, down: torch.Tensor, chunk: int,
                     quantize: bool) -> ExpertStore:  # fmt: skip
        """A store in (CPU) memory from fused [E, D, 2I] / [E, I, D] tensors (tests, tools)."""
        lay = layout(gate_up.shape[0], gate_up.shape[1:], down.shape[1:], gate_up.dtype, quantize)
        block = torch.zeros(lay["n"] * lay["stride"], dtype=torch.uint8)
        for e in range(lay["n"]):
            for part, t in zip(PARTS, (gate_up[e], down[e]), strict=True):
                at = e * lay["stride"] + lay["parts"][part]["offset"]
                if quantize:
                    nf4.quantize(t.detach().cpu()).write_into(block[at:])
                else:
                    raw = t.detach().cpu().contiguous().view(-1).view(torch.uint8)
                    block[at : at + raw.numel()].copy_(raw)
        return cls(block, lay, chunk)

    @property
    def nbytes(self) -> int:
        return self.block.numel()

    def weights(self, buf: torch.Tensor, j: int):
        """Expert j of `buf` (a block or a chunk buffer): callables giving gate_up and down
        dense, each dequantized into a reused scratch buffer only when its turn comes."""
        out = []
        for part in PARTS:
            p = self.layout["parts"][part]
            at, shape = j * self.stride + p["offset"], tuple(p["shape"])
            if p["kind"] == "nf4":
                packed = nf4.Packed.view(buf[at:], shape, self.dtype)
                out.append(lambda packed=packed: nf4.dequantize(
                    packed, self.dtype, self._scratch(packed.shape, packed.device)))  # fmt: skip
            else:
                numel = 1
                for s in shape:
                    numel *= s
                dense = buf[at : at + numel * self.dtype.itemsize].view(self.dtype).view(shape)
                out.append(lambda dense=dense: dense)
        return tuple(out)

    def _scratch(self, shape: tuple, device: torch.device) -> torch.Tensor:
        key = (shape, str(device))
        if key not in self.scratch:
            self.scratch[key] = torch.empty(shape, dtype=self.dtype, device=device)
        return self.scratch[key]

    def chunks(self, device: torch.device):
        """(first expert, [(gate_up, down) per expert of the chunk]) on `device`, in order. A
        block already there (CPU, or experts resident on the GPU) is read in place; else the
        streamer copies chunk i + 1 while chunk i computes."""
        starts = list(range(0, self.n, self.chunk))
        self.passes += 1
        if self.block.device == device or self.streamer is None:
            for s in starts:
                yield (
                    s,
                    [self.weights(self.block, e) for e in range(s, min(s + self.chunk, self.n))],
                )
            return
        for s, buf in self.streamer.stream(self, starts, device):
            yield s, [self.weights(buf, j) for j in range(min(self.chunk, self.n - s))]


class Streamer:
    """Two device buffers of one chunk each, shared by every MoE layer, filled on a side stream.

    Chunk i + 1 is copied while chunk i computes. Events order it both ways: the compute
    stream waits for a buffer's copy before reading it (`ready`), and the side stream waits
    for the compute that read a buffer before refilling it (`free`), so no kernel ever reads a
    half-overwritten buffer. The buffers live as long as the streamer, so no allocation (and
    no `record_stream`) is involved; the source blocks are pinned, so the copies are truly
    asynchronous and the CPU runs ahead.
    """

    def __init__(self, device: torch.device, nbytes: int):
        self.device = device
        self.side = torch.cuda.Stream(device)
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self.ready = [torch.cuda.Event() for _ in range(2)]
        self.free = [torch.cuda.Event() for _ in range(2)]
        self.copied = 0  # bytes sent to the device

    def stream(self, store: ExpertStore, starts: list[int], device: torch.device):
        compute = torch.cuda.current_stream(device)

        def issue(i: int) -> None:
            b, a = i % 2, starts[i] * store.stride
            z = min(starts[i] + store.chunk, store.n) * store.stride
            self.side.wait_event(self.free[b])
            with torch.cuda.stream(self.side):
                self.buffers[b][: z - a].copy_(store.block[a:z], non_blocking=True)
                self.ready[b].record(self.side)
            self.copied += z - a

        issue(0)
        for i, s in enumerate(starts):
            if i + 1 < len(starts):
                issue(i + 1)
            compute.wait_event(self.ready[i % 2])
            try:
                yield s, self.buffers[i % 2]
            finally:  # the consumer has queued every kernel that reads this buffer
                self.free[i % 2].record(compute)


def _groups(idx: torch.Tensor, n: int):
    order = torch.argsort(idx, stable=True)
    counts = torch.bincount(idx, minlength=n).tolist()
    start = 0
    for e, c in enumerate(counts):
        yield e, order[start : start + c]
        start += c


class StreamedExperts(torch.autograd.Function):
    """routed_in [T, D] (already scaled), expert index [T] -> routed_out [T, D]."""

    @staticmethod
    def forward(ctx, routed_in, idx, store: ExpertStore, mode: str | None = None):
        """mode "keep": remember the output for the recompute; "replay": that recompute."""
        ctx.save_for_backward(routed_in, idx)
        ctx.store = store
        if mode == "replay":
            out = store._kept.to(routed_in.device, non_blocking=True)  # no second stream
            store._kept = None
            return out
        out = torch.zeros_like(routed_in)
        groups = dict(_groups(idx, store.n))
        for start, weights in store.chunks(routed_in.device):
            for j, (gate_up, down) in enumerate(weights):
                rows = groups[start + j]
                if len(rows):
                    out[rows] = _swiglu(routed_in[rows], gate_up().to(routed_in.dtype),
                                        down().to(routed_in.dtype))  # fmt: skip
        if mode == "keep":  # host memory, the size of one checkpoint
            if out.is_cuda and store.arena is not None:
                store._kept = store.arena.take(out.shape, out.dtype)
                store._kept.copy_(out, non_blocking=True)
            else:
                store._kept = (
                    out.detach().to("cpu", non_blocking=True) if out.is_cuda else out.detach()
                )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        routed_in, idx = ctx.saved_tensors
        store = ctx.store
        grad_in = torch.zeros_like(routed_in)
        groups = dict(_groups(idx, store.n))
        for start, weights in store.chunks(routed_in.device):
            for j, (gate_up, down) in enumerate(weights):
                rows = groups[start + j]
                if len(rows):
                    x = routed_in[rows].detach().requires_grad_(True)
                    with torch.enable_grad():
                        y = _swiglu(x, gate_up().to(x.dtype), down().to(x.dtype))
                    (g,) = torch.autograd.grad(y, x, grad_out[rows])
                    grad_in[rows] = g
        return grad_in, None, None, None


def _swiglu(x, gate_up, down):
    gate, up = (x @ gate_up).chunk(2, dim=-1)
    return (up * nn.functional.silu(gate)) @ down


class SparseMoe(nn.Module):
    """Drop-in for transformers' Llama4TextMoe, keeping its submodule names (router, experts,
    shared_expert) so checkpoints and adapters keep theirs."""

    def __init__(self, moe: nn.Module, store: ExpertStore | None = None):
        super().__init__()
        self.router = moe.router
        self.shared_expert = moe.shared_expert
        self.hidden_dim, self.num_experts = moe.hidden_dim, moe.num_experts
        self.store = store
        if store is None:
            self.experts = moe.experts

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, self.hidden_dim)
        logits = nn.functional.linear(x, self.router.weight)
        top, idx = logits.max(dim=1)
        scores = torch.sigmoid(top.float()).to(x.dtype)
        routed_in = x * scores[:, None]
        if self.store is not None:
            routed = StreamedExperts.apply(routed_in, idx, self.store, self._mode())
        else:
            routed = torch.zeros_like(routed_in)
            for e, rows in _groups(idx, self.num_experts):
                if len(rows):
                    routed = routed.index_put((rows,), _swiglu(
                        routed_in[rows], self.experts.gate_up_proj[e], self.experts.down_proj[e]))  # fmt: skip
        return self.shared_expert(x) + routed, logits

    def _mode(self) -> str | None:
        store = self.store
        if not (store.replay and torch.is_grad_enabled()):
            return None
        recompute = torch._C._current_graph_task_id() != -1  # called from inside backward
        return "replay" if recompute and store._kept is not None else "keep"


def sparsify(model: nn.Module, stores: dict[str, ExpertStore] | None = None) -> None:
    """Replace every Llama4TextMoe of `model` by a SparseMoe; one whose path is in `stores`
    takes its routed experts from that store instead of from the model."""
    for path, m in list(model.named_modules()):
        if m.__class__.__name__ != "Llama4TextMoe":
            continue
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, SparseMoe(m, (stores or {}).get(path)))
