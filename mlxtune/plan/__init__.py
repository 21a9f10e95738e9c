"""`mlxtune plan CONFIG`: bytes per component and where they live, before anything loads.

Framework-free. Parameter counts come from `counts` (safetensors headers or config.json). The
cuda backend's terms, and its prepare / load phases, disk and streaming time, are in `cuda`.

mlx backend (unified memory): weights at their dtype, or 4 / 8 bits plus a scale and a bias
per 64 weights with model.quantize (4.5 / 8.5 bits in bf16); the LoRA state; every layer's
activations (or one per layer with train.grad_checkpoint); the logits chunk; MLX's own
overhead. The per-logit and base constants are fitted by `benchmarks/fit_plan.py` on one set
of small runs; tests/test_plan.py checks the plan against other runs. Measured on the CPU, a
quantized head costs more than this (the loss dequantizes it); the planned figure is the
unquantized-head case.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..config import Config
from ..data.batching import Batching
from ..errors import MlxtuneError
from .counts import (
    KNOWN,
    Counts,
    counts_from_config,
    counts_from_headers,
    full_params,
    layer_bytes,
    layer_elements,
    logits_bytes,
    lora_params,
    model_config,
)
from .cuda import DTYPE_BYTES, GIB, NF4_BITS, PCIE_GBPS, cuda_rows, uses_cache

__all__ = ["GIB", "KNOWN", "NF4_BITS", "Counts", "Plan", "Row", "counts_from_config",
           "counts_from_headers", "model_config", "plan", "uses_cache"]  # fmt: skip

MLX_GROUP = 64  # mlx quantization: a scale and a bias (in the model's dtype) per 64 weights
# Fitted by benchmarks/fit_plan.py on its own runs (not the ones tests/test_plan.py checks).
# MLX_BASE is the fit's intercept: MLX's own buffers less what the per-row estimates overstate.
MLX_BASE = -0.016 * GIB
MLX_LOGIT_BYTES = 41  # logits, softmax, their gradient and the head's output, fp32
MLX_SOFTCAP_BYTES = 15  # a soft-capped head's extra: scaled, tanh and its derivative
LORA_ROW, FULL_ROW = "LoRA + grads + AdamW", "grads + AdamW (full)"
# What FSDP2 shards over the ranks (cuda_backend/shard.py): every parameter, its gradient and
# AdamW's moments; activations, the logits and the buffers stay whole on each rank.
SHARDED_ROWS = (LORA_ROW, FULL_ROW, "frozen linear weights", "head, routers, norms",
                "input embedding", "vision/audio towers")  # fmt: skip
BASE_ROWS = ("CUDA context, workspace", "process")
MAC_LINK_GBPS = 1.25  # between Macs: 10 Gb Ethernet (Thunderbolt is faster: plan --link-gbps)


@dataclass
class Row:
    name: str
    gpu: float = 0.0  # bytes on the device (unified memory on a Mac)
    host: float = 0.0  # bytes in host RAM (cuda backend)
    note: str = ""


@dataclass
class Plan:
    model: str
    backend: str
    counts: Counts
    rows: list[Row] = field(default_factory=list)  # while training
    tokens: int = 0  # per micro-batch
    accum: int = 1  # micro-batches per optimizer step
    streamed_per_step: float = 0.0  # bytes over PCIe per optimizer step
    device_gb: float | None = None
    host_gb: float | None = None
    applied: set[str] = field(default_factory=set)  # components whose remedy is already on
    dtype: str = "bfloat16"
    on_cpu: bool = False  # the cuda backend run on a CPU: every row is host RAM
    pcie_gbps: float = PCIE_GBPS
    phases: dict[str, tuple[float, float]] = field(default_factory=dict)  # (gpu, host) bytes
    disk: float = 0.0  # bytes of the prepared copy (cuda)
    notes: list[str] = field(default_factory=list)
    trainable: int = 0  # parameters trained (their gradients are what ranks all-reduce)
    ranks: int = 1
    allreduce_seconds: float = 0.0

    def add(self, name: str, gpu: float = 0.0, host: float = 0.0, note: str = "") -> None:
        if self.on_cpu:
            gpu, host = 0.0, gpu + host
        self.rows.append(Row(name, gpu, host, note))

    @property
    def gpu(self) -> float:
        return sum(r.gpu for r in self.rows)

    @property
    def host(self) -> float:
        return sum(r.host for r in self.rows)

    def peak(self) -> tuple[float, float, str, str]:
        """(GPU bytes, host bytes, the phase of each peak) over prepare, load and training."""
        every = {"training": (self.gpu, self.host), **self.phases}
        gpu = max(every, key=lambda k: every[k][0])
        host = max(every, key=lambda k: every[k][1])
        return every[gpu][0], every[host][1], gpu, host

    @property
    def step_seconds(self) -> float:
        """The streaming bound on one optimizer step: its bytes over PCIe at pcie_gbps."""
        return self.streamed_per_step / (self.pcie_gbps * 1e9)

    @property
    def fits(self) -> bool:
        gpu, host, _, _ = self.peak()
        gpu_ok = self.device_gb is None or self.on_cpu or gpu <= self.device_gb * GIB
        host_ok = self.backend != "cuda" or self.host_gb is None or host <= self.host_gb * GIB
        return gpu_ok and host_ok

    def verdict(self) -> str:
        gpu, host, gpu_phase, host_phase = self.peak()
        lines = []
        if self.device_gb is not None and not self.on_cpu:
            fits = gpu <= self.device_gb * GIB
            where = "GPU" if self.backend == "cuda" else "unified"
            lines.append(f"{'fits' if fits else 'does not fit'}: {gpu / GIB:.1f} GiB of "
                         f"{self.device_gb:g} GiB {where} memory{_at(gpu_phase)}")  # fmt: skip
            if not fits:
                lines.append("  to fit: " + self._advice())
        if self.backend == "cuda" and self.host_gb is not None:
            fits = host <= self.host_gb * GIB
            lines.append(f"{'fits' if fits else 'does not fit'}: {host / GIB:.1f} GiB of "
                         f"{self.host_gb:g} GiB host RAM{_at(host_phase)}")  # fmt: skip
            if not fits:
                lines.append("  to fit: more RAM (experts need it page-locked), or a smaller model")
        return "\n".join(lines)

    def _advice(self) -> str:
        tips = {
            "routed experts": "set model.offload_experts: true (stream them from host RAM)",
            "frozen linear weights": "set model.quantize: 4",
            "layer checkpoints": "set train.offload_checkpoints: true",
            "activations": "set train.grad_checkpoint: true, or a smaller train.batch_tokens",
            "layer working set": "a smaller train.batch_tokens",
            "logits chunk": "a smaller train.ce_chunk_tokens",
        }
        for row in sorted(self.rows, key=lambda r: -r.gpu):
            if row.name in tips and row.name not in self.applied:
                return tips[row.name]
        return "a smaller train.batch_tokens, or a bigger device"

    def table(self) -> str:
        cuda = self.backend == "cuda"
        head = f"{'component':<26}{'GPU GiB' if cuda else 'memory GiB':>11}"
        head += f"{'host GiB':>10}  note" if cuda else "  note"
        where = "; on this CPU (every row is host RAM)" if self.on_cpu else ""
        lines = [f"{self.model}: {self.counts.total:,} parameters; {self.backend} backend, "
                 f"{self.tokens:,} tokens per step{where}", head]  # fmt: skip
        for r in self.rows:
            host = f"{r.host / GIB:>10.2f}" if cuda else ""
            lines.append(f"{r.name:<26}{r.gpu / GIB:>11.2f}{host}  {r.note}")
        total = f"{self.host / GIB:>10.2f}" if cuda else ""
        lines.append(f"{'training, total':<26}{self.gpu / GIB:>11.2f}{total}")
        for phase, (gpu, host) in self.phases.items():
            lines.append(f"{'while ' + _ING[phase]:<26}{gpu / GIB:>11.2f}{host / GIB:>10.2f}")
        if self.disk:
            lines.append(
                f"disk for the prepared copy (mlxtune prepare, once): {self.disk / 1e9:.1f} GB"
            )
        if self.streamed_per_step:
            tok_s = self.tokens * self.accum / self.step_seconds
            lines.append(f"streamed host -> GPU per optimizer step: {self.streamed_per_step / 1e9:.1f}"
                         f" GB: at least {self.step_seconds:.1f} s at {self.pcie_gbps:g} GB/s, "
                         f"so at most {tok_s:,.0f} tokens/s (compute not counted)")  # fmt: skip
        lines += self.notes
        return "\n".join(lines)


_ING = {"prepare": "preparing (once)", "load": "loading"}


def _at(phase: str) -> str:
    return "" if phase == "training" else f" (peak while {_ING.get(phase, phase)})"


def plan(cfg: Config, device_gb: float | None = None, host_gb: float | None = None,
         on_cpu: bool = False, pcie_gbps: float = PCIE_GBPS, ranks: int = 1,
         link_gbps: float | None = None) -> Plan:  # fmt: skip
    """The plan of `cfg` on each of `ranks` data-parallel devices; `on_cpu`: the cuda backend
    running on a CPU (everything in RAM); `link_gbps`: the bandwidth between ranks.

    With `train.grad_checkpoint: auto`, the plan is made without checkpointing, and again with
    it when the first does not fit `device_gb` (as the trainers decide)."""
    if cfg.train.grad_checkpoint == "auto":
        decided, why = settle(cfg, device_gb, host_gb, on_cpu, ranks=ranks)
        p = plan(decided, device_gb, host_gb, on_cpu, pcie_gbps, ranks, link_gbps)
        p.notes.append(why or "train.grad_checkpoint auto: off (a step fits without it)")
        return p
    p = _plan(cfg, device_gb, host_gb, on_cpu, pcie_gbps, ranks)
    if ranks > 1:
        if sharded(cfg):
            _shard(p, cfg, ranks)
        _data_parallel(p, cfg, ranks, link_gbps)
    return p


def sharded(cfg: Config) -> bool:
    """Whether several ranks shard the model (FSDP2 on the cuda backend)."""
    return cfg.model.backend == "cuda" and (cfg.lora.method == "full" or cfg.train.shard)


def _shard(p: Plan, cfg: Config, ranks: int) -> None:
    """Each rank keeps 1/N of the weights, gradients and AdamW state, and gathers whole layers
    as it goes: two layers' weights in flight (one computing, the next arriving) and one
    layer's unsharded gradients. It loads the whole model before sharding it."""
    config, _ = model_config(str(cfg.model.path))
    text = config.get("text_config", config)
    dense = DTYPE_BYTES.get(p.dtype, 2)
    # while loading: the whole model's weights, and the process
    held = [r for r in p.rows if r.name in SHARDED_ROWS[2:] or r.name in BASE_ROWS]
    p.phases["load"] = (sum(r.gpu for r in held), sum(r.host for r in held))
    for r in p.rows:
        if r.name in SHARDED_ROWS:
            r.gpu, r.host = r.gpu / ranks, r.host / ranks
            r.note = f"{r.note}, 1/{ranks} (sharded)".lstrip(", ")
    for r in p.rows:  # the loss takes whole logits: FSDP gathers the head in its forward
        if r.name == "logits chunk":
            r.gpu, r.host = (x and logits_bytes(cfg, text["vocab_size"], tokens=p.tokens,
                                                chunked=False) for x in (r.gpu, r.host))  # fmt: skip
    c = p.counts
    layer = (c.attention + c.dense_ffn + c.shared_expert + c.routed_experts + c.router) / max(
        text["num_hidden_layers"], 1
    )
    p.add("gathered layers", 3 * layer * dense,
          note="2 layers' weights in flight + 1 layer's gradients")  # fmt: skip
    p.notes.append(f"sharded over {ranks} ranks (FSDP2): each loads the whole model, then keeps "
                   f"1/{ranks} of it")  # fmt: skip


