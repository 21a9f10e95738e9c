"""`mlxtune plan CONFIG`: bytes per component and where they live, before anything loads.

Framework-free. Parameter counts come from the checkpoint's safetensors headers when the folder
is local, else from its config.json by formula (Llama 4's layout is built in, and Maverick's and
Scout's real configs ship in `mlxtune/known/`). The formulas are checked against transformers'
own models, and the predicted peak against the measured one on small runs.

cuda backend (the 24 GB recipe's terms): frozen linear layers in NF4 at 4.127 bits per weight
(bitsandbytes with double quantization), the output head in bf16, the input embedding and, with
`model.offload_experts`, the routed experts in host RAM, streamed through two chunk buffers;
LoRA weights, gradients and AdamW moments in fp32 (16 bytes per parameter); one checkpointed
input per layer (in host RAM with `train.offload_checkpoints`), the working set of the one
layer being recomputed, a chunk of fp32 logits, and the CUDA context. Streaming moves every
expert twice per micro-batch: forward, and backward for the input gradient (a checkpointed
layer's recompute reuses the forward's routed output).

mlx backend (unified memory): weights at their dtype, or 4 / 8 bits plus a scale and a bias
per 64 weights with model.quantize (4.5 / 8.5 bits in bf16);
the same LoRA state; every layer's activations (or one per layer with train.grad_checkpoint);
the logits chunk; MLX's own overhead. Measured on the CPU, a quantized head costs more than this
(the loss dequantizes it); the planned figure is the unquantized-head case.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .errors import ModelError

GIB = 2**30
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # bitsandbytes NF4 with double-quantized scales
MLX_GROUP = 64  # mlx quantization: a scale and a bias (in the model's dtype) per 64 weights
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT = 1.5 * GIB  # CUDA context, cuBLAS workspace, allocator slack [est]
HOST_BASE = 10 * GIB  # Python, CUDA host allocations, tokenized data, OS [est]
MLX_BASE = 0.05 * GIB  # MLX's own buffers and allocator slack at small sizes [measured]
MLX_LOGIT_BYTES = 24  # logits, softmax, their gradient and the head's output, fp32 [measured]
MLX_SOFTCAP_BYTES = 20  # a soft-capped head's extra: scaled, tanh and its derivative [measured]
KNOWN = Path(__file__).with_name("known")


@dataclass(frozen=True)
class Counts:
    """Parameters by component (a model's config.json or safetensors headers)."""

    routed_experts: int = 0
    dense_ffn: int = 0
    attention: int = 0
    shared_expert: int = 0
    router: int = 0
    embed: int = 0
    head: int = 0
    towers: int = 0  # vision / audio encoders and their projectors
    other: int = 0  # norms, per-layer embeddings, scalars

    @property
    def total(self) -> int:
        return sum(vars(self).values())

    @property
    def linear(self) -> int:
        """Frozen linear weights that stay with the model (quantizable)."""
        return self.dense_ffn + self.attention + self.shared_expert + self.router


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
    rows: list[Row] = field(default_factory=list)
    tokens: int = 0
    streamed_per_step: float = 0.0  # bytes over PCIe per optimizer step
    device_gb: float | None = None
    host_gb: float | None = None
    applied: set[str] = field(default_factory=set)  # components whose remedy is already on

    @property
    def gpu(self) -> float:
        return sum(r.gpu for r in self.rows)

    @property
    def host(self) -> float:
        return sum(r.host for r in self.rows)

    @property
    def fits(self) -> bool:
        gpu = self.device_gb is None or self.gpu <= self.device_gb * GIB
        host = self.backend != "cuda" or self.host_gb is None or self.host <= self.host_gb * GIB
        return gpu and host

    def verdict(self) -> str:
        lines = []
        if self.device_gb is not None:
            fits = self.gpu <= self.device_gb * GIB
            lines.append(f"{'fits' if fits else 'does not fit'}: {self.gpu / GIB:.1f} GiB of "
                         f"{self.device_gb:g} GiB {'GPU' if self.backend == 'cuda' else 'unified'} memory")  # fmt: skip
            if not fits:
                lines.append("  to fit: " + self._advice())
        if self.backend == "cuda" and self.host_gb is not None:
            fits = self.host <= self.host_gb * GIB
            lines.append(f"{'fits' if fits else 'does not fit'}: {self.host / GIB:.1f} GiB of "
                         f"{self.host_gb:g} GiB host RAM")  # fmt: skip
            if not fits:
                lines.append("  to fit: more RAM (experts need it pinned), or a smaller model")
        return "\n".join(lines)

    def _advice(self) -> str:
        tips = {
            "routed experts": "set model.offload_experts: true (stream them from host RAM)",
            "frozen linear weights": "set model.quantize: 4",
            "layer checkpoints": "set train.offload_checkpoints: true",
            "activations": "set train.grad_checkpoint: true, or fewer tokens per step",
            "layer working set": "fewer tokens per step (data.max_seq_len x train.batch_size)",
            "logits chunk": "a smaller train.ce_chunk_tokens",
        }
        for row in sorted(self.rows, key=lambda r: -r.gpu):
            if row.name in tips and row.name not in self.applied:
                return tips[row.name]
        return "fewer tokens per step (data.max_seq_len x train.batch_size), or a bigger device"

    def table(self) -> str:
        head = f"{'component':<26}{'GPU GiB' if self.backend == 'cuda' else 'memory GiB':>11}"
        head += f"{'host GiB':>10}  note" if self.backend == "cuda" else "  note"
        lines = [f"{self.model}: {self.counts.total:,} parameters; {self.backend} backend, "
                 f"{self.tokens:,} tokens per step", head]  # fmt: skip
        for r in self.rows:
            host = f"{r.host / GIB:>10.2f}" if self.backend == "cuda" else ""
            lines.append(f"{r.name:<26}{r.gpu / GIB:>11.2f}{host}  {r.note}")
        total = f"{self.host / GIB:>10.2f}" if self.backend == "cuda" else ""
        lines.append(f"{'total':<26}{self.gpu / GIB:>11.2f}{total}")
        if self.streamed_per_step:
            lines.append(
                f"streamed host -> GPU per optimizer step: {self.streamed_per_step / 1e9:.1f} GB"
            )
        return "\n".join(lines)


# ------------------------------------------------------------------------------ the counts


def model_config(path: str) -> tuple[dict, Path | None]:
    """config.json of a local folder, of a shipped known model, or fetched from the hub."""
    local = Path(path).expanduser()
    if (local / "config.json").is_file():
        return json.loads((local / "config.json").read_text(encoding="utf-8")), local
    known = KNOWN / (path.replace("/", "--") + ".json")
    if known.is_file():
        return json.loads(known.read_text(encoding="utf-8")), None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "config.json")).read_text()), None
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"model.path: no config.json for {path}: {reason}") from None


