"""Data-parallel training on MLX: two ranks started by mlx.launch (ring backend over localhost)
against one process, a killed rank, resume rules, and the host checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _cli import EXE, mlxtune
from conftest import DATA
from safetensors.numpy import load_file

from mlxtune import demo, trainer
from mlxtune.config import load_config
from mlxtune.distributed import check_fingerprints, fingerprint, host_fingerprint
from mlxtune.errors import MlxtuneError
from mlxtune.progress import read_metrics

LAUNCH = str(Path(sys.executable).parent / "mlx.launch")
B = 256  # each rank's token budget; the one process gets 2 * B

pytestmark = pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch not installed")


def _settings(model: Path, **more) -> dict:
    text = {"path": str(model)}
    s = {
        "model": text,
        "data": {
            "train": str(DATA / "chat_train.jsonl"),
            "valid": str(DATA / "chat_valid.jsonl"),
            "max_seq_len": 128,
        },  # fmt: skip
        "lora": {"rank": 4, "alpha": 8},
        "train": {
            "iters": 6,
            "learning_rate": 1e-3,
            "report_every": 1,
            "save_every": 3,
            "eval_every": 3,
        },  # fmt: skip
    }
    for key, value in more.items():
        section, name = key.split("__")
        s[section][name] = value
    return s


def _config(folder: Path, settings: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(json.dumps(settings), encoding="utf-8")  # JSON is YAML
    return path


def _launch(config: Path, out: Path, budget: int, *extra: str, raw: bool = False):
    """Two ranks on this machine: through `mlxtune train --hosts`, or mlx.launch itself."""
    sets = ["--set", f"output.dir={out}", "--set", f"train.batch_tokens={budget}"]
    if raw:
        cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--python", sys.executable, "--",
               "-m", "mlxtune", "train", str(config), *sets, *extra]  # fmt: skip
    else:
        cmd = [EXE, "train", str(config), *sets, "--hosts", "localhost,localhost", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))


def _one_process(config: Path, out: Path, budget: int) -> Path:
    cfg = load_config(str(config), [f"output.dir={out}", f"train.batch_tokens={budget}"])
    return trainer.train(cfg, echo=lambda line: None)


def _curve(run: Path, kind: str = "train") -> list[tuple[int, float]]:
    return [
        (r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r["kind"] == kind
    ]


def _same_adapter(a: Path, b: Path, tol: float = 1e-5) -> float:
    """The largest per-tensor ||a - b|| / ||a||. Elementwise, Adam divides by sqrt(v): a moment
    near cancellation turns summation-order rounding (one sum over 2B rows, or two over B) into
    a larger relative change of that one element, so parity is judged per tensor."""
    x, y = (
        load_file(str(a / "adapter_model.safetensors")),
        load_file(str(b / "adapter_model.safetensors")),
    )
    assert x.keys() == y.keys()
    worst = max(float(np.linalg.norm(x[k] - y[k]) / np.linalg.norm(x[k])) for k in x)
    assert worst <= tol, worst
    return worst


@pytest.fixture(scope="module")
def media_task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    train_file, _ = demo.write_media_task(folder)
    small = folder / "small.jsonl"
    small.write_text("".join(train_file.read_text().splitlines(keepends=True)[:24]))
    return small


CASES = {
    "llama": {},
    "llama-packed-accum": {"data__packing": True, "train__grad_accum": 2},
    "gemma4-image-audio": {
        "data__max_seq_len": 256,
        "data__image_soft_tokens": 70,
        "train__iters": 4,
        "train__save_every": 0,
    },  # fmt: skip
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_take_the_steps_of_one_process_with_twice_the_budget(
    tiny, tmp_path, case, media_task
):
    """2 ranks with train.batch_tokens B: the same per-step losses, validation losses and final
    adapter as 1 process with 2B (fp32); one metrics row per report, written by rank 0 only."""
    arch = "gemma4" if case.startswith("gemma4") else "llama"
    settings = _settings(tiny(arch), **CASES[case])
    if arch == "gemma4":
        settings["data"] = {**settings["data"], "train": str(media_task)}
        settings["data"].pop("valid")
    config = _config(tmp_path, settings)
    one = _one_process(config, tmp_path / "one", 2 * B)
    got = _launch(config, tmp_path / "two", B, raw=case == "llama")
    assert got.returncode == 0, got.stdout + got.stderr
    two = tmp_path / "two"
    assert "2 data-parallel ranks" in got.stdout
    assert [s for s, _ in _curve(two)] == list(range(1, settings["train"]["iters"] + 1))
    np.testing.assert_allclose([v for _, v in _curve(two)], [v for _, v in _curve(one)], rtol=1e-5)
    np.testing.assert_allclose([v for _, v in _curve(two, "valid")],
                               [v for _, v in _curve(one, "valid")], rtol=1e-5)  # fmt: skip
    # the gradient's norm before clipping: clipping and AdamW would hide a wrong scale
    norms = [[r["grad_norm"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
             for run in (one, two)]  # fmt: skip
    np.testing.assert_allclose(norms[1], norms[0], rtol=1e-5, atol=1e-4)  # reported to 4 places
    _same_adapter(one, two)


def _rank_pid(rank: int, marker: str) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in env and marker.encode() in cmd:
            return int(proc.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks through /proc")
def test_a_killed_rank_stops_the_other_and_the_run_resumes_to_the_same_adapter(tiny, tmp_path):
    """SIGKILL rank 1 mid-run: rank 0 stops within seconds with one line, the command exits
    non-zero; --resume on 2 ranks ends with the adapter and losses of a straight 2-rank run."""
    settings = _settings(tiny("llama"), train__iters=60, train__save_every=10,
                         train__eval_every=0)  # fmt: skip
    config = _config(tmp_path, settings)
    straight = _launch(config, tmp_path / "straight", B)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    run = tmp_path / "killed"
    cmd = [EXE, "train", str(config), "--set", f"output.dir={run}", "--set",
           f"train.batch_tokens={B}", "--hosts", "localhost,localhost"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        rows = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
        if rows and rows[-1]["step"] >= 12:
            break
        time.sleep(0.05)
    pid = _rank_pid(1, str(run))
    assert pid is not None and proc.poll() is None, "the run ended before it could be killed"
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    out, _ = proc.communicate(timeout=60)
    assert time.time() - killed_at < 15
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("mlxtune: error")]
    assert errors and "lost another rank" in errors[0] and f"--resume {run}" in errors[0], out
    assert "Traceback" not in out
    assert read_metrics(run / "metrics.jsonl")[-1]["step"] < 60
    resumed = subprocess.run([EXE, "train", "--resume", str(run), "--hosts", "localhost,localhost"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout
    a, b = _curve(run), _curve(tmp_path / "straight")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 61))
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-5)
    _same_adapter(tmp_path / "straight", run)


@pytest.fixture(scope="module")
def two_rank_run(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_rank")
    config = _config(folder, _settings(tiny("llama")))
    got = _launch(config, folder / "run", B)
    assert got.returncode == 0, got.stdout + got.stderr
    return folder / "run"


def test_resume_on_another_rank_count_needs_the_same_global_batches(two_rank_run, tmp_path):
    """A 2-rank run resumed by one process with the same per-rank budget would plan other
    batches: refused in one line that names the budget that works, and with it, it resumes."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_rank_run, run)
    got = mlxtune("train", "--resume", run, "--set", "train.iters=8")
    assert got.returncode == 2 and "Traceback" not in got.stderr
    assert got.stderr.count("\n") == 1, got.stderr
    assert f"--set train.batch_tokens={2 * B}" in got.stderr, got.stderr
    got = mlxtune("train", "--resume", run, "--set", "train.iters=8",
                  "--set", f"train.batch_tokens={2 * B}")  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert [s for s, _ in _curve(run)] == list(range(1, 9))