def _data_parallel(p: Plan, cfg: Config, ranks: int, link_gbps: float | None) -> None:
    """What N ranks add: the gradients' all-reduce per optimizer step (a ring sends and
    receives 2 (N - 1) / N of the bytes on each link), and the global batch."""
    link = link_gbps or (p.pcie_gbps if cfg.model.backend == "cuda" else MAC_LINK_GBPS)
    share = (ranks - 1) / ranks  # of the bytes, over each rank's link (a ring)
    dense = DTYPE_BYTES.get(p.dtype, 2)
    if sharded(cfg):  # per micro-batch: every weight gathered twice, gradients reduce-scattered
        weights = p.counts.total * dense
        grads = p.trainable * (4 if cfg.lora.method != "full" else dense)
        sent = p.accum * share * (2 * weights + grads)
        what = (f"gathers of {weights / 1e6:,.1f} MB of weights (forward and backward) and a "
                f"reduce-scatter of {grads / 1e6:,.1f} MB of gradients per micro-batch")  # fmt: skip
    else:
        grads = 4 * p.trainable  # fp32 gradients
        sent = 2 * share * grads
        what = f"all-reduce of {grads / 1e6:,.1f} MB of gradients per optimizer step"
    seconds = sent / (link * 1e9)
    p.ranks, p.allreduce_seconds = ranks, seconds
    p.notes.append(
        f"data parallel: {ranks} ranks, each as planned above (its share of every micro-batch, "
        f"at most {p.tokens:,} tokens); global micro-batch {Batching.of(cfg, ranks).tokens or 0:,}"
        f" tokens; {what}: about {seconds * 1e3:,.1f} ms per step at {link:g} GB/s, so a step "
        f"takes one rank's step plus that, for up to {ranks}x the tokens/s of one"
    )


