"""Data-parallel ranks on `torch.distributed`, as torchrun starts them: the twin of
mlxtune/ranks.py. One process alone (no torchrun, or WORLD_SIZE 1) is a world of one: every
call here is then free and changes nothing.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) `start()` joins the process
group: NCCL when the model runs on CUDA, each rank on `cuda:LOCAL_RANK`; gloo on the CPU.
Rank 0's state is the truth: it is broadcast when a run starts or resumes, and every rank then
applies the same summed gradients, so parameters and optimizer state stay identical.

Timeouts. A collective of the training loop (`TIMEOUT`, 5 minutes) waits at most for the
slowest rank's step or for rank 0 writing a LoRA checkpoint, seconds in a healthy run; a rank
that hangs stops the others after it. The waits of the start (the fingerprints after every
rank has loaded the model, rank 0's one-time prepared copy, a resumed checkpoint) go over a
separate gloo group with a long timeout (`START_TIMEOUT`). A rank that dies is noticed at once
either way: gloo's connection to it closes, and torchrun stops the other ranks with SIGTERM,
which `start()` turns into the same one-line error.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from mlxtune.distributed import OnWorld, World, lost_rank, world_from_env
from mlxtune.errors import MlxtuneError

TIMEOUT = timedelta(minutes=5)
START_TIMEOUT = timedelta(hours=24)
# What a collective says when another rank went away (gloo, NCCL, the TCP store).
LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
        "timeout", "connection refused", "socket", "nccl")  # fmt: skip


def torchrun_world() -> World:
    """The rank and world size torchrun put in the environment; one rank without it."""
    return world_from_env()


class Ranks(OnWorld):
    def __init__(self, world: World | None = None, device: torch.device | None = None):
        self.world = world or World()
        self.device = device or torch.device("cpu")  # where the collectives' tensors live
        self.start_group = None  # gloo, long timeout: the waits of the start
        self.owned = False  # this process group was made here (and is destroyed here)
        self.stopping = False
        self._handler = None  # the SIGTERM handler this replaced
        self.run_dir = "RUN_DIR"  # named in the message when a rank is lost

    @classmethod
    def start(cls, on_cuda: bool) -> Ranks:
        """Join torchrun's process group (a world of one without torchrun)."""
        world = torchrun_world()
        if world.size == 1:
            return cls(world)
        device = torch.device("cpu")
        if on_cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)  # "cuda" (model.device()) is now this rank's GPU
        ranks = cls(world, device)
        if not dist.is_initialized():
            extra = {"device_id": device} if on_cuda else {}
            dist.init_process_group("nccl" if on_cuda else "gloo", timeout=TIMEOUT, **extra)
            ranks.owned = True
        ranks.start_group = dist.new_group(backend="gloo", timeout=START_TIMEOUT)
        if threading.current_thread() is threading.main_thread():
            ranks._handler = signal.signal(signal.SIGTERM, ranks._terminated)
        return ranks

    def _terminated(self, signum, frame) -> None:
        """torchrun sends SIGTERM to every rank when one stops: stop with one line, once."""
        if self.stopping:
            return
        self.stopping = True
        raise lost_rank("torchrun stopped this one with SIGTERM", self.run_dir)

    def close(self, failed: bool) -> None:
        """Leave the process group. After a failure SIGTERM is ignored from here on (SIG_IGN,
        which outlives the interpreter's shutdown): the process is about to print its error
        and exit, and torchrun's SIGTERM would cut that short (it kills it 30 s later if not)."""
        if self.size == 1:
            return
        self.stopping = True
        if failed and self._handler is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.owned and dist.is_initialized():
            with contextlib.suppress(Exception):
                if failed and dist.get_backend() == "nccl":  # a collective may still hang there
                    dist.distributed_c10d._abort_process_group()
                else:
                    dist.destroy_process_group()
            self.owned = False
        if not failed and self._handler is not None:
            signal.signal(signal.SIGTERM, self._handler)
        self._handler = None

    def lost(self, e: BaseException) -> MlxtuneError | None:
        """The one-line error for a collective that failed because another rank stopped."""
        if self.size == 1 or isinstance(e, MlxtuneError):
            return None
        if isinstance(e, dist.DistError) or any(w in str(e).lower() for w in LOST):
            return lost_rank(_reason(e), self.run_dir)
        return None

    # ------------------------------------------------------------------ collectives

    def sum(self, x: float) -> float:
        if self.size == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def max(self, x: float) -> float:
        if self.size == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def gradients(self, params: list[torch.Tensor], scale: float) -> None:
        """Each parameter's gradient times `scale`, summed over ranks, in place: one all-reduce
        of one flat float32 buffer (DDP's reducer coalesces likewise; only these parameters,
        the trained ones, are reduced). A rank with no gradient for a parameter adds zeros; a
        parameter that no rank has a gradient for keeps none (AdamW then skips it, as it does
        in one process)."""
        sizes = [p.numel() for p in params]
        n = sum(sizes)
        flat = torch.zeros(n + len(params), dtype=torch.float32, device=self.device)
        at = 0
        for p, size in zip(params, sizes, strict=True):
            if p.grad is not None:
                flat[at : at + size].copy_(p.grad.reshape(-1))
            at += size
        flat[:n].mul_(scale)
        has = [float(p.grad is not None) for p in params]
        flat[n:].copy_(torch.tensor(has, dtype=torch.float32))
        dist.all_reduce(flat)
        seen = flat[n:].tolist()
        at = 0
        for p, size, s in zip(params, sizes, seen, strict=True):
            g = flat[at : at + size].view(p.shape)
            p.grad = g.to(p.device, p.dtype) if s > 0 else None
            at += size

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values of these tensors on every rank, in place (one broadcast per dtype)."""
        if self.size == 1 or not tensors:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        with torch.no_grad():
            for group in by_dtype.values():
                flat = torch.cat([t.detach().reshape(-1).to(self.device) for t in group])
                dist.broadcast(flat, src=0)
                for t, piece in zip(group, flat.split([t.numel() for t in group]), strict=True):
                    t.copy_(piece.view(t.shape))

    def broadcast_object(self, obj):
        """Rank 0's picklable object on every rank (other ranks pass anything)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.start_group)
        return box[0]

    def gather_object(self, obj) -> list:
        """Every rank's picklable object, in rank order."""
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=self.start_group)
        return out

    def barrier(self) -> None:
        """Wait for every rank (over the start's long timeout)."""
        if self.size > 1:
            dist.barrier(group=self.start_group)


def _reason(e: BaseException) -> str:
    """A collective's error on one line, without gloo's source location and boilerplate."""
    text = " ".join(str(e).split())
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", text)
    return text.split(" This is typically caused by")[0].rstrip(". ") or type(e).__name__
