"""A merged Hugging Face folder as one GGUF file for llama.cpp, Ollama and LM Studio, written
with the `gguf` package that llama.cpp's authors publish; and a `Modelfile` for Ollama.

Supported: the llama architecture as llama.cpp names it (Llama 2/3, SmolLM, Mistral-style
checkpoints whose config.json says `model_type: llama` or `mistral` without sliding windows)
with a byte-level BPE tokenizer (tokenizer.json). Other families are refused in one line.

What the file holds, following llama.cpp's `convert_hf_to_gguf.py` for LlamaModel:
- tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q`, ..., `output_norm`,
  `output` unless the embedding is tied), q and k rows permuted into llama.cpp's rotary
  layout (interleaved pairs per head);
- `--quant f32`: every tensor in float32; `f16`: 2-D weights in float16, the norms in float32; `q8_0`: 2-D weights in Q8_0
  (blocks of 32, one float16 scale), norms float32; `q4_k_m`: llama.cpp's mix, Q4_K for most
  2-D weights and Q6_K for the output head and for attn_v and ffn_down in some blocks (see
  `_q4_k_m`); rows whose length is not a multiple of 256 fall back to Q5_0 and Q8_0 as
  llama-quantize's do;
- the hyperparameters llama.cpp reads (`llama.*`), the tokenizer (tokens, types, merges,
  bos/eos/pad ids, the pre-tokenizer's name) and the chat template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .errors import ModelError

QUANTS = ("f32", "f16", "q8_0", "q4_k_m")
ARCH = "llama"
# llama.cpp's tensor names for the llama architecture (HF suffix -> GGUF name)
BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}  # fmt: skip
# llama.cpp's names of pre-tokenizers, by the regex a tokenizer.json splits with
PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}  # fmt: skip


def supported(config: dict) -> str | None:
    """Why this checkpoint cannot be written here, or None."""
    kind = config.get("model_type")
    if kind not in ("llama", "mistral"):
        return (f"model_type {kind}: GGUF export supports the llama architecture (Llama, SmolLM, "
                "Mistral without sliding windows); use --format merged and llama.cpp's "
                "convert_hf_to_gguf.py for other families")  # fmt: skip
    if config.get("sliding_window"):
        return f"sliding_window {config['sliding_window']}: not in llama.cpp's llama architecture"
    rope = config.get("rope_scaling") or {}
    if rope and rope.get("rope_type", rope.get("type")) not in (None, "default", "llama3"):
        return f"rope_scaling {rope.get('rope_type', rope.get('type'))}: not written here"
    return None


def write(folder: Path, out: Path, quant: str = "f16", name: str | None = None) -> Path:
    """Write `folder` (a merged Hugging Face checkpoint) as the GGUF file `out`."""
    import gguf

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    why = supported(config)
    if why:
        raise ModelError(f"{folder}: {why}")
    if quant not in QUANTS:
        raise ModelError(f"--quant {quant}: not one of {', '.join(QUANTS)}")
    tensors = _load(folder)
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or \
        config["num_attention_heads"]  # fmt: skip
    layers = config["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(out), ARCH)
    _hyperparameters(writer, config, name or folder.name, quant)
    _tokenizer(writer, folder, config)
    for hf, t in _renamed(tensors, layers):
        if hf.endswith("attn_q.weight"):
            t = _permute(t, heads, heads)
        elif hf.endswith("attn_k.weight"):
            t = _permute(t, heads, kv)
        data, kind = _encode(hf, t, quant, layers)
        writer.add_tensor(hf, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_lora(adapter, config: dict, out: Path) -> Path:
    """The adapter as llama.cpp's LoRA GGUF (`llama-cli -m BASE.gguf --lora OUT`): for each
    adapted weight `blk.N.X.weight`, `.lora_a` [rank, in] and `.lora_b` [out, rank] in
    float32, B's rows permuted as the base's q and k rows are; `adapter.lora.alpha` such that
    llama.cpp's alpha / rank is the run's scale."""
    import gguf

    why = supported(config)
    if why:
        raise ModelError(why)
    if adapter.lora.method != "lora":
        raise ModelError(f"lora.method {adapter.lora.method}: llama.cpp's LoRA GGUF holds plain "
                         "LoRA only; use --format gguf (merged)")  # fmt: skip
    if adapter.full:
        raise ModelError(f"{adapter.saved_modules[0]}: trained in full, which a LoRA GGUF "
                         "cannot carry; use --format gguf (merged)")  # fmt: skip
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    writer = gguf.GGUFWriter(str(out), ARCH)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.lora.scale * adapter.lora.rank))
    for module, t in sorted(adapter.modules.items(), key=lambda kv: _order(kv[0])):
        name = _gguf_name(f"{module}.weight")
        b = np.asarray(t.b, np.float32)
        if name.endswith("attn_q.weight"):
            b = _permute(b, heads, heads)
        elif name.endswith("attn_k.weight"):
            b = _permute(b, heads, kv)
        writer.add_tensor(f"{name}.lora_a", np.asarray(t.a, np.float32))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _gguf_name(hf: str) -> str:
    """llama.cpp's name of a checkpoint tensor of the llama architecture."""
    if hf in TOP:
        return TOP[hf]
    m = re.fullmatch(r"(?:model\.)?layers\.(\d+)\.(.+)", hf.removeprefix("base_model.model."))
    if not m or m.group(2) not in BLOCK:
        raise ModelError(f"{hf}: no llama.cpp tensor of the llama architecture")
    return f"blk.{m.group(1)}.{BLOCK[m.group(2)]}"