def _plan(cfg: Config, device_gb: float | None, host_gb: float | None, on_cpu: bool,
          pcie_gbps: float, ranks: int) -> Plan:  # fmt: skip
    config, local = model_config(str(cfg.model.path))
    counts = counts_from_headers(local) if local is not None else counts_from_config(config)
    text = config.get("text_config", config)
    tokens = Batching.of(cfg, ranks).most_tokens()
    cuda_backend = cfg.model.backend == "cuda"
    p = Plan(str(cfg.model.path), cfg.model.backend, counts, tokens=tokens, device_gb=device_gb,
             host_gb=host_gb, dtype=_dtype(cfg, config), on_cpu=on_cpu and cuda_backend,
             pcie_gbps=pcie_gbps, accum=cfg.train.grad_accum)  # fmt: skip
    on = {"frozen linear weights": cfg.model.quantize == 4, "routed experts":
          cfg.model.offload_experts, "layer checkpoints": cfg.train.offload_checkpoints,
          "activations": cfg.train.grad_checkpoint is True}  # fmt: skip
    p.applied = {k for k, v in on.items() if v}
    if cfg.lora.method == "full":  # gradients and both moments in the weights' dtype
        dense = DTYPE_BYTES.get(p.dtype, 2)
        p.trainable = full_params(text, counts, cfg)
        p.add(FULL_ROW, 3 * dense * p.trainable,
              note=f"{p.trainable:,} parameters, {dense * 8}-bit")  # fmt: skip
    else:
        lora = lora_params(text, cfg)
        p.trainable = lora
        p.add(LORA_ROW, 16 * lora, note=f"{lora:,} parameters, fp32")
    if cuda_backend:
        cuda_rows(p, cfg, config, text, counts, tokens)
    else:
        _mlx(p, cfg, text, counts, tokens)
    return p


