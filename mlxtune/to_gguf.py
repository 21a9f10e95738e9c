"""A merged Hugging Face folder as one GGUF file for llama.cpp, Ollama and LM Studio, written
with the `gguf` package that llama.cpp's authors publish; and a `Modelfile` for Ollama.

Supported, as llama.cpp names the architectures:
- `llama`: Llama 2/3, SmolLM and Mistral-style checkpoints (`model_type: llama` or `mistral`
  without sliding windows) with a byte-level BPE tokenizer (tokenizer.json);
- `gemma4`: Gemma 4's text decoder (E2B/E4B-style: per-layer embeddings, KV-shared layers,
  double-wide MLPs, sliding and full layers with their own head widths, proportional rope);
  the vision and audio towers are not written (llama.cpp reads them from a separate mmproj
  file, which is not made here). Gemma 4's MoE checkpoints are refused.
Other families are refused in one line.

What the file holds, following llama.cpp's `convert_hf_to_gguf.py` (LlamaModel, Gemma4Model):
- tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q`, ..., `output_norm`,
  `output` unless the embedding is tied); for llama, q and k rows permuted into llama.cpp's
  rotary layout (interleaved pairs per head; Gemma's NEOX rope keeps HF's halves); for
  gemma4, the gguf package's own name table, and `rope_freqs` (factor 1e30 on the dimensions
  the full layers' proportional rope leaves unrotated);
- `--quant f32`: every tensor in float32; `f16`: 2-D weights in float16, the norms in float32; `q8_0`: 2-D weights in Q8_0
  (blocks of 32, one float16 scale), norms float32; `q4_k_m`: llama.cpp's mix, Q4_K for most
  2-D weights and Q6_K for the output head and for attn_v and ffn_down in some blocks (see
  `_q4_k_m`); rows whose length is not a multiple of 256 fall back to Q5_0 and Q8_0 as
  llama-quantize's do;
- the hyperparameters llama.cpp reads (`llama.*`, `gemma4.*`), the tokenizer (tokens, types,
  merges, bos/eos/pad ids, the pre-tokenizer's name; Gemma's byte-fallback BPE as llama.cpp's
  `gemma4` tokenizer) and the chat template.
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


GEMMA4 = ("gemma4", "gemma4_text")
# tensors of the Gemma 4 checkpoint that are not the text decoder's
TOWERS = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.",
          "model.embed_audio.")  # fmt: skip


def architecture(config: dict) -> str:
    """llama.cpp's name of the checkpoint's architecture (`supported` says if we write it)."""
    return "gemma4" if config.get("model_type") in GEMMA4 else ARCH


def supported(config: dict) -> str | None:
    """Why this checkpoint cannot be written here, or None."""
    kind = config.get("model_type")
    if kind in GEMMA4:
        if config.get("text_config", config).get("enable_moe_block"):
            return ("Gemma 4 with MoE blocks: not written here (the dense E2B/E4B/31B layouts "
                    "are); use --format merged and llama.cpp's convert_hf_to_gguf.py")  # fmt: skip
        return None
    if kind not in ("llama", "mistral"):
        return (f"model_type {kind}: GGUF export supports the llama architecture (Llama, SmolLM, "
                "Mistral without sliding windows) and Gemma 4's text decoder; use --format "
                "merged and llama.cpp's convert_hf_to_gguf.py for other families")  # fmt: skip
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
    arch = architecture(config)
    writer = gguf.GGUFWriter(str(out), arch)
    if arch == "gemma4":
        text = config.get("text_config", config)
        _gemma4_hyperparameters(writer, text, name or folder.name)
        _gemma4_tokenizer(writer, folder, text)
        named = list(_gemma4_tensors(tensors, text))
    else:
        text = config
        _hyperparameters(writer, config, name or folder.name)
        _tokenizer(writer, folder, config)
        named = list(_llama_tensors(tensors, config))
    _file_type(writer, quant)
    layers = text["num_hidden_layers"]
    tied = "output.weight" not in dict(named)
    for hf, t in named:
        data, kind = _encode(hf, t, quant, layers, tied)
        writer.add_tensor(hf, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_lora(adapter, config: dict, out: Path) -> Path:
    """The adapter as llama.cpp's LoRA GGUF (`llama-cli -m BASE.gguf --lora OUT`): for each
    adapted weight `blk.N.X.weight`, `.lora_a` [rank, in] and `.lora_b` [out, rank] in
    float32 (for llama, B's rows permuted as the base's q and k rows are);
    `adapter.lora.alpha` such that llama.cpp's alpha / rank is the run's scale."""
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
    arch = architecture(config)
    text = config.get("text_config", config)
    heads = text["num_attention_heads"]
    kv = text.get("num_key_value_heads") or heads
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.lora.scale * adapter.lora.rank))
    for module, t in sorted(adapter.modules.items(), key=lambda kv: _order(kv[0])):
        name = _gguf_name(f"{module}.weight", arch, text["num_hidden_layers"])
        b = np.asarray(t.b, np.float32)
        if arch == ARCH and name.endswith("attn_q.weight"):
            b = _permute(b, heads, heads)
        elif arch == ARCH and name.endswith("attn_k.weight"):
            b = _permute(b, heads, kv)
        writer.add_tensor(f"{name}.lora_a", np.asarray(t.a, np.float32))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _gguf_name(hf: str, arch: str = ARCH, layers: int = 0) -> str:
    """llama.cpp's name of a checkpoint tensor of the text decoder."""
    hf = hf.removeprefix("base_model.model.")
    if arch == "gemma4":
        import gguf

        name = None
        if not hf.startswith(TOWERS):
            hf = "model." + hf.removeprefix("model.").removeprefix("language_model.")
            name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, layers).get_name(
                hf, try_suffixes=(".weight",))  # fmt: skip
        if name is None:
            raise ModelError(f"{hf}: not in llama.cpp's gemma4 text decoder (the towers go in "
                             "an mmproj file, not written here); use --format gguf (merged)")  # fmt: skip
        return name
    if hf in TOP:
        return TOP[hf]
    m = re.fullmatch(r"(?:model\.)?layers\.(\d+)\.(.+)", hf)
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


