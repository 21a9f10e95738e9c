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

With an `ExpertStore`, the routed experts live outside the model, in (pinned) host memory,
optionally in NF4, and `StreamedExperts` visits them chunk by chunk: on CUDA the next chunk is
copied on a side stream while the current one computes (double buffering), and each expert is
dequantized into a scratch buffer only when its turn comes. Experts are frozen, so backward
needs only the input gradient: it streams the experts again, recomputes each group's
activations and back-propagates them right away; nothing but the layer input and the routing
is kept between forward and backward.
"""

from __future__ import annotations

import torch
from torch import nn

from . import nf4


class ExpertStore:
    """One MoE layer's routed experts, off the model: [E, D, 2I] gate/up and [E, I, D] down."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, chunk: int, quantize: bool):
        self.n, self.chunk, self.quantized = gate_up.shape[0], max(1, chunk), quantize
        pack = nf4.quantize if quantize else (lambda t: t.detach().cpu().contiguous())
        self.gate_up = [pack(gate_up[e].cpu()) for e in range(self.n)]
        self.down = [pack(down[e].cpu()) for e in range(self.n)]
        self.dtype = gate_up.dtype
        self.passes = 0  # full sweeps over the experts (each streams every expert once)
        self.replay = False  # keep the forward's output for a checkpointed layer's recompute
        self._kept: torch.Tensor | None = None
        if torch.cuda.is_available():  # pinned pages copy to the GPU without staging
            pin = (lambda p: p.pin()) if quantize else (lambda t: t.pin_memory())
            self.gate_up, self.down = [pin(t) for t in self.gate_up], [pin(t) for t in self.down]

    @property
    def nbytes(self) -> int:
        def size(t):
            return t.nbytes if isinstance(t, nf4.Packed) else t.numel() * t.element_size()

        return sum(size(t) for t in self.gate_up + self.down)

    def chunks(self, device: torch.device):
        """(first expert, [(gate_up, down) per expert of the chunk]) on `device`, in order; on
        CUDA the copy of chunk i + 1 overlaps the compute of chunk i."""
        starts = list(range(0, self.n, self.chunk))
        self.passes += 1
        if device.type != "cuda":
            for s in starts:
                yield s, [(self._weight(g), self._weight(d)) for g, d in
                          zip(self.gate_up[s : s + self.chunk], self.down[s : s + self.chunk], strict=True)]  # fmt: skip
            return
        side = torch.cuda.Stream(device)
        pending = self._copy(starts[0], device, side)
        for i, s in enumerate(starts):
            torch.cuda.current_stream(device).wait_stream(side)
            current = pending
            if i + 1 < len(starts):
                pending = self._copy(starts[i + 1], device, side)
            yield s, [(self._weight(g), self._weight(d)) for g, d in current]

    def _copy(self, start: int, device, stream):
        with torch.cuda.stream(stream):
            end = start + self.chunk
            return [(g.to(device, non_blocking=True), d.to(device, non_blocking=True))
                    for g, d in zip(self.gate_up[start:end], self.down[start:end], strict=True)]  # fmt: skip

    def _weight(self, t):
        """Lazily dequantized: a callable giving the expert's matrix when its turn comes."""
        if isinstance(t, nf4.Packed):
            return lambda: nf4.dequantize(t, self.dtype)
        return lambda: t


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
            out, store._kept = store._kept.to(routed_in.device), None  # no second stream
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
            store._kept = out.detach().to("cpu", non_blocking=True) if out.is_cuda else out.detach()
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


def sparsify(model: nn.Module, stream: bool = False, chunk: int = 16,
             quantize: bool = False) -> list[ExpertStore]:  # fmt: skip
    """Replace every Llama4TextMoe of `model` by a SparseMoe; with `stream`, move the routed
    experts into ExpertStores (in NF4 with `quantize`). Returns the stores."""
    stores = []
    for path, m in list(model.named_modules()):
        if m.__class__.__name__ != "Llama4TextMoe":
            continue
        store = None
        if stream:
            store = ExpertStore(m.experts.gate_up_proj, m.experts.down_proj, chunk, quantize)
            stores.append(store)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, SparseMoe(m, store))
    return stores
