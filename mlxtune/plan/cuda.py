"""The cuda backend's plan: training rows, the prepare and load phases, disk, streaming time.

The recipe's terms (`cuda_backend/`): with `model.quantize: 4` or `model.offload_experts` the
model loads from a prepared copy (`mlxtune prepare`), never whole. Frozen linear weights are NF4
(4.127 bits per weight), the head, routers and norms stay in the compute dtype; Llama 4 is
loaded text-only (no vision tower). Each MoE layer's routed experts sit in one block of exactly
their size: page-locked host RAM when streamed, else on the GPU. Two chunk buffers and one
expert's dequantized weights live on the GPU; every expert crosses PCIe twice per micro-batch
(forward, and backward for the input gradient; a checkpointed layer's recompute reuses the
forward's routed output). Checkpointed layer inputs (and those kept routed outputs) go to one
page-locked host arena of exactly their size with `train.offload_checkpoints`.

Phases: *prepare* holds one source slice (an expert's gate_up, or a 64 MiB piece) and the
quantizer's fixed temporaries; *load* holds what stays resident plus one tensor in flight;
*training* is the rows. On a CPU (how this project tests the backend) every row is host RAM,
and the process's own footprint per phase is `CPU_BASE`, fitted by benchmarks/fit_plan.py on a
scaled Scout and checked against a scaled Maverick by tests/test_maverick_scaled.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import Config, ModelConfig
from .counts import Counts, layer_bytes, layer_elements, logits_bytes

if TYPE_CHECKING:
    from . import Plan

GIB = 2**30
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # bitsandbytes NF4 with double-quantized scales
ALIGN = 64  # bytes: each part of a cached tensor starts on a cache line
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT = 1.5 * GIB  # CUDA context, cuBLAS workspace, allocator slack [est]
HOST_BASE = 10 * GIB  # Python, CUDA host allocations, tokenized data, OS [est]
# The process's own resident set on a CPU, per phase: Python, torch, transformers, the
# tokenizer, the data. Fitted by `python benchmarks/fit_plan.py` (scaled Scout, 1 layer).
CPU_BASE = {"prepare": 0.481 * GIB, "load": 0.283 * GIB, "train": 0.920 * GIB}
SLICE_BYTES = 64 << 20  # a plain tensor is read and sent in pieces of this size
QUANT_TEMP = 0.1 * GIB  # the quantizer's slices: 4M values in fp32, their codes and indices
PCIE_GBPS = 25.0  # PCIe 4.0 x16, effective, host -> device [est]


def uses_cache(model: ModelConfig) -> bool:
    """The cuda backend loads through the prepared copy when it quantizes or streams."""
    return model.backend == "cuda" and (model.quantize == 4 or model.offload_experts)


def nf4_parts(numel: int) -> tuple[int, int, int]:
    """Bytes of an NF4 tensor's codes, 8-bit scales and fp32 stats (bitsandbytes' sizes)."""
    blocks = -(-numel // 64)
    return numel // 2, blocks, 4 * (1 + -(-blocks // 256))


def _up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def nf4_nbytes(numel: int) -> int:
    """Bytes of one NF4 tensor in the prepared copy, each part aligned."""
    return sum(_up(n) for n in nf4_parts(numel))


def expert_stride(d: int, inter: int, dense: int, quantize: bool) -> int:
    """Bytes of one routed expert (gate_up [d, 2 inter] and down [inter, d]) in its block."""
    sizes = (2 * d * inter, inter * d)
    return sum(_up(nf4_nbytes(n) if quantize else n * dense) for n in sizes)


def cuda_rows(p: Plan, cfg: Config, config: dict, text: dict, counts: Counts, tokens: int) -> None:
    """Training rows, then the prepare and load phases."""
    d, v = text["hidden_size"], text["vocab_size"]
    dense = DTYPE_BYTES.get(p.dtype, 2)
    quantize, cached = cfg.model.quantize == 4, uses_cache(cfg.model)
    streamed = cfg.model.offload_experts
    text_only = cached and config.get("model_type") == "llama4"
    w = NF4_BITS / 8 if quantize else dense
    p.add(
        "frozen linear weights",
        counts.quantizable * w,
        note="NF4" if quantize else f"{dense * 8}-bit",
    )
    p.add("head, routers, norms", (counts.head + counts.router + counts.other) * dense)
    if streamed:
        p.add("input embedding", host=counts.embed * dense, note="host RAM, row gather")
    else:
        p.add("input embedding", counts.embed * dense)
    if counts.towers and not text_only:
        p.add("vision/audio towers", counts.towers * w, note="frozen")
    elif counts.towers:
        p.notes.append("vision tower not loaded (Llama 4 trains on text on this backend)")
    moe = _moe_layers(text)
    experts = 0.0
    if counts.routed_experts:
        e, inter = text["num_local_experts"], text["intermediate_size"]
        stride = expert_stride(d, inter, dense, quantize) if cached else 3 * d * inter * dense
        experts = moe * e * stride
        if streamed:
            p.add("routed experts", host=experts, note="page-locked host RAM, exact size")
            chunk = min(cfg.model.expert_chunk, e)
            p.add("expert stream buffers", 2 * chunk * stride + 3 * d * inter * dense,
                  note=f"2 chunks of {chunk} experts + 1 dequantized")  # fmt: skip
            p.streamed_per_step = 2 * experts * cfg.train.grad_accum
        else:
            p.add("routed experts", experts, note="NF4, on the GPU" if cached else "in the model")
            if cached:
                p.add("expert scratch", 3 * d * inter * dense, note="1 dequantized expert")
    _activations(p, cfg, text, tokens, dense, moe if cached and counts.routed_experts else 0)
    chunked = cfg.lora.method != "full"  # a full fine-tune's loss takes whole logits
    p.add("logits chunk", logits_bytes(cfg, v, tokens=tokens, chunked=chunked))
    if p.on_cpu:
        p.add("process", host=CPU_BASE["train"], note="Python, torch, data [fitted]")
    else:
        p.add("CUDA context, workspace", CUDA_CONTEXT, host=HOST_BASE, note="[est]")
    if cached:
        _phases(p, text, counts, dense, w, experts, streamed, text_only)


def _moe_layers(text: dict) -> int:
    if not text.get("num_local_experts"):
        return 0
    step = text.get("interleave_moe_layer_step", 1)
    return len(range(step - 1, text["num_hidden_layers"], step))


def _activations(p: Plan, cfg: Config, text: dict, tokens: int, dense: int, kept: int) -> None:
    """Checkpoints (and the routed outputs a recompute reuses), or every layer's activations."""
    d, n_layers = text["hidden_size"], text["num_hidden_layers"]
    if cfg.train.grad_checkpoint:
        # each layer's input, and what the final norm saves (two fp32 copies; measured)
        ckpt = (n_layers * dense + 8) * tokens * d + kept * tokens * d * dense
        note = "layer inputs" + (" + kept routed outputs" if kept else "")
        if cfg.train.offload_checkpoints:
            p.add("layer checkpoints", host=ckpt, note=note + ", page-locked arena")
        else:
            p.add("layer checkpoints", ckpt, note=note)
        p.add("layer working set", tokens * layer_bytes(text, dense),
              note="the layer being recomputed")  # fmt: skip
    else:
        kept_all = n_layers * tokens * layer_elements(text, cfg.model.offload_experts) * dense
        p.add("activations", kept_all, note="every layer's, kept for backward")
    if cfg.train.ce_chunk_tokens and cfg.lora.method != "full":
        p.add("loss: hidden gradient", tokens * d * dense, note="kept from the chunked loss")


