"""Tiny Gemma 3n checkpoint (`Gemma3nForConditionalGeneration`): text decoder, USM audio tower,
MobileNetV5 vision tower (timm names) and the two multimodal embedders.

Every decoder feature is on: AltUp (4 streams), LAuReL, per-layer embeddings, activation sparsity,
sliding + full attention, and KV sharing (the last half of the layers reuse the K/V of the last
unshared layer of their type, so they own no k/v weights).

Vocab layout as in the real model: text ids [0, T), 128 vision ids at T, 128 audio ids at T + 128;
V = T + 256 and `vocab_size_per_layer_input` = T, where T is `vocab_size` (the tokenizer, or
`--vocab-size`: 262144 gives the real 262,400). The tokenizer never produces the 256 multimodal
ids (the model uses V - 1 for audio padding). Our specials sit at ids 0..12, so the image/audio
soft and end tokens are text ids embedded by `embed_tokens` (the real ones sit inside the
multimodal ranges); the config's boi/eoi/image/boa/eoa/audio ids point at them, as the processor
inserts them.
"""

from __future__ import annotations

import re

import numpy as np

from ._common import Checkpoint, TokenizerSpec

SPECIALS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
    "<start_of_audio>",
    "<end_of_audio>",
    "<audio_soft_token>",
)

# Gemma 3 turns: system text (+ blank line) opens the first user turn, assistant -> model, images
# and audio become the soft tokens the processor expands.
CHAT_TEMPLATE = """{{- bos_token -}}
{%- set ns = namespace(prefix='') -%}
{%- set turns = messages -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set sys = messages[0]['content'] -%}
{%- if sys is not string -%}
{%- set sys = sys | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}
{%- endif -%}
{%- set ns.prefix = (sys | trim) + '\\n\\n' -%}
{%- set turns = messages[1:] -%}
{%- endif -%}
{%- for message in turns -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{- '<start_of_turn>' + role + '\\n' -}}
{%- if role == 'user' -%}{{- ns.prefix -}}{%- set ns.prefix = '' -%}{%- endif -%}
{%- if message['content'] is string -%}
{{- message['content'] | trim -}}
{%- elif message['content'] -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'text' -%}{{- part['text'] | trim -}}
{%- elif part['type'] == 'image' -%}{{- '<image_soft_token>' -}}
{%- elif part['type'] == 'audio' -%}{{- '<audio_soft_token>' -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<start_of_turn>model\\n' -}}
{%- endif -%}"""

# The attributes Gemma3nProcessor reads (tokenizer.image_token, .boi_token, ...), as in the real
# tokenizer_config.json.
MM_TOKENS = {
    "image_token": "<image_soft_token>",
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "audio_token": "<audio_soft_token>",
    "boa_token": "<start_of_audio>",
    "eoa_token": "<end_of_audio>",
}

TOKENIZER = TokenizerSpec(
    style="sentencepiece",
    special_tokens=SPECIALS,
    chat_template=CHAT_TEMPLATE,
    bos="<bos>",
    eos="<eos>",
    pad="<pad>",
    unk="<unk>",
    tokenizer_config={
        **MM_TOKENS,
        "mask_token": "<mask>",
        "processor_class": "Gemma3nProcessor",
        "spaces_between_special_tokens": False,
        "use_default_system_prompt": False,
    },
)

MM_VOCAB = 128  # hard-token ids per modality (rows of embed_vision / embed_audio), as real
IMAGE_TOKENS = 256  # 16 x 16 MSFA output per image, as real
AUDIO_TOKENS = 188  # fixed soft tokens per clip (30 s / 160 ms), as real
VISION_HIDDEN = 2048  # fixed: timm's MobileNetV5Encoder hard-codes the MSFA output channels


# mobilenetv5_300m_enc exactly as timm builds it (`_gen_mobilenet_v5`): stem, four stages of
# 3/5/37/39 blocks in timm's arch notation (er = edge residual, uir = universal inverted residual
# with start/mid depthwise kernels a/k, mqa = multi-query attention, v2 = K/V downsampled), then
# the fusion adapter (MSFA) to 2048 channels. Only the widths can shrink, through `model_args`:
# timm edits `block_args` in place, so a custom block list there breaks save_pretrained; the
# attention heads and key dims do not scale.
VISION_ARCH = (
    ["er_k3_s2_e4_c128"] + ["er_k3_s1_e4_c128"] * 2,
    ["uir_a3_k5_s2_e6_c256"] + ["uir_a5_k0_s1_e4_c256", "uir_a3_k0_s1_e4_c256"] * 2,
    ["uir_a5_k5_s2_e6_c640"] + ["uir_a5_k0_s1_e4_c640"] * 7 + ["uir_a0_k0_s1_e1_c640"]
    + ["mqa_k3_h12_v2_s1_d64_c640", "uir_a0_k0_s1_e2_c640"] * 14,
    ["uir_a5_k5_s2_e6_c1280"] + ["mqa_k3_h16_s1_d96_c1280", "uir_a0_k0_s1_e2_c1280"] * 19,
)  # fmt: skip
VISION_ARGS = {"channel_multiplier": 1 / 64, "stem_size": 8}  # stages of 8/8/16/24 channels

