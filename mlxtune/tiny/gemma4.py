"""Tiny Gemma 4 E2B-style checkpoint (`Gemma4ForConditionalGeneration`): text, vision and audio.

google/gemma-4-E2B-it scaled down: per-layer embeddings (PLE), a KV-shared tail of double-wide MLP
layers, sliding/full layers (full ones with wider heads), a ViT vision tower pooling 3x3 patches of
16 px and a conformer audio tower. Tensor names are those `save_pretrained` writes: transformers has
no conversion mapping for `gemma4`, and Gemma4RMSNorm scales by `w` (not `1 + w`), so norms are ones.
"""

from __future__ import annotations

from ._common import Checkpoint, TokenizerSpec

SPECIALS = (
    *("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"),
    *("<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>"),
    *("<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>"),
    *('<|"|>', "<|image>", "<image|>", "<|image|>"),
    *("<|audio>", "<audio|>", "<|audio|>", "<|video|>"),
)

# The named tokens of the real tokenizer_config (Gemma4Processor reads image/boi/eoi/audio/boa/eoa).
NAMED_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "escape_token": '<|"|>',
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
}

# Gemma 4 turns (E2B/E4B flavour: no empty thought block in the generation prompt). A system turn
# opens when there is a system/developer message, thinking or tools. A tool call keeps the model
# turn open: the tool's response follows inline and the model's answer continues the same turn.
CHAT_TEMPLATE = """{%- macro render(content) -%}
{%- if content is string -%}{{- content | trim -}}
{%- else -%}{%- for part in content or [] -%}
{%- if part['type'] == 'text' -%}{{- part['text'] | trim -}}
{%- elif part['type'] in ['image', 'audio', 'video'] -%}{{- '<|' + part['type'] + '|>' -}}
{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set ns = namespace(start=0, call='') -%}
{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- set has_system = messages and messages[0]['role'] in ['system', 'developer'] -%}
{%- if has_system or thinking or tools -%}
{{- '<|turn>system\\n' -}}
{%- if thinking -%}{{- '<|think|>' -}}{%- endif -%}
{%- if has_system -%}{%- set ns.start = 1 -%}{{- render(messages[0]['content']) -}}{%- endif -%}
{%- for tool in tools or [] -%}
{%- set fn = tool['function'] if tool['function'] is defined else tool -%}
{%- set decl = {'description': fn.get('description', ''), 'parameters': fn.get('parameters', {})} -%}
{{- '<|tool>declaration:' + fn['name'] + (decl | tojson) + '<tool|>' -}}
{%- endfor -%}
{{- '<turn|>\\n' -}}
{%- endif -%}
{%- for message in messages[ns.start:] -%}
{%- set prev = loop.previtem['role'] if not loop.first else '' -%}
{%- set next = loop.nextitem['role'] if not loop.last else '' -%}
{%- if message['role'] == 'tool' -%}
{%- set content = message['content'] -%}
{%- if content is not string -%}{%- set content = content | tojson -%}{%- endif -%}
{%- if not content.startswith('{') -%}{%- set content = '{' + content + '}' -%}{%- endif -%}
{{- '<|tool_response>response:' + (message.get('name') or ns.call) + content + '<tool_response|>' -}}
{%- if next not in ['', 'tool', 'assistant'] -%}{{- '<turn|>\\n' -}}{%- endif -%}
{%- else -%}
{%- if not (message['role'] == 'assistant' and prev == 'tool') -%}
{{- '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' -}}
{%- endif -%}
{{- render(message['content']) -}}
{%- for call in message.get('tool_calls') or [] -%}
{%- set fn = call['function'] if call['function'] is defined else call -%}
{%- set ns.call = fn['name'] -%}
{%- set args = fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson -%}
{{- '<|tool_call>call:' + fn['name'] + args + '<tool_call|>' -}}
{%- endfor -%}
{%- if next != 'tool' -%}{{- '<turn|>\\n' -}}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and (not messages or messages[-1]['role'] != 'tool') -%}
{{- '<|turn>model\\n' -}}
{%- endif -%}"""

TOKENIZER = TokenizerSpec(
    style="sentencepiece",
    special_tokens=SPECIALS,
    chat_template=CHAT_TEMPLATE,
    bos="<bos>",
    eos="<eos>",
    pad="<pad>",
    unk="<unk>",
    add_bos=False,  # as the real tokenizer: the chat template writes <bos>
    tokenizer_config={
        "tokenizer_class": "GemmaTokenizer",
        "mask_token": "<mask>",
        "padding_side": "left",
        **NAMED_TOKENS,  # flat keys, as tokenizer.save_pretrained writes them
    },
)

