"""A Hugging Face config.json as both transformers (4 or 5) and mlx-lm read it.

transformers 5 saves RoPE under `rope_parameters` (`{rope_type, rope_theta, factor, ...,
partial_rotary_factor}`, or one such dict per layer type) and no longer writes the top-level
`rope_theta`, `rope_scaling` and `partial_rotary_factor` that most mlx-lm families read; mlx-lm
then silently runs with base 10,000 and no scaling. Likewise it saves Gemma 4's wider
full-attention layers as `per_layer_config` instead of `global_head_dim`. `normalize()` reads
each level of the config that holds decoder settings (the config itself and its `text_config`)
the way transformers 5 does, and writes the same settings in both layouts. A setting the
family's mlx-lm code has no field for is refused with one line instead of being dropped.
`mlxtune.model.load` passes every mlx-lm load through it; the merged export writes its result.
"""

from __future__ import annotations

import copy
import inspect
import json
import math

from ..errors import ModelError

DEFAULT_THETA = 10_000.0  # transformers' and mlx-lm's shared fallback (and nn.RoPE's base)
NEEDS_ORIGINAL = ("llama3", "yarn", "longrope")  # types transformers gives the pretraining length
# mlx-lm families that spell a setting their own way (transformers 5 writes only rope_parameters)
ALIASES = {"gpt_neox": {"rope_theta": "rotary_emb_base", "partial_rotary_factor": "rotary_pct"}}
MISSING = object()


def normalize(config: dict, where: str, strict: bool = True) -> dict:
    """A copy of `config` with each level's RoPE settings as `rope_parameters` and as the
    legacy keys. `strict`: refuse (ModelError naming `where`) what mlx-lm would not apply."""
    out = copy.deepcopy(config)
    for name, level, fields in _levels(out):
        _normalize_level(level, fields, f"{where}: {name}", strict)
        if level.get("model_type") == "gemma4_text" and level.get("per_layer_config"):
            _gemma4_layers(level, f"{where}: {name}", strict)
    return out


def changed_keys(before: dict, after: dict) -> dict:
    """The top-level entries `normalize` changed (what to pass as mlx-lm's `model_config`)."""
    return {k: v for k, v in after.items() if before.get(k, MISSING) != v}


def _levels(config: dict):
    """(name, dict, fields of the mlx-lm args class that reads it or None) for each level."""
    top, text = _args_fields(config)
    yield "config.json", config, top
    if isinstance(config.get("text_config"), dict):
        yield "config.json: text_config", config["text_config"], text


def _args_fields(config: dict) -> tuple[set | None, set | None]:
    """Field names of the mlx-lm args classes for the config and for its text_config."""
    try:
        import importlib

        from mlx_lm.utils import _get_classes

        model_class, args = _get_classes(config)
    except (ImportError, ValueError, KeyError):
        return None, None
    module = importlib.import_module(model_class.__module__)
    text = getattr(module, "TextArgs", None) or getattr(module, "TextConfig", None)
    sub = config.get("text_config")
    if text is None and isinstance(sub, dict) and "model_type" in sub:
        try:
            text = _get_classes(sub)[1]
        except (ImportError, ValueError):
            text = None
    return _names(args), _names(text)


def _names(cls) -> set | None:
    return None if cls is None else set(inspect.signature(cls).parameters)


def _normalize_level(level: dict, fields: set | None, where: str, strict: bool) -> None:
    legacy, params = level.get("rope_scaling"), level.get("rope_parameters")
    if not (legacy or params or level.get("rope_theta") is not None):
        return
    if params and all(isinstance(v, dict) or v is None for v in params.values()):
        rope = copy.deepcopy(params)
        if legacy and rope.get("full_attention"):  # Gemma 3's rule: it scales the full layers
            rope["full_attention"].update({k: v for k, v in legacy.items() if k != "type"})
        _nested(level, rope, fields, where, strict)
        return
    rope = _flat(level, copy.deepcopy(legacy or params or {}))  # transformers 5: rope_scaling wins
    level["rope_parameters"] = rope
    _write_legacy(level, rope, where, strict)
    if fields is not None and "rope_parameters" not in fields:
        _check(level, rope, fields, where, strict)


def _flat(level: dict, rope: dict) -> dict:
    """One flat dict with every setting, as transformers 5's `standardize_rope_params` makes it."""
    kind = rope.pop("type", None)
    rope["rope_type"] = rope.get("rope_type") or kind or "default"
    theta = rope.get("rope_theta", level.get("rope_theta"))
    if theta is not None:
        rope["rope_theta"] = theta
    if level.get("partial_rotary_factor") is not None:
        rope.setdefault("partial_rotary_factor", level["partial_rotary_factor"])
    if rope["rope_type"] in NEEDS_ORIGINAL:
        original = level.get("original_max_position_embeddings")  # Phi-3 keeps it here
        original = original or rope.get("original_max_position_embeddings")
        original = original or level.get("max_position_embeddings")
        if original:
            rope["original_max_position_embeddings"] = original
    return rope