def _llama_tensors(tensors: dict[str, np.ndarray], config: dict):
    """(llama.cpp's name, tensor), in llama.cpp's order: the embedding, each block, the rest;
    q and k rows permuted into llama.cpp's rotary layout."""
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    layers = config["num_hidden_layers"]
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
            t = tensors[key]
            if name == "attn_q.weight":
                t = _permute(t, heads, heads)
            elif name == "attn_k.weight":
                t = _permute(t, heads, kv)
            yield f"blk.{i}.{name}", t
    yield TOP["model.norm.weight"], tensors["model.norm.weight"]
    if "lm_head.weight" in tensors:
        yield TOP["lm_head.weight"], tensors["lm_head.weight"]


def _permute(w: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """HF's rotary halves -> llama.cpp's interleaved pairs, per head (convert_hf_to_gguf.py)."""
    n = kv_heads if kv_heads != heads else heads
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(name: str, t: np.ndarray, quant: str, layers: int, tied: bool = False):
    """(bytes or array, GGML type) of one tensor; `tied`: the embedding is also the head."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if t.ndim == 1:  # norms stay float32 (llama.cpp does the same)
        return t.astype(np.float32), Q.F32
    if quant == "f32":
        return t.astype(np.float32), Q.F32
    kind = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_k_m": _q4_k_m(name, layers, tied)}[quant]
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


def _q4_k_m(name: str, layers: int, tied: bool = False):
    """llama.cpp's Q4_K_M mix: Q6_K for the output head (the embedding when it is tied), for
    attn_v and ffn_down in the first and last eighth of the blocks and every third block
    between; Q4_K elsewhere."""
    from gguf import GGMLQuantizationType as Q

    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return Q.Q6_K
    m = re.match(r"blk\.(\d+)\.(attn_v|ffn_down)\.weight", name)
    if m:
        i = int(m.group(1))
        if i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2:
            return Q.Q6_K
    return Q.Q4_K


def _hyperparameters(writer, config: dict, name: str) -> None:
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


def _file_type(writer, quant: str) -> None:
    import gguf

    kinds = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}  # fmt: skip
    writer.add_file_type(kinds[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _gemma4_hyperparameters(writer, t: dict, name: str) -> None:
    """Gemma4Model's keys: two head widths and rope bases (sliding / full layers), the
    sliding-window pattern, KV-shared tail, per-layer input width and per-layer MLP and KV-head
    counts where they differ."""
    n = t["num_hidden_layers"]
    swa = [kind == "sliding_attention" for kind in t["layer_types"]]
    shared = t.get("num_kv_shared_layers") or 0
    ff = t["intermediate_size"]
    rope = t["rope_parameters"]
    full, local = rope["full_attention"], rope["sliding_attention"]
    writer.add_name(name)
    writer.add_context_length(t.get("max_position_embeddings", 131072))
    writer.add_embedding_length(t["hidden_size"])
    writer.add_block_count(n)
    writer.add_feed_forward_length([ff if i < n - shared else 2 * ff for i in range(n)]
                                   if t.get("use_double_wide_mlp") else ff)  # fmt: skip
    writer.add_head_count(t["num_attention_heads"])
    kv, kv_full = t["num_key_value_heads"], t.get("num_global_key_value_heads")
    writer.add_head_count_kv([kv if s else kv_full for s in swa] if kv_full else kv)
    writer.add_rope_freq_base(float(full["rope_theta"]))
    writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(t.get("rms_norm_eps", 1e-6)))
    head, head_swa = t["global_head_dim"], t["head_dim"]
    writer.add_key_length(head)
    writer.add_value_length(head)
    writer.add_key_length_swa(head_swa)
    writer.add_value_length_swa(head_swa)
    writer.add_rope_dimension_count(head)  # proportional: unrotated dimensions via rope_freqs
    part = local.get("partial_rotary_factor", t.get("partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count_swa(int(head_swa * part))
    if t.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(t["final_logit_softcapping"]))
    writer.add_sliding_window(t["sliding_window"])
    writer.add_sliding_window_pattern(swa)
    writer.add_shared_kv_layers(shared)
    writer.add_embedding_length_per_layer_input(t.get("hidden_size_per_layer_input") or 0)
    writer.add_vocab_size(t["vocab_size"])


def _gemma4_tensors(tensors: dict[str, np.ndarray], t: dict):
    """The text decoder's tensors under llama.cpp's gemma4 names (the gguf package's table),
    and `rope_freqs` for the full layers' proportional rope."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, t["num_hidden_layers"])
    embed = tensors.get("model.language_model.embed_tokens.weight",
                        tensors.get("model.embed_tokens.weight"))  # fmt: skip
    for key in sorted(tensors, key=_order):
        if key.startswith(TOWERS) or (key == "lm_head.weight" and
                                      np.array_equal(tensors[key], embed)):  # fmt: skip
            continue
        hf = "model." + key.removeprefix("model.").removeprefix("language_model.")
        if hf.endswith("layer_scalar"):
            name = names.get_name(hf)
            name = name and f"{name}.weight"
        else:
            name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"{key}: a tensor llama.cpp's gemma4 architecture does not have")
        yield name, tensors[key]
    full = t["rope_parameters"]["full_attention"]
    half = t["global_head_dim"] // 2
    rotated = int(t["global_head_dim"] * full.get("partial_rotary_factor", 1.0) / 2)
    factors = np.array([1.0] * rotated + [1e30] * (half - rotated), np.float32)
    yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors


# tokens llama.cpp's Gemma 4 chat parser must see in the text it decodes
VISIBLE = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
           "<tool_response|>", '<|"|>'}  # fmt: skip