# Fields the image and video processors share: pixels only rescaled to [0, 1], 16 px patches
# pooled 3x3 into one soft token, aspect-ratio-preserving bicubic (3) resize.
_PIXELS = {
    "do_convert_rgb": True,
    "do_resize": True,
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "image_mean": [0.0, 0.0, 0.0],
    "image_std": [1.0, 1.0, 1.0],
    "patch_size": 16,
    "pooling_kernel_size": 3,
}

# The real processor_config.json (one nested file, as Gemma4Processor.save_pretrained writes it).
PROCESSOR = {
    "processor_class": "Gemma4Processor",
    "image_seq_length": 280,
    "audio_seq_length": 750,
    "audio_ms_per_token": 40,
    "image_processor": {
        "image_processor_type": "Gemma4ImageProcessor",
        **_PIXELS,
        "do_normalize": False,
        "image_seq_length": 280,
        "max_soft_tokens": 280,
    },
    "video_processor": {
        "video_processor_type": "Gemma4VideoProcessor",
        **_PIXELS,
        "do_normalize": True,  # a no-op with mean 0 / std 1, as in the released file
        "do_sample_frames": True,
        "num_frames": 32,
        "return_metadata": False,
        "max_soft_tokens": 70,
    },
    "feature_extractor": {
        "feature_extractor_type": "Gemma4AudioFeatureExtractor",
        "feature_size": 128,
        "sampling_rate": 16000,
        "padding_value": 0.0,
        "padding_side": "right",
        "return_attention_mask": True,
        "frame_length": 320,
        "hop_length": 160,
        "fft_length": 512,
        "fft_overdrive": False,
        "min_frequency": 0.0,
        "max_frequency": 8000.0,
        "mel_floor": 0.001,
        "preemphasis": 0.0,
        "preemphasis_htk_flavor": True,
        "dither": 0.0,
        "input_scale_factor": 1.0,
        "per_bin_mean": None,
        "per_bin_stddev": None,
    },
}


# Sandwich norms around attention and MLP, in the text decoder and the vision encoder alike.
_SANDWICH = [
    f"{s}_layernorm" for s in ("input", "post_attention", "pre_feedforward", "post_feedforward")
]


def _w(*shape):
    return shape, "normal"


CLIP = 8.0  # the bounds of every clipped linear: normalised activations rarely reach them


def _with_clip_bounds(params: dict) -> dict:
    """Each `<name>.linear.weight` of a tower gets its four scalar bounds, as E2B has them."""
    out = dict(params)
    for key in params:
        if key.endswith(".linear.weight"):
            base = key.removesuffix("linear.weight")
            for side in ("input", "output"):
                out[f"{base}{side}_min"] = ((), f"const:{-CLIP}")
                out[f"{base}{side}_max"] = ((), f"const:{CLIP}")
    return out


def _ones(prefix, names, dim):
    """Gemma4RMSNorm computes x * w (no `1 +`), so an identity norm is all ones."""
    return {f"{prefix}{n}.weight": ((dim,), "ones") for n in names}