def _write_legacy(level: dict, rope: dict, where: str, strict: bool) -> None:
    """rope_theta, rope_scaling (None when plain RoPE) and partial_rotary_factor from `rope`."""
    if "rope_theta" in rope:
        level["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    plain = scaling == {"rope_type": "default"}
    # mlx-lm reads `type` before `rope_type` (Phi-3 reads only `type`): both, the same
    level["rope_scaling"] = None if plain else {**scaling, "type": scaling["rope_type"]}
    if "partial_rotary_factor" in rope:
        level["partial_rotary_factor"] = rope["partial_rotary_factor"]
    for key, alias in ALIASES.get(level.get("model_type", ""), {}).items():
        if key in level:
            level[alias] = level[key]
    if rope["rope_type"] == "yarn" and strict:
        _check_yarn(rope, where)


def _check_yarn(rope: dict, where: str) -> None:
    """mlx-lm's yarn takes the attention factor only as mscale / mscale_all_dim."""
    wanted = rope.get("attention_factor")
    if wanted is None:
        return
    factor = rope.get("factor") or 1.0

    def mscale(m):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    got = mscale(rope.get("mscale") or 1) / mscale(rope.get("mscale_all_dim") or 0)
    if abs(got - wanted) > 1e-6 * abs(wanted):
        raise ModelError(f"{where}: rope_parameters.attention_factor {wanted}: mlx-lm's yarn "
                         f"RoPE cannot apply it (it derives {got:.6g} from factor and mscale)")  # fmt: skip


def _check(level: dict, rope: dict, fields: set, where: str, strict: bool) -> None:
    """Refuse a setting that differs from the default and that the mlx-lm family never reads."""
    family = level.get("model_type", "?")
    aliases = ALIASES.get(family, {})

    def reads(key):
        return key in fields or aliases.get(key) in fields

    unread = []
    if rope.get("rope_theta", DEFAULT_THETA) != DEFAULT_THETA and not reads("rope_theta"):
        unread.append(f"rope_theta {rope['rope_theta']}")
    if level["rope_scaling"] is not None and not reads("rope_scaling"):
        unread.append(f"rope_type {rope['rope_type']}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0 and not reads("partial_rotary_factor"):
        unread.append(f"partial_rotary_factor {rope['partial_rotary_factor']}")
    if unread and strict:
        raise ModelError(f"{where}: mlx-lm's {family} model ignores {', '.join(unread)}; "
                         "it would run with different positions than the checkpoint was "
                         "trained with")  # fmt: skip


def _nested(level: dict, rope: dict, fields: set | None, where: str, strict: bool) -> None:
    """One RoPE per layer type (Gemma 3, 3n, 4). Families that read `rope_parameters` take it
    as it is; Gemma 3's spelling is full layers -> rope_theta / rope_scaling, sliding layers ->
    rope_local_base_freq."""
    for value in rope.values():
        if value is not None and not (value.get("rope_type") or value.get("type")):
            value["rope_type"] = "default"
    level["rope_parameters"] = rope
    if fields is None or "rope_parameters" in fields:
        return
    full, sliding = rope.get("full_attention"), rope.get("sliding_attention")
    local = (sliding or {}).get("rope_theta")
    plain = sliding is None or (sliding["rope_type"] == "default" and
                                sliding.get("partial_rotary_factor", 1.0) == 1.0)  # fmt: skip
    mappable = set(rope) <= {"full_attention", "sliding_attention"} and full and plain
    if mappable and (local is None or "rope_local_base_freq" in fields):
        flat = _flat(level, copy.deepcopy(full))
        _write_legacy(level, flat, where, strict)
        if local is not None:
            level["rope_local_base_freq"] = local
        _check(level, flat, fields, where, strict)
    elif strict:
        raise ModelError(f"{where}: rope_parameters per layer type ({', '.join(rope)}): "
                         f"mlx-lm's {level.get('model_type', '?')} model does not read them")  # fmt: skip


def _gemma4_layers(level: dict, where: str, strict: bool) -> None:
    """transformers 5's `per_layer_config` ({layer: {head_dim, num_key_value_heads}} for each
    full-attention layer) as the `global_head_dim` / `num_global_key_value_heads` mlx-lm reads:
    possible when every full layer has the same override and nothing else differs."""
    layers = level["per_layer_config"]
    full = {str(i) for i, t in enumerate(level.get("layer_types") or []) if t == "full_attention"}
    values = list(layers.values())
    keys = {"head_dim"} | ({"num_key_value_heads"} if level.get("attention_k_eq_v") else set())
    if set(map(str, layers)) == full and all(v == values[0] and set(v) <= keys for v in values):
        if "head_dim" in values[0]:
            level["global_head_dim"] = values[0]["head_dim"]
        if "num_key_value_heads" in values[0]:
            level["num_global_key_value_heads"] = values[0]["num_key_value_heads"]
    elif strict:
        raise ModelError(f"{where}: per_layer_config {json.dumps(layers)}: mlx-lm's gemma4 takes "
                         "one head_dim (and k=v head count) for all full-attention layers")  # fmt: skip
