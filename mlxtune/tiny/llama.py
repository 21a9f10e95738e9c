"""Tiny Llama 3-style checkpoint (`LlamaForCausalLM`): the plain text family."""

from __future__ import annotations

from ._common import Checkpoint, TokenizerSpec

SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    "<|finetune_right_pad_id|>",
)

# Llama 3's turn format: header, blank line, content, <|eot_id|>; tool calls as JSON.
CHAT_TEMPLATE = """{{- bos_token -}}
{%- for message in messages -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}
{%- if message['content'] is string -%}
{{- message['content'] | trim -}}
{%- elif message['content'] -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'text' -%}{{- part['text'] | trim -}}{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- for call in message.get('tool_calls') or [] -%}
{%- set fn = call['function'] if call['function'] is defined else call -%}
{{- '{"name": "' + fn['name'] + '", "parameters": ' + (fn['arguments'] | tojson) + '}' -}}
{%- endfor -%}
{{- '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{%- endif -%}"""

TOKENIZER = TokenizerSpec(
    style="bytelevel",
    special_tokens=SPECIALS,
    chat_template=CHAT_TEMPLATE,
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    pad="<|finetune_right_pad_id|>",
)


def build(ids, vocab_size, sizes):
    h = sizes.hidden_size or 64
    n_layers = sizes.num_layers or 2
    heads, kv_heads = sizes.heads or 4, sizes.kv_heads or 2
    head_dim = sizes.head_dim or h // heads
    inter = sizes.intermediate or 2 * h
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": vocab_size,
        "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"], ids["<|eom_id|>"]],
        "pad_token_id": ids["<|finetune_right_pad_id|>"],
        "torch_dtype": "float32",
    }
    params = {
        "model.embed_tokens.weight": ((vocab_size, h), "normal"),
        "model.norm.weight": ((h,), "ones"),
        "lm_head.weight": ((vocab_size, h), "normal"),
    }
    for i in range(n_layers):
        p = f"model.layers.{i}."
        params |= {
            p + "input_layernorm.weight": ((h,), "ones"),
            p + "post_attention_layernorm.weight": ((h,), "ones"),
            p + "self_attn.q_proj.weight": ((heads * head_dim, h), "normal"),
            p + "self_attn.k_proj.weight": ((kv_heads * head_dim, h), "normal"),
            p + "self_attn.v_proj.weight": ((kv_heads * head_dim, h), "normal"),
            p + "self_attn.o_proj.weight": ((h, heads * head_dim), "normal"),
            p + "mlp.gate_proj.weight": ((inter, h), "normal"),
            p + "mlp.up_proj.weight": ((inter, h), "normal"),
            p + "mlp.down_proj.weight": ((h, inter), "normal"),
        }
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    return Checkpoint(config=config, params=params, files={"generation_config.json": generation})
