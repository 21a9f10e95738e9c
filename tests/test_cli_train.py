"""train / eval / generate / export / resume through the real console script, as a user runs
them, and the one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA, run_overrides

EXE = shutil.which("mlxtune", path=str(Path(sys.executable).parent)) or "mlxtune"


def mlxtune(*args) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))  # fmt: skip


def sets(*overrides: str) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("mlxtune: error:")]
    assert len(lines) == 1, r.stderr
    return lines[0].removeprefix("mlxtune: error: ")


@pytest.fixture(scope="module")
def cli_run(tiny, tmp_path_factory):
    """A run made by `mlxtune train`, and the config file it was made from."""
    folder = tmp_path_factory.mktemp("cli")
    config = folder / "config.yaml"
    config.write_text("train:\n  iters: 4\n")  # the --set below (iters 8) wins over the file
    run_dir = folder / "run"
    r = mlxtune("train", config, *sets(*run_overrides(tiny("llama"), run_dir)))
    assert r.returncode == 0, r.stderr
    return config, run_dir, r.stdout


def test_train_reports_progress_and_writes_the_run(cli_run):
    _, run_dir, stdout = cli_run
    assert "train: 12 rows" in stdout and "valid: 2 rows" in stdout
    assert "step 8/8" in stdout and "tok/s" in stdout and "peak" in stdout and "eta" in stdout
    assert (run_dir / "adapter_model.safetensors").is_file()


def test_eval_prints_json_metrics(cli_run, tiny):
    config, run_dir, _ = cli_run
    r = mlxtune("eval", config, "--adapter", run_dir, *sets(*run_overrides(tiny("llama"), run_dir)))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["loss"] > 0 and result["perplexity"] > 1 and result["tokens"] == 10
    assert result["exact_match_rows"] == 2 and 0 <= result["exact_match"] <= 1


def test_generate_and_export(cli_run, tiny, tmp_path):
    _, run_dir, _ = cli_run
    r = mlxtune("generate", "--model", tiny("llama"), "--adapter", run_dir, "--prompt", "Hi",
                "--max-tokens", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr  # the tuned model may well just end its turn
    r = mlxtune("generate", "--model", tiny("llama"), "--prompt", "Hi", "--max-tokens", "4")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = mlxtune("export", run_dir, tmp_path / "peft", "--format", "peft")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert "exists and is not empty" in one_error_line(
        mlxtune("export", run_dir, tmp_path / "peft", "--format", "mlx-lm")
    )


def test_resume_extends_a_run(cli_run, tmp_path):
    _, run_dir, _ = cli_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    r = mlxtune("train", "--resume", copy)
    assert r.returncode == 0 and "nothing to do: the run is at step 8" in r.stdout, r.stderr
    r = mlxtune("train", "--resume", copy, "--set", "train.iters=10")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout and "step 10/10" in r.stdout
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 10


def test_bad_data_is_one_line_and_writes_nothing(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = (DATA / "chat_train.jsonl").read_text().splitlines()[0]
    bad.write_text(good + "\n" + '{"messages": [{"role": "user", "content": "hi"}, '
                   '{"role": "assistant", "content": ""}]}\n')  # fmt: skip
    out = tmp_path / "run"
    r = mlxtune("train", DATA.parent.parent / "configs" / "tiny.yaml",
                *sets(*run_overrides(tiny("llama"), out), f"data.train={bad}"))  # fmt: skip
    assert one_error_line(r) == f"{bad}:2: messages[1].content: empty assistant turn"
    assert not out.exists()


def test_mismatched_adapter_and_reused_folders(cli_run, tiny, trained, tmp_path):
    config, run_dir, _ = cli_run
    gemma_run = trained("gemma4")
    msg = one_error_line(mlxtune("eval", config, "--adapter", gemma_run,
                                 *sets(*run_overrides(tiny("llama"), run_dir))))  # fmt: skip
    assert msg.startswith(f"{gemma_run}: adapter does not match the model")
    msg = one_error_line(mlxtune("train", config, *sets(*run_overrides(tiny("llama"), run_dir))))
    assert msg == (f"output.dir: {run_dir} is not empty; resume it with --resume {run_dir} "
                   "or set output.overwrite=true")  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text(Path(config).read_text())
    assert one_error_line(mlxtune("train", "--resume", empty)) == (
        f"{empty}: no checkpoint to resume from"
    )
