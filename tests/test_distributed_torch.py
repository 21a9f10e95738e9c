"""Data-parallel training on the PyTorch twin, as `torchrun` runs it: two local processes on
the CPU (gloo). Two ranks with train.batch_tokens B take the steps of one process with 2 x B
(the same losses, the same adapter); a rank that dies stops the other with one line; a stopped
run resumes on two ranks, or on one with the batch budget doubled, and ends where a straight
run ends; on one rank with the same budget it is refused in one line.

Adapters are compared per tensor by ||a - b|| / ||a||: the two runs add the same gradients in
another order (each rank's share, then the all-reduce), and AdamW divides by the square root
of its second moment, which turns those last-bit differences into larger ones elementwise
wherever the moments are nearly cancelled; the norm of a tensor's difference stays near
float32 rounding: 1e-5 for the text runs. The tiny Gemma 4 on pictures and audio is less well
conditioned: its LoRA gradients move by 1e-6 to 1e-5 (relative) when the same rows of one
micro-batch merely come in another order in one process, and one process run with each
micro-batch's rows reversed ends ~1e-4 from the straight run (q_proj of layer 3); its bound
is therefore 5e-4, still far below what a wrong reduction gives (> 1e-1).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from conftest import DATA  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from cuda_backend import trainer as ttrainer  # noqa: E402
from mlxtune.config import load_config  # noqa: E402

B = 128  # train.batch_tokens of each rank (llama runs)
RANKS = 2
TIMEOUT = 240  # seconds, for one launch


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], sets: list[str], logs: Path | None = None) -> list[str]:
    """`torchrun --nproc_per_node 2 -m mlxtune train ARGS --set ...`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS),
           "--master_port", str(_port())]  # fmt: skip
    if logs is not None:  # each rank's stdout and stderr in its own file
        cmd += ["--redirects", "3", "--log-dir", str(logs)]
    return [*cmd, "-m", "mlxtune", "train", *args, *(a for s in sets for a in ("--set", s))]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    for _ in range(3):  # the free port may have been taken meanwhile: another one
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                           env=dict(os.environ))  # fmt: skip
        if "EADDRINUSE" not in r.stderr:
            break
        cmd[cmd.index("--master_port") + 1] = str(_port())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "config.yaml"
    path.write_text("model:\n  backend: cuda\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> tuple[Path, Path]:
    from mlxtune import demo

    return demo.write_media_task(tmp_path_factory.mktemp("media"), n_train=8, n_valid=3)


def _sets(model: Path, out: Path, tokens: int, *extra: str) -> list[str]:
    return [
        f"model.path={model}",
        f"output.dir={out}",
        f"data.train={DATA / 'chat_train.jsonl'}",
        f"data.valid={DATA / 'chat_valid.jsonl'}",
        "data.max_seq_len=128",
        "lora.rank=4",
        "lora.alpha=8",
        "lora.dropout=0",
        f"train.batch_tokens={tokens}",
        "train.learning_rate=1e-3",
        "train.lr_schedule=constant",
        "train.report_every=1",
        "train.eval_every=0",  # and at the end
        "train.save_every=0",
        *extra,
    ]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_run(one: Path, two: Path, adapter_rtol: float = 1e-5) -> tuple[float, float]:
    """The two runs' reports and final adapters agree; returns the largest relative loss
    difference and the largest ||a - b|| / ||a|| over the adapter's tensors."""
    a, b = _metrics(one), _metrics(two)
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for key in ("loss_tokens", "real_tokens", "tokens"):  # the global counts, exactly
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    la, lb = np.array([r["loss"] for r in a]), np.array([r["loss"] for r in b])
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    # the gradient's norm before clipping: clipping and AdamW would hide a wrong scale
    ga, gb = ([r["grad_norm"] for r in rows if r["kind"] == "train"] for rows in (a, b))
    # reported to 4 decimals; after AdamW steps of a full fine-tune, float32 sums taken in
    # another order move it by up to 4e-5 (a wrong scale, e.g. FSDP's mean, moves it by 50%)
    np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-4)
    wa, wb = (load_file(str(_weights_file(d))) for d in (one, two))
    assert wa.keys() == wb.keys()
    rel = {k: float(np.linalg.norm(wa[k] - wb[k]) / max(np.linalg.norm(wa[k]), 1e-30))
           for k in wa}  # fmt: skip
    worst = max(rel, key=rel.get)
    assert rel[worst] <= adapter_rtol, (worst, rel[worst])
    assert all(np.linalg.norm(v) > 0 for k, v in wa.items() if "lora_B" in k)  # it trained
    return float(np.max(np.abs(lb - la) / np.abs(la))), rel[worst]


def _weights_file(run_dir: Path) -> Path:
    """The adapter, or the weights of a full fine-tune."""
    adapter = run_dir / "adapter_model.safetensors"
    return adapter if adapter.is_file() else run_dir / "trainable.safetensors"