def test_ranks_with_different_data_or_model_are_refused_in_one_line(tiny):
    """Every rank fingerprints its examples and model config; one that differs is named."""
    cfg = load_config(
        None, [f"model.path={tiny('llama')}", f"data.train={DATA / 'chat_train.jsonl'}"]
    )
    engine = trainer.setup(cfg)
    examples = engine.dataset(cfg.data.train).examples
    mine = fingerprint(examples, cfg.model.path)
    check_fingerprints([mine, list(mine)])
    other = engine.dataset(str(DATA / "chat_valid.jsonl")).examples[:1] + examples[1:]
    assert len(other) == len(examples)
    with pytest.raises(MlxtuneError, match="rank 1 has a different training data than rank 0"):
        check_fingerprints([mine, fingerprint(other, cfg.model.path)])
    with pytest.raises(MlxtuneError, match="rank 2 has a different model config.json"):
        check_fingerprints([mine, mine, fingerprint(examples, tiny("gemma4"))])


def test_doctor_checks_the_hosts_can_train_together(tiny, tmp_path):
    """doctor --hosts: every host's versions and files against the first's, then a real
    all-reduce over the launch train uses; a host that cannot be resolved is one line."""
    config = _config(tmp_path, _settings(tiny("llama")))
    got = mlxtune("doctor", "--hosts", "localhost,localhost", "--config", config)
    assert got.returncode == 0, got.stdout + got.stderr
    assert "all-reduce: 2 ranks" in got.stdout and "ready: 2 hosts" in got.stdout
    bad = mlxtune("doctor", "--hosts", "localhost,no-such-host.invalid")
    assert bad.returncode == 2 and "cannot resolve no-such-host.invalid" in bad.stderr
    assert bad.stderr.count("\n") == 1
    other = _settings(tiny("llama"))
    other["data"]["train"] = str(DATA / "chat_valid.jsonl")
    a = host_fingerprint(str(config))
    b = host_fingerprint(str(_config(tmp_path / "b", other)))
    from mlxtune.distributed import _differences

    diff = _differences(a, b)
    assert any("chat_valid.jsonl" in d or "chat_train.jsonl" in d for d in diff), diff
