"""The one schema: precedence, strict keys with suggestions, coercion, cross-field rules,
round trip, and every shipped config loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mlxtune.config import Config, LoRAConfig, TrainConfig, describe_keys, load_config
from mlxtune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# Keys later work, tests and users rely on: renaming one is a breaking change.
FIXED_KEYS = [
    "model.path",
    "model.backend",
    "model.quantize",
    "data.train",
    "data.valid",
    "data.max_seq_len",
    "data.packing",
    "lora.rank",
    "lora.alpha",
    "lora.dropout",
    "lora.targets",
    "lora.num_layers",
    "train.iters",
    "train.epochs",
    "train.batch_size",
    "train.learning_rate",
    "train.grad_accum",
    "train.grad_checkpoint",
    "train.seed",
    "train.eval_every",
    "train.save_every",
    "output.dir",
]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def error(tmp_path: Path, text: str, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_fixed_keys_exist():
    keys = {row[0] for row in describe_keys()}
    assert set(FIXED_KEYS) <= keys
    assert {"model", "data", "lora", "train", "output", "fusion"} == {
        f.name for f in dataclasses.fields(Config)
    }


def test_every_key_has_help():
    assert all(help_text for *_, help_text in describe_keys())


def test_precedence_defaults_file_overrides(tmp_path):
    path = write(tmp_path, "lora:\n  rank: 4\n  alpha: 8\ntrain:\n  batch_size: 2\n")
    cfg = load_config(path, ["lora.rank=16"])
    assert cfg.lora.rank == 16  # override beats file
    assert cfg.lora.alpha == 8.0  # file beats default
    assert cfg.lora.dropout == LoRAConfig().dropout  # default stays
    assert cfg.train.batch_size == 2
    assert cfg.lora.scale == 0.5


def test_no_file_gives_defaults():
    assert load_config() == Config()


def test_coercion_by_declared_type(tmp_path):
    cfg = load_config(
        write(tmp_path, "train:\n  learning_rate: 1e-5\n  iters: 1e3\nlora:\n  alpha: 32\n"),
        ["lora.targets=q_proj, v_proj", "model.quantize=4", "data.packing=false"],
    )
    assert cfg.train.learning_rate == 1e-5 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.iters == 1000 and isinstance(cfg.train.iters, int)
    assert cfg.lora.alpha == 32.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.lora.targets == ("q_proj", "v_proj")
    assert cfg.model.quantize == 4
    assert cfg.data.packing is False


def test_misspelt_key_names_file_line_and_suggests(tmp_path):
    msg = error(tmp_path, "model:\n  path: x\nlora:\n  rank: 8\n  rnak: 8\n")
    assert msg == f"{tmp_path / 'cfg.yaml'}:5: lora.rnak: unknown key; did you mean lora.rank?"


def test_key_in_wrong_section_suggests_right_one(tmp_path):
    assert "did you mean lora.rank?" in error(tmp_path, "train:\n  rank: 8\n")
    assert "did you mean lora?" in error(tmp_path, "lorra:\n  rank: 8\n")


def test_override_errors_name_the_override(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^--set lora.rnak=4: lora.rnak: unknown key; did you mean lora.rank\?$"
    ):
        load_config(None, ["lora.rnak=4"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["lora.rank"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("lora:\n  rank: eight\n", "cfg.yaml:2: lora.rank: expected int, got str 'eight'"),
        ("lora:\n  rank: 2.5\n", "cfg.yaml:2: lora.rank: expected an integer, got 2.5"),
        ("lora:\n  rank: 0\n", "cfg.yaml:2: lora.rank: must be > 0, got 0"),
        ("lora:\n  dropout: 1.5\n", "cfg.yaml:2: lora.dropout: must be in [0, 1), got 1.5"),
        (
            "model:\n  backend: metal\n",
            "cfg.yaml:2: model.backend: 'metal' is not one of mlx, cuda",
        ),
        ("model:\n  quantize: 3\n", "cfg.yaml:2: model.quantize: 3 is not one of 4, 8"),
        (
            "data:\n  packing: maybe\n",
            "cfg.yaml:2: data.packing: expected true or false, got str 'maybe'",
        ),
        (
            "train:\n  iters: 10\n  epochs: 2\n",
            "cfg.yaml:3: train.epochs: set train.iters or train.epochs, not both",
        ),
        ("lora: 8\n", "cfg.yaml:1: lora: expected a mapping, got int 8"),
        ("- a\n- b\n", "cfg.yaml:1: the top level must be a mapping of sections"),
        ("lora:\n  rank: [\n", "cfg.yaml:3: invalid YAML"),
        ("train:\n  lr_schedule: cosin\n", "did you mean cosine?"),
        (
            "train:\n  shard: true\n",
            "cfg.yaml:2: train.shard: sharding is the cuda backend's (FSDP2)",
        ),
        (
            "model:\n  backend: cuda\n  quantize: 4\ntrain:\n  shard: true\n",
            "cfg.yaml:5: train.shard: NF4 weights and streamed experts are not sharded",
        ),
    ],
)
def test_bad_values_one_line_with_place(tmp_path, text, expected):
    assert expected in error(tmp_path, text)


def test_fusion_members_and_secrets(tmp_path):
    text = """fusion:
  pool:
    - {name: a, base_url: http://127.0.0.1:1/v1, model: m, api_key_env: KEY_A}
    - name: b
      base_url: http://127.0.0.1:2/v1
      model: m2
      headers: {X-Title: mlxtune}
"""
    cfg = load_config(write(tmp_path, text))
    assert [m.name for m in cfg.fusion.pool] == ["a", "b"]
    assert cfg.fusion.pool[1].headers == {"X-Title": "mlxtune"}
    bad = text.replace("api_key_env: KEY_A", "api_key_env: sk-or-v1-abc")
    msg = error(tmp_path, bad)
    assert "cfg.yaml:3: fusion.pool[0].api_key_env: must name an environment variable" in msg
    assert "sk-or" not in msg
    missing = "fusion:\n  pool:\n    - name: a\n      model: m\n"
    assert "cfg.yaml:3: fusion.pool[0].base_url: required" in error(tmp_path, missing)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["lora.targets=[q_proj,v_proj]", "train.iters=5", "lora.rank=4"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_python_api_validates_too():
    with pytest.raises(ValueError, match="rank: must be > 0"):
        LoRAConfig(rank=0)
    assert TrainConfig(iters=3).epochs is None


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path):
    load_config(path)


def test_configs_folder_is_not_empty():
    assert len(list((ROOT / "configs").rglob("*.yaml"))) >= 3


def test_num_layers_minus_one_means_every_layer_as_in_mlx_lm(tmp_path):
    cfg = load_config(write(tmp_path, "lora:\n  num_layers: -1\n"))
    assert cfg.lora.num_layers is None  # every layer, as null
    assert load_config(None, ["lora.num_layers=4"]).lora.num_layers == 4
    message = error(tmp_path, "lora:\n  num_layers: -2\n")
    assert message.endswith("lora.num_layers: must be > 0, or -1 for every layer; got -2")
    assert ":2: " in message
    help_text = {row[0]: row[3] for row in describe_keys()}["lora.num_layers"]
    assert "-1" in help_text