CASES = {  # name -> (tiny family, per-rank batch_tokens, overrides, adapter rtol)
    "llama": ("llama", B, ["train.iters=5"], 1e-5),
    # packed rows: 2 to a global micro-batch, and a last one of 1 row, where rank 1 has none
    "llama-packed": (
        "llama",
        B,
        ["data.packing=true", "train.grad_accum=2", "train.iters=4"],
        1e-5,
    ),  # fmt: skip
    # pictures and audio: each rank's share mixes both kinds, or holds audio alone
    "gemma4-media": (
        "gemma4",
        256,
        ["data.max_seq_len=512", "data.image_soft_tokens=70", "train.iters=4"],
        5e-4,
    ),  # fmt: skip
    # sharded (FSDP2): full fine-tuning shards always, LoRA when train.shard is on
    "llama-full-sharded": ("llama", B, ["lora.method=full", "train.iters=5"], 1e-5),
    "llama-packed-sharded": (
        "llama",
        B,
        ["train.shard=true", "data.packing=true", "train.grad_accum=2", "train.iters=4"],
        1e-5,
    ),  # fmt: skip
    "gemma4-media-full-sharded": (
        "gemma4",
        256,
        ["lora.method=full", "data.max_seq_len=512", "data.image_soft_tokens=70", "train.iters=4"],
        5e-4,
    ),  # fmt: skip
}
SLOW_CASES = {"gemma4-media-full-sharded"}  # in test-all


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW_CASES else []) for c in
             sorted(CASES)]
)  # fmt: skip
def test_two_ranks_take_the_steps_of_one_process_with_twice_the_batch(
    case, tiny, config, media, tmp_path
):
    arch, tokens, extra, adapter_rtol = CASES[case]
    if arch == "gemma4":
        extra = [*extra, f"data.train={media[0]}", f"data.valid={media[1]}"]
    model = tiny(arch)
    two = tmp_path / "two" / "run"
    sets = _sets(model, two, tokens, *extra)
    if case == "llama":  # through `mlxtune train --gpus 2`, which starts torchrun itself
        r = _run([sys.executable, "-m", "mlxtune", "train", str(config),
                  *(a for s in sets for a in ("--set", s)), "--gpus", str(RANKS)])  # fmt: skip
    else:
        r = _run(_launch([str(config)], sets))
    one = ttrainer.train(
        load_config(None, ["model.backend=cuda", *_sets(model, tmp_path / "one" / "run",
                                                         RANKS * tokens, *extra)]),
        echo=lambda line: None,
    )  # fmt: skip
    loss_diff, adapter_diff = _same_run(one, two, adapter_rtol)
    print(f"{case}: losses within {loss_diff:.1e} (relative), adapter within {adapter_diff:.1e}")
    # rank 0 alone speaks and writes
    assert r.stdout.count("step 1/") == 1 and r.stdout.count("done: ") == 1, r.stdout
    assert f"{RANKS} data-parallel ranks" in r.stdout
    held = re.search(r"FSDP2: each holds ([\d,]+) of the ([\d,]+) parameters", r.stdout)
    assert (held is not None) == case.endswith("-sharded"), r.stdout
    if held:  # each rank keeps its half of every tensor (FSDP pads a shard to whole rows)
        mine, total = (int(x.replace(",", "")) for x in held.groups())
        assert total / RANKS <= mine <= total / RANKS * 1.01, (mine, total)


@pytest.mark.slow
def test_a_sharded_run_resumes_on_two_ranks_and_on_one_to_the_straight_runs_weights(
    tiny, config, tmp_path
):
    """A full fine-tune on two ranks (FSDP2) writes whole tensors in the usual layout: its
    checkpoint resumes sharded on two ranks, or in one process with the global budget."""
    model, straight = tiny("llama"), tmp_path / "straight"
    extra = ["lora.method=full", "train.iters=4", "train.save_every=2", "output.keep_checkpoints=0"]
    _run(_launch([str(config)], _sets(model, straight, B, *extra)))
    for name, how in (("two", "ranks"), ("one", "process")):
        run_dir = tmp_path / name
        shutil.copytree(straight, run_dir)
        shutil.rmtree(run_dir / "checkpoints" / "step-0000004")
        (run_dir / "trainable.safetensors").unlink()
        if how == "ranks":
            r = _run(_launch(["--resume", str(run_dir)], []))
            assert "resuming" in r.stdout and "FSDP2" in r.stdout, r.stdout
        else:
            cfg = load_config(run_dir / "config.yaml",
                              [f"output.dir={run_dir}", f"train.batch_tokens={RANKS * B}"])  # fmt: skip
            ttrainer.train(cfg, resume=True, echo=lambda line: None)
        loss_diff, weights_diff = _same_run(straight, run_dir)
        print(f"resumed ({name}): losses within {loss_diff:.1e}, weights within {weights_diff:.1e}")


# --------------------------------------------------------------------- a rank dies, and resuming