def counts_from_headers(folder: Path) -> Counts:
    from .adapters import tensor_shapes

    sums: dict[str, int] = {}
    for name, shape in tensor_shapes(folder).items():
        n = 1
        for s in shape:
            n *= s
        key = _component(name)
        sums[key] = sums.get(key, 0) + n
    return Counts(**sums)


def _component(name: str) -> str:
    if re.search(r"(vision|audio|multi_modal_projector|embed_vision|embed_audio)", name):
        return "towers"
    if ".experts." in name:
        return "routed_experts"
    if "router" in name:
        return "router"
    if "shared_expert" in name:
        return "shared_expert"
    if "self_attn" in name and name.endswith("weight") and "norm" not in name:
        return "attention"
    if re.search(r"(mlp|feed_forward)\.(gate|up|down)_proj", name):
        return "dense_ffn"
    if "lm_head" in name:
        return "head"
    if name.endswith("embed_tokens.weight"):
        return "embed"
    return "other"


def counts_from_config(config: dict) -> Counts:
    """Llama 4 (text + vision) by formula; exact against transformers (tested)."""
    text = config.get("text_config", config)
    if text.get("model_type") not in ("llama4_text", "llama4"):
        raise ModelError(f"plan: no local checkpoint, and no formula for {text.get('model_type')}")
    d, n_layers, v = text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]
    heads, kv, hd = text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]
    step = text.get("interleave_moe_layer_step", 1)
    moe = len(range(step - 1, n_layers, step))
    e, inter, inter_mlp = (
        text["num_local_experts"],
        text["intermediate_size"],
        text["intermediate_size_mlp"],
    )
    counts = {
        "routed_experts": moe * e * 3 * d * inter,
        "dense_ffn": (n_layers - moe) * 3 * d * inter_mlp,
        "attention": n_layers * (2 * d * heads * hd + 2 * d * kv * hd),
        "shared_expert": moe * 3 * d * inter,
        "router": moe * d * e,
        "embed": v * d,
        "head": 0 if config.get("tie_word_embeddings") else v * d,
        "other": n_layers * 2 * d + d,
    }
    vision = config.get("vision_config")
    if vision:
        h, m, layers = (
            vision["hidden_size"],
            vision["intermediate_size"],
            vision["num_hidden_layers"],
        )
        grid = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
        shuffled = int(h / vision["pixel_shuffle_ratio"] ** 2)
        counts["towers"] = (
            3 * vision["patch_size"] ** 2 * h + h + grid * h + 4 * h  # patches, class, positions, norms
            + layers * (4 * (h * h + h) + (h * m + m) + (m * h + h) + 4 * h)  # encoder layers
            + shuffled * vision["projector_input_dim"]
            + vision["projector_input_dim"] * vision["projector_output_dim"]  # pixel-shuffle MLP
            + vision["vision_output_dim"] * d  # projector into the text width
        )  # fmt: skip
    return Counts(**counts)


