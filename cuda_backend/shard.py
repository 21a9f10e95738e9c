"""Sharded data-parallel training on the twin: FSDP2 (`torch.distributed.fsdp.fully_shard`).

With several ranks, full fine-tuning (`lora.method: full`) and any run with `train.shard: true`
keep 1/N of every parameter, gradient and AdamW moment on each rank instead of a full copy.
Each layer of the text decoder is one FSDP unit; everything else (embeddings, head, norms, the
vision and audio towers) is the root's unit. A unit's weights are gathered just before its forward and again for its
backward, and its gradients are reduce-scattered after it, so a rank holds at most a couple
of whole layers at a time.

What the trainer keeps from the data-parallel design (mlxtune/distributed.py):
- The reduce-scatter adds the ranks' gradients (a plain SUM, with FSDP's divide factor 1: gloo
  has no pre-multiplied sum); the trainer then divides by the global count of target tokens,
  so the update equals one process's with the global batch.
- Parameters that a rank did not use (a tower its rows did not need) add zeros, so every rank
  reduces the same tensors.
- A rank with no row in a micro-batch still runs a forward and backward, on one row with its
  loss times zero: FSDP's gathers are collectives every rank must join.
- The model is loaded whole on every rank, made identical (rank 0's values), and only then
  sharded; a resumed run is restored the same way before sharding (rank 0 reads the
  checkpoint, every rank takes its values), so resuming briefly holds the full AdamW state.
- Checkpoints and the final adapter are gathered to full tensors (every rank joins) and rank 0
  writes them in the usual layout: a sharded run's folder is the same as an unsharded one's.

Not sharded here: NF4 weights (`model.quantize: 4`) and the prepared Llama 4 copy (streamed
experts); the config refuses those with `train.shard`.
"""

from __future__ import annotations

import torch
from torch import nn


def _units(model: nn.Module) -> list[nn.Module]:
    """The text decoder's layers, which every forward runs: each becomes an FSDP unit. The
    towers stay in the root's unit. A unit that only some ranks run (a vision layer, on the
    rank whose rows have pictures) would meet another unit's gather on the other rank."""
    embed = model.get_input_embeddings()
    for m in model.modules():
        layers = getattr(m, "layers", None)
        if getattr(m, "embed_tokens", None) is embed and isinstance(layers, nn.ModuleList):
            return list(layers)
    return []  # one unit: the whole model (correct, and it saves less)


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Shard `model` over the process group (in place) and return its AdamW: a new optimizer
    over the sharded parameters, holding `optimizer`'s state (a resumed run's), each moment
    cut to this rank's shard. Every rank must hold the same values when this is called."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    old = {name: p for name, p in model.named_parameters() if p.requires_grad}
    state = {name: optimizer.state.get(p, {}) for name, p in old.items()}
    for unit in _units(model):
        fully_shard(unit)
    fully_shard(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # a sum: the trainer divides by the token count
            m.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    model.set_reduce_scatter_unused_params(True)  # same tensors on every rank
    group = optimizer.param_groups[0]
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sharded = torch.optim.AdamW(list(params.values()), lr=group["lr"],
                                weight_decay=group["weight_decay"])  # fmt: skip
    for name, p in params.items():
        if state[name]:
            sharded.state[p] = {slot: _like(p, v) for slot, v in state[name].items()}
    return sharded


def _like(param, value):
    """A moment of `param` as a shard like the parameter's (a step count stays as it is)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor) or not torch.is_tensor(value) or value.shape != param.shape:
        return value
    # every rank holds the same full value: each cuts its own shard, nothing is sent
    return distribute_tensor(value.to(param.to_local().device), param.device_mesh,
                             param.placements, src_data_rank=None)  # fmt: skip


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every rank calls it, in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def is_sharded(model: nn.Module) -> bool:
    """Whether `wrap` sharded this model."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
