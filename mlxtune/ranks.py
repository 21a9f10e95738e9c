"""Data-parallel ranks on MLX, over `mx.distributed` (ring over TCP or Thunderbolt, jaccl RDMA,
MPI), as `mlx.launch` starts them. One process alone is a world of one: every call here is then
free and changes nothing.

Rank 0's state is the truth: it is broadcast (a sum in which every other rank adds zeros, exact
in any dtype) when a run starts or resumes, and every rank then applies the same summed
gradients, so parameters and optimizer state stay identical without being sent again.
"""

from __future__ import annotations

import json
import signal

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .distributed import OnWorld, World, lost_rank
from .errors import MlxtuneError

LOST = ("[ring]", "[jaccl]", "[mpi]", "peer")  # what a collective says when a rank went away


class Ranks(OnWorld):
    def __init__(self) -> None:
        self.group = mx.distributed.init()
        self.world = World(self.group.rank(), self.group.size())
        self.run_dir = "RUN_DIR"  # named in the message when a rank is lost
        if self.size > 1:  # mlx.launch stops the other ranks with SIGTERM when one fails
            signal.signal(signal.SIGTERM, self._stopped)

    def _stopped(self, signum, frame) -> None:
        self.release()
        raise self._lost("the launcher stopped this one")

    def _lost(self, why) -> MlxtuneError:
        return lost_rank(why, self.run_dir)

    def sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group) if self.size > 1 else x

    def max(self, x: mx.array) -> mx.array:
        return mx.distributed.all_max(x, group=self.group) if self.size > 1 else x

    def gradients(self, grads):
        """The sum over ranks of each rank's gradients (MLX's own bucketed all-reduce,
        `nn.average_gradients`, times the number of ranks). Inside the compiled update."""
        if self.size == 1:
            return grads
        size = float(self.size)
        return tree_map(lambda g: g * size, nn.average_gradients(grads, self.group))

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's list of small non-negative ints (each below 2**31)."""
        mine = mx.array(np.asarray(values, np.int32))
        if self.size == 1:
            return [values]
        out = mx.distributed.all_gather(mine[None], group=self.group)
        return np.array(out).tolist()

    def broadcast(self, tree):
        """Rank 0's arrays on every rank (each rank passes a tree of the same shapes)."""
        if self.size == 1:
            return tree
        flat = sorted(tree_flatten(tree), key=lambda kv: kv[0])  # the same order on every rank
        out = []
        for k, v in flat:
            x = v if self.rank == 0 else mx.zeros_like(v)
            if mx.issubdtype(v.dtype, mx.integer) and v.dtype not in (mx.int32, mx.uint32):
                x = mx.distributed.all_sum(x.astype(mx.int32), group=self.group).astype(v.dtype)
            else:
                x = mx.distributed.all_sum(x, group=self.group)
            out.append((k, x))
        mx.eval([v for _, v in out])
        return tree_unflatten(out)

    def broadcast_json(self, obj) -> object:
        """Rank 0's JSON-able object on every rank (other ranks pass anything)."""
        if self.size == 1:
            return obj
        data = json.dumps(obj).encode() if self.rank == 0 else b""
        n = int(self.sum(mx.array(len(data), mx.int32)).item())
        raw = np.zeros(n, np.int32)
        if self.rank == 0:
            raw[:] = np.frombuffer(data, np.uint8)
        got = np.array(self.sum(mx.array(raw))).astype(np.uint8).tobytes()
        return json.loads(got.decode())

    def lost(self, e: RuntimeError) -> MlxtuneError | None:
        """The one-line error for a collective that failed because another rank stopped."""
        if self.size > 1 and any(w in str(e) for w in LOST):
            return self._lost(e)
        return None

    def release(self) -> None:
        """Back to the default SIGTERM: the run is over (or failed) and may now just exit."""
        if self.size > 1:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def probe(megabytes: int = 64) -> str | None:
    """All-reduce `megabytes` of float32 a few times over the launched ranks; rank 0's line."""
    import time

    ranks = Ranks()
    x = mx.ones(megabytes * 2**18)
    mx.eval(ranks.sum(x))  # connect and warm up
    start = time.perf_counter()
    for _ in range(3):
        y = ranks.sum(x)
        mx.eval(y)
    seconds = (time.perf_counter() - start) / 3
    ok = bool((y == ranks.size).all().item())
    if ranks.rank:
        return None
    if not ok:
        raise MlxtuneError(f"the all-reduce over {ranks.size} ranks gave wrong sums")
    return (f"all-reduce: {ranks.size} ranks, {megabytes} MB in {seconds * 1e3:.0f} ms "
            f"({megabytes / 1024 / seconds:.2f} GB/s per rank)")  # fmt: skip