# -------------------------------------------------------------------------------- the plan


def plan(cfg: Config, device_gb: float | None = None, host_gb: float | None = None) -> Plan:
    config, local = model_config(str(cfg.model.path))
    counts = counts_from_headers(local) if local is not None else counts_from_config(config)
    text = config.get("text_config", config)
    tokens = cfg.data.max_seq_len * cfg.train.batch_size
    name = str(cfg.model.path)
    p = Plan(name, cfg.model.backend, counts, tokens=tokens, device_gb=device_gb, host_gb=host_gb)
    on = {"frozen linear weights": cfg.model.quantize == 4, "routed experts":
          cfg.model.offload_experts, "layer checkpoints": cfg.train.offload_checkpoints,
          "activations": cfg.train.grad_checkpoint}  # fmt: skip
    p.applied = {k for k, v in on.items() if v}
    lora = lora_params(text, cfg)
    p.rows.append(Row("LoRA + grads + AdamW", 16 * lora, note=f"{lora:,} parameters, fp32"))
    (_cuda if cfg.model.backend == "cuda" else _mlx)(p, cfg, config, text, counts, tokens)
    return p


def _cuda(p: Plan, cfg: Config, config, text, counts: Counts, tokens: int) -> None:
    d, n_layers, v = text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]
    dense = DTYPE_BYTES.get(_dtype(cfg, config), 2)
    w = NF4_BITS / 8 if cfg.model.quantize == 4 else dense
    p.rows.insert(0, Row("frozen linear weights", counts.linear * w,
                         note="NF4" if cfg.model.quantize == 4 else f"{dense * 8}-bit"))  # fmt: skip
    p.rows.insert(1, Row("output head", counts.head * dense))
    p.rows.insert(2, Row("input embedding", host=counts.embed * dense, note="host RAM, row gather")
                  if cfg.model.offload_experts else Row("input embedding", counts.embed * dense))  # fmt: skip
    if counts.towers:
        p.rows.append(Row("vision/audio towers", counts.towers * w, note="frozen"))
    if counts.routed_experts:
        experts = counts.routed_experts * w
        if cfg.model.offload_experts:
            e = text.get("num_local_experts", 1)
            one = 3 * d * text["intermediate_size"]
            chunk = min(cfg.model.expert_chunk, e)
            buffers = 2 * chunk * one * w + 2 * one * dense  # two chunks + two dequant scratch
            p.rows.append(Row("routed experts", host=experts, note="pinned host RAM, streamed"))
            p.rows.append(Row("expert stream buffers", buffers,
                              note=f"2 chunks of {chunk} experts + 2 dequantized"))  # fmt: skip
            p.streamed_per_step = 2 * experts * cfg.train.grad_accum  # forward, backward
        else:
            p.rows.append(Row("routed experts", experts))
    ckpt = n_layers * tokens * d * dense
    if cfg.train.grad_checkpoint:
        where = {"host": ckpt} if cfg.train.offload_checkpoints else {"gpu": ckpt}
        p.rows.append(Row("layer checkpoints", **where, note="one input per layer"))
        p.rows.append(Row("layer working set", tokens * layer_bytes(text, dense),
                          note="the layer being recomputed"))  # fmt: skip
    else:
        kept = n_layers * tokens * layer_elements(text, cfg.model.offload_experts) * dense
        p.rows.append(Row("activations", kept, note="every layer's, kept for backward"))
    p.rows.append(Row("logits chunk", logits_bytes(cfg, v)))
    p.rows.append(Row("CUDA context, workspace", CUDA_CONTEXT, host=HOST_BASE, note="[est]"))


