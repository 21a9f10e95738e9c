"""The real console script, run as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlxtune import env

EXE = shutil.which("mlxtune", path=str(Path(sys.executable).parent)) or "mlxtune"


def run(*args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", env.NO_REEXEC)}
    environ.update(extra_env or {})
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=environ, timeout=120)


def test_help_lists_the_commands():
    r = run("--help")
    assert r.returncode == 0
    for name in [
        "train",
        "eval",
        "generate",
        "export",
        "data",
        "plan",
        "plot",
        "doctor",
        "demo",
        "fusion",
        "config",
    ]:
        assert f"  {name} " in r.stdout


def test_misspelt_key_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lora:\n  rnak: 8\n")
    r = run("train", str(cfg))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"mlxtune: error: {cfg}:2: lora.rnak: unknown key; did you mean lora.rank?"
    ]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_bad_override_exits_2():
    cfg = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    r = run("train", str(cfg), "--set", "train.learning_rate=fast")
    assert r.returncode == 2
    assert "--set train.learning_rate=fast: train.learning_rate: expected float" in r.stderr


def test_missing_model_folder_is_one_line(tmp_path):
    cfg = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    r = run("train", str(cfg), "--set", f"model.path={tmp_path / 'nowhere'}",
            "--set", f"output.dir={tmp_path / 'run'}")  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"mlxtune: error: model.path: folder not found: {tmp_path / 'nowhere'}"
    )
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def test_config_prints_resolved_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora:\n  rank: 4\n")
    r = run("config", str(cfg), "--set", "train.learning_rate=3e-4")
    assert r.returncode == 0
    assert "  rank: 4\n" in r.stdout and "learning_rate: 0.0003" in r.stdout
    keys = run("config", "--keys")
    assert "lora.rank" in keys.stdout and "LoRA rank r" in keys.stdout


def test_doctor_reports_the_machine():
    r = run("doctor")
    assert r.returncode == 0, r.stderr
    for label in ("platform", "memory", "mlx", "matmul", "torch", "disk"):
        assert any(line.startswith(label) for line in r.stdout.splitlines()), label


@pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or env.openblas_path() is None
    or env.bundled_blas() is None,
    reason="needs Linux, mlx[cpu] and Debian's libopenblas0-pthread",
)
def test_mlx_commands_reexec_with_openblas():
    fast = run("doctor")
    assert "OpenBLAS (preloaded)" in fast.stdout
    slow = run("doctor", extra_env={env.NO_REEXEC: "1"})
    assert "bundled reference BLAS" in slow.stdout


def test_without_openblas_the_cli_prints_how_to_get_it(monkeypatch):
    if not sys.platform.startswith("linux") or env.bundled_blas() is None:
        pytest.skip("only mlx[cpu] on Linux bundles the slow BLAS")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(env, "openblas_path", lambda: None)
    hint = env.use_fast_blas(["doctor"])
    assert hint is not None and env.APT_HINT in hint and "\n" not in hint
