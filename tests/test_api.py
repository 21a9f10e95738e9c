"""The Python API (`import mlxtune as mt`): loading and asking a model, training from Python
values, evaluating, and the one-line errors the CLI gives, on tiny checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA

import mlxtune as mt
from mlxtune.errors import ConfigError, DataError

SETTINGS = {"lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
            "train": {"iters": 3, "report_every": 1, "eval_every": 0, "save_every": 0,
                      "learning_rate": 1e-3}}  # fmt: skip


def _rows(name: str) -> list[dict]:
    return _jsonl(DATA / name)


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """Three steps trained from a list of rows in memory."""
    out = tmp_path_factory.mktemp("api") / "run"
    return mt.train(model=tiny("llama"), data={"train": _rows("chat_train.jsonl"),
                                               "max_seq_len": 128},
                    output={"dir": str(out)}, echo=None, **SETTINGS)  # fmt: skip


def test_training_from_rows_in_memory_names_one_file_per_content(run, tiny, tmp_path):
    assert [r["step"] for r in run.metrics if r["kind"] == "train"] == [1, 2, 3]
    written = run.config.data.train
    assert written.startswith(str(run.dir.parent / ".data" / "train-"))
    assert _jsonl(written) == _rows("chat_train.jsonl")
    # the same rows from a file train the same adapter
    again = mt.train(model=tiny("llama"),
                     data={"train": str(DATA / "chat_train.jsonl"), "max_seq_len": 128},
                     output={"dir": str(tmp_path / "file")}, echo=None, **SETTINGS)  # fmt: skip
    losses = [[r["loss"] for r in x.metrics if r["kind"] == "train"] for x in (run, again)]
    assert losses[0] == losses[1]


def test_a_datasets_dataset_trains_like_its_rows(tiny, tmp_path):
    """A DatasetDict's train and validation splits (chat rows: a Dataset takes one schema, and
    gives null for the keys a row lacks, which must not reach the validator)."""
    datasets = pytest.importorskip("datasets")
    # the tool row first: Dataset.from_list takes its schema from the first row
    chats = [{"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
        "tools": [{"name": "weather", "parameters": {"city": "string"}}]}]  # fmt: skip
    chats += [r for r in _rows("chat_train.jsonl") if "messages" in r]
    valid = [r for r in _rows("chat_valid.jsonl") if "messages" in r]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(chats),
                                   "validation": datasets.Dataset.from_list(valid)})  # fmt: skip
    runs = [mt.train(model=tiny("llama"), data=data, output={"dir": str(tmp_path / name)},
                     echo=None, **SETTINGS)
            for name, data in (("ds", splits), ("rows", {"train": chats, "valid": valid}))]  # fmt: skip
    assert _jsonl(runs[0].config.data.train) == chats
    assert runs[0].config.data.valid == runs[1].config.data.valid  # the same content, one file
    curves = [[(r["kind"], r["loss"]) for r in x.metrics] for x in runs]
    assert curves[0] == curves[1] and ("valid", curves[0][-1][1]) == curves[0][-1]


def test_keyword_sections_are_checked_like_yaml(tiny):
    with pytest.raises(ConfigError) as e:
        mt.train(model=tiny("llama"), data=str(DATA / "chat_train.jsonl"), lora={"rnak": 8})
    assert str(e.value) == ("mlxtune.train(lora={'rnak': ...}): lora.rnak: unknown key; "
                            "did you mean lora.rank?")  # fmt: skip
    with pytest.raises(ConfigError, match=r"train\.iters: expected int, got str 'ten'$"):
        mt.train(model=tiny("llama"), data=str(DATA / "chat_train.jsonl"), train={"iters": "ten"})
    with pytest.raises(
        ConfigError, match=r"^mlxtune.train\(trian=...\): trian: unknown key; did you mean train\?$"
    ):
        mt.train(model=tiny("llama"), trian={"iters": 1})


def test_bad_rows_in_memory_get_the_validators_line(tiny, tmp_path):
    out = {"dir": str(tmp_path / "bad")}
    with pytest.raises(DataError, match=r"^data \(train\) row 1: expected a mapping, got str$"):
        mt.train(model=tiny("llama"), data=[{"text": "a"}, "b"], output=out, echo=None)
    broken = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": "oops"}]
    with pytest.raises(DataError) as e:
        mt.train(model=tiny("llama"), data=broken, output=out, echo=None, **SETTINGS)
    assert "\n" not in str(e.value) and ".jsonl:2:" in str(e.value), str(e.value)
    assert not (tmp_path / "bad").exists()


def test_generate_and_stream_give_the_cli_reply(run):
    model = run.load()
    question = "What colour is the sky?"
    reply = model.generate(question, max_tokens=12)
    assert "".join(model.stream(question, max_tokens=12)) == reply
    messages = [{"role": "user", "content": question}]
    assert model.generate(messages, max_tokens=12) == reply
    cli = subprocess.run([sys.executable, "-m", "mlxtune", "generate", "--model",
                          str(run.config.model.path), "--adapter", str(run.dir), "--prompt",
                          question, "--max-tokens", "12"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert cli.stdout == reply + "\n"


def test_evaluate_takes_a_run_a_model_or_a_config(run):
    valid = str(DATA / "chat_valid.jsonl")
    by_run = mt.evaluate(run, valid, max_rows=2)
    by_model = mt.evaluate(run.load(), valid, max_rows=2)
    cli = subprocess.run([sys.executable, "-m", "mlxtune", "eval", str(run.dir / "config.yaml"),
                          "--adapter", str(run.dir), "--data", valid, "--max-rows", "2"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert by_run == by_model == json.loads(cli.stdout)
    assert by_run["exact_match_rows"] == 2 and by_run["tokens"] > 0


def test_plot_shows_inline_and_metrics_are_the_files_rows(run):
    pytest.importorskip("matplotlib")
    plot = run.plot()
    assert plot.path == run.dir / "loss.png"
    assert plot._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (run.dir / "metrics.jsonl").read_text().splitlines()
    assert run.metrics == [json.loads(x) for x in lines]


def test_everything_public_has_a_docstring_and_type_hints():
    import inspect

    for name in mt.__all__:
        obj = getattr(mt, name)
        assert inspect.getdoc(obj), name
        members = [obj] if inspect.isfunction(obj) else [
            m for k, m in vars(obj).items() if not k.startswith("_") and callable(m)]  # fmt: skip
        for fn in members:
            sig = inspect.signature(fn)
            assert inspect.getdoc(fn), f"{name}.{fn.__name__}"
            missing = [p for p in sig.parameters.values() if p.name != "self"
                       and p.annotation is inspect.Parameter.empty]  # fmt: skip
            assert not missing and sig.return_annotation is not inspect.Signature.empty, \
                (name, fn.__name__, missing)  # fmt: skip


def test_the_twin_answers_as_mlx_does_through_the_same_calls(run):
    """`backend="cuda"` (the PyTorch twin, on the CPU here): the same greedy reply, streamed in
    pieces by transformers' TextIteratorStreamer."""
    pytest.importorskip("torch")
    question = "What colour is the sky?"
    mlx_reply = run.load().generate(question, max_tokens=12)
    twin = run.load(backend="cuda")
    assert twin.generate(question, max_tokens=12) == mlx_reply
    assert "".join(twin.stream(question, max_tokens=12)) == mlx_reply
