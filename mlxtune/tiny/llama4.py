"""Tiny Llama 4 Maverick-style checkpoint (`Llama4ForConditionalGeneration`): MoE text + vision.

Maverick's layout scaled down: dense SwiGLU layers alternate with MoE layers
(`interleave_moe_layer_step` 2: routed experts, top-1, plus an always-on shared expert), every
4th layer is NoPE (full attention), the others use RoPE with chunked attention, and there is no
qk-norm. The vision tower keeps the real tile geometry (336 px, 14 px patches, pixel shuffle 0.5:
144 tokens per tile) so the real image processor drives it. Expert weights are fused as
transformers stores them: `experts.gate_up_proj` (E, hidden, 2 * inter), `experts.down_proj`
(E, inter, hidden).
"""

from __future__ import annotations

from ._common import Checkpoint, TokenizerSpec

SPECIALS = (
    *("<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"),
    *("<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"),
    *("<|finetune_right_pad|>", "<|python_start|>", "<|python_end|>"),
    *("<|image_start|>", "<|image_end|>", "<|tile_x_separator|>", "<|tile_y_separator|>"),
    *("<|image|>", "<|patch|>", "<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"),
)

# Llama 4's turns: header, blank line, content (not trimmed), <|eot|>. Tool calls go between
# <|python_start|> and <|python_end|> as JSON; tool results come back in an `ipython` turn.
CHAT_TEMPLATE = """{%- macro render(content) -%}
{%- if content is string -%}{{- content -}}
{%- else -%}{%- for part in content or [] -%}
{%- if part['type'] == 'image' -%}{{- '<|image|>' -}}
{%- elif part['type'] == 'text' -%}{{- part['text'] -}}
{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- for message in messages -%}
{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}
{{- '<|header_start|>' + role + '<|header_end|>\\n\\n' -}}
{%- if message.get('tool_calls') -%}
{{- '<|python_start|>' + render(message['content']) + '<|python_end|>' -}}
{%- for call in message['tool_calls'] -%}
{%- set fn = call['function'] if call['function'] is defined else call -%}
{%- set args = fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson -%}
{{- '{"name": "' + fn['name'] + '", "parameters": ' + args + '}' -}}
{%- endfor -%}
{%- elif message['role'] == 'tool' and message['content'] is not string -%}
{{- message['content'] | tojson -}}
{%- else -%}
{{- render(message['content']) -}}
{%- endif -%}
{{- '<|eot|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|header_start|>assistant<|header_end|>\\n\\n' -}}
{%- endif -%}"""

TOKENIZER = TokenizerSpec(
    style="bytelevel",
    special_tokens=SPECIALS,
    chat_template=CHAT_TEMPLATE,
    bos="<|begin_of_text|>",
    eos="<|eot|>",
    pad="<|finetune_right_pad|>",
)

# The released preprocessor: 336 px tiles (up to 16 plus a global tile), bilinear, [-1, 1].
PREPROCESSOR = {
    "image_processor_type": "Llama4ImageProcessorFast",
    "processor_class": "Llama4Processor",
    "size": {"height": 336, "width": 336},
    "max_patches": 16,
    "resize_to_max_canvas": False,
    "resample": 2,
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True,
}
PROCESSOR = {
    "processor_class": "Llama4Processor",
    "patch_size": 14,
    "pixel_shuffle_ratio": 0.5,
    "fake_image_token": "<|image|>",
    "image_token": "<|image|>",
    "start_of_image_token": "<|image_start|>",
    "end_of_image_token": "<|image_end|>",
    "patch_token": "<|patch|>",
    "tile_x_separator_token": "<|tile_x_separator|>",
    "tile_y_separator_token": "<|tile_y_separator|>",
}


def _w(*shape):
    return shape, "normal"