def _order(module: str) -> tuple:
    m = re.search(r"layers\.(\d+)\.(.+)", module)
    return (int(m.group(1)), m.group(2)) if m else (-1, module)


def _load(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder in float32 (bfloat16 included: read through MLX)."""
    import mlx.core as mx

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        for k, v in mx.load(str(shard)).items():
            out[k] = np.array(v.astype(mx.float32))
    return out


def _renamed(tensors: dict[str, np.ndarray], layers: int):
    """(llama.cpp's name, tensor), in llama.cpp's order: the embedding, each block, the rest."""
    if "lm_head.weight" in tensors and np.array_equal(tensors["lm_head.weight"],
                                                      tensors["model.embed_tokens.weight"]):  # fmt: skip
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}  # tied
    unknown = [k for k in tensors if k not in TOP and not re.match(r"model\.layers\.\d+\.", k)
               and not k.endswith("rotary_emb.inv_freq")]  # fmt: skip
    if unknown:
        raise ModelError(f"{unknown[0]}: a tensor the llama architecture does not have")
    yield TOP["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"]
    for i in range(layers):
        for suffix, name in BLOCK.items():
            key = f"model.layers.{i}.{suffix}"
            if key not in tensors:
                raise ModelError(f"{key}: missing from the checkpoint")
            yield f"blk.{i}.{name}", tensors[key]
    yield TOP["model.norm.weight"], tensors["model.norm.weight"]
    if "lm_head.weight" in tensors:
        yield TOP["lm_head.weight"], tensors["lm_head.weight"]


def _permute(w: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """HF's rotary halves -> llama.cpp's interleaved pairs, per head (convert_hf_to_gguf.py)."""
    n = kv_heads if kv_heads != heads else heads
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(name: str, t: np.ndarray, quant: str, layers: int):
    """(bytes or array, GGML type) of one tensor."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if t.ndim == 1:  # norms stay float32 (llama.cpp does the same)
        return t.astype(np.float32), Q.F32
    if quant == "f32":
        return t.astype(np.float32), Q.F32
    kind = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_k_m": _q4_k_m(name, layers)}[quant]
    if t.shape[-1] % quants.GGML_QUANT_SIZES[kind][0]:  # rows 256-blocks cannot cut: as
        kind = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}.get(kind, kind)  # llama-quantize falls back
    if t.shape[-1] % quants.GGML_QUANT_SIZES[kind][0]:
        kind = Q.F16
    if kind == Q.F16:
        return t.astype(np.float16), Q.F16
    if kind in (Q.Q4_K, Q.Q6_K):
        from . import kquants

        return kquants.quantize(t, kind), kind
    return quants.quantize(t, kind), kind


def _q4_k_m(name: str, layers: int):
    """llama.cpp's Q4_K_M mix: Q6_K for the output head, for attn_v and ffn_down in the first
    and last eighth of the blocks and every third block between; Q4_K elsewhere."""
    from gguf import GGMLQuantizationType as Q

    if name == "output.weight":
        return Q.Q6_K
    m = re.match(r"blk\.(\d+)\.(attn_v|ffn_down)\.weight", name)
    if m:
        i = int(m.group(1))
        if i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2:
            return Q.Q6_K
    return Q.Q4_K


def _hyperparameters(writer, config: dict, name: str, quant: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    rope = config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) == "llama3":
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)  # llama.cpp reads rope_freqs
    kinds = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}  # fmt: skip
    writer.add_file_type(kinds[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    return config.get("rope_theta") or params.get("rope_theta") or 10000.0


def _tokenizer(writer, folder: Path, config: dict) -> None:
    """tokenizer.json's byte-level BPE as llama.cpp's "gpt2" tokenizer, with the chat template."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{folder}: no tokenizer.json (GGUF export needs a fast BPE tokenizer)")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ModelError(f"{path}: a {model.get('type')} tokenizer; GGUF export writes BPE ones")
    vocab: dict[str, int] = dict(model["vocab"])
    special = set()
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    size = max(config["vocab_size"], max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED, for ids the tokenizer never makes
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = 3 if i in special else 1  # CONTROL / NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = model.get("merges", [])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    settings = _tokenizer_config(folder)
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("pad_token", writer.add_pad_token_id), ("unk_token", writer.add_unk_token_id)):  # fmt: skip
        token = settings.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token in vocab:
            add(vocab[token])
    writer.add_add_bos_token(bool(settings.get("add_bos_token", False)))
    template = chat_template(folder)
    if template:
        writer.add_chat_template(template)


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def chat_template(folder: Path) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _tokenizer_config(folder).get("chat_template")
    return template if isinstance(template, str) else None


def _pre(data: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer ("default": GPT-2's)."""
    text = json.dumps(data.get("pre_tokenizer") or {})
    for pattern, name in PRE.items():
        if json.dumps(pattern)[1:-1] in text:
            return name
    if '"individual_digits": true' in text:  # SmolLM's: digits one by one, then byte-level
        return "smollm"
    return "default"


# --------------------------------------------------------------------------------- Ollama

# Ollama's Go templates for the chat formats llama-architecture models use, by a marker of
# their Jinja template; (template, stop tokens).
OLLAMA = {
    "<|im_start|>": ("""{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
""", ["<|im_end|>", "<|im_start|>"]),
    "<|start_header_id|>": ("""<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

""", ["<|eot_id|>", "<|start_header_id|>"]),
    "[INST]": ("""{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}""", ["[INST]", "</s>"]),
}  # fmt: skip


def modelfile(gguf_name: str, folder: Path, context: int, adapter: str | None = None) -> str:
    """An Ollama Modelfile for the GGUF file beside it: FROM, the chat template as Ollama's Go
    template (for ChatML, Llama 3 and Mistral formats; otherwise Ollama reads the template the
    GGUF file carries), the stop tokens, and the context length."""
    template = chat_template(folder) or ""
    lines = [f"FROM ./{gguf_name}", *([f"ADAPTER ./{adapter}"] if adapter else []), ""]
    for marker, (go, stops) in OLLAMA.items():
        if marker in template:
            lines += [f'TEMPLATE """{go}"""', ""]
            lines += [f'PARAMETER stop "{stop}"' for stop in stops]
            break
    else:
        lines += ["# No TEMPLATE: Ollama uses the chat template inside the GGUF file."]
    lines += [f"PARAMETER num_ctx {context}", ""]
    return "\n".join(lines)
