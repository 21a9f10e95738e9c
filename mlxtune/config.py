"""THE config schema: frozen dataclasses and one loader. Stdlib + PyYAML only.

Precedence: dataclass defaults < YAML file < `--set a.b=value` overrides, merged in
`load_config()` and nowhere else. Field name = YAML key = `--set` path = adapter_config key.
Unknown keys fail with a did-you-mean; values are coerced by declared type; cross-field rules
live in `__post_init__`. Help text lives in field metadata and feeds `mlxtune config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .keys import looks_like_secret


class Invalid(ValueError):
    """Raised by `__post_init__`: `key` is the field (in this section) the message is about."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _positive(obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and (value < 0 if allow_zero else value <= 0):
            raise Invalid(name, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    path: str | None = opt(
        None, "Hugging Face repo id or local folder (config.json, *.safetensors, tokenizer.json)"
    )
    adapter: str | None = opt(
        None,
        "Train on from this adapter (a run folder or a PEFT adapter folder), e.g. an SFT run "
        "before DPO or GRPO: its LoRA layers keep training and its LoRA settings replace "
        "lora.*; DPO's reference and GRPO's KL are then to this adapter's model",
    )
    backend: Literal["mlx", "cuda"] = opt("mlx", "mlx (Apple Silicon / mlx[cpu]) or cuda (torch)")
    quantize: Literal[4, 8] | None = opt(None, "Quantize the frozen base to 4 or 8 bits (QLoRA)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Compute dtype; auto keeps the checkpoint's"
    )
    offload_experts: bool = opt(
        False, "cuda, Llama 4: routed experts stay in host RAM and stream through the GPU"
    )
    expert_chunk: int = opt(16, "cuda, offload_experts: experts per streamed chunk (2 in flight)")
    prepared_dir: str | None = opt(
        None,
        "cuda, quantize 4 or offload_experts: folder of the prepared copy (NF4, experts laid out "
        "for streaming; mlxtune prepare); null = ~/.cache/mlxtune/prepared/<model>-<key>",
    )

    def __post_init__(self) -> None:
        _positive(self, "expert_chunk")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train: str | None = opt(None, "Training JSONL (messages | prompt/completion | text rows)")
    valid: str | None = opt(None, "Validation JSONL; empty disables validation")
    max_seq_len: int = opt(2048, "Longest row in tokens, packed or not")
    packing: bool = opt(
        False,
        "Pack several examples per row (a mask keeps attention inside each); off, each example "
        "is a row, rows of similar length share a micro-batch and attention needs no mask",
    )
    loss_on: Literal["assistant", "last_assistant", "all"] = opt(
        "assistant", "Tokens that carry loss: every assistant turn, only the last, or all"
    )
    overlong: Literal["truncate", "skip"] = opt(
        "truncate", "What to do with rows longer than max_seq_len (counted and reported)"
    )
    image_soft_tokens: Literal[70, 140, 280, 560, 1120] | None = opt(
        None, "Gemma 4: soft tokens per image (more = finer detail); null = the processor's, 280"
    )

    def __post_init__(self) -> None:
        if self.max_seq_len < 8:
            raise Invalid("max_seq_len", f"must be >= 8, got {self.max_seq_len}")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    method: Literal["lora", "dora", "full"] = opt("lora", "lora, dora, or full fine-tuning")
    rank: int = opt(8, "LoRA rank r")
    alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = opt(0.0, "Dropout on the LoRA input, in [0, 1)")
    targets: tuple[str, ...] = opt((), "Module names to adapt; empty = the family's default table")
    num_layers: int | None = opt(
        None, "Adapt only the last N decoder layers; null or -1 = all (-1 as in mlx-lm)"
    )
    vision: bool = opt(False, "Also adapt the vision tower's attention and MLP (Gemma 4)")
    audio: bool = opt(False, "Also adapt the audio tower's attention and feed-forwards (Gemma 4)")
    train_embedders: bool = opt(
        False, "Train the projections from the towers into the text model in full (Gemma 4)"
    )

    def __post_init__(self) -> None:
        if self.num_layers == -1:  # mlx-lm's spelling of "every layer"
            object.__setattr__(self, "num_layers", None)
        if self.num_layers is not None and self.num_layers <= 0:
            raise Invalid(
                "num_layers", f"must be > 0, or -1 for every layer; got {self.num_layers}"
            )
        _positive(self, "rank", "alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise Invalid("dropout", f"must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    method: Literal["sft", "dpo", "orpo", "grpo"] = opt(
        "sft",
        "sft: learn the assistant turns; dpo / orpo: learn preferences from rows with prompt, "
        "chosen and rejected (TRL's shapes); grpo: sample train.group_size answers per prompt "
        "and learn from train.reward_functions' scores",
    )
    beta: float | None = opt(
        None,
        "dpo: how far the policy may move from the reference (the weights at step 0); orpo: "
        "weight of the odds-ratio term; grpo: weight of the KL to the base model; null = TRL's "
        "default, 0.1 for dpo and orpo, 0.0 for grpo",
    )
    dpo_loss: Literal["sigmoid", "robust", "ipo", "hinge"] = opt(
        "sigmoid", "dpo: TRL's loss_type of the same name"
    )
    label_smoothing: float = opt(
        0.0,
        "dpo, sigmoid and robust: share of preference labels assumed flipped, in [0, 0.5) "
        "(sigmoid: conservative DPO)",
    )
    reward_functions: str | None = opt(
        None,
        "grpo: a Python file of reward functions, fn(prompts, completions, **columns) -> list "
        "of floats (or None to abstain); every public function in it, or FILE:name,name",
    )
    reward_weights: tuple[float, ...] = opt((), "grpo: one weight per reward function; empty = 1")
    reward_judge: EndpointConfig | None = opt(
        None,
        "grpo: a model that scores every answer from 0 to 10 (any OpenAI-compatible endpoint, "
        "a local one included, through the fusion client); score / 10 is the reward `judge`",
    )
    judge_instructions: str = opt(
        "Score how well the answer follows the prompt, from 0 (not at all) to 10 (fully). "
        "Reply with the number only.",
        "grpo, reward_judge: what the judge is told before the prompt and the answer",
    )
    judge_weight: float = opt(1.0, "grpo, reward_judge: the judge reward's weight")
    group_size: int = opt(8, "grpo: answers sampled per prompt (TRL's num_generations)")
    max_completion_tokens: int = opt(128, "grpo: longest sampled answer in tokens")
    temperature: float = opt(1.0, "grpo: sampling temperature (the log-probs use it too, as TRL)")
    clip_epsilon: float = opt(0.2, "grpo: the ratio's clip range 1 +- epsilon")
    grpo_loss: Literal["grpo", "dr_grpo", "bnpo", "dapo"] = opt(
        "dapo", "grpo: how token losses are averaged (TRL's loss_type)"
    )
    scale_rewards: Literal["group", "batch", "none"] = opt(
        "group", "grpo: divide advantages by the reward std of the group, the batch, or not"
    )
    iters: int | None = opt(None, "Optimizer steps; set this or epochs")
    epochs: float | None = opt(None, "Passes over the data; iters and epochs both null = 1 epoch")
    batch_size: int | None = opt(
        None, "Rows per micro-batch at most; null = as many as train.batch_tokens holds"
    )
    batch_tokens: int | None = opt(
        4096,
        "Token budget of a micro-batch, padding included (rows x padded length; a single row "
        "may be longer): what sizes steps and bounds their memory whatever the row lengths. "
        "Rows of similar length share a batch, so short rows come many to a batch; "
        "null = train.batch_size rows",
    )
    grad_accum: int = opt(1, "Micro-batches per optimizer step")
    learning_rate: float = opt(1e-4, "Peak learning rate (AdamW)")
    lr_schedule: Literal["cosine", "linear", "constant"] = opt("cosine", "Decay after warmup")
    warmup_steps: int = opt(0, "Linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float | None = opt(1.0, "Clip the global gradient norm; null disables")
    grad_checkpoint: Literal["auto", True, False] = opt(
        "auto",
        "Recompute layer activations in backward to save memory; auto = on when the memory plan "
        "says a step would not fit this machine's memory otherwise",
    )
    memory_gb: float | None = opt(
        None,
        "Memory a step may plan for (grad_checkpoint auto decides against it); null = this "
        "machine's (a Mac's GPU working set, else its RAM; the GPU's with cuda)",
    )
    seed: int = opt(0, "Seed for weights init, data order and dropout")
    eval_every: int = opt(100, "Validate every N steps; 0 = only at the end")
    save_every: int = opt(100, "Checkpoint every N steps; 0 = only at the end")
    report_every: int = opt(10, "Progress line and metrics.jsonl row every N steps")
    eval_batches: int | None = opt(None, "Validation micro-batches per evaluation; null = all")
    ce_chunk_tokens: int = opt(
        128, "Tokens whose logits the loss computes at once; 0 = full logits in one go"
    )
    media_cache_gb: float = opt(
        2.0, "Memory for frozen towers' soft tokens, reused across epochs; 0 = recompute each step"
    )
    offload_checkpoints: bool = opt(
        False, "cuda, with grad_checkpoint: keep each layer's saved input in host RAM"
    )
    shard: bool = opt(
        False,
        "cuda, several ranks: each keeps 1/N of the weights, gradients and AdamW state (FSDP2); "
        "always on for lora.method full",
    )

    def __post_init__(self) -> None:
        if self.iters is not None and self.epochs is not None:
            raise Invalid("epochs", "set train.iters or train.epochs, not both")
        _positive(self, "iters", "epochs", "batch_size", "batch_tokens", "grad_accum")
        _positive(self, "learning_rate", "memory_gb")
        if self.batch_size is None and self.batch_tokens is None:
            raise Invalid("batch_tokens", "set train.batch_tokens or train.batch_size (or both)")
        _positive(self, "report_every", "max_grad_norm", "eval_batches")
        _positive(self, "ce_chunk_tokens", "media_cache_gb", allow_zero=True)
        _positive(self, "warmup_steps", "weight_decay", "eval_every", "save_every", allow_zero=True)
        if self.beta is None:  # TRL's defaults
            object.__setattr__(self, "beta", 0.0 if self.method == "grpo" else 0.1)
        _positive(self, "beta", allow_zero=self.method == "grpo")
        _positive(self, "clip_epsilon", "temperature")
        _positive(self, "group_size", "max_completion_tokens")
        if self.method == "grpo" and self.group_size < 2:
            raise Invalid("group_size", "grpo compares answers within a group: needs >= 2")
        if self.method == "grpo" and not (self.reward_functions or self.reward_judge):
            raise Invalid("reward_functions", "train.method grpo needs a file of reward functions "
                          "(or train.reward_judge)")  # fmt: skip
        if not 0.0 <= self.label_smoothing < 0.5:
            raise Invalid("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    dir: str = opt("runs/latest", "Run folder: adapter, metrics.jsonl, config.yaml, checkpoints/")
    overwrite: bool = opt(False, "Replace an existing run folder instead of refusing")
    keep_checkpoints: int = opt(2, "Newest checkpoints kept in checkpoints/; 0 keeps all")

    def __post_init__(self) -> None:
        _positive(self, "keep_checkpoints", allow_zero=True)


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _names_a_variable(name: str) -> bool:
    """A variable's name, not a pasted key (`hf_...`, `gsk_...`, long random strings)."""
    return bool(_ENV_NAME.match(name)) and not looks_like_secret(name)


@dataclass(frozen=True, kw_only=True)
class EndpointConfig:
    name: str = opt("", "Label for this member in tables and traces (default: the model id)")
    base_url: str = opt("", "OpenAI-compatible base URL, e.g. https://openrouter.ai/api/v1")
    model: str = opt("", "Model id sent in the request")
    api_key_env: str | None = opt(None, "Name of the environment variable holding the API key")
    headers: dict[str, str] = field(
        default_factory=dict, metadata={"help": "Extra HTTP headers (values, never keys)"}
    )
    max_tokens: int = opt(1024, "max_tokens sent with every request")
    temperature: float = opt(0.7, "Sampling temperature")
    timeout_s: float = opt(120.0, "Total deadline for one call, retries included, seconds")
    connect_timeout_s: float = opt(10.0, "Deadline to connect to the endpoint, seconds")
    first_token_s: float = opt(
        60.0, "Deadline for the first content token (keep-alive comments do not count), seconds"
    )
    max_retries: int = opt(2, "Retries on 408, 429, 5xx and connection errors (never on 4xx)")
    hedge_after_s: float | None = opt(
        None, "Send a second identical request if no content has come after this many seconds"
    )
    attribution: bool | None = opt(
        None, "Send fusion.app_url / app_title headers; null = only to openrouter.ai"
    )
    input_price: float | None = opt(
        None, "USD per million prompt tokens, when the provider reports no usage.cost"
    )
    output_price: float | None = opt(None, "USD per million completion tokens (as input_price)")

    def __post_init__(self) -> None:
        for key in ("base_url", "model"):
            if not getattr(self, key):
                raise Invalid(key, "required")
        if not self.base_url.startswith(("http://", "https://")):
            raise Invalid("base_url", f"must start with http:// or https://, got {self.base_url!r}")
        if self.api_key_env is not None and not _names_a_variable(self.api_key_env):
            # A literal key here would end up in logs and run folders: refuse it, never echo it.
            raise Invalid("api_key_env", "must name an environment variable, not hold a key")
        _positive(self, "max_tokens", "timeout_s", "connect_timeout_s", "first_token_s")
        _positive(self, "hedge_after_s")
        _positive(self, "temperature", "max_retries", "input_price", "output_price",
                  allow_zero=True)  # fmt: skip

    @property
    def label(self) -> str:
        return self.name or self.model


@dataclass(frozen=True, kw_only=True)
class FusionConfig:
    mode: Literal["best-of", "merge", "debate", "self"] = opt("best-of", "How answers combine")
    pool: tuple[EndpointConfig, ...] = opt((), "Members that answer in parallel")
    judge: EndpointConfig | None = opt(None, "Model that turns the members' answers into one")
    rounds: int = opt(
        2, "debate: revision rounds after the first answers (stops early on consensus)"
    )
    samples: int = opt(3, "self: how many times the first pool member is sampled")
    quorum: int | None = opt(
        None, "Go on once this many members have answered (k of n); null = wait for all"
    )
    grace_s: float = opt(0.5, "After the quorum, wait this long for the others, then cancel them")
    min_successful: int = opt(1, "Fewer answers than this is an error")
    max_total_tokens: int | None = opt(None, "Budget: stop (no more rounds, no judge) past this")
    max_cost: float | None = opt(None, "Budget in USD, as max_total_tokens")
    skip_judge_on_agreement: bool = opt(
        True, "No judge call when every answer gives the same short or numeric answer"
    )
    seed: int = opt(0, "Seed for the order answers are shown to the judge")
    max_per_host: int = opt(8, "Concurrent connections per host")
    app_url: str | None = opt(None, "HTTP-Referer sent to OpenRouter (attribution)")
    app_title: str | None = opt("mlxtune", "X-Title sent to OpenRouter (attribution)")
    server_token_env: str | None = opt(
        None, "fusion serve: environment variable holding the bearer token clients must send"
    )
    max_request_kb: int = opt(1024, "fusion serve: largest request body accepted, KiB")
    max_concurrent: int = opt(16, "fusion serve: requests handled at once; more get HTTP 429")
    expose_members: bool = opt(
        False,
        "fusion serve: also return each member's answer, model id and error to clients "
        "(off: only the fused answer and usage)",
    )

    def __post_init__(self) -> None:
        _positive(self, "rounds", "grace_s", "max_cost", allow_zero=True)
        _positive(self, "samples", "quorum", "min_successful", "max_total_tokens", "max_per_host")
        _positive(self, "max_request_kb", "max_concurrent")
        if self.quorum is not None and self.pool and self.quorum > len(self.pool):
            raise Invalid("quorum", f"{self.quorum} is more than the {len(self.pool)} members")
        if self.server_token_env is not None and not _names_a_variable(self.server_token_env):
            raise Invalid("server_token_env", "must name an environment variable, not hold a token")
        labels = [m.label for m in self.pool]
        dup = next((x for x in labels if labels.count(x) > 1), None)
        if dup:
            raise Invalid("pool", f"two members are called {dup!r}; give each a distinct name")


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)

    def __post_init__(self) -> None:
        if self.lora.method == "full" and self.model.quantize:
            raise Invalid(
                "lora.method", "full fine-tuning needs an unquantized model.quantize: null"
            )
        if self.train.shard and self.model.backend != "cuda":
            raise Invalid("train.shard", "sharding is the cuda backend's (FSDP2); MLX ranks "
                          "each hold the whole model: set model.backend: cuda or shard: false")  # fmt: skip
        if self.train.shard and (self.model.quantize or self.model.offload_experts):
            raise Invalid("train.shard", "NF4 weights and streamed experts are not sharded: "
                          "set model.quantize: null and model.offload_experts: false")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                sections: Mapping[str, Any] | None = None, origin: str = "") -> Config:  # fmt: skip
    """Defaults < YAML file < `sections` (Python values by section, as `mlxtune.train(lora=
    {"rank": 16})` passes them; errors name `origin`) < `--set a.b=value` overrides. Raises
    ConfigError (one line)."""
    raw: dict[str, Any] = {}
    where: dict[str, str] = {}  # dotted key -> "file:line" or "--set key=value"
    if path is not None:
        raw, where = _read_yaml(Path(path))
    for section, value in (sections or {}).items():
        where[section] = f"{origin}({section}=...)"
        if isinstance(value, Mapping):
            for key, item in value.items():
                _set_dotted(raw, f"{section}.{key}", item, origin or section)
                where[f"{section}.{key}"] = f"{origin}({section}={{{key!r}: ...}})"
        else:
            raw[section] = value
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. lora.rank=16")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        _set_dotted(raw, key, value, f"--set {key}")
        where[key] = f"--set {key}={_shown(key, text)}"
    return _build(Config, raw, "", where)


def _shown(key: str, text: str) -> str:
    """A `--set` value as error messages may print it: never a key pasted where a variable's
    name belongs."""
    return "(not shown)" if key.endswith("_env") and looks_like_secret(text.strip()) else text


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the top level must be a mapping of sections")
    where: dict[str, str] = {}
    _record_lines(node, "", str(path), where)
    return data, where


def _record_lines(node: yaml.Node, prefix: str, path: str, where: dict[str, str]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            where[key] = f"{path}:{key_node.start_mark.line + 1}"
            _record_lines(value_node, key + ".", path, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{prefix[:-1]}[{i}]"
            where[key] = f"{path}:{item.start_mark.line + 1}"
            _record_lines(item, key + ".", path, where)


def _set_dotted(raw: dict[str, Any], key: str, value: Any, origin: str) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {part} is a value, not a section")
        node = child
    node[leaf] = value


def _locate(key: str, where: Mapping[str, str]) -> str:
    """The most specific known place for `key`: itself, else its nearest parent."""
    probe = key
    while probe:
        if probe in where:
            return f"{where[probe]}: "
        probe = probe.rpartition(".")[0]
    return ""


def _fail(key: str, message: str, where: Mapping[str, str]) -> ConfigError:
    return ConfigError(f"{_locate(key, where)}{key}: {message}")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        inner = _dataclass_in(typing.get_type_hints(cls)[f.name])
        if inner is not None:
            keys += _all_keys(inner, f"{prefix}{f.name}.")
    return keys


def _suggest(section_cls: type, prefix: str, name: str) -> str:
    """Did-you-mean: a close name in this section, else the same name in another section."""
    local = [f.name for f in dataclasses.fields(section_cls)]
    close = difflib.get_close_matches(name, local, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    everywhere = _all_keys(Config)
    moved = [k for k in everywhere if k.rsplit(".", 1)[-1] == name]
    if not moved:
        leaves = {k.rsplit(".", 1)[-1]: k for k in everywhere}
        near = difflib.get_close_matches(name, list(leaves), n=1, cutoff=0.75)
        moved = [leaves[near[0]]] if near else []
    return f"; did you mean {moved[0]}?" if moved else ""


def _build(cls: type, raw: Any, prefix: str, where: Mapping[str, str]) -> Any:
    section = prefix[:-1] or "config"
    if not isinstance(raw, Mapping):
        raise _fail(section, f"expected a mapping, got {_describe(raw)}", where)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise _fail(f"{prefix}{key}", f"unknown key{_suggest(cls, prefix, str(key))}", where)
    values = {k: _coerce(hints[k], v, f"{prefix}{k}", where) for k, v in raw.items()}
    try:
        return cls(**values)
    except Invalid as e:
        raise _fail(f"{prefix}{e.key}", e.message, where) from None


def _dataclass_in(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


def _coerce(tp: Any, value: Any, key: str, where: Mapping[str, str]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, key, where)
    if value is None:
        raise _fail(key, "must not be null", where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", where)
    if origin is Literal:
        for choice in args:
            if value == choice or str(value) == str(choice):
                return choice
        options = ", ".join(str(a) for a in args)
        near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        raise _fail(key, f"{value!r} is not one of {options}{hint}", where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise _fail(key, f"expected a list, got {_describe(value)}", where)
        return tuple(_coerce(args[0], v, f"{key}[{i}]", where) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _fail(key, f"expected a mapping, got {_describe(value)}", where)
        return {str(k): _coerce(args[1], v, f"{key}.{k}", where) for k, v in value.items()}
    return _scalar(tp, value, key, where)


def _scalar(tp: type, value: Any, key: str, where: Mapping[str, str]) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(key, f"expected true or false, got {_describe(value)}", where)
    if isinstance(value, bool | list | dict):
        raise _fail(key, f"expected {tp.__name__}, got {_describe(value)}", where)
    if tp is str:
        return str(value)
    try:
        number = float(value)  # YAML reads 1e-5 as a string; declared type decides
    except (TypeError, ValueError):
        raise _fail(key, f"expected {tp.__name__}, got {_describe(value)}", where) from None
    if tp is float:
        return number
    if tp is int and number.is_integer():
        return int(number)
    raise _fail(key, f"expected an integer, got {value!r}", where)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def describe_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every leaf key: the help `mlxtune config` prints."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe_keys(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((prefix + f.name, _type_name(tp), _plain(default), f.metadata.get("help", "")))
    return rows


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp)).replace("Config", "").lower() or str(tp)
