"""Parameter counts by component, and the per-token sizes the plans are made of. Framework-free.

Counts come from a local checkpoint's safetensors headers, else from its config.json by formula
(Llama 4's layout is built in; Maverick's and Scout's real configs ship in `mlxtune/known/`).
The formula is checked against transformers' own models.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import ModelError

KNOWN = Path(__file__).resolve().parents[1] / "known"


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
        """Frozen linear weights that stay with the model."""
        return self.quantizable + self.router

    @property
    def quantizable(self) -> int:
        """The linear weights the cuda backend stores in NF4 (not the routers, not the head)."""
        return self.dense_ffn + self.attention + self.shared_expert


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
    from ..adapters import tensor_shapes

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


def logits_bytes(cfg: Config, vocab: int, per_logit: int = 8, tokens: int = 0,
                 chunked: bool = True) -> float:  # fmt: skip
    """One chunk's logits: fp32 logits and their gradient plus the head's output (8 bytes per
    logit), or what MLX keeps while it differentiates a chunk (MLX_LOGIT_BYTES). Not
    `chunked`: the whole micro-batch's."""
    chunk = (cfg.train.ce_chunk_tokens if chunked else 0) or tokens
    return chunk * vocab * per_logit


def full_params(text: dict, counts: Counts, cfg: Config) -> int:
    """Parameters a full fine-tune trains: the chosen decoder blocks (their attention, MLP or
    experts and routers; norms are too small to count)."""
    layers = text["num_hidden_layers"]
    n = layers if cfg.lora.num_layers is None else min(cfg.lora.num_layers, layers)
    blocks = (counts.attention + counts.dense_ffn + counts.shared_expert + counts.routed_experts
              + counts.router)  # fmt: skip
    return blocks * n // layers


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