def _phases(p: Plan, text: dict, counts: Counts, dense: int, w: float, experts: float,
            streamed: bool, text_only: bool) -> None:  # fmt: skip
    """Preparing (once) and loading, and the disk the prepared copy takes."""
    d = text["hidden_size"]
    inter = text.get("intermediate_size", 4 * d)
    widths = [
        2 * inter if counts.routed_experts else 0,
        inter,
        text.get("intermediate_size_mlp", 0),
    ]
    largest = d * max(widths)  # the largest single read: an expert's gate_up or a linear weight
    slice_bytes = max(largest * dense, SLICE_BYTES)
    base = CPU_BASE if p.on_cpu else {"prepare": HOST_BASE, "load": HOST_BASE}
    context = 0.0 if p.on_cpu else CUDA_CONTEXT
    p.phases["prepare"] = (0.0, base["prepare"] + slice_bytes + nf4_nbytes(largest) + QUANT_TEMP)
    resident = [r for r in p.rows if r.name in RESIDENT]
    p.phases["load"] = (sum(r.gpu for r in resident) + context, base["load"] + SLICE_BYTES
                        + sum(r.host for r in resident) + nf4_nbytes(largest))  # fmt: skip
    towers = 0 if text_only else counts.towers * w
    p.disk = (counts.quantizable * w + (counts.head + counts.router + counts.other + counts.embed)
              * dense + towers + experts)  # fmt: skip


RESIDENT = ("frozen linear weights", "head, routers, norms", "input embedding",
            "vision/audio towers", "routed experts")  # fmt: skip
