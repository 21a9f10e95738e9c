"""Which modules LoRA adapts, per model family: one table for both backends. Framework-free.

Targets are matched against a module's path inside its block ("self_attn.q_proj" is hit by
"q_proj" or by "self_attn.q_proj"); a ClippableLinear's inner `.linear` counts as the layer.
"""

from __future__ import annotations

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

# model_type -> module names adapted by default: attention and MLP, as Unsloth and most
# recipes do. Families whose projections are fused or named differently get their own row.
# Llama 4: MLP hits the shared expert and the dense FFN layers; its router (`router`) and its
# routed experts (3-D parameters, not linear layers) are never adapted.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        ("gemma4", "gemma4_text", "gemma3n", "gemma3", "gemma3_text", "gemma2", "gemma"),
        ATTENTION + MLP,
    ),
    **dict.fromkeys(
        (
            "llama",
            "llama4",
            "llama4_text",
            "mistral",
            "qwen2",
            "qwen3",
            "smollm3",
            "olmo2",
            "granite",
        ),
        ATTENTION + MLP,
    ),  # fmt: skip
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}

# Gemma 4's towers: attention and MLP / feed-forward projections (lora.vision / lora.audio).
TOWER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "post", "gate_proj", "up_proj",
                 "down_proj", "ffw_layer_1", "ffw_layer_2")  # fmt: skip
EMBEDDERS = ("embed_vision", "embed_audio")  # trained in full with lora.train_embedders
NEVER = ("router",)  # a MoE router stays frozen whatever the targets say


def hits(path: str, targets: tuple[str, ...]) -> bool:
    path = path.removesuffix(".linear")
    if any(path == n or path.endswith("." + n) for n in NEVER):
        return False
    return any(path == t or path.endswith("." + t) for t in targets)
