"""`mlxtune plan`: the counts are transformers', the Maverick / Scout arithmetic is the
research's, and on runs small enough to make here, the planned peak is the measured one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlxtune import plan
from mlxtune.config import load_config

ROOT = Path(__file__).resolve().parents[1]
EXE = shutil.which("mlxtune", path=str(Path(sys.executable).parent)) or "mlxtune"
GIB = 2**30


def recipe(name: str, *overrides: str):
    return load_config(ROOT / "configs" / f"llama4-{name}-24gb.yaml", list(overrides))


@pytest.mark.parametrize("name, total", [("Maverick-17B-128E", 401_583_781_376),
                                         ("Scout-17B-16E", 108_641_793_536)])  # fmt: skip
def test_the_formula_counts_what_transformers_builds(name, total):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = json.loads((plan.KNOWN / f"meta-llama--Llama-4-{name}-Instruct.json").read_text())
    counts = plan.counts_from_config(config)
    with torch.device("meta"):
        model = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(**config))
    assert counts.total == total == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert counts.routed_experts == experts


def test_headers_and_formula_agree_on_a_local_checkpoint(tiny):
    folder = tiny("llama4")
    by_headers = plan.counts_from_headers(folder)
    by_formula = plan.counts_from_config(json.loads((folder / "config.json").read_text()))
    for field in ("routed_experts", "dense_ffn", "attention", "shared_expert", "router", "embed",
                  "head", "towers"):  # fmt: skip
        assert getattr(by_headers, field) == getattr(by_formula, field), field


def test_maverick_on_24_gb_matches_the_research_arithmetic():
    counts = plan.plan(recipe("maverick")).counts
    assert counts.routed_experts * plan.NF4_BITS / 8 / GIB == pytest.approx(185.71, abs=0.01)
    vram = []
    for tokens in (2048, 8192, 16384):
        p = plan.plan(recipe("maverick", f"data.max_seq_len={tokens}", "train.batch_size=1"),
                      24, 256)  # fmt: skip
        vram.append(p.gpu / GIB)
        assert p.fits and 198 <= p.host / GIB <= 211
        assert p.streamed_per_step / 1e9 == pytest.approx(398.8, abs=0.1)  # forward + backward
    assert 14 <= vram[0] < vram[1] < vram[2] <= 19
    scout = plan.plan(recipe("scout"), 24, 96)
    assert scout.counts.routed_experts * plan.NF4_BITS / 8 / GIB == pytest.approx(46.43, abs=0.01)
    assert scout.fits and scout.streamed_per_step / 1e9 == pytest.approx(99.7, abs=0.1)
    small = plan.plan(recipe("maverick"), 16, 192)
    assert not small.fits and "does not fit: 205" in small.verdict()


def test_the_planned_peak_is_the_measured_one_on_small_runs(tmp_path):
    """Three small MLX runs (a Llama and a Gemma 4 shape with real-sized vocabularies, with and
    without gradient checkpointing): MLX's measured peak within 20% of the plan."""
    from mlxtune.tiny import Sizes, make_tiny
    from mlxtune.trainer import train

    rng = np.random.default_rng(0)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "weather",
        "today",
        "sunny",
        "cloudy",
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": " ".join(rng.choice(words, 150))},
        {"role": "assistant", "content": " ".join(rng.choice(words, 150))}]}) + "\n"
        for _ in range(32)))  # fmt: skip
    cases = [("llama", Sizes(512, 4, 32000), ["data.max_seq_len=256", "train.batch_size=4"]),
             ("llama", Sizes(512, 4, 32000), ["data.max_seq_len=256", "train.batch_size=4",
                                              "train.grad_checkpoint=true"]),
             ("gemma4", Sizes(256, 4, 65536), ["data.max_seq_len=256", "train.batch_size=4"])]  # fmt: skip
    for i, (arch, sizes, extra) in enumerate(cases):
        model = tmp_path / f"{arch}-{i}"
        make_tiny(model, arch, sizes=sizes)
        cfg = load_config(None, [f"model.path={model}", f"data.train={data}", "model.dtype=float32",
                                 f"output.dir={tmp_path / f'run{i}'}", "train.iters=4",
                                 "train.report_every=2", "train.eval_every=0",
                                 "train.save_every=0", *extra])  # fmt: skip
        run_dir = train(cfg, echo=lambda line: None)
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        measured = max(r["peak_memory_gb"] for r in rows) * 1e9
        planned = plan.plan(cfg).gpu
        assert 0.8 <= planned / measured <= 1.2, (arch, extra, planned / GIB, measured / GIB)


def test_the_command_prints_the_table_and_exits_1_when_it_does_not_fit():
    config = ROOT / "configs" / "llama4-maverick-24gb.yaml"
    ok = subprocess.run([EXE, "plan", str(config), "--vram-gb", "24", "--ram-gb", "256"],
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "401,583,781,376 parameters" in ok.stdout and "routed experts" in ok.stdout
    assert "streamed host -> GPU per optimizer step: 398.8 GB" in ok.stdout
    short = subprocess.run([EXE, "plan", str(config), "--vram-gb", "12", "--ram-gb", "256",
                            "--json"], capture_output=True, text=True)  # fmt: skip
    assert short.returncode == 1
    result = json.loads(short.stdout)
    assert result["params"]["routed_experts"] == 386_547_056_640
    assert result["verdict"].startswith("does not fit")
    mac = subprocess.run([EXE, "plan", str(config), "--set", "model.backend=mlx", "--set",
                          "model.offload_experts=false", "--set", "train.grad_checkpoint=true",
                          "--vram-gb", "512"], capture_output=True, text=True)  # fmt: skip
    assert mac.returncode == 0 and "fits:" in mac.stdout and "unified memory" in mac.stdout