def _text(h, n_layers, vocab_size, ids, eos, sizes):
    heads, kv_heads = sizes.heads or 4, sizes.kv_heads or 1  # E2B: 8 query heads over 1 KV head
    head_dim = sizes.head_dim or h // heads
    global_head_dim = 2 * head_dim  # full-attention layers use wider heads (E2B: 256 -> 512)
    inter = sizes.intermediate or 2 * h
    ple = max(h // 4, 4)  # per-layer-input width (E2B: 256 for hidden 1536)
    # Alternate sliding/full (E2B: 4 sliding + 1 full) so even 4 layers hold both kinds; the last
    # layer must be full. The back half reuses K/V: the front half then still holds both kinds.
    layer_types = ["full_attention" if i % 2 else "sliding_attention" for i in range(n_layers)]
    layer_types[-1] = "full_attention"
    n_shared = n_layers // 2 if n_layers >= 4 else 0
    config = {
        "model_type": "gemma4_text",
        "vocab_size": vocab_size,
        "vocab_size_per_layer_input": vocab_size,
        "hidden_size": h,
        "hidden_size_per_layer_input": ple,
        "intermediate_size": inter,
        "num_hidden_layers": n_layers,
        "layer_types": layer_types,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_global_key_value_heads": None,
        "head_dim": head_dim,
        "global_head_dim": global_head_dim,
        "attention_k_eq_v": False,
        "num_kv_shared_layers": n_shared,
        "use_double_wide_mlp": True,
        "enable_moe_block": False,
        "use_bidirectional_attention": None,
        "sliding_window": 512,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": 0.25,
                "rope_theta": 1_000_000.0,
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        "attention_bias": False,
        "tie_word_embeddings": True,
        "pad_token_id": ids["<pad>"],
        "bos_token_id": ids["<bos>"],
        "eos_token_id": eos,
    }
    lm = "model.language_model."
    params = {
        lm + "embed_tokens.weight": _w(vocab_size, h),
        lm + "embed_tokens_per_layer.weight": _w(vocab_size, n_layers * ple),
        lm + "per_layer_model_projection.weight": _w(n_layers * ple, h),
        **_ones(lm, ["norm"], h),
        **_ones(lm, ["per_layer_projection_norm"], ple),
    }
    for i, kind in enumerate(layer_types):
        p = f"{lm}layers.{i}."
        hd = global_head_dim if kind == "full_attention" else head_dim
        shared = i >= n_layers - n_shared  # reuses an earlier layer's K/V: no k/v weights
        wide = 2 * inter if shared else inter  # use_double_wide_mlp widens the shared layers
        params |= {
            p + "self_attn.q_proj.weight": _w(heads * hd, h),
            p + "self_attn.o_proj.weight": _w(h, heads * hd),
            p + "mlp.gate_proj.weight": _w(wide, h),
            p + "mlp.up_proj.weight": _w(wide, h),
            p + "mlp.down_proj.weight": _w(h, wide),
            p + "per_layer_input_gate.weight": _w(ple, h),
            p + "per_layer_projection.weight": _w(h, ple),
            p + "layer_scalar": ((1,), "ones"),
            **_ones(p, [*_SANDWICH, "post_per_layer_input_norm"], h),
            **_ones(p, ["self_attn.q_norm"] + ([] if shared else ["self_attn.k_norm"]), hd),
        }
        if not shared:
            params[p + "self_attn.k_proj.weight"] = _w(kv_heads * hd, h)
            params[p + "self_attn.v_proj.weight"] = _w(kv_heads * hd, h)
    return config, params


def _vision(h, vh=32, n_layers=2):
    heads, patch = 2, 16
    hd = vh // heads
    config = {
        "model_type": "gemma4_vision",
        "hidden_size": vh,
        "intermediate_size": 2 * vh,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hd,
        "global_head_dim": hd,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "axial", "rope_theta": 100.0},
        "patch_size": patch,  # must match the image processor, as pooling_kernel_size must
        "pooling_kernel_size": 3,
        "position_embedding_size": 10240,  # covers any patch grid the processor can emit
        "default_output_length": 280,
        "use_clipped_linears": True,  # as E2B: each linear clamps its input and output
        "standardize": False,
    }
    vt = "model.vision_tower."
    params = {
        vt + "patch_embedder.input_proj.weight": _w(vh, 3 * patch * patch),
        vt + "patch_embedder.position_embedding_table": _w(2, 10240, vh),
        "model.embed_vision.embedding_projection.weight": _w(h, vh),
    }
    for i in range(n_layers):
        p = f"{vt}encoder.layers.{i}."
        params |= {p + f"self_attn.{x}_proj.linear.weight": _w(heads * hd, vh) for x in "qkv"}
        params |= {
            p + "self_attn.o_proj.linear.weight": _w(vh, heads * hd),
            p + "mlp.gate_proj.linear.weight": _w(2 * vh, vh),
            p + "mlp.up_proj.linear.weight": _w(2 * vh, vh),
            p + "mlp.down_proj.linear.weight": _w(vh, 2 * vh),
            **_ones(p, ["self_attn.q_norm", "self_attn.k_norm"], hd),
            **_ones(p, _SANDWICH, vh),
        }
    return config, params