def _text(h, n_layers, vocab_size, ids, eos, experts=4):
    heads, kv_heads, head_dim = 4, 2, h // 4
    inter, inter_dense = h // 2, 2 * h  # Maverick: 8192 per expert, 16384 dense
    moe_layers = list(range(1, n_layers, 2))  # interleave_moe_layer_step 2: layers 1, 3, ...
    config = {
        "model_type": "llama4_text",
        "vocab_size": vocab_size,
        "hidden_size": h,
        "intermediate_size": inter,
        "intermediate_size_mlp": inter_dense,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "num_local_experts": experts,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 2,
        "moe_layers": moe_layers,
        "no_rope_layer_interval": 4,  # layers 3, 7, ... are NoPE
        "use_qk_norm": False,  # Maverick (Scout has it)
        "attention_chunk_size": 64,  # real 8192; short so tests can cross a chunk boundary
        "attn_temperature_tuning": True,
        "floor_scale": 8192,
        "attn_scale": 0.1,
        # Maverick's released keys (mlx-lm reads these; transformers converts them).
        "rope_theta": 500_000.0,
        "rope_scaling": None,
        "max_position_embeddings": 1_048_576,
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": eos,
        "pad_token_id": ids["<|finetune_right_pad|>"],
    }
    lm = "language_model."
    params = {
        lm + "model.embed_tokens.weight": _w(vocab_size, h),
        lm + "model.norm.weight": ((h,), "ones"),
        lm + "lm_head.weight": _w(vocab_size, h),
    }
    for i in range(n_layers):
        p = f"{lm}model.layers.{i}."
        ff = p + "feed_forward."
        params |= {
            p + "self_attn.q_proj.weight": _w(heads * head_dim, h),
            p + "self_attn.k_proj.weight": _w(kv_heads * head_dim, h),
            p + "self_attn.v_proj.weight": _w(kv_heads * head_dim, h),
            p + "self_attn.o_proj.weight": _w(h, heads * head_dim),
            p + "input_layernorm.weight": ((h,), "ones"),
            p + "post_attention_layernorm.weight": ((h,), "ones"),
        }
        if i in moe_layers:
            params |= {
                ff + "router.weight": _w(experts, h),
                ff + "experts.gate_up_proj": _w(experts, h, 2 * inter),
                ff + "experts.down_proj": _w(experts, inter, h),
                ff + "shared_expert.gate_proj.weight": _w(inter, h),
                ff + "shared_expert.up_proj.weight": _w(inter, h),
                ff + "shared_expert.down_proj.weight": _w(h, inter),
            }
        else:
            params |= {
                ff + "gate_proj.weight": _w(inter_dense, h),
                ff + "up_proj.weight": _w(inter_dense, h),
                ff + "down_proj.weight": _w(h, inter_dense),
            }
    return config, params


def _vision(h):
    vh, heads, n_layers, image, patch, shuffle = 32, 2, 2, 336, 14, 0.5
    # intermediate_size is both the encoder MLP's width and the adapter's input, which pixel
    # shuffle makes vh / 0.5**2: so it must be 4 * vh, as the real 5632 = 4 * 1408 is.
    inter = int(vh / shuffle**2)
    proj = 2 * vh  # real: 4096
    config = {
        "model_type": "llama4_vision_model",
        "hidden_size": vh,
        "intermediate_size": inter,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_channels": 3,
        "image_size": image,
        "patch_size": patch,
        "pixel_shuffle_ratio": shuffle,
        "vision_output_dim": proj,
        "projector_input_dim": proj,
        "projector_output_dim": proj,
        "multi_modal_projector_bias": False,
        "vision_feature_select_strategy": "default",
        "hidden_act": "gelu",
        "norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},
    }
    n_pos = (image // patch) ** 2 + 1  # patches + the class token
    vm = "vision_model."
    params = {
        vm + "class_embedding": _w(vh),
        vm + "positional_embedding_vlm": _w(n_pos, vh),
        vm + "patch_embedding.linear.weight": _w(vh, 3 * patch * patch),
        vm + "vision_adapter.mlp.fc1.weight": _w(proj, inter),
        vm + "vision_adapter.mlp.fc2.weight": _w(proj, proj),
        "multi_modal_projector.linear_1.weight": _w(h, proj),
    }
    for name in ("layernorm_pre", "layernorm_post"):
        params |= {vm + f"{name}.weight": ((vh,), "ones"), vm + f"{name}.bias": ((vh,), "zeros")}
    for i in range(n_layers):
        p = f"{vm}model.layers.{i}."
        for x in "qkvo":
            params |= {p + f"self_attn.{x}_proj.weight": _w(vh, vh)}
            params |= {p + f"self_attn.{x}_proj.bias": _w(vh)}
        params |= {
            p + "mlp.fc1.weight": _w(inter, vh),
            p + "mlp.fc1.bias": _w(inter),
            p + "mlp.fc2.weight": _w(vh, inter),
            p + "mlp.fc2.bias": _w(vh),
        }
        for name in ("input_layernorm", "post_attention_layernorm"):
            params |= {p + f"{name}.weight": ((vh,), "ones"), p + f"{name}.bias": ((vh,), "zeros")}
    return config, params


def build(ids, vocab_size, sizes):
    h = sizes.hidden_size or 64
    eos = [ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]]
    text_config, params = _text(h, sizes.num_layers or 4, vocab_size, ids, eos, sizes.experts or 4)
    vision_config, vision_params = _vision(h)
    config = {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": text_config,
        "vision_config": vision_config,
        "boi_token_index": ids["<|image_start|>"],
        "eoi_token_index": ids["<|image_end|>"],
        "image_token_index": ids["<|patch|>"],  # the model fills <|patch|> positions
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    generation = {
        "bos_token_id": text_config["bos_token_id"],
        "eos_token_id": eos,
        "pad_token_id": text_config["pad_token_id"],
        **{"do_sample": True, "temperature": 0.6, "top_p": 0.9},
    }
    files = {
        "generation_config.json": generation,
        "preprocessor_config.json": PREPROCESSOR,
        "processor_config.json": PROCESSOR,
    }
    return Checkpoint(config=config, params=params | vision_params, files=files)