# Sixteen steps, so the run is still going when rank 1 is killed after the step-2 checkpoint.
# Reports every 5 steps: most checkpoints then hold part of a report's window, whose loss must
# be the sum over the ranks (and a resumed rank 1 must start its part at 0).
KILLED = ["train.iters=16", "train.save_every=2", "train.report_every=5"]


@pytest.fixture(scope="module")
def straight(tiny, config, tmp_path_factory) -> Path:
    """The 16-step run on two ranks, never stopped."""
    out = tmp_path_factory.mktemp("straight") / "run"
    _run(_launch([str(config)], _sets(tiny("llama"), out, B, *KILLED)))
    return out


def _rank_pid(rank: int, marker: str) -> int | None:
    """The process of this rank (torchrun's RANK in its environment) of the run whose command
    line holds `marker`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and marker.encode() in cmdline:
            return int(proc.name)
    return None


@pytest.fixture(scope="module")
def killed(tiny, config, tmp_path_factory):
    """The same run with rank 1 killed (SIGKILL) after the step-2 checkpoint: its folder, a
    copy of it (for test_resuming_on_one_process...), rank 0's stderr and the seconds from the
    kill to the launcher's exit."""
    root = tmp_path_factory.mktemp("killed")
    out, logs = root / "run", root / "logs"
    with open(root / "torchrun.log", "w") as log:
        p = subprocess.Popen(_launch([str(config)], _sets(tiny("llama"), out, B, *KILLED), logs),
                             stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))  # fmt: skip
        try:
            deadline = time.monotonic() + TIMEOUT
            while not (out / "checkpoints" / "step-0000002").is_dir():
                assert p.poll() is None, (root / "torchrun.log").read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.01)
            pid = _rank_pid(1, str(out))
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            t0 = time.monotonic()
            p.wait(timeout=120)
            took = time.monotonic() - t0
        finally:
            if p.poll() is None:
                p.kill()
    assert p.returncode != 0
    assert not (out / "adapter_model.safetensors").exists(), "the run ended before the kill"
    rank0 = next(logs.glob("*/attempt_0/0/stderr.log")).read_text()
    copy = root / "copy"
    shutil.copytree(out, copy)
    return out, copy, rank0, took


@pytest.mark.slow
def test_a_killed_rank_stops_the_other_in_one_line_and_the_run_resumes_on_two_ranks(
    killed, straight, config
):
    run_dir, _, rank0, took = killed
    assert took < 30, took
    line = _one_error_line(rank0, " (rank 0 of 2)")
    # gloo's closed connection, or torchrun's SIGTERM when it saw rank 1 die first
    assert line.startswith("mlxtune: error (rank 0 of 2): stopped: lost another rank ("), line
    assert "lost another rank" in line and "--resume" in line, line
    r = _run(_launch(["--resume", str(run_dir)], []))
    assert "resuming" in r.stdout
    loss_diff, adapter_diff = _same_run(straight, run_dir)
    print(f"resumed on 2 ranks: losses within {loss_diff:.1e}, adapter within {adapter_diff:.1e}")


def _one_error_line(text: str, tag: str = "") -> str:
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("mlxtune: error")]
    assert len(errors) == 1, text
    assert errors[0].startswith(f"mlxtune: error{tag}: "), errors[0]
    return errors[0]


def test_resuming_on_other_global_batches_is_refused_on_every_rank_in_one_line(
    killed, config, tmp_path
):
    """Twice the per-rank budget on two ranks plans other global batches: rank 0 finds out,
    and every rank stops with its line (none waits for the checkpoint)."""
    _, run_dir, _, _ = killed
    logs = tmp_path / "logs"
    cmd = _launch(["--resume", str(run_dir)], [f"train.batch_tokens={RANKS * B}"], logs)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=dict(os.environ))
    assert r.returncode != 0
    for rank in range(RANKS):
        text = next(logs.glob(f"*/attempt_0/{rank}/stderr.log")).read_text()
        line = _one_error_line(text, f" (rank {rank} of {RANKS})")
        assert "the run was trained on 2 ranks" in line, line


def test_resuming_on_one_process_needs_the_same_global_batches(killed, straight):
    _, run_dir, _, _ = killed
    r = subprocess.run([sys.executable, "-m", "mlxtune", "train", "--resume", str(run_dir)],
                       capture_output=True, text=True, timeout=TIMEOUT, env=dict(os.environ))  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    line = _one_error_line(r.stderr)
    assert "trained on 2 ranks" in line and f"--set train.batch_tokens={RANKS * B}" in line
    cfg = load_config(run_dir / "config.yaml",
                      [f"output.dir={run_dir}", f"train.batch_tokens={RANKS * B}"])  # fmt: skip
    ttrainer.train(cfg, resume=True, echo=lambda line: None)
    loss_diff, adapter_diff = _same_run(straight, run_dir)
    print(f"resumed on 1 process: losses within {loss_diff:.1e}, adapter within {adapter_diff:.1e}")