def _audio(h, ah=32, n_layers=2):
    heads, kernel = 2, 5
    # The first subsampling conv must keep 128 channels: the projection's input width is
    # (channels[0] // 4) * channels[1], which only matches (128 mel bins / 4) * channels[1].
    c0, c1 = 128, 8
    config = {
        "model_type": "gemma4_audio",
        "hidden_size": ah,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "hidden_act": "silu",
        "subsampling_conv_channels": [c0, c1],
        "conv_kernel_size": kernel,
        "residual_weight": 0.5,
        "attention_chunk_size": 12,
        "attention_context_left": 13,
        "attention_context_right": 0,
        "attention_logit_cap": 50.0,
        "attention_invalid_logits_value": -1.0e9,
        "use_clipped_linears": True,
        "gradient_clipping": 1.0e10,
        "rms_norm_eps": 1e-6,
        "output_proj_dims": h,  # E2B projects the audio tower to the text width (1536)
    }
    at = "model.audio_tower."
    sub = at + "subsample_conv_projection."
    params = {
        sub + "layer0.conv.weight": _w(c0, 1, 3, 3),
        sub + "layer1.conv.weight": _w(c1, c0, 3, 3),
        **_ones(sub, ["layer0.norm"], c0),
        **_ones(sub, ["layer1.norm"], c1),
        sub + "input_proj_linear.weight": _w(ah, (c0 // 4) * c1),
        at + "output_proj.weight": _w(h, ah),
        at + "output_proj.bias": ((h,), "zeros"),
        "model.embed_audio.embedding_projection.weight": _w(h, h),
    }
    for i in range(n_layers):
        p = f"{at}layers.{i}."
        for ff in ("feed_forward1.", "feed_forward2."):
            params[p + ff + "ffw_layer_1.linear.weight"] = _w(4 * ah, ah)
            params[p + ff + "ffw_layer_2.linear.weight"] = _w(ah, 4 * ah)
            params |= _ones(p + ff, ["pre_layer_norm", "post_layer_norm"], ah)
        for x in ("q_proj", "k_proj", "v_proj", "post"):
            params[p + f"self_attn.{x}.linear.weight"] = _w(ah, ah)
        params |= {
            p + "self_attn.relative_k_proj.weight": _w(ah, ah),
            # softplus(0) scales queries by ln 2, as transformers initialises it
            p + "self_attn.per_dim_scale": ((ah // heads,), "zeros"),
            p + "lconv1d.linear_start.linear.weight": _w(2 * ah, ah),
            p + "lconv1d.linear_end.linear.weight": _w(ah, ah),
            p + "lconv1d.depthwise_conv1d.weight": _w(ah, 1, kernel),
            **_ones(p + "lconv1d.", ["pre_layer_norm", "conv_norm"], ah),
            **_ones(p, ["norm_pre_attn", "norm_post_attn", "norm_out"], ah),
        }
    return config, params


def build(ids, vocab_size, sizes):
    h = sizes.hidden_size or 64
    eos = [ids["<eos>"], ids["<turn|>"], ids["<|tool_response>"]]
    text_config, params = _text(h, sizes.num_layers or 4, vocab_size, ids, eos, sizes)
    towers = {"n_layers": sizes.tower_layers or 2}
    vision_config, vision_params = _vision(h, sizes.tower_hidden or 32, **towers)
    audio_config, audio_params = _audio(h, sizes.tower_hidden or 32, **towers)
    vision_params, audio_params = _with_clip_bounds(vision_params), _with_clip_bounds(audio_params)
    config = {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": text_config,
        "vision_config": vision_config,
        "audio_config": audio_config,
        "vocab_size": vocab_size,  # mlx-lm reads it here (its default is 262144), not text_config
        "image_token_id": ids["<|image|>"],
        "boi_token_id": ids["<|image>"],
        "eoi_token_id": ids["<image|>"],
        "video_token_id": ids["<|video|>"],
        "audio_token_id": ids["<|audio|>"],
        "boa_token_id": ids["<|audio>"],
        "eoa_token_id": ids["<audio|>"],
        "eoa_token_index": ids["<audio|>"],  # the name Gemma4Config declares
        "vision_soft_tokens_per_image": 280,
        "bos_token_id": ids["<bos>"],
        "pad_token_id": ids["<pad>"],
        "eos_token_id": eos,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,  # lm_head is embed_tokens: not written
        "dtype": "float32",
    }
    generation = {
        "bos_token_id": ids["<bos>"],
        "pad_token_id": ids["<pad>"],
        "eos_token_id": eos,
        **{"do_sample": True, "temperature": 1.0, "top_k": 64, "top_p": 0.95},  # Gemma 4's
    }
    files = {"generation_config.json": generation, "processor_config.json": PROCESSOR}
    return Checkpoint(config=config, params=params | vision_params | audio_params, files=files)