def _gemma4_tokenizer(writer, folder: Path, config: dict) -> None:
    """Gemma's byte-fallback BPE (spaces as '▁', `<0xNN>` byte tokens) as llama.cpp's
    `gemma4` tokenizer: tokens in id order with their types, the merges, special ids and the
    chat template."""
    from gguf import TokenType

    data = _tokenizer_json(folder)
    model = data["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise ModelError(f"{folder / 'tokenizer.json'}: not Gemma's byte-fallback BPE")
    vocab, special = _vocab(data)
    size = max(config["vocab_size"], max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        if text in VISIBLE:
            types[i] = TokenType.USER_DEFINED
        elif i in special:
            types[i] = TokenType.CONTROL
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            types[i] = TokenType.BYTE
        else:
            types[i] = TokenType.NORMAL
    writer.add_tokenizer_model("gemma4")
    writer.add_token_list(tokens)
    writer.add_token_scores([-1000.0] * size)  # as llama.cpp's converter: BPE ranks by merges
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    _special_ids(writer, folder, vocab)
    writer.add_add_space_prefix(False)
    writer.add_add_bos_token(True)
    template = chat_template(folder)
    if template:
        writer.add_chat_template(template)


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    return config.get("rope_theta") or params.get("rope_theta") or 10000.0


def _tokenizer_json(folder: Path) -> dict:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{folder}: no tokenizer.json (GGUF export needs a fast BPE tokenizer)")
    return json.loads(path.read_text(encoding="utf-8"))


def _vocab(data: dict) -> tuple[dict[str, int], set[int]]:
    """tokenizer.json's tokens by text (added ones included) and the ids of special ones."""
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    special = set()
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    return vocab, special


def _special_ids(writer, folder: Path, vocab: dict[str, int]) -> None:
    settings = _tokenizer_config(folder)
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("pad_token", writer.add_pad_token_id), ("unk_token", writer.add_unk_token_id)):  # fmt: skip
        token = settings.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token in vocab:
            add(vocab[token])


def _tokenizer(writer, folder: Path, config: dict) -> None:
    """tokenizer.json's byte-level BPE as llama.cpp's "gpt2" tokenizer, with the chat template."""
    data = _tokenizer_json(folder)
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ModelError(f"{folder / 'tokenizer.json'}: a {model.get('type')} tokenizer; GGUF "
                         "export writes BPE ones")  # fmt: skip
    vocab, special = _vocab(data)
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
    _special_ids(writer, folder, vocab)
    writer.add_add_bos_token(bool(_tokenizer_config(folder).get("add_bos_token", False)))
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

# Ollama's Go templates for the chat formats of the models written here (ChatML, Llama 3,
# Gemma 4, Mistral), by a marker of their Jinja template; (template, stop tokens).
OLLAMA = {
    "<|im_start|>": ("""{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
""", ["<|im_end|>", "<|im_start|>"]),
    "<|start_header_id|>": ("""<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

""", ["<|eot_id|>", "<|start_header_id|>"]),
    "<|turn>": ("""{{- range .Messages }}<|turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}
{{ .Content }}<turn|>
{{ end }}<|turn>model
""", ["<turn|>", "<|turn>"]),
    "[INST]": ("""{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}""", ["[INST]", "</s>"]),
}  # fmt: skip


def modelfile(gguf_name: str, folder: Path, context: int, adapter: str | None = None) -> str:
    """An Ollama Modelfile for the GGUF file beside it: FROM, the chat template as Ollama's Go
    template (for ChatML, Llama 3, Gemma 4 and Mistral formats; otherwise Ollama reads the template the
    GGUF file carries), the stop tokens, and the context length."""
    template = chat_template(folder) or ""
    lines = [f"FROM ./{gguf_name}", *([f"ADAPTER ./{adapter}"] if adapter else []), ""]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if architecture(config) == "gemma4" and "text_config" in config:
        lines += ["# Text only: the vision and audio towers are not in this GGUF file.", ""]
    for marker, (go, stops) in OLLAMA.items():
        if marker in template:
            lines += [f'TEMPLATE """{go}"""', ""]
            lines += [f'PARAMETER stop "{stop}"' for stop in stops]
            break
    else:
        lines += ["# No TEMPLATE: Ollama uses the chat template inside the GGUF file."]
    lines += [f"PARAMETER num_ctx {context}", ""]
    return "\n".join(lines)