def _checkpointing(cfg: Config, on: bool) -> Config:
    return replace(cfg, train=replace(cfg.train, grad_checkpoint=on))


def settle(cfg: Config, device_gb: float | None, host_gb: float | None = None,
           on_cpu: bool = False, ranks: int = 1) -> tuple[Config, str | None]:  # fmt: skip
    """`cfg` with train.grad_checkpoint decided: `auto` is on when the plan of a step without
    checkpointing does not fit the memory given (None: unknown, so off), and a line saying why."""
    if cfg.train.grad_checkpoint != "auto":
        return cfg, None
    try:
        off = plan(_checkpointing(cfg, False), device_gb, host_gb, on_cpu, ranks=ranks)
    except (KeyError, TypeError, ValueError, OSError, MlxtuneError):
        # a model the planner has no formula for, or cannot find: loading says what is wrong
        return _checkpointing(cfg, False), None
    if off.fits:
        return _checkpointing(cfg, False), None
    gpu, host, _, _ = off.peak()
    need, have = (host, host_gb) if off.on_cpu else (gpu, device_gb)
    return _checkpointing(cfg, True), (
        f"train.grad_checkpoint auto: on; without it a step needs {need / GIB:.1f} GiB "
        f"(planned) of the {have:.3g} GiB it may use"
    )


def _mlx(p: Plan, cfg: Config, text: dict, counts: Counts, tokens: int) -> None:
    d, n_layers, v = text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]
    dense = DTYPE_BYTES.get(p.dtype, 2)
    w = (cfg.model.quantize + 2 * dense * 8 / MLX_GROUP) / 8 if cfg.model.quantize else dense
    frozen = counts.linear + counts.routed_experts + counts.head + counts.embed
    p.rows.insert(0, Row("weights", frozen * w + (counts.other + counts.towers) * dense,
                         note=f"{cfg.model.quantize}-bit" if cfg.model.quantize else f"{dense * 8}-bit"))  # fmt: skip
    row = cfg.data.max_seq_len  # MLX's attention backward keeps the score rows
    if cfg.train.grad_checkpoint:
        p.add("layer checkpoints", n_layers * tokens * d * dense)
        p.add("layer working set", tokens * layer_bytes(text, dense, row))
    else:
        kept = n_layers * tokens * layer_elements(text, streamed=False, row=row) * dense
        p.add("activations", kept, note="every layer's, kept for backward")
    softcap = MLX_SOFTCAP_BYTES if text.get("final_logit_softcapping") else 0
    p.add("logits chunk", logits_bytes(cfg, v, MLX_LOGIT_BYTES + softcap, tokens,
                                       chunked=cfg.lora.method != "full"))  # fmt: skip
    # The intercept corrects what the per-token rows overstate; it never takes more than them
    # (a tiny model would otherwise plan a negative total).
    per_token = sum(r.gpu for r in p.rows if r.name not in ("weights", LORA_ROW, FULL_ROW))
    p.add("MLX buffers (fitted)", max(MLX_BASE, -per_token),
          note="intercept of benchmarks/fit_plan.py's fit")  # fmt: skip


def _dtype(cfg: Config, config: dict) -> str:
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    text = config.get("text_config", config)
    return str(
        config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype") or "bfloat16"
    )