# Gemma 3n's RMSNorm is `x * w` (RmsNorm2d in timm too), so scales start at one; so does AltUp's
# `correct_output_scale` (zero in transformers' init, which would switch the per-layer input path
# off). The towers' residual branches start small: at one, ~80 random MobileNetV5 blocks (and the
# conformer's branches) bury the picture (the clip) under noise, and a tiny model then cannot tell
# a red picture from a blue one, which a trained tower can. The block that opens each MobileNetV5
# stage has no skip, so its scale stays one (at a tenth it is as small as each residual branch
# after it, which swamp it: red and blue soft tokens ended at cosine 0.99), and the vision
# branches start at 0.03 (at 0.1 the 37- and 39-block stages still blur the colours: a held-out
# colour quiz went 12/20 after 60 steps, 20/20 at 0.03). Everything else, biases included, is
# random.
_ONES = re.compile(r"(norm|bn\d?)\.weight$|correct_output_scale$")
_TENTH = re.compile(r"audio_tower\..*(post_layer_norm|attention\.post_norm)\.weight$")
_VISION_BRANCH = re.compile(r"timm_model\..*layer_scale\.gamma$")
_STAGE_OPENER = re.compile(r"timm_model\.blocks\.\d+\.0\.layer_scale\.gamma$")
_SMALL = re.compile(r"audio_tower\..*lconv1d\.linear_end\.weight$")


def _init(name: str) -> str:
    if _STAGE_OPENER.search(name):
        return "ones"
    if _VISION_BRANCH.search(name):
        return "const:0.03"
    if _TENTH.search(name):
        return "const:0.1"
    if _SMALL.search(name):
        return "normal:0.1"
    return "ones" if _ONES.search(name) else "normal"