def _mlx(p: Plan, cfg: Config, config, text, counts: Counts, tokens: int) -> None:
    d, n_layers, v = text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]
    dense = DTYPE_BYTES.get(_dtype(cfg, config), 2)
    w = (cfg.model.quantize + 2 * dense * 8 / MLX_GROUP) / 8 if cfg.model.quantize else dense
    frozen = counts.linear + counts.routed_experts + counts.head + counts.embed
    p.rows.insert(0, Row("weights", frozen * w + (counts.other + counts.towers) * dense,
                         note=f"{cfg.model.quantize}-bit" if cfg.model.quantize else f"{dense * 8}-bit"))  # fmt: skip
    row = cfg.data.max_seq_len  # MLX's attention backward keeps the score rows
    if cfg.train.grad_checkpoint:
        p.rows.append(Row("layer checkpoints", n_layers * tokens * d * dense))
        p.rows.append(Row("layer working set", tokens * layer_bytes(text, dense, row)))
    else:
        kept = n_layers * tokens * layer_elements(text, streamed=False, row=row) * dense
        p.rows.append(Row("activations", kept, note="every layer's, kept for backward"))
    softcap = MLX_SOFTCAP_BYTES if text.get("final_logit_softcapping") else 0
    p.rows.append(Row("logits chunk", logits_bytes(cfg, v, MLX_LOGIT_BYTES + softcap)))
    p.rows.append(Row("MLX buffers", MLX_BASE, note="[measured on small runs]"))


def _dtype(cfg: Config, config: dict) -> str:
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    text = config.get("text_config", config)
    return str(
        config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype") or "bfloat16"
    )


def layer_elements(text: dict, streamed: bool = True, row: int = 0) -> int:
    """Values per token one decoder layer keeps for its backward: the norms' inputs and outputs
    and the residual (5 x hidden), q, k, v, the rotated q and k and the attention output, and the
    MLP's gate, up, activation and product (4 x its width). A MoE layer keeps the shared
    expert's, plus the routed expert's unless the experts stream (they keep nothing). `row`:
    when attention materialises its scores (MLX's attention backward), each token keeps a row of
    them and of their softmax per head."""
    d = text["hidden_size"]
    heads, kv = text.get("num_attention_heads", 1), text.get("num_key_value_heads", 1)
    hd = text.get("head_dim") or d // heads
    inter = text.get("intermediate_size", 4 * d)
    widths = [2 * inter if text.get("use_double_wide_mlp") else inter]  # Gemma 4's KV-shared
    if text.get("num_local_experts"):
        widths = [inter * (1 if streamed else 2)]
        if text.get("interleave_moe_layer_step", 1) > 1:
            widths.append(text.get("intermediate_size_mlp", inter))  # the dense layers
    per_layer = 2 * text.get("hidden_size_per_layer_input", 0)  # Gemma's per-layer inputs
    return 5 * d + 3 * heads * hd + 3 * kv * hd + 4 * max(widths) + 2 * heads * row + per_layer


def layer_bytes(text: dict, dense: int, row: int = 0) -> float:
    """The working set per token of the one layer being differentiated: what it keeps, and half
    as much again for the gradients formed while it runs backward."""
    return 1.5 * layer_elements(text, row=row) * dense


def logits_bytes(cfg: Config, vocab: int, per_logit: int = 8) -> float:
    """One chunk's logits: fp32 logits and their gradient plus the head's output (8 bytes per
    logit), or what MLX keeps while it differentiates a chunk (MLX_LOGIT_BYTES)."""
    chunk = cfg.train.ce_chunk_tokens or cfg.data.max_seq_len * cfg.train.batch_size
    return chunk * vocab * per_logit


def lora_params(text: dict, cfg: Config) -> int:
    """LoRA parameters of the default or configured targets over the adapted layers."""
    if cfg.lora.method == "full":
        return 0
    d, r = text["hidden_size"], cfg.lora.rank
    heads, kv = text.get("num_attention_heads", 1), text.get("num_key_value_heads", 1)
    hd = text.get("head_dim") or d // heads
    layers = text["num_hidden_layers"]
    n = layers if cfg.lora.num_layers is None else min(cfg.lora.num_layers, layers)
    attention = r * ((d + heads * hd) * 2 + (d + kv * hd) * 2)  # q, o; k, v
    inter = text.get("intermediate_size", 4 * d)
    mlp = r * 3 * (d + inter)
    total = n * attention
    if text.get("num_local_experts"):  # shared expert on MoE layers, dense FFN on the others
        step = text.get("interleave_moe_layer_step", 1)
        moe = len(range(step - 1, layers, step)) * n // layers
        total += moe * mlp + (n - moe) * r * 3 * (d + text.get("intermediate_size_mlp", inter))
    else:
        total += n * mlp
    return total