def _divisible(v, divisor=8):
    """timm's make_divisible: nearest multiple of 8, at least 8, never below 90% of v."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _conv_norm(p, c_out, c_in, k, depthwise=False):
    return {p + "conv.weight": (c_out, 1 if depthwise else c_in, k, k), p + "bn.weight": (c_out,)}


def _vision(p):
    """timm MobileNetV5Encoder names and shapes under `p`."""
    stem, mult = VISION_ARGS["stem_size"], VISION_ARGS["channel_multiplier"]
    shapes = {p + "conv_stem.conv.bias": (stem,), **_conv_norm(p + "conv_stem.", stem, 3, 3)}
    c_in, stage_out = stem, []
    for s, stage in enumerate(VISION_ARCH):
        for i, code in enumerate(stage):
            kind, *opts = code.split("_")
            o = {x[0]: float(x[1:]) if x[0] == "e" else int(x[1:]) for x in opts}
            b, c = f"{p}blocks.{s}.{i}.", _divisible(o["c"] * mult)
            mid = _divisible(c_in * o.get("e", 1.0))
            if kind == "er":
                shapes[b + "conv_exp.weight"] = (mid, c_in, o["k"], o["k"])
                shapes |= {b + "bn1.weight": (mid,), b + "conv_pwl.weight": (c, mid, 1, 1)}
                shapes[b + "bn2.weight"] = (c,)
            elif kind == "uir":
                if o["a"]:
                    shapes |= _conv_norm(b + "dw_start.", c_in, c_in, o["a"], depthwise=True)
                shapes |= _conv_norm(b + "pw_exp.", mid, c_in, 1)
                if o["k"]:
                    shapes |= _conv_norm(b + "dw_mid.", mid, mid, o["k"], depthwise=True)
                shapes |= _conv_norm(b + "pw_proj.", c, mid, 1)
            else:  # mqa: h query heads, one K/V head of dim d, optional K/V downsampling
                a, hd = b + "attn.", o["h"] * o["d"]
                shapes |= {b + "norm.weight": (c_in,), a + "query.proj.weight": (hd, c_in, 1, 1)}
                shapes |= {a + f"{kv}.proj.weight": (o["d"], c_in, 1, 1) for kv in ("key", "value")}
                shapes[a + "output.proj.weight"] = (c, hd, 1, 1)
                for kv in ("key", "value") if o.get("v", 1) > 1 else ():
                    shapes[a + f"{kv}.down_conv.weight"] = (c_in, 1, o["k"], o["k"])
                    shapes[a + f"{kv}.norm.weight"] = (c_in,)
            if kind != "er":
                shapes[b + "layer_scale.gamma"] = (c,)
            c_in = c
        stage_out.append(c_in)
    # The MSFA fuses the last two stages into VISION_HIDDEN channels on a 16 x 16 grid.
    msfa_in = sum(stage_out[-2:])
    msfa_mid = _divisible(msfa_in * 2.0)
    shapes |= _conv_norm(p + "msfa.ffn.pw_exp.", msfa_mid, msfa_in, 1)
    shapes |= _conv_norm(p + "msfa.ffn.pw_proj.", VISION_HIDDEN, msfa_mid, 1)
    return shapes | {p + "msfa.norm.weight": (VISION_HIDDEN,)}


def _audio(p, cfg):
    """USM conformer (Gemma3nAudioEncoder) names and shapes under `p`."""
    h, k = cfg["hidden_size"], cfg["conf_conv_kernel_size"]
    (c0, c1), f = cfg["sscp_conv_channel_size"], cfg["input_feat_size"]
    for _ in range(2):  # two kernel-3 stride-2 convs over the mel axis, padded (1, 1)
        f = (f + 2 - 3) // 2 + 1
    s = p + "subsample_conv_projection."
    shapes = {s + "conv_0.conv.weight": (c0, 1, 3, 3), s + "conv_0.norm.weight": (c0,)}
    shapes |= {s + "conv_1.conv.weight": (c1, c0, 3, 3), s + "conv_1.norm.weight": (c1,)}
    shapes[s + "input_proj_linear.weight"] = (h, c1 * f)
    for i in range(cfg["conf_num_hidden_layers"]):
        b = f"{p}conformer.{i}."
        for ffw in ("ffw_layer_start.", "ffw_layer_end."):
            shapes[b + ffw + "ffw_layer_1.weight"] = (4 * h, h)
            shapes[b + ffw + "ffw_layer_2.weight"] = (h, 4 * h)
            shapes |= {b + ffw + f"{n}_layer_norm.weight": (h,) for n in ("pre", "post")}
        a = b + "attention."
        shapes |= {a + n: (h,) for n in ("pre_attn_norm.weight", "post_norm.weight")}
        shapes |= {a + f"attn.{x}_proj.weight": (h, h) for x in "qkv"}
        shapes[a + "attn.relative_position_embedding.pos_proj.weight"] = (h, h)
        shapes[a + "attn.per_dim_scale"] = (h // cfg["conf_num_attention_heads"],)  # softplus'd
        shapes[a + "post.weight"] = (h, h)
        c = b + "lconv1d."
        shapes |= {c + "linear_start.weight": (2 * h, h), c + "linear_end.weight": (h, h)}
        shapes[c + "depthwise_conv1d.weight"] = (h, 1, k)
        shapes |= {c + n: (h,) for n in ("pre_layer_norm.weight", "conv_norm.weight")}
        shapes[b + "norm.weight"] = (h,)
    return shapes


def _embedder(p, mm_hidden, h):
    """Gemma3nMultimodalEmbedder (its post-projection norm has no weight)."""
    shapes = {p + "embedding.weight": (MM_VOCAB, mm_hidden)}
    shapes[p + "embedding_projection.weight"] = (h, mm_hidden)
    return shapes | {p + f"{x}_embedding_norm.weight": (mm_hidden,) for x in ("hard", "soft")}


def _text(p, cfg):
    h, n, ple = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["hidden_size_per_layer_input"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    inter, alt, rank = cfg["intermediate_size"], cfg["altup_num_inputs"], cfg["laurel_rank"]
    shapes = {p + "embed_tokens.weight": (cfg["vocab_size"], h), p + "norm.weight": (h,)}
    shapes[p + "embed_tokens_per_layer.weight"] = (cfg["vocab_size_per_layer_input"], n * ple)
    shapes[p + "per_layer_model_projection.weight"] = (n * ple, h)
    shapes[p + "per_layer_projection_norm.weight"] = (ple,)
    for i in range(alt - 1):
        shapes |= {p + f"altup_{x}projections.{i}.weight": (h, h) for x in ("", "unembed_")}
    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
             "post_feedforward_layernorm", "post_per_layer_input_norm", "altup.router_norm",
             "laurel.post_laurel_norm")  # fmt: skip
    for i in range(n):
        b, a = f"{p}layers.{i}.", f"{p}layers.{i}.self_attn."
        shapes |= {b + f"{x}.weight": (h,) for x in norms}
        shapes |= {a + "q_proj.weight": (q, h), a + "q_norm.weight": (hd,)}
        shapes[a + "o_proj.weight"] = (h, q)
        if i < n - cfg["num_kv_shared_layers"]:  # KV-shared layers own no K/V weights
            shapes |= {a + "k_proj.weight": (kv, h), a + "v_proj.weight": (kv, h)}
            shapes[a + "k_norm.weight"] = (hd,)  # v_norm has no weight
        shapes |= {b + f"mlp.{x}_proj.weight": (inter, h) for x in ("gate", "up")}
        shapes[b + "mlp.down_proj.weight"] = (h, inter)
        shapes[b + "altup.correct_output_scale"] = (h,)
        shapes[b + "altup.modality_router.weight"] = (alt, h)
        shapes[b + "altup.correction_coefs.weight"] = (alt, alt)
        shapes[b + "altup.prediction_coefs.weight"] = (alt * alt, alt)
        shapes[b + "laurel.linear_left.weight"] = (rank, h)
        shapes[b + "laurel.linear_right.weight"] = (h, rank)
        shapes[b + "per_layer_input_gate.weight"] = (ple, h)
        shapes[b + "per_layer_projection.weight"] = (h, ple)
    return shapes


def build(ids, vocab_size, sizes):
    h = sizes.hidden_size or 64
    n_layers = sizes.num_layers or 4
    heads, kv_heads = 4, 2
    if h % (2 * heads):
        raise ValueError(f"hidden_size {h} must be a multiple of {2 * heads}")
    text_vocab = vocab_size  # T: tokenizer ids (+ padding); multimodal ids follow
    # Sliding/full alternate; the last half of the layers (when at least one of each type stays
    # unshared) reuse the K/V of the last unshared layer of their type.
    layer_types = ["full_attention" if i % 2 else "sliding_attention" for i in range(n_layers)]
    n_shared = n_layers // 2 if n_layers >= 3 else 0
    eos = [ids["<eos>"], ids["<end_of_turn>"]]
    text = {
        "model_type": "gemma3n_text", "vocab_size": text_vocab + 2 * MM_VOCAB,
        "vocab_size_per_layer_input": text_vocab, "hidden_size_per_layer_input": 16,
        "hidden_size": h, "intermediate_size": 2 * h, "num_hidden_layers": n_layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": h // heads,
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768, "attention_bias": False, "attention_dropout": 0.0,
        "layer_types": layer_types, "sliding_window": sizes.sliding_window or 32,
        # The released config.json's legacy keys (mlx-lm reads these; transformers converts them).
        "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
        "num_kv_shared_layers": n_shared, "laurel_rank": 8, "final_logit_softcapping": 30.0,
        "altup_num_inputs": 4, "altup_active_idx": 0, "altup_coef_clip": 120.0,
        "altup_correct_scale": True,
        "activation_sparsity_pattern": [0.95 if i < max(1, n_layers // 2) else 0.0 for i in range(n_layers)],
        "tie_word_embeddings": True, "bos_token_id": ids["<bos>"], "eos_token_id": eos,
        "pad_token_id": ids["<pad>"],
    }  # fmt: skip
    audio = {
        "model_type": "gemma3n_audio", "vocab_size": MM_VOCAB, "vocab_offset": text_vocab + MM_VOCAB,
        "input_feat_size": 128, "hidden_size": 32, "rms_norm_eps": 1e-6,
        "gradient_clipping": 10_000_000_000.0, "conf_num_hidden_layers": 2,
        "conf_num_attention_heads": 2, "conf_attention_chunk_size": 12,
        "conf_attention_context_left": 13, "conf_attention_context_right": 0,
        "conf_attention_logit_cap": 50.0, "conf_conv_kernel_size": 5, "conf_reduction_factor": 4,
        "conf_residual_weight": 0.5, "sscp_conv_channel_size": [16, 8],
        "sscp_conv_group_norm_eps": 1e-3, "sscp_conv_kernel_size": [[3, 3], [3, 3]],
        "sscp_conv_stride_size": [[2, 2], [2, 2]],
    }  # fmt: skip
    vision = {
        "model_type": "gemma3n_vision", "architecture": "mobilenetv5_300m_enc",
        "model_args": dict(VISION_ARGS), "do_pooling": False, "hidden_size": VISION_HIDDEN,
        "vocab_size": MM_VOCAB, "vocab_offset": text_vocab, "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
        "num_classes": 2, "label_names": ["LABEL_0", "LABEL_1"],  # so the config loads without timm
    }  # fmt: skip
    config = {
        "architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n",
        "text_config": text, "audio_config": audio, "vision_config": vision,
        "audio_soft_tokens_per_image": AUDIO_TOKENS, "vision_soft_tokens_per_image": IMAGE_TOKENS,
        "boi_token_id": ids["<start_of_image>"], "eoi_token_id": ids["<end_of_image>"],
        "image_token_id": ids["<image_soft_token>"], "boa_token_id": ids["<start_of_audio>"],
        "eoa_token_id": ids["<end_of_audio>"], "audio_token_id": ids["<audio_soft_token>"],
        "initializer_range": 0.02, "tie_word_embeddings": True,  # no lm_head.weight, as real
        "torch_dtype": "float32",
    }  # fmt: skip
    shapes = _text("model.language_model.", text) | _audio("model.audio_tower.", audio)
    shapes |= _vision("model.vision_tower.timm_model.")
    shapes |= _embedder("model.embed_audio.", audio["hidden_size"], h)
    shapes |= _embedder("model.embed_vision.", VISION_HIDDEN, h)
    params = {k: (v, _init(k)) for k, v in shapes.items()}
    generation = {"bos_token_id": ids["<bos>"], "eos_token_id": eos, "pad_token_id": ids["<pad>"]}
    side = sizes.image_size or 768
    if side % 32 or side < 256:
        raise ValueError(f"image_size {side} must be a multiple of 32, at least 256")
    files = {
        "generation_config.json": generation,
        "preprocessor_config.json": {**PREPROCESSOR, "size": {"height": side, "width": side}},
        "processor_config.json": {
            "processor_class": "Gemma3nProcessor",
            "audio_seq_length": AUDIO_TOKENS,
            "image_seq_length": IMAGE_TOKENS,
        },
    }
    return Checkpoint(config=config, params=params, files=files, shape=_shape_audio_front)


def _shape_audio_front(tensors: dict[str, np.ndarray]) -> None:
    """Give the random USM front end two properties a trained one has, so a tiny model can hear
    a pitch: loudness does not move it (the first conv's kernels sum to zero per output channel,
    so a constant log-mel offset cancels), and nearby frequencies map to nearby codes (the input
    projection is smoothed over the frequency axis, sigma 2 bins, then centred over it). Drawn iid
    it maps 3.2 and 3.5 kHz tones about as far apart as 3.2 kHz and 200 Hz ones: on the demo's
    tones the clip means after the embedder lay 3.5 apart between pitches and 5.5 within one;
    shaped, 4.3 and 3.7."""
    p = "model.audio_tower.subsample_conv_projection."
    k = tensors[p + "conv_0.conv.weight"]
    tensors[p + "conv_0.conv.weight"] = k - k.mean(axis=(1, 2, 3), keepdims=True)
    w = tensors[p + "input_proj_linear.weight"]  # [h, F * C], frequency-major
    c = tensors[p + "conv_1.conv.weight"].shape[0]
    x = w.reshape(w.shape[0], -1, c)
    f = np.arange(x.shape[1])
    blur = np.exp(-0.5 * ((f[:, None] - f[None]) / 2.0) ** 2)
    y = np.einsum("fg,hgc->hfc", blur, x)
    y -= y.mean(axis=1, keepdims=True)
    y *= w.std() / y.std()
    tensors[p + "input_proj_linear.weight"] = y.reshape(w.shape).astype(w.dtype)


# One file for both processors, as the real folder has: SigLIP-style 768x768 bilinear resize,
# rescale 1/255, no normalisation; USM log-mel at 16 kHz (32 ms frames, 10 ms hop, FFT 1024).
PREPROCESSOR = {
    "processor_class": "Gemma3nProcessor", "image_processor_type": "SiglipImageProcessorFast",
    "do_resize": True, "size": {"height": 768, "width": 768}, "resample": 2,
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": False,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": None,
    "image_seq_length": IMAGE_TOKENS,
    "feature_extractor_type": "Gemma3nAudioFeatureExtractor", "feature_size": 128,
    "sampling_rate": 16000, "padding_value": 0.0, "padding_side": "right",
    "return_attention_mask": True, "frame_length": 512, "hop_length": 160, "fft_length": 1024,
    "fft_overdrive": True, "min_frequency": 125.0, "max_frequency": 7600.0,
    "preemphasis": 0.97, "preemphasis_htk_flavor": True, "dither": 0.0, "input_scale_factor": 1.0,
    "mel_floor": 1e-5, "per_bin_mean": None, "per_bin_stddev": None,
}  # fmt: skip
